"""What a sweep shares between the sweeper process and its jobs.

* the Optuna storage (`open_storage`): an RDBStorage for the embedded SQLite file or any URL;
* the job contract: environment variables the sweeper sets around each launch, read back by
  `current_trial()` into a `SweepTrial` handle (params, pruning, MLflow tags);
* MLflow: `start_run_for_job` / `start_child_run` for the task, `SweepTracker` for the sweeper
  (one parent run per study, outcome tags on the child runs).

MLflow is imported lazily: it takes seconds, and Hydra imports this module whenever it scans
its plugins.
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional

import optuna
from optuna.trial import FrozenTrial
from sqlalchemy.engine import make_url

from arch_lab.sweep.search_space import SweepConfigError
from arch_lab.tracking import sqlite_path

if TYPE_CHECKING:
    import mlflow

ENV_TRIAL_NUMBER = "ARCH_LAB_SWEEP_TRIAL_NUMBER"
ENV_STUDY_NAME = "ARCH_LAB_SWEEP_STUDY_NAME"
ENV_STORAGE = "ARCH_LAB_SWEEP_STORAGE"
ENV_PARENT_RUN_ID = "ARCH_LAB_SWEEP_PARENT_RUN_ID"
ENV_EXPERIMENT_ID = "ARCH_LAB_SWEEP_EXPERIMENT_ID"
ENV_TRACKING_URI = "ARCH_LAB_SWEEP_TRACKING_URI"
ENV_PRUNER = "ARCH_LAB_SWEEP_PRUNER"
_SHARED_ENV = (ENV_STUDY_NAME, ENV_STORAGE, ENV_PARENT_RUN_ID, ENV_EXPERIMENT_ID, ENV_TRACKING_URI, ENV_PRUNER)

TAG_STUDY_NAME = "sweep.study_name"
TAG_TRIAL_NUMBER = "trial.number"
TAG_TRIAL_STATE = "trial.state"
TAG_FAIL_REASON = "fail_reason"
TAG_BEST = "sweep.best"
TAG_SUPERSEDED_BY = "sweep.superseded_by"  # on the parent run of a study started again, its new parent run
TAG_PARENT = "mlflow.parentRunId"

DEFAULT_STORAGE_FILE = "optuna.db"
DEFAULT_TRACKING_FILE = "mlruns.db"
PRUNER_KINDS = ("none", "median")
_MAX_TAG_LEN = 5000


# --------------------------------------------------------------------------- storage


def resolve_storage_url(storage: Optional[str], base_dir: Path) -> str:
    """`None` → the embedded `optuna.db` in `base_dir`; a relative SQLite path is anchored there too."""
    if storage is None:
        return f"sqlite:///{(base_dir / DEFAULT_STORAGE_FILE).resolve()}"
    return _anchor_sqlite_url(storage, base_dir)


def resolve_tracking_uri(tracking_uri: Optional[str], base_dir: Path) -> str:
    """`None` → MLFLOW_TRACKING_URI, else the embedded `mlruns.db` in `base_dir`."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_TRACKING_FILE}"
    return _anchor_sqlite_url(uri, base_dir) if uri.startswith("sqlite:") else uri


def open_storage(url: str, heartbeat_interval: Optional[int] = None, grace_period: Optional[int] = None,
                 on_stale: Optional[Callable[[FrozenTrial], None]] = None) -> Any:
    """An Optuna RDBStorage that several processes can share.

    RDBStorage rather than JournalStorage because the embedded default is a SQLite file and
    URLs such as postgresql:// must work the same way; it also supports heartbeats, so a trial
    of a worker that died (SIGKILL, lost node) turns FAIL after `grace_period` and is re-run
    with the same parameters (RetryHeartbeatStaleTrialCallback; `on_stale` is told of each). For
    SQLite, `timeout` makes a writer wait for the file lock instead of failing with "database is
    locked", and creating the schema of a fresh file is serialised with a file lock: Optuna's
    alembic initialisation is not safe when two processes create the same file at once (UNIQUE
    constraint failed: alembic_version.version_num).
    """
    database = sqlite_path(url)
    engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if database else {"pool_pre_ping": True}
    with warnings.catch_warnings(), _file_lock(database):
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: "experimental" since 2.9
        heartbeat: dict[str, Any] = {}
        if heartbeat_interval is not None:
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)

            def stale(study: optuna.Study, trial: FrozenTrial) -> None:
                retry(study, trial)
                if on_stale is not None:
                    on_stale(trial)

            heartbeat = {"heartbeat_interval": heartbeat_interval, "grace_period": grace_period,
                         "heartbeat_stale_trial_callback": stale}
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)


