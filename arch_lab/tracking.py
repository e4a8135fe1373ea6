"""MLflow bookkeeping for a run: flattened path-free params, text artifacts, metrics, the git commit."""
from __future__ import annotations

import os
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from components.config import ConfigError

RESUMED_FROM_TAG = "resumed_from_run"  # a resumed run's tag: the id of the run whose checkpoint it resumed
PROCESS_TAG = "process"  # a run's tag: <host>:<pid> of the process that trains it
_MAX_PARAM_LEN = 500  # MLflow's limit on a param value is larger; long lists are truncated for readability


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def loggable_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as flat params, with paths made relative to the data root and never absolute, and
    passwords in URLs hidden."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    roots = _data_roots(resolved.get("data_root"))
    return {key: (value if isinstance(value, str) else str(value))[:_MAX_PARAM_LEN]
            for key, value in flatten(_path_free(resolved, roots)).items()}


def loggable_config_yaml(cfg: DictConfig) -> str:
    """The config as composed (interpolations kept, as the run's config.yaml artifact), its values made loggable
    as the params are."""
    import yaml

    roots = _data_roots(OmegaConf.select(cfg, "data_root"))
    return yaml.safe_dump(_path_free(OmegaConf.to_container(cfg, resolve=False), roots), sort_keys=False)


def _path_free(node: Any, roots: list[str]) -> Any:
    """`node` with every string in it, at any depth, made loggable (_loggable)."""
    if isinstance(node, dict):
        return {key: _path_free(value, roots) for key, value in node.items()}
    if isinstance(node, list):
        return [_path_free(value, roots) for value in node]
    return _loggable(node, roots) if isinstance(node, str) else node


def _data_roots(root: Any) -> list[str]:
    return [str(Path(root).resolve()), str(root)] if root else []


def _loggable(text: str, roots: list[str]) -> str:
    text = redact_url(text) if "://" in text else text  # postgresql://user:pw@host
    for prefix in roots:
        text = text.replace(prefix, "<data_root>")
    return hide_absolute_path(text)


def lab_experiment() -> str:
    """The experiment `python -m arch_lab` and the bench log to by default (conf/logger: logger.experiment_name)."""
    return str(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "logger" / "mlflow.yaml").experiment_name)


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***, for params, tags and logs."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL (e.g. http://host for MLflow): nothing to hide there
        return url


def hide_absolute_path(text: str) -> str:
    """An absolute path, or a URL to one (sqlite:////abs/path.db), reduced to its file name under `<abs>/`: logged
    values must not carry a machine's directory layout."""
    scheme, sep, rest = text.partition(":///")
    if sep and (os.path.isabs(rest) or scheme == "file"):  # file:///home/x is /home/x; sqlite:///x.db is relative
        return f"{scheme}:///<abs>/{Path(rest).name}"
    if os.path.isabs(text):
        return "<abs>/" + Path(text).name
    return text


