"""A Hydra Sweeper that runs an Optuna 5 study through its ask/tell API.

Modelled on Hydra's BasicSweeper (hydra/_internal/core_plugins/basic_sweeper.py: jobs go through
`self.launcher.launch(batch, initial_job_idx)`) and hydra-optuna-sweeper's _impl.py (search space
from config and overrides), which pins optuna<3 and cannot be used here.

Hydra instantiates sweepers only from the `hydra_plugins` namespace, so the class Hydra sees is
`hydra_plugins.arch_lab_optuna_sweeper.ArchLabOptunaSweeper`, a subclass of `OptunaSweeper`;
this module registers its config as `hydra/sweeper=arch_lab_optuna`.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
import uuid
import warnings
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import optuna
import sqlalchemy.exc
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig, OmegaConf
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, GridSampler
from optuna.trial import FrozenTrial, TrialState

from arch_lab.errors import exit_with_message
from arch_lab.sweep.pareto import Objective, describe_trial, log_front
from arch_lab.sweep.search_space import (
    PARAMS_KEY,
    SearchSpace,
    SearchSpaceError,
    SweepConfigError,
    build_search_space,
    override_value,
)
from arch_lab.sweep.study_tracking import (
    ENV_TRIAL_NUMBER,
    PrunerConf,
    SweepTracker,
    make_pruner,
    open_storage,
    resolve_storage_url,
    resolve_tracking_uri,
    sweep_environment,
)
from arch_lab.tracking import check_tracking_uri, hide_absolute_path, redact_url
from components.config import ConfigError

log = logging.getLogger(__name__)

SWEEPER_TARGET = "hydra_plugins.arch_lab_optuna_sweeper.ArchLabOptunaSweeper"
SAMPLER_KINDS = ("tpe", "nsgaii", "random", "grid")
DIRECTIONS = ("maximize", "minimize")
PARENT_RUN_ATTR = "mlflow_parent_run_id"
FAIL_REASON_ATTR = "fail_reason"
INTERRUPTED_ATTR = "interrupted"  # a FAIL trial stopped with its sweep (Ctrl-C, SIGTERM), not by its values
FIXED_OVERRIDES_ATTR = "fixed_overrides"  # the overrides every trial of the study runs with
CREATION_ATTR = "created_as"  # a mark unique to each creation of the study
RUN_ID_ATTR = "mlflow_run_id"
_COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
_PARENT_WAIT_S = 120.0
_MAX_REASON_LEN = 2000


class SweepFailedError(RuntimeError):
    """The sweep stopped because too many of its trials failed."""


@dataclass
class SamplerConf:
    """`hydra.sweeper.sampler`. Options a kind does not use must stay null."""

    kind: str = "tpe"
    seed: Optional[int] = None
    n_startup_trials: Optional[int] = None  # tpe: random trials before the model kicks in
    population_size: Optional[int] = None  # nsgaii: trials per generation


@dataclass
class OptunaSweeperConf:
    _target_: str = SWEEPER_TARGET
    study_name: str = MISSING
    storage: Optional[str] = None  # null → sqlite file optuna.db in the launch directory
    n_trials: int = 10  # target number of COMPLETE + PRUNED trials in the study
    n_jobs: int = 1  # trials launched together per batch (parallel with a parallel launcher)
    sampler: SamplerConf = field(default_factory=SamplerConf)
    pruner: PrunerConf = field(default_factory=PrunerConf)
    directions: dict[str, str] = field(default_factory=dict)  # metric name → maximize|minimize
    params: dict[str, Any] = field(default_factory=dict)
    constraints: list[str] = field(default_factory=list)
    max_failed_trials: Optional[int] = None  # stop (parent run FAILED) after this many FAIL trials; null → n_trials
    tracking_uri: Optional[str] = None  # null → MLFLOW_TRACKING_URI, else sqlite file mlruns.db
    experiment_name: Optional[str] = None  # null → MLFLOW_EXPERIMENT_NAME/_ID, else MLflow's Default
    heartbeat_interval: int = 60  # seconds; a silent worker's trial is failed and re-run after
    grace_period: Optional[int] = None  # … this many seconds (null → 2 × heartbeat_interval)
    poll_interval: float = 1.0  # seconds between checks while other workers finish the study


ConfigStore.instance().store(group="hydra/sweeper", name="arch_lab_optuna", node=OptunaSweeperConf, provider="arch_lab")


@dataclass(frozen=True)
class Objectives:
    """The metrics the task returns that the study optimises, in order."""

    items: tuple[Objective, ...]

    @classmethod
    def parse(cls, directions: Any) -> Objectives:
        where = "hydra.sweeper.directions"
        if isinstance(directions, DictConfig):
            directions = OmegaConf.to_container(directions, resolve=True)
        if not isinstance(directions, Mapping) or not directions:
            raise SweepConfigError(
                f"{where} must map at least one metric name the task returns to maximize|minimize, "
                f"e.g. {{recall/mqar_acc: maximize}}; got {directions!r}"
            )
        items = []
        for name, direction in directions.items():
            if direction not in DIRECTIONS:
                raise SweepConfigError(f"{where}.{name} must be one of {list(DIRECTIONS)}, got {direction!r}")
            items.append(Objective(str(name), direction))
        return cls(tuple(items))

    @property
    def names(self) -> list[str]:
        return [objective.name for objective in self.items]

    @property
    def directions(self) -> list[str]:
        return [objective.direction for objective in self.items]

    def missing_from(self, returned: Any) -> list[str]:
        """The objectives a mapping the task returned does not hold."""
        return [name for name in self.names if isinstance(returned, Mapping) and name not in returned]

    def values_from(self, returned: Any) -> tuple[Optional[list[float]], Optional[str]]:
        """(objective values, None), or (None, why the trial fails)."""
        if not isinstance(returned, Mapping):
            return None, (
                f"the task returned {type(returned).__name__}, not a mapping of metric name → value "
                f"holding {self.names} (hydra.sweeper.directions)"
            )
        missing = self.missing_from(returned)
        if missing:
            return None, (
                f"metric '{missing[0]}' (hydra.sweeper.directions) is missing from the task's return value; "
                f"it returned {sorted(map(str, returned))}"
            )
        values = []
        for name in self.names:
            try:
                value = float(returned[name])
            except (TypeError, ValueError):
                return None, f"metric '{name}' is not a number: {returned[name]!r}"
            if not math.isfinite(value):
                return None, f"metric '{name}' is {value}"
            values.append(value)
        return values, None


class OptunaSweeper(Sweeper):
    """Runs `n_trials` trials of an Optuna study, each a Hydra job, tracked in MLflow (see `arch_lab.sweep`)."""

    def __init__(
        self,
        study_name: str,
        storage: Optional[str],
        n_trials: int,
        n_jobs: int,
        sampler: Any,
        pruner: Any,
        directions: Any,
        params: Any,
        constraints: Any,
        max_failed_trials: Optional[int],
        tracking_uri: Optional[str],
        experiment_name: Optional[str],
        heartbeat_interval: int,
        grace_period: Optional[int],
        poll_interval: float,
    ) -> None:
        super().__init__()
        self.study_name = study_name
        self.storage = storage
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.sampler, self.pruner = sampler, pruner  # checked by sweep (Hydra would wrap an error raised here)
        self.directions = directions
        self.params = OmegaConf.to_container(params, resolve=True) if isinstance(params, DictConfig) else params
        self.constraints = list(constraints or [])
        self.max_failed_trials = max_failed_trials
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.poll_interval = poll_interval
        self.hydra_context: Optional[HydraContext] = None
        self.config: Optional[DictConfig] = None
        self.launcher: Optional[Launcher] = None
        self._in_flight: dict[int, optuna.Trial] = {}
        self._stale: list[int] = []  # trials of dead workers that this process failed (Optuna's stale callback)
        self._heartbeats: Optional[_Heartbeats] = None
        self._superseded_parent: Optional[str] = None  # the parent run of a study without results, started again

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        try:
            return self._sweep(arguments)
        except (SweepConfigError, SweepFailedError, ConfigError) as error:  # the message says it all
            exit_with_message(log, error)
        except (KeyboardInterrupt, SystemExit) as stop:
            from arch_lab.interrupts import interrupt_exit_status, is_interrupt

            if not is_interrupt(stop):
                raise
            status = interrupt_exit_status(stop)
            log.error("interrupted (%s): the trials in flight are recorded interrupted; resume the study with the "
                      "same command", "SIGTERM" if status == 143 else "Ctrl-C")
            raise SystemExit(status) from None

    def _check_settings(self) -> None:
        """The sweeper's own keys, checked as the sweep starts: Hydra instantiates the sweeper with its
        traceback-wrapped InstantiationError around anything the constructor raises."""
        for key in ("n_trials", "n_jobs", "heartbeat_interval"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise SweepConfigError(f"hydra.sweeper.{key} must be a positive integer, got {value!r}")
        failed = self.max_failed_trials
        if failed is not None and (not isinstance(failed, int) or failed < 1):
            raise SweepConfigError(f"hydra.sweeper.max_failed_trials must be a positive integer or null, "
                                   f"got {failed!r}")
        self.sampler_conf = _dataclass_from(SamplerConf, self.sampler, "hydra.sweeper.sampler")
        self.pruner_conf = _dataclass_from(PrunerConf, self.pruner, "hydra.sweeper.pruner")

    def _sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        self._check_settings()
        space, fixed_arguments = self._search_space(arguments)
        self._check_composes(space, fixed_arguments)
        objectives = Objectives.parse(self.directions)
        if self.pruner_conf.kind != "none" and len(objectives.items) > 1:
            raise SweepConfigError(
                "hydra.sweeper.pruner.kind must be none with several hydra.sweeper.directions: "
                "Optuna prunes single-objective studies only"
            )
        pruner = make_pruner(self.pruner_conf)
        sampler = make_sampler(self.sampler_conf, space)
        target = self.n_trials
        if isinstance(sampler, GridSampler):
            grid_size = math.prod(len(values) for values in space.grid().values())
            if grid_size < target:
                log.info("grid has %d points: n_trials lowered from %d", grid_size, target)
                target = grid_size

        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        tracking_uri = resolve_tracking_uri(self.tracking_uri, Path.cwd())
        check_tracking_uri(tracking_uri, "hydra.sweeper.tracking_uri")  # before the study: a refusal leaves none
        storage_url = resolve_storage_url(self.storage, Path.cwd())
        try:
            storage = open_storage(storage_url, self.heartbeat_interval, self.grace_period,
                                   on_stale=lambda trial: self._stale.append(trial.number))
        except (ImportError, sqlalchemy.exc.NoSuchModuleError, sqlalchemy.exc.ArgumentError) as error:  # no such
            # dialect, no driver for it, no URL
            raise SweepConfigError(f"hydra.sweeper.storage={redact_url(storage_url)}: {error}") from None
        study, created = self._open_study(storage, sampler, pruner, objectives, fixed_arguments)
        tracker = SweepTracker(tracking_uri)
        parent_run_id = self._parent_run(study, created, tracker, storage_url, space, objectives, target)
        log.info(
            "study %s in %s: %s, directions %s, target %d trials, parent MLflow run %s",
            self.study_name, redact_url(storage_url), _sampler_label(self.sampler_conf),
            dict(zip(objectives.names, objectives.directions)), target, parent_run_id,
        )

        returns: list[Sequence[JobReturn]] = []
        status, stop_reason, loop_done = "FAILED", None, False
        environment = sweep_environment(
            self.study_name, storage_url, parent_run_id, tracker.parent_experiment_id(parent_run_id),
            tracker.tracking_uri, self.pruner_conf,
        )
        self._heartbeats = _Heartbeats(storage, self.study_name, self.heartbeat_interval)
        with _sigterm_raises_keyboard_interrupt(), environment, self._heartbeats:
            try:
                stop_reason = self._run_trials(
                    study, space, objectives, target, fixed_arguments, tracker, parent_run_id, returns
                )
                status, loop_done = ("FINISHED" if stop_reason is None else "FAILED"), True
            except BaseException as error:
                from arch_lab.interrupts import is_interrupt

                interrupted = is_interrupt(error)
                status = "KILLED" if interrupted else "FAILED"
                reason = f"{'interrupted by' if interrupted else 'the sweep failed:'} {type(error).__name__}: {error}"
                self._fail_in_flight(study, tracker, parent_run_id, reason, interrupted)
                raise
            finally:
                self._close(study, tracker, parent_run_id, objectives, target, status, summarize=loop_done)
        if stop_reason is not None:
            raise SweepFailedError(stop_reason)
        return returns

    # ------------------------------------------------------------------ setup helpers

    def _search_space(self, arguments: list[str]) -> tuple[SearchSpace, list[str]]:
        assert self.hydra_context is not None and self.config is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides(arguments)
        fixed = [(text, o) for text, o in zip(arguments, overrides) if not o.is_sweep_override()]
        sweeps = [o for o in overrides if o.is_sweep_override()]
        space = build_search_space(self.params or {}, self.constraints, sweeps, {o.key_or_group for _, o in fixed})
        if not space.params:
            raise SearchSpaceError(f"{PARAMS_KEY} is empty and no command-line sweep was given: nothing to search")
        space.check_names(self.config)
        return space, [text for text, _ in fixed]

    def _check_composes(self, space: SearchSpace, fixed_arguments: list[str]) -> None:
        """Compose one trial's config (each parameter at its first value) before the study exists, so a key that
        the config lacks fails the sweep at once instead of its first trial (sweep() has checked the setup)."""
        overrides = [*fixed_arguments, *space.first_overrides()]
        try:
            self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        except Exception as error:
            raise SweepConfigError(f"a trial's config does not compose from the sweep's overrides: {error}") from None

    def _open_study(
        self, storage: Any, sampler: BaseSampler, pruner: optuna.pruners.BasePruner, objectives: Objectives,
        fixed_arguments: list[str],
    ) -> tuple[optuna.Study, bool]:
        """Create the study, or join it; `created` is True for exactly one of racing workers. A study joined
        must have been run with the same objectives and the same fixed overrides: resuming head_ratio for
        another experiment or data set would otherwise mix its trials with the old ones. A study that holds no
        result (every trial FAIL, e.g. its overrides were refused) is started again instead, so a corrected command
        can keep the study's name; its old parent run stays, tagged with the new one."""
        fixed = sorted(_without_password(argument) for argument in fixed_arguments)  # stored and printed
        while True:
            try:
                study = optuna.create_study(
                    storage=storage, study_name=self.study_name, sampler=sampler, pruner=pruner,
                    directions=objectives.directions,
                )
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    study.set_metric_names(objectives.names)
                study.set_user_attr(CREATION_ATTR, uuid.uuid4().hex)
                study.set_user_attr(FIXED_OVERRIDES_ATTR, fixed)  # last: joining workers wait for it
                return study, True
            except optuna.exceptions.DuplicatedStudyError:
                study = optuna.load_study(study_name=self.study_name, storage=storage, sampler=sampler, pruner=pruner)
            mismatch = self._mismatch(study, objectives, fixed)
            if mismatch is None:
                return study, False
            trials = study.get_trials(deepcopy=False)
            if not trials or any(t.state != TrialState.FAIL for t in trials):
                # no trial yet: another worker may be starting it, or its sweep stopped before its first trial
                unused = "" if trials else (f"; it has no trial yet: if no sweep runs it, delete it (optuna "
                                            f"delete-study --study-name {self.study_name} --storage <its storage>)")
                raise SweepConfigError(f"study '{self.study_name}' in its storage {mismatch}: resume it with the "
                                       "same overrides and directions, or start another study with "
                                       f"hydra.sweeper.study_name=<name>{unused}")
            log.warning("study '%s' in its storage %s, and holds no result (%d trial(s), all FAIL): it is started "
                        "again", self.study_name, mismatch, len(trials))
            attrs = study.user_attrs  # read now: a Study reads its attributes from the storage at every access
            self._superseded_parent = attrs.get(PARENT_RUN_ATTR)
            self._delete_if_unchanged(storage, attrs.get(CREATION_ATTR))

    def _delete_if_unchanged(self, storage: Any, creation: Optional[str]) -> None:
        """Delete the study if it is still the creation that was judged, not one that a racing worker has started
        again meanwhile (SQLite reuses a deleted study's id); either way the next pass creates or joins it."""
        try:
            current = optuna.load_study(study_name=self.study_name, storage=storage)
        except KeyError:  # deleted meanwhile
            return
        if current.user_attrs.get(CREATION_ATTR) == creation:
            with suppress(KeyError):
                storage.delete_study(current._study_id)

    def _mismatch(self, study: optuna.Study, objectives: Objectives, fixed: list[str]) -> Optional[str]:
        """How a stored study differs from this sweep's objectives and fixed overrides (None: it does not)."""
        deadline = time.monotonic() + _PARENT_WAIT_S
        while FIXED_OVERRIDES_ATTR not in study.user_attrs and not study.get_trials(deepcopy=False) \
                and time.monotonic() < deadline:
            time.sleep(self.poll_interval)  # the worker that created the study is still writing what it runs with
        existing = [d.name.lower() for d in study.directions]
        names = study.metric_names
        if existing != objectives.directions or (names is not None and names != objectives.names):
            return (f"has the metrics {names} and directions {existing}, this sweep has hydra.sweeper.directions "
                    f"{dict(zip(objectives.names, objectives.directions))}")
        before = study.user_attrs.get(FIXED_OVERRIDES_ATTR)
        if before is not None and before != fixed:
            return f"ran its trials with the overrides {before}, this sweep has {fixed}"
        return None

    def _parent_run(
        self, study: optuna.Study, created: bool, tracker: SweepTracker, storage_url: str,
        space: SearchSpace, objectives: Objectives, target: int,
    ) -> str:
        """The study's one parent run: made by the worker that created the study, reused by all others."""
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
        deadline = time.monotonic() + _PARENT_WAIT_S
        while run_id is None and not created and not study.get_trials(deepcopy=False) and time.monotonic() < deadline:
            time.sleep(self.poll_interval)  # the creating worker is still making the parent run
            run_id = study.user_attrs.get(PARENT_RUN_ATTR)
        if run_id is not None and tracker.reopen_parent(run_id):
            return run_id
        tags = {
            "sweep.storage": hide_absolute_path(redact_url(storage_url)),
            "sweep.sampler": _sampler_label(self.sampler_conf),
            "sweep.pruner": self.pruner_conf.kind,
            "sweep.directions": ",".join(f"{o.name}:{o.direction}" for o in objectives.items),
            "sweep.n_trials": str(target),
        }
        run_id = tracker.create_parent(tracker.experiment_id(self.experiment_name), self.study_name, tags)
        tracker.client.log_dict(run_id, _space_summary(space, objectives), "sweep/search_space.json")
        if self._superseded_parent is not None:
            tracker.mark_superseded(self._superseded_parent, run_id)
        study.set_user_attr(PARENT_RUN_ATTR, run_id)
        return run_id

    # ------------------------------------------------------------------ the trial loop

    def _run_trials(
        self, study: optuna.Study, space: SearchSpace, objectives: Objectives, target: int,
        fixed_arguments: list[str], tracker: SweepTracker, parent_run_id: str, returns: list[Sequence[JobReturn]],
    ) -> Optional[str]:
        """Ask/launch/tell until the study holds `target` COMPLETE+PRUNED trials; returns why it stopped early."""
        assert self.launcher is not None and self.config is not None
        max_failed = self.max_failed_trials if self.max_failed_trials is not None else self.n_trials
        failures: list[str] = []
        waiting_logged = False
        while True:
            self._fail_stale_trials(study, tracker, parent_run_id)
            trials = study.get_trials(deepcopy=False)
            done = sum(t.state in _COUNTED for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            waiting = sum(t.state == TrialState.WAITING for t in trials)  # a stale trial's retry, queued
            if done >= target:
                return None
            if isinstance(study.sampler, GridSampler) and study.sampler.is_exhausted(study) and running + waiting == 0:
                # every grid point was tried; failed points are recorded, re-running them would repeat
                return None if done else (f"every grid point's trial failed ({len(trials)} trials); last failure: "
                                          f"{failures[-1] if failures else _last_fail_reason(trials)}")
            if len(failures) >= max_failed:
                return (
                    f"{len(failures)} trials failed in this sweep (hydra.sweeper.max_failed_trials={max_failed}); "
                    f"the study has {done}/{target} trials; last failure: {failures[-1]}"
                )
            free = target - done - running
            if free <= 0:  # other workers' trials may still complete the study, or fail and free slots
                if not waiting_logged:
                    log.info("waiting for %d running trial(s) of other workers (the trial of a worker that died fails "
                             "%d s after its last heartbeat, and its point is free again)", running,
                             self.grace_period or 2 * self.heartbeat_interval)
                    waiting_logged = True
                time.sleep(self.poll_interval)
                continue
            waiting_logged = False
            batch: list[tuple[optuna.Trial, list[str]]] = []
            for _ in range(min(self.n_jobs, free)):
                trial = self._ask(study)
                if self._is_surplus(study, trial, target):
                    reason = "surplus: other workers already run or finished n_trials trials"
                    self._tell(study, tracker, parent_run_id, trial, TrialState.FAIL, None, reason, launched=False)
                    break
                values = space.sample(trial, self.config)
                violated = space.violated_constraints(values, self.config)
                reason = "; ".join(violated) or _duplicate_of(study, trial, values)
                if reason:
                    self._tell(study, tracker, parent_run_id, trial, TrialState.FAIL, None, reason, launched=False)
                    failures.append(reason)
                    continue
                job_overrides = [
                    *fixed_arguments,
                    *(f"{space.override_key(name)}={override_value(value)}" for name, value in values.items()),
                    f"++hydra.job.env_set.{ENV_TRIAL_NUMBER}={trial.number}",
                ]
                batch.append((trial, job_overrides))
            if not batch:
                continue
            # No validate_batch_is_legal: the launcher composes each job anyway and a composition
            # error raises out of launch() just the same, which ends the sweep FAILED.
            overrides = [job_overrides for _, job_overrides in batch]
            results = self.launcher.launch(overrides, initial_job_idx=batch[0][0].number)
            never_returned = None
            with _signals_deferred():  # a Ctrl-C now would discard trials that have run to the end
                for (trial, _), result in zip(batch, results):
                    state, values, reason = _outcome(trial, result, objectives)
                    self._tell(study, tracker, parent_run_id, trial, state, values, reason, launched=True)
                    if state == TrialState.FAIL:
                        failures.append(reason or "")
                        never_returned = never_returned or _never_returned(study, trial, result, objectives)
            returns.append(results)
            if never_returned:
                return never_returned

    def _ask(self, study: optuna.Study) -> optuna.Trial:
        with warnings.catch_warnings():
            # Heartbeats are recorded by _Heartbeats below, which is what optimize() would do.
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
            trial = study.ask()
        assert self._heartbeats is not None
        self._in_flight[trial.number] = trial
        self._heartbeats.add(trial.number)
        return trial

    def _tell(
        self, study: optuna.Study, tracker: SweepTracker, parent_run_id: str, trial: optuna.Trial,
        state: TrialState, values: Optional[list[float]], reason: Optional[str], launched: bool,
        interrupted: bool = False,
    ) -> None:
        """Record the outcome on the trial and on its child run (if its job ran and opened one)."""
        run_id = tracker.child_runs(parent_run_id, trial.number).get(trial.number) if launched else None
        if reason is not None:
            reason = reason[:_MAX_REASON_LEN]
            trial.set_user_attr(FAIL_REASON_ATTR, reason)
            log.warning("trial %d: %s", trial.number, reason)
        if run_id is not None:
            trial.set_user_attr(RUN_ID_ATTR, run_id)
            tracker.record_outcome(run_id, state.name, reason, interrupted)
        study.tell(trial, state=state, values=values)
        self._in_flight.pop(trial.number, None)
        assert self._heartbeats is not None
        self._heartbeats.remove(trial.number)

    def _fail_in_flight(self, study: optuna.Study, tracker: SweepTracker, parent_run_id: str, reason: str,
                        interrupted: bool) -> None:
        for trial in list(self._in_flight.values()):
            try:
                if interrupted:
                    trial.set_user_attr(INTERRUPTED_ATTR, True)
                self._tell(study, tracker, parent_run_id, trial, TrialState.FAIL, None, reason, launched=True,
                           interrupted=interrupted)
            except Exception as error:  # the sweep is already going down; keep the original error
                log.error("could not mark trial %d FAIL: %s", trial.number, error)
        self._in_flight.clear()

    def _fail_stale_trials(self, study: optuna.Study, tracker: SweepTracker, parent_run_id: str) -> None:
        """Optuna fails the trials whose worker died (no heartbeat for the grace period) and queues a retry; their
        child runs, which no process will end, end KILLED with the reason as a tag (Optuna keeps none on a trial it
        failed)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        stale, self._stale = self._stale, []
        if not stale:
            return
        try:
            runs = tracker.child_runs(parent_run_id)
            for number in sorted(set(stale) & set(runs)):
                log.warning("trial %d: its worker stopped sending heartbeats (killed?); its run ends KILLED", number)
                tracker.record_outcome(runs[number], TrialState.FAIL.name, "its worker died (no heartbeat)",
                                       interrupted=True)
        except Exception as error:  # the trials are failed and retried all the same; only their runs stay open
            log.error("could not end the runs of stale trials %s: %s", stale, error)

    @staticmethod
    def _is_surplus(study: optuna.Study, trial: optuna.Trial, target: int) -> bool:
        """Two workers may ask at the same moment; the later trial number gives way."""
        earlier = study.get_trials(deepcopy=False, states=(*_COUNTED, TrialState.RUNNING))
        return sum(t.number < trial.number for t in earlier) >= target

    def _close(
        self, study: optuna.Study, tracker: SweepTracker, parent_run_id: str, objectives: Objectives,
        target: int, status: str, summarize: bool,
    ) -> None:
        """End the parent run, unless another worker still runs trials of the study (it will)."""
        self._fail_stale_trials(study, tracker, parent_run_id)
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.RUNNING for t in trials):
            log.info("other workers still run trials of %s; leaving parent run %s open", self.study_name, parent_run_id)
            return
        counts = {state: sum(t.state == state for t in trials) for state in TrialState}
        tags = {"sweep.n_trials": str(target)}
        for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
            tags[f"sweep.n_{state.name.lower()}"] = str(counts[state])
        try:
            if summarize and counts[TrialState.COMPLETE]:
                run_ids = tracker.child_runs(parent_run_id)
                front = log_front(tracker.client, parent_run_id, study, objectives.items, run_ids)
                complete_runs = {
                    t.number: run_ids[t.number]
                    for t in trials
                    if t.state == TrialState.COMPLETE and t.number in run_ids
                }
                tracker.tag_best(complete_runs, {t.number for t in front})
                tags["sweep.best_trials"] = ",".join(str(t.number) for t in front)
                best = "the best" if len(objectives.items) == 1 else f"{len(front)} on the Pareto front"
                log.info("%s: %s of the %d complete trials:", self.study_name, best, counts[TrialState.COMPLETE])
                for trial in front:
                    log.info("\t%s", describe_trial(trial, objectives.items))
                if len(objectives.items) == 1:
                    tracker.log_best_values(parent_run_id, {objectives.names[0]: study.best_value})
        except BaseException:
            tracker.finish_parent(parent_run_id, "FAILED", tags)
            raise
        tracker.finish_parent(parent_run_id, status, tags)
        log.info("%s: %s; %d complete, %d pruned, %d failed of %d; MLflow parent run %s", self.study_name, status,
                 counts[TrialState.COMPLETE], counts[TrialState.PRUNED], counts[TrialState.FAIL], target,
                 parent_run_id)


# ---------------------------------------------------------------------- samplers


def make_sampler(conf: SamplerConf, space: SearchSpace) -> BaseSampler:
    where = "hydra.sweeper.sampler"
    if conf.kind not in SAMPLER_KINDS:
        raise SweepConfigError(f"{where}.kind must be one of {list(SAMPLER_KINDS)}, got {conf.kind!r}")
    for option, kind in (("n_startup_trials", "tpe"), ("population_size", "nsgaii")):
        if getattr(conf, option) is not None and conf.kind != kind:
            raise SweepConfigError(f"{where}.{option} applies to kind {kind} only, not {conf.kind}")
    if conf.kind == "grid":
        return _AskTellGridSampler(space.grid(), seed=conf.seed)
    try:
        factory = _sampler_factory(conf)
        factory(conf.seed)  # validate the options now, with the error naming the key
    except ValueError as error:
        raise SweepConfigError(f"{where}: {error}") from None
    return factory(None) if conf.seed is None else _PerTrialSeededSampler(factory, conf.seed)


def _sampler_factory(conf: SamplerConf) -> Any:
    if conf.kind == "tpe":
        extra = {} if conf.n_startup_trials is None else {"n_startup_trials": conf.n_startup_trials}
        return lambda seed: optuna.samplers.TPESampler(seed=seed, **extra)
    if conf.kind == "nsgaii":
        extra = {} if conf.population_size is None else {"population_size": conf.population_size}
        return lambda seed: optuna.samplers.NSGAIISampler(seed=seed, **extra)
    return lambda seed: optuna.samplers.RandomSampler(seed=seed)


class _PerTrialSeededSampler(BaseSampler):
    """Delegates to a sampler seeded with `seed + trial.number`.

    One seed per process would make a resumed sweep, or two workers started together, draw the
    same values again; trial numbers are unique within a study, so this keeps runs reproducible
    and workers apart.
    """

    def __init__(self, factory: Any, seed: int) -> None:
        self._factory, self._seed = factory, seed
        self._number: Optional[int] = None
        self._inner: Optional[BaseSampler] = None

    def _for(self, trial: FrozenTrial) -> BaseSampler:
        if self._inner is None or self._number != trial.number:
            self._inner, self._number = self._factory(self._seed + trial.number), trial.number
        return self._inner

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Optional[Sequence[float]]
    ) -> None:
        self._for(trial).after_trial(study, trial, state, values)


class _AskTellGridSampler(GridSampler):
    """GridSampler without its after_trial hook, which calls study.stop() (valid only inside
    study.optimize); the sweeper caps n_trials at the grid size itself. A point whose trial was
    interrupted (its sweep stopped, or its worker died: a stale trial has no fail reason) is not
    visited, so a resumed sweep runs it; a point that failed by its own values stays visited."""

    def _get_unvisited_grid_ids(self, study: optuna.Study) -> list[int]:
        visited, running = set(), set()
        for t in study._storage.get_all_trials(study._study_id, deepcopy=False):
            if "grid_id" not in t.system_attrs or not self._same_search_space(t.system_attrs["search_space"]):
                continue
            if t.state == TrialState.RUNNING:
                running.add(t.system_attrs["grid_id"])
            elif t.state.is_finished() and not _interrupted(t):
                visited.add(t.system_attrs["grid_id"])
        every = set(range(self._n_min_trials))
        return sorted(every - visited - running or every - visited)  # all started: the running, as GridSampler

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Optional[Sequence[float]]
    ) -> None:
        return None


# ---------------------------------------------------------------------- helpers


def _outcome(
    trial: optuna.Trial, result: JobReturn, objectives: Objectives
) -> tuple[TrialState, Optional[list[float]], Optional[str]]:
    # JobReturn's field (Hydra 1.3): its return_value property writes "Error executing job" before it raises
    if result.status == JobStatus.FAILED and isinstance(result._return_value, optuna.TrialPruned):
        return TrialState.PRUNED, None, None  # a normal early stop
    try:
        returned = result.return_value
    except Exception as error:
        if not isinstance(error, ConfigError):  # a config error's message, logged as the reason, names its key
            log.error("trial %d raised", trial.number, exc_info=error)
        return TrialState.FAIL, None, f"{type(error).__name__}: {error}"
    values, reason = objectives.values_from(returned)
    return (TrialState.COMPLETE, values, None) if reason is None else (TrialState.FAIL, None, reason)


def _never_returned(study: optuna.Study, trial: optuna.Trial, result: JobReturn, objectives: Objectives
                    ) -> Optional[str]:
    """Why the sweep stops now, when a trial's run returned without an objective and no trial of the study ever
    completed: a run's config decides which metrics it returns (eval.decode.enabled=false drops
    throughput/decode_tok_s), so every later trial would train in full and fail alike."""
    if result.status != JobStatus.COMPLETED or study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None  # it raised, or the config has produced every objective before: this trial's own failure
    missing = objectives.missing_from(result.return_value)
    if not missing:
        return None
    return (f"trial {trial.number} returned no {', '.join(missing)} and no trial of the study has completed, so "
            f"every trial would fail alike: make the runs' config produce each metric of hydra.sweeper.directions "
            f"(it returned {sorted(map(str, result.return_value))})")


def _without_password(override: str) -> str:
    key, sep, value = override.partition("=")
    return f"{key}{sep}{redact_url(value)}" if "://" in value else override


def _last_fail_reason(trials: Sequence[FrozenTrial]) -> str:
    reasons = [t.user_attrs.get(FAIL_REASON_ATTR) for t in trials if t.state == TrialState.FAIL]
    return next((reason for reason in reversed(reasons) if reason), "none recorded")


def _interrupted(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.FAIL and (trial.user_attrs.get(INTERRUPTED_ATTR, False)
                                                or FAIL_REASON_ATTR not in trial.user_attrs)


def _duplicate_of(study: optuna.Study, trial: optuna.Trial, values: Mapping[str, Any]) -> str:
    """A reason if a COMPLETE, PRUNED or RUNNING trial already has exactly these values, else ''."""
    for other in study.get_trials(deepcopy=False, states=(*_COUNTED, TrialState.RUNNING)):
        if other.number != trial.number and other.params == dict(values):
            return f"duplicate of trial {other.number} (same parameters)"
    return ""


class _Heartbeats:
    """Records a heartbeat for every in-flight trial (what Study.optimize does for its trials).

    The first beat is written when the trial starts: Optuna never counts a RUNNING trial without
    any heartbeat as stale, so a worker killed before its first beat would leave it RUNNING forever.
    """

    def __init__(self, storage: Any, study_name: str, interval: int) -> None:
        self._storage, self._interval = storage, interval
        self._study_id = storage.get_study_id_from_name(study_name)
        self._trial_ids: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat_until_stopped, name="optuna-heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeats:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join()

    def add(self, number: int) -> None:
        trial_id = self._storage.get_trial_id_from_study_id_trial_number(self._study_id, number)
        self._storage.record_heartbeat(trial_id)
        self._trial_ids[number] = trial_id

    def remove(self, number: int) -> None:
        self._trial_ids.pop(number, None)

    def _beat_until_stopped(self) -> None:
        while not self._stop.wait(self._interval):
            for number, trial_id in list(self._trial_ids.items()):
                try:
                    self._storage.record_heartbeat(trial_id)
                except Exception as error:  # a missed beat at worst makes the trial look stale late
                    log.debug("heartbeat of trial %d failed: %s", number, error)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block has run, then interrupt as they would have."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise KeyboardInterrupt(f"signal {signal.Signals(received[0]).name}")


@contextmanager
def _sigterm_raises_keyboard_interrupt() -> Iterator[None]:
    """SIGTERM (schedulers, `kill`) ends the sweep the way Ctrl-C does: trials FAIL, parent run KILLED."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _dataclass_from(cls: type, node: Any, where: str) -> Any:
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    unknown = set(values) - set(cls.__dataclass_fields__)
    if unknown:
        allowed = sorted(cls.__dataclass_fields__)
        raise SweepConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {allowed}")
    return cls(**values)


def _sampler_label(conf: SamplerConf) -> str:
    return f"{conf.kind}(seed={conf.seed})"


def _space_summary(space: SearchSpace, objectives: Objectives) -> dict[str, Any]:
    def describe(param: Any) -> dict[str, Any]:
        fields = {k: v for k, v in vars(param).items() if k not in ("name", "override_key", "when")}
        if param.when is not None:
            fields["when"] = param.when.source
        return fields

    return {
        "params": {param.name: describe(param) for param in space.params},
        "constraints": [constraint.source for constraint in space.constraints],
        "directions": dict(zip(objectives.names, objectives.directions)),
    }