def _anchor_sqlite_url(url: str, base_dir: Path) -> str:
    path = sqlite_path(url)
    if path is None or path.is_absolute():
        return url
    return make_url(url).set(database=str((base_dir / path).resolve())).render_as_string(hide_password=False)


@contextmanager
def _file_lock(database: Optional[Path]) -> Iterator[None]:
    if database is None:
        yield
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released by the OS even if this process dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- pruner


@dataclass
class PrunerConf:
    """`hydra.sweeper.pruner`: Optuna's MedianPruner settings, or kind none."""

    kind: str = "none"
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    interval_steps: int = 1


def make_pruner(conf: PrunerConf) -> optuna.pruners.BasePruner:
    if conf.kind == "none":
        return optuna.pruners.NopPruner()
    if conf.kind == "median":
        try:
            return optuna.pruners.MedianPruner(
                n_startup_trials=conf.n_startup_trials,
                n_warmup_steps=conf.n_warmup_steps,
                interval_steps=conf.interval_steps,
            )
        except ValueError as error:
            raise SweepConfigError(f"hydra.sweeper.pruner: {error}") from None
    raise SweepConfigError(f"hydra.sweeper.pruner.kind must be one of {list(PRUNER_KINDS)}, got {conf.kind!r}")


# --------------------------------------------------------------------------- job contract


@contextmanager
def sweep_environment(
    study_name: str,
    storage_url: str,
    parent_run_id: str,
    experiment_id: str,
    tracking_uri: str,
    pruner: PrunerConf,
) -> Iterator[None]:
    """Set the variables every job of this sweep reads (plus MLFLOW_TRACKING_URI), then restore them.

    The trial number differs per job; the sweeper passes it as the override
    `++hydra.job.env_set.ARCH_LAB_SWEEP_TRIAL_NUMBER=<n>`, which Hydra applies inside the job.
    """
    values = {
        ENV_STUDY_NAME: study_name,
        ENV_STORAGE: storage_url,
        ENV_PARENT_RUN_ID: parent_run_id,
        ENV_EXPERIMENT_ID: experiment_id,
        ENV_TRACKING_URI: tracking_uri,
        ENV_PRUNER: json.dumps(asdict(pruner)),
        "MLFLOW_TRACKING_URI": tracking_uri,
    }
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass(frozen=True)
class SweepTrial:
    """The running Optuna trial as a job sees it (see the contract in `arch_lab.sweep`)."""

    number: int
    study_name: str
    storage_url: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    pruner: PrunerConf

    @property
    def params(self) -> dict[str, Any]:
        """The sampled values of this trial, {"model.n_heads": 8, ...}."""
        return dict(self._optuna_trial().params)

    @property
    def directions(self) -> list[str]:
        """The study's directions, "minimize" or "maximize", one per objective."""
        return [direction.name.lower() for direction in self._optuna_trial().study.directions]

    def report(self, value: float, step: int) -> None:
        """Record an intermediate objective value; raises optuna.TrialPruned when the pruner says so.

        Optuna prunes single-objective studies only; in a multi-objective study this does nothing.
        """
        trial = self._optuna_trial()
        if len(trial.study.directions) > 1:
            return
        trial.report(float(value), step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"trial {self.number} pruned at step {step} (value {value})")

    def set_user_attr(self, key: str, value: Any) -> None:
        self._optuna_trial().set_user_attr(key, value)

    def mlflow_tags(self) -> dict[str, str]:
        """Tags that make an MLflow run this trial's child run (also for runs opened by other code)."""
        return {
            TAG_PARENT: self.parent_run_id,
            TAG_STUDY_NAME: self.study_name,
            TAG_TRIAL_NUMBER: str(self.number),
        }

    def _optuna_trial(self) -> optuna.Trial:
        return _live_trial(self.storage_url, self.study_name, self.number, json.dumps(asdict(self.pruner)))