def sqlite_path(url: str) -> Optional[Path]:
    """The database file of a SQLite URL (relative as written); None for other URLs and in-memory databases."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def existing_store(uri: str, flag: str) -> str:
    """`uri`, once it is known to name an MLflow store that exists: MLflow creates a SQLite file or a store directory
    on first use, so a mistyped path given to a tool that only reads (report, merge_stores --from, compare_runs)
    would make an empty store and report nothing. Servers and database URLs are left to MLflow."""
    if "://" not in uri and Path(uri).is_file():  # MLflow would read it as a file store, a directory, and fail
        raise SystemExit(f"{flag} {uri}: expected an MLflow store URI, e.g. sqlite:///{uri} for a SQLite file")
    if "://" not in uri:
        path = Path(uri)  # a plain directory: MLflow's file store
    elif uri.startswith("file://"):
        path = Path(uri.removeprefix("file://"))
    elif uri.startswith("sqlite:"):
        path = sqlite_path(uri)
    else:
        try:
            check_tracking_uri(uri, flag, file_store_ok=True)
        except ConfigError as error:
            raise SystemExit(str(error)) from None
        return uri
    if path is not None and not path.exists():
        raise SystemExit(f"{flag} {uri}: no MLflow store there ({path} does not exist)")
    check_sqlite_store(uri, flag)
    return uri


def check_tracking_uri(uri: str, key: str, file_store_ok: bool = False, probe_server: bool = True) -> None:
    """Refuse, in one line naming the setting (`key`, e.g. logger.tracking_uri or --tracking-uri), a tracking URI that
    MLflow would fail on only once a run opens, with a long traceback: a scheme it has no store for, a path or
    file: URI (MLflow refuses file stores unless MLFLOW_ALLOW_FILE_STORE=true; readers may pass `file_store_ok`),
    or a server whose host and port take no connection (MLflow retries for minutes before it gives up)."""
    from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry
    from mlflow.utils.uri import get_uri_scheme

    named = f"{key}={redact_url(uri)}"
    known = sorted(s for s in _tracking_store_registry._registry if s)  # MLflow's stores by URI scheme
    # as MLflow reads a URI: "databricks" alone names a store, postgresql+psycopg2:// is postgresql's
    scheme = uri if uri in known else get_uri_scheme(uri)
    if scheme in ("", "file") and not (file_store_ok or MLFLOW_ALLOW_FILE_STORE.get()):
        local = uri if uri.endswith(".db") and scheme == "" else "mlruns.db"
        raise ConfigError(f"{named}: MLflow refuses file stores (a path or file: URI) unless MLFLOW_ALLOW_FILE_STORE="
                          f"true; use sqlite:///{local} for a local store, or http(s)://<host>:<port> for a server")
    if scheme not in known + [""]:
        raise ConfigError(f"{named}: MLflow has no store for {scheme}:// URIs; allowed schemes: {', '.join(known)}")
    if scheme in ("http", "https") and probe_server:
        _check_server_listens(uri, named)


def _check_server_listens(uri: str, named: str) -> None:
    """A TCP connection to the server's host and port: its login, TLS and paths stay MLflow's business."""
    import socket
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(uri)
        address = (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
        socket.create_connection(address, timeout=10).close()
    except (OSError, ValueError) as error:  # refused, no such host, a timeout; a port that is no number
        raise ConfigError(f"{named}: no server takes connections there ({error}); start one (mlflow server --host "
                          f"127.0.0.1 --port <port>) or give another URI") from None


def check_sqlite_store(uri: str, flag: str, empty_ok: bool = False) -> None:
    """Refuse a SQLite file of `uri` that is not an MLflow store: MLflow fails on one that is not a database with a
    raw DatabaseError, and writes its tables into one without them (fine only for a new store: `empty_ok`)."""
    import sqlite3
    from contextlib import closing

    path = sqlite_path(uri) if uri.startswith("sqlite:") else None
    if path is None or not path.is_file():
        return
    try:  # read-only: a store being checked is not changed
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as error:
        raise SystemExit(f"{flag} {uri}: {path} is not an MLflow SQLite store ({error})") from None
    if "experiments" not in tables and (tables or not empty_ok):
        held = f"its tables: {', '.join(sorted(tables))}" if tables else "an empty database"
        raise SystemExit(f"{flag} {uri}: {path} is not an MLflow SQLite store ({held})")


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def end_if_its_process_died(client: Any, run_id: str, resumed_by: str) -> bool:
    """Mark KILLED a run that is still RUNNING although its process, on this host, is gone: a SIGKILL (or a lost
    machine) ends a process without a word to MLflow. Only a resume, which knows the run it continues, finds out.
    A run of another host or store, or whose process id is alive (perhaps reused), is left as it is."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:  # the checkpoint's run is in another store
        return False
    host, _, pid = run.data.tags.get(PROCESS_TAG, "").rpartition(":")
    if run.info.status != "RUNNING" or host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        return False
    except PermissionError:  # it exists, under another user
        return False
    except ProcessLookupError:
        client.set_terminated(run_id, "KILLED")
        client.set_tag(run_id, "ended_by", f"its process was gone when run {resumed_by} resumed it")
        return True


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def backends_tag() -> str:
    """Which kernel packages import here and whether CUDA is up, e.g. "causal_conv1d=ok, mamba_ssm=ok, cuda=ok":
    with backend=auto this is what decides kernel or reference for every op of the run."""
    from components.ops.backend import describe_backends

    return ", ".join(f"{name}={outcome.split(' ')[0]}" for name, outcome in describe_backends().items())


def log_text_artifact(text: str, file_name: str) -> None:
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / file_name
        path.write_text(text)
        mlflow.log_artifact(str(path))


def log_metrics(metrics: dict[str, float], step: Optional[int] = None) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
