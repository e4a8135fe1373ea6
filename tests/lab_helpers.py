"""Shared helpers for the lab's own tests: run `python -m arch_lab` in a subprocess and read back its MLflow runs.

Every run works in its own directory (cwd) with its own SQLite MLflow store, copied from one empty store
created once per test process: creating MLflow's schema takes seconds on a 2-core machine.
"""
from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
# The shared data sets, where conf/train.yaml looks for them too (data_root: $ARCH_LAB_DATA_ROOT or ../shared/data).
DATA_ROOT = Path(os.environ.get("ARCH_LAB_DATA_ROOT") or REPO.parent / "shared" / "data").resolve()
EXPERIMENT_NAME = "arch_lab"  # conf/logger/mlflow.yaml
RUN_DIR_NAME = "out"

# A few optimizer steps on a few MQAR batches, and a token-sized decode benchmark: seconds, not minutes.
TINY = (
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=2",
    "data.train_examples=192",
    "data.test_examples=64",
    "eval.decode.new_tokens=2",
    "eval.decode.context=16",
    "eval.decode.batch=2",
)
# Text runs: a short byte-level corpus slice, short sequences and short passkey prompts.
TINY_TEXT = (
    "data=text_shakespeare",
    "data.seq_len=64",
    "data.batch_size=4",
    "data.max_train_tokens=8192",
    "data.max_eval_tokens=2048",
    "eval.passkey.seq_len=128",  # the needle, question and answer alone take 103 bytes
    "eval.passkey.num_per_depth=1",
    "eval.analysis.seq_len=32",
)


def tracking_uri(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'mlruns.db'}"


def lab_env() -> dict[str, str]:
    """The parent's environment without sweep/MLflow variables, one thread per process (the machine is shared)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARCH_LAB_", "MLFLOW_"))}
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@functools.lru_cache(maxsize=None)
def _empty_store() -> Path:
    from mlflow import MlflowClient

    folder = tempfile.mkdtemp(prefix="arch_lab_mlflow_template_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # one per test process, not left in /tmp
    path = Path(folder) / "mlruns.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the schema
    return path


def prepare_workdir(workdir: Path) -> Path:
    """Give `workdir` an empty MLflow store (no experiments but Default: runs create `arch_lab` themselves)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "mlruns.db").exists():
        shutil.copy(_empty_store(), workdir / "mlruns.db")
    return workdir


def lab_command(args: Sequence[str], workdir: Path, run_dir: Optional[Path] = None) -> list[str]:
    """`python -m arch_lab ARGS` plus the overrides that keep a run inside `workdir`, but for a key ARGS set."""
    keep_inside = {"data_root": DATA_ROOT, "logger.tracking_uri": tracking_uri(workdir),
                   "hydra.run.dir": run_dir or workdir / RUN_DIR_NAME, "trainer.enable_progress_bar": "false"}
    given = {arg.split("=", 1)[0].lstrip("+~") for arg in args}
    return [sys.executable, "-m", "arch_lab", *args, *(f"{k}={v}" for k, v in keep_inside.items() if k not in given)]


def run_lab(args: Sequence[str], tmp_path: Path, check: bool = True, run_dir: Optional[Path] = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `python -m arch_lab` in `tmp_path` (its MLflow store is `tmp_path/mlruns.db`); with `check`, a
    non-zero exit fails the test and shows the end of the output."""
    prepare_workdir(tmp_path)
    proc = subprocess.run(lab_command(args, tmp_path, run_dir), cwd=tmp_path, env=lab_env(), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"python -m arch_lab {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def start_lab(args: Sequence[str], tmp_path: Path, run_dir: Optional[Path] = None) -> subprocess.Popen[str]:
    """Like run_lab, without waiting (output goes to tmp_path/lab.log)."""
    prepare_workdir(tmp_path)
    with open(tmp_path / "lab.log", "w") as log:  # the child keeps its own handle
        return subprocess.Popen(lab_command(args, tmp_path, run_dir), cwd=tmp_path, env=lab_env(), stdout=log,
                                stderr=subprocess.STDOUT, text=True)


_ERROR_LINE = re.compile(r"^\[[^]]*\]\[arch_lab\]\[ERROR\] - (.*)$")


def error_messages(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The messages the lab logged at ERROR level (on stdout, Hydra's console), after checking that the run printed
    no traceback: a bad input or a diverged run gets one line."""
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-4000:]
    return [m.group(1) for line in proc.stdout.splitlines() if (m := _ERROR_LINE.match(line))]


# ----------------------------------------------------------------------------------------------- MLflow


def client(tmp_path: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri(tmp_path))


def lab_runs(tmp_path: Path) -> list:
    """Every run of the lab's experiment in tmp_path's store (none if the experiment was never created)."""
    c = client(tmp_path)
    experiment = c.get_experiment_by_name(EXPERIMENT_NAME)
    if experiment is None:
        return []
    from mlflow.entities import ViewType

    return c.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL)


def only_run(tmp_path: Path):
    runs = lab_runs(tmp_path)
    assert len(runs) == 1, f"expected one MLflow run, found {[(r.info.run_id, r.info.status) for r in runs]}"
    return runs[0]


def metric_history(tmp_path: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs in the order they were logged."""
    history = sorted(client(tmp_path).get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))
    return [(m.step, m.value) for m in history]


def last_logged(tmp_path: Path, run_id: str, key: str) -> float:
    """The value logged last (the end-of-run evaluation for keys that training also logs)."""
    return metric_history(tmp_path, run_id, key)[-1][1]


def mqar_acc_from_slices(run) -> float:
    """recall/mqar_acc recomputed from the run's logged per-slice accuracies (recall/mqar_acc_kv<k>): a slice weighs
    by its supervised positions, k queries in each of its examples, data.test_examples split evenly over the
    data.num_kv_pairs_test slices (the first slices take the remainder). Not the mean of the slices: an 8-pair
    slice holds 8 times the queries of a 1-pair one."""
    slices = [int(k) for k in run.data.params["data.num_kv_pairs_test"].strip("[]").split(",")]
    examples = int(run.data.params["data.test_examples"])
    rows = [examples // len(slices) + (i < examples % len(slices)) for i in range(len(slices))]
    queries = {k: k * n for k, n in zip(slices, rows)}
    return sum(run.data.metrics[f"recall/mqar_acc_kv{k}"] * q for k, q in queries.items()) / sum(queries.values())


def artifact_paths(tmp_path: Path, run_id: str, path: Optional[str] = None) -> set[str]:
    """Every artifact file of a run, recursively, as paths relative to the run's artifact root."""
    c = client(tmp_path)
    found: set[str] = set()
    for info in c.list_artifacts(run_id, path):
        found |= artifact_paths(tmp_path, run_id, info.path) if info.is_dir else {info.path}
    return found


def read_artifact_text(tmp_path: Path, run_id: str, path: str) -> str:
    return Path(client(tmp_path).download_artifacts(run_id, path, str(tempfile.mkdtemp()))).read_text()