def current_trial() -> Optional[SweepTrial]:
    """The trial this job runs for, or None outside a sweep."""
    number = os.environ.get(ENV_TRIAL_NUMBER)
    if number is None:
        return None
    missing = [key for key in _SHARED_ENV if key not in os.environ]
    if missing:
        raise RuntimeError(
            f"{ENV_TRIAL_NUMBER} is set but {missing} are not; arch_lab's OptunaSweeper sets them together"
        )
    return SweepTrial(
        number=int(number),
        study_name=os.environ[ENV_STUDY_NAME],
        storage_url=os.environ[ENV_STORAGE],
        parent_run_id=os.environ[ENV_PARENT_RUN_ID],
        experiment_id=os.environ[ENV_EXPERIMENT_ID],
        tracking_uri=os.environ[ENV_TRACKING_URI],
        pruner=PrunerConf(**json.loads(os.environ[ENV_PRUNER])),
    )


@functools.lru_cache(maxsize=1)
def _live_trial(storage_url: str, study_name: str, number: int, pruner_json: str) -> optuna.Trial:
    """The trial, rebuilt from storage, so that pruning works whichever launcher ran the job.

    The job never samples: RandomSampler keeps `Trial()` construction free of sampler side
    effects. Cached so that every report() of one job shares one Trial.
    """
    storage = _job_storage(storage_url)
    study = optuna.load_study(
        study_name=study_name,
        storage=storage,
        sampler=optuna.samplers.RandomSampler(),
        pruner=make_pruner(PrunerConf(**json.loads(pruner_json))),
    )
    study_id = storage.get_study_id_from_name(study_name)
    return optuna.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, number))


@functools.lru_cache(maxsize=None)
def _job_storage(storage_url: str) -> Any:
    return open_storage(storage_url)


# --------------------------------------------------------------------------- MLflow: task side


@contextmanager
def start_child_run(
    trial: SweepTrial, run_name: Optional[str] = None, tags: Optional[Mapping[str, str]] = None
) -> Iterator["mlflow.ActiveRun"]:
    """The trial's MLflow run, nested under the study's parent run, with the sampled values as params."""
    import mlflow

    mlflow.set_tracking_uri(trial.tracking_uri)
    run = mlflow.start_run(
        experiment_id=trial.experiment_id,
        run_name=run_name or f"{trial.study_name}-trial-{trial.number}",
        parent_run_id=trial.parent_run_id,
        tags={**(tags or {}), **trial.mlflow_tags()},
    )
    with _ending_run():
        mlflow.log_params(trial.params)
        yield run


@contextmanager
def start_run_for_job(
    run_name: Optional[str] = None,
    *,
    experiment_name: Optional[str] = None,
    tags: Optional[Mapping[str, str]] = None,
) -> Iterator["mlflow.ActiveRun"]:
    """A child run inside a sweep (its experiment is the parent's), a top-level run otherwise.

    The run ends FINISHED, FAILED when the body raises, KILLED on KeyboardInterrupt; a pruned
    trial (optuna.TrialPruned) ends FINISHED, since pruning is a normal early stop.
    """
    trial = current_trial()
    if trial is not None:
        with start_child_run(trial, run_name, tags) as run:
            yield run
        return
    import mlflow

    experiment_id = mlflow.set_experiment(experiment_name).experiment_id if experiment_name else None
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=dict(tags or {}))
    with _ending_run():
        yield run


@contextmanager
def _ending_run() -> Iterator[None]:
    import mlflow

    try:
        yield
    except optuna.TrialPruned:
        mlflow.end_run("FINISHED")
        raise
    except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C and SIGTERM into SystemExit
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


# --------------------------------------------------------------------------- MLflow: sweeper side


class SweepTracker:
    """The sweeper's MLflow bookkeeping: the study's parent run and the outcome of each child run."""

    def __init__(self, tracking_uri: str) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        # MlflowClient creates the schema of a fresh SQLite store with alembic right away, which
        # fails when two workers start together (like Optuna's): serialise it the same way.
        with _file_lock(sqlite_path(tracking_uri) if tracking_uri.startswith("sqlite:") else None):
            self.client = MlflowClient(tracking_uri)

    def experiment_id(self, experiment_name: Optional[str]) -> str:
        """The named experiment (created if missing), else MLflow's own default resolution."""
        name = experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        if not name:
            return os.environ.get("MLFLOW_EXPERIMENT_ID", "0")
        experiment = self.client.get_experiment_by_name(name)
        return experiment.experiment_id if experiment is not None else self.client.create_experiment(name)

    def create_parent(self, experiment_id: str, study_name: str, tags: Mapping[str, str]) -> str:
        run = self.client.create_run(
            experiment_id, run_name=study_name, tags={**tags, TAG_STUDY_NAME: study_name}
        )
        return run.info.run_id

    def reopen_parent(self, run_id: str) -> bool:
        """Mark an existing parent run RUNNING again (resume / another worker); False if it is gone."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return False
        if run.info.lifecycle_stage == "deleted":
            return False
        if run.info.status != "RUNNING":
            self.client.set_tag(run_id, "sweep.resumed_from_status", run.info.status)
            self.client.update_run(run_id, status="RUNNING")
        return True

    def mark_superseded(self, run_id: str, new_run_id: str) -> None:
        """Point the parent run of a study that was started again (it held no result) at the new parent run."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.set_tag(run_id, TAG_SUPERSEDED_BY, new_run_id)
        except MlflowException:  # deleted meanwhile: nothing to point from
            return
        if self.client.get_run(run_id).info.status == "RUNNING":  # its worker died
            self.client.set_terminated(run_id, "KILLED")

    def parent_experiment_id(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.experiment_id

    def child_runs(self, parent_run_id: str, number: Optional[int] = None) -> dict[int, str]:
        """{trial number: run id} of the parent's child runs (in any experiment)."""
        experiment_ids = [e.experiment_id for e in self.client.search_experiments()]
        query = f"tags.`{TAG_PARENT}` = '{parent_run_id}'"
        if number is not None:
            query += f" and tags.`{TAG_TRIAL_NUMBER}` = '{number}'"
        children: dict[int, str] = {}
        page_token = None
        while True:
            page = self.client.search_runs(
                experiment_ids, filter_string=query, max_results=1000, page_token=page_token
            )
            for run in page:
                children[int(run.data.tags[TAG_TRIAL_NUMBER])] = run.info.run_id
            page_token = page.token
            if not page_token:
                return children

    def record_outcome(self, run_id: str, state: str, fail_reason: Optional[str], interrupted: bool = False) -> None:
        """Tag the child run with the trial's state; a FAIL trial's run ends FAILED even if the task returned (KILLED
        when the trial was interrupted: its sweep stopped, or its worker died)."""
        self.client.set_tag(run_id, TAG_TRIAL_STATE, state)
        if fail_reason is not None:
            self.client.set_tag(run_id, TAG_FAIL_REASON, fail_reason[:_MAX_TAG_LEN])
            if self.client.get_run(run_id).info.status in ("FINISHED", "RUNNING"):
                self.client.set_terminated(run_id, "KILLED" if interrupted else "FAILED")

    def tag_best(self, run_ids: Mapping[int, str], best_numbers: set[int]) -> None:
        for number, run_id in run_ids.items():
            self.client.set_tag(run_id, TAG_BEST, "true" if number in best_numbers else "false")

    def log_best_values(self, parent_run_id: str, best: Mapping[str, float]) -> None:
        for name, value in best.items():
            if math.isfinite(value):
                self.client.log_metric(parent_run_id, f"best/{name}", value)

    def finish_parent(self, run_id: str, status: str, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)
        self.client.set_terminated(run_id, status)
