"""arch_lab.sweep: the Optuna Hydra sweeper, driven end to end through tests/sweep_app in subprocesses.

Each end-to-end test (marked slow: every app process pays Hydra + Optuna + MLflow start-up) works
in its own directory with its own `optuna.db` and `mlruns.db`, copied from one MLflow store
initialised per module since creating MLflow's schema takes seconds; the two-worker test starts
from nothing, so that both workers race to create both schemas.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.trial import FixedTrial, TrialState

from arch_lab.sweep import current_trial
from arch_lab.sweep.optuna_sweeper import (Objectives, OptunaSweeper, SamplerConf, _signals_deferred,
                                           _without_password, make_sampler)
from arch_lab.sweep.pareto import Objective, describe_trial
from arch_lab.sweep.search_space import (
    CategoricalParam,
    FloatParam,
    IntParam,
    SearchSpaceError,
    SweepConfigError,
    build_search_space,
    override_value,
    parse_param,
)
from arch_lab.sweep.study_tracking import ENV_TRIAL_NUMBER, open_storage, resolve_storage_url
from arch_lab.tracking import hide_absolute_path, redact_url

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "tests" / "sweep_app" / "app.py"
EXPERIMENT = "sweep_app"


# ---------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlruns.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def workdir(tmp_path: Path, mlflow_template: Path) -> Path:
    shutil.copy(mlflow_template, tmp_path / "mlruns.db")
    return tmp_path


def _env(workdir: Path, sleep_if_trial: int | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARCH_LAB_SWEEP_", "MLFLOW_", "SWEEP_APP_"))}
    if sleep_if_trial is not None:
        env["SWEEP_APP_SLEEP_IF_TRIAL"] = str(sleep_if_trial)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlruns.db'}"
    return env


def _command(*overrides: str) -> list[str]:
    return [sys.executable, str(APP), "-m", *overrides, f"hydra.sweeper.experiment_name={EXPERIMENT}"]


def run_app(workdir: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _command(*overrides), cwd=workdir, env=_env(workdir), capture_output=True, text=True, timeout=300
    )


def start_app(workdir: Path, *overrides: str, sleep_if_trial: int | None = None) -> subprocess.Popen[str]:
    """The app in the background; trial `sleep_if_trial` sleeps for two minutes, long enough to be interrupted."""
    return subprocess.Popen(
        _command(*overrides), cwd=workdir, env=_env(workdir, sleep_if_trial), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )


def load_study(workdir: Path, name: str) -> optuna.Study:
    # open_storage, like the workers: it serialises creating the schema of a fresh SQLite file.
    return optuna.load_study(study_name=name, storage=open_storage(f"sqlite:///{workdir / 'optuna.db'}"))


def mlflow_client(workdir: Path) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{workdir / 'mlruns.db'}")


def parent_run(client: Any, study_name: str) -> Any:
    """The one run of the study that has no parent."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`sweep.study_name` = '{study_name}'")
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert len(parents) == 1, [run.info.run_name for run in parents]
    return parents[0]


def child_runs(client: Any, parent_id: str) -> dict[int, Any]:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    numbers = [int(run.data.tags["trial.number"]) for run in runs]
    assert len(numbers) == len(set(numbers)), f"two child runs for one trial: {sorted(numbers)}"
    return {int(run.data.tags["trial.number"]): run for run in runs}


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def stopped_console(result: subprocess.CompletedProcess[str]) -> str:
    """The console (stdout) of a sweep that its config stopped: exit status 1 and no traceback, the reason logged."""
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr, result.stderr[-4000:]
    return result.stdout


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr[-4000:]


def complete_param_sets(study: optuna.Study) -> list[tuple[tuple[str, Any], ...]]:
    return [tuple(sorted(t.params.items())) for t in study.get_trials(states=(TrialState.COMPLETE,))]


# ---------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_multi_objective_sweep_has_one_parent_run_and_a_child_per_trial(workdir: Path) -> None:
    assert_ok(run_app(workdir, "hparams_search=multi"))

    study = load_study(workdir, "multi")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    client = mlflow_client(workdir)
    parent = parent_run(client, "multi")
    assert parent.info.run_name == "multi" and parent.info.status == "FINISHED"
    assert parent.data.tags["sweep.storage"] == "sqlite:///<abs>/optuna.db"  # no machine paths in logged values
    assert parent.data.tags["sweep.sampler"] == "nsgaii(seed=0)"
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id

    children = child_runs(client, parent.info.run_id)
    assert sorted(children) == [0, 1, 2]
    front = {t.number for t in study.best_trials}
    for trial in trials:
        child = children[trial.number]
        assert child.info.status == "FINISHED"
        assert trial.user_attrs["mlflow_run_id"] == child.info.run_id
        assert {name: child.data.metrics[name] for name in ("quality", "cost", "size")} == dict(
            zip(["quality", "cost", "size"], trial.values)
        )
        assert child.data.params == {name: str(value) for name, value in trial.params.items()}
        # model.window is sampled only when model.n_heads > 0 (its `when:`).
        assert ("model.window" in trial.params) == (trial.params["model.n_heads"] > 0)
        assert child.data.tags["sweep.best"] == ("true" if trial.number in front else "false")

    assert {a.path for a in client.list_artifacts(parent.info.run_id, "pareto")} == {
        "pareto/pareto_front.csv", "pareto/pareto_front.json", "pareto/pareto_front.png"
    }
    local = Path(client.download_artifacts(parent.info.run_id, "pareto", str(workdir / "downloaded")))
    with open(local / "pareto_front.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["trial"]) for row in rows] == sorted(front)
    assert list(rows[0])[:4] == ["trial", "quality", "cost", "size"]
    assert (local / "pareto_front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert parent.data.tags["sweep.best_trials"] == ",".join(str(n) for n in sorted(front))


@pytest.mark.slow
def test_interrupted_then_killed_sweep_resumes_to_n_trials_without_repeating_trials(workdir: Path) -> None:
    overrides = [
        "hparams_search=single", "hydra.sweeper.pruner.kind=none",
        "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=2",
    ]

    # 1. SIGTERM while trial 2 runs: the sweep stops cleanly.
    worker = start_app(workdir, *overrides, sleep_if_trial=2)
    wait_for(lambda: _reported_all_steps(workdir, "single", 2), 120, "trial 2 to start sleeping")
    worker.send_signal(signal.SIGTERM)
    stdout, stderr = worker.communicate(timeout=60)
    assert worker.returncode == 143, stderr[-4000:]  # the shell's status for SIGTERM, one line and no traceback
    assert "Traceback" not in stderr and "interrupted (SIGTERM): the trials in flight are recorded" in stdout
    client = mlflow_client(workdir)
    parent = parent_run(client, "single")
    assert parent.info.status == "KILLED"
    study = load_study(workdir, "single")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]
    assert study.trials[2].user_attrs["fail_reason"].startswith("interrupted by KeyboardInterrupt")
    assert child_runs(client, parent.info.run_id)[2].info.status == "KILLED"
    finished_before = {t.number: t.params for t in study.trials if t.state == TrialState.COMPLETE}

    # 2. The resumed sweep is SIGKILLed while trial 3 runs: nothing cleans up, trial 3 stays RUNNING.
    worker = start_app(workdir, *overrides, sleep_if_trial=3)
    wait_for(lambda: _reported_all_steps(workdir, "single", 3), 120, "trial 3 to start sleeping")
    worker.kill()
    worker.communicate(timeout=60)
    assert load_study(workdir, "single").trials[3].state == TrialState.RUNNING

    # 3. The next resume fails the stale trial 3 (no heartbeat for grace_period), re-runs its values
    #    and finishes the study; the trials that had finished are neither re-run nor repeated.
    assert_ok(run_app(workdir, *overrides))
    study = load_study(workdir, "single")
    assert study.trials[3].state == TrialState.FAIL
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == 3]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert retried[0].params == study.trials[3].params
    stale = child_runs(client, parent.info.run_id)[3]  # no process was left to end it: the resume did
    assert stale.info.status == "KILLED" and stale.data.tags["fail_reason"] == "its worker died (no heartbeat)"
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 4
    assert {t.number: t.params for t in complete if t.number in finished_before} == finished_before
    assert len(set(complete_param_sets(study))) == 4
    resumed = client.get_run(parent.info.run_id)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["sweep.resumed_from_status"] == "KILLED"
    assert sorted(child_runs(client, parent.info.run_id)) == [t.number for t in study.trials]

    # 4. The finished study's command, run again, runs nothing and logs its best trial once more, not twice
    assert_ok(run_app(workdir, *overrides))
    assert len(load_study(workdir, "single").trials) == len(study.trials)
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "pareto/pareto_front.json",
                                                      str(workdir / "front"))).read_text())
    assert [row[table["columns"].index("trial")] for row in table["data"]] == [study.best_trial.number]


def _reported_all_steps(workdir: Path, name: str, number: int) -> bool:
    """True once trial `number` reported its 3 intermediate values (the app then sleeps)."""
    if not (workdir / "optuna.db").exists():
        return False
    try:
        trials = load_study(workdir, name).get_trials()
    except KeyError:  # the study does not exist yet
        return False
    return len(trials) > number and len(trials[number].intermediate_values) == 3


@pytest.mark.slow
def test_failing_trials_are_recorded_and_the_sweep_goes_on(workdir: Path) -> None:
    result = run_app(
        workdir,
        "hparams_search=single",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.max_failed_trials=4",
        "y=choice(-0.25,0.75)",  # a command-line sweep replaces the configured y
        "steps=2",  # a fixed override reaches every trial
        "knobs.fail_if_trial=1",
        "knobs.nan_if_trial=2",
        "knobs.drop_metric_if_trial=3",
        "knobs.bad_intermediate_if_trial=5",  # pruned: trials 0 and 4 complete the median's startup
    )
    assert_ok(result)

    study = load_study(workdir, "single")
    states = {t.number: t.state for t in study.trials}
    C, F, P = TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED
    assert states == {0: C, 1: F, 2: F, 3: F, 4: C, 5: P}
    reasons = {t.number: t.user_attrs.get("fail_reason") for t in study.trials if t.state == F}
    assert reasons[1] == "RuntimeError: injected failure"
    assert reasons[2] == "metric 'loss' is nan"
    assert reasons[3].startswith("metric 'loss' (hydra.sweeper.directions) is missing from the task's return value")
    assert all(t.params["y"] in (-0.25, 0.75) for t in study.trials)
    assert all(len(t.intermediate_values) <= 2 for t in study.trials)

    client = mlflow_client(workdir)
    parent = parent_run(client, "single")
    assert parent.info.status == "FINISHED"
    children = child_runs(client, parent.info.run_id)
    for number in (1, 2, 3):
        assert children[number].info.status == "FAILED"
        assert children[number].data.tags["fail_reason"] == reasons[number]
        assert children[number].data.tags["trial.state"] == "FAIL"
    assert children[5].data.tags["trial.state"] == "PRUNED" and children[5].info.status == "FINISHED"
    assert children[study.best_trial.number].data.tags["sweep.best"] == "true"
    assert parent.data.metrics["best/loss"] == pytest.approx(study.best_value)
    # the console ends with the front and the counts
    console = result.stdout + result.stderr
    assert console.count("Error executing job") == 1  # trial 1's raise; not the pruned trial's normal early stop
    assert f"single: FINISHED; 2 complete, 1 pruned, 3 failed of 3; MLflow parent run {parent.info.run_id}" in console
    best = describe_trial(study.best_trial, [Objective("loss", "minimize")])
    assert "single: the best of the 2 complete trials:" in console and f"\t{best}" in console
    assert best.startswith(f"#{study.best_trial.number} ") and f": loss={study.best_value:.4g}" in best


@pytest.mark.slow
def test_a_grid_whose_every_point_failed_ends_the_sweep_failed(workdir: Path) -> None:
    """Trying every point of a grid is the end of a sweep, but not a finished one when no trial completed (it used
    to end FINISHED, exit status 0, whenever n_trials covered the grid)."""
    result = run_app(workdir, "hparams_search=grid", "knobs.fail_if_trial=0")  # one point, n_trials=4
    assert result.returncode == 1, result.stderr[-4000:]
    assert "every grid point's trial failed (1 trials); last failure: RuntimeError: injected failure" in result.stdout
    assert [t.state for t in load_study(workdir, "grid").trials] == [TrialState.FAIL]
    assert parent_run(mlflow_client(workdir), "grid").info.status == "FAILED"
    assert_ok(run_app(workdir, "hparams_search=grid", "hydra.sweeper.study_name=grid_ok"))  # the point itself is fine


@pytest.mark.slow
def test_two_workers_sharing_one_storage_split_the_trials(tmp_path: Path) -> None:
    # Fresh optuna.db AND mlruns.db: both workers race to create both schemas.
    workdir = tmp_path
    overrides = ["hparams_search=single", "hydra.sweeper.pruner.kind=none", "hydra.sweeper.n_trials=4"]
    workers = [start_app(workdir, *overrides) for _ in range(2)]
    for worker in workers:
        _, stderr = worker.communicate(timeout=300)
        assert worker.returncode == 0, stderr[-4000:]
        assert "Traceback" not in stderr

    study = load_study(workdir, "single")
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 4
    assert len({t.number for t in study.trials}) == len(study.trials)
    assert len(set(complete_param_sets(study))) == 4
    client = mlflow_client(workdir)
    parent = parent_run(client, "single")  # one parent run although two workers started together
    assert parent.info.status == "FINISHED"
    assert sorted(child_runs(client, parent.info.run_id)) == sorted(t.number for t in complete)


@pytest.mark.slow
def test_a_config_that_drops_an_objective_stops_the_sweep_after_one_trial(workdir: Path) -> None:
    # Without a completed trial, a missing objective is the config's doing (the lab's eval.decode.enabled=false
    # drops throughput/decode_tok_s): the other trials would train in full and fail alike.
    result = run_app(workdir, "hparams_search=single", "hydra.sweeper.n_trials=3", "knobs.drop_metric_if_trial=0")
    assert "trial 0 returned no loss and no trial of the study has completed" in stopped_console(result)
    study = load_study(workdir, "single")
    assert [t.state for t in study.trials] == [TrialState.FAIL]
    assert parent_run(mlflow_client(workdir), "single").info.status == "FAILED"


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("hydra.sweeper.params.x.high=null", "hydra.sweeper.params.x.high must be a finite number, got None"),
    # Hydra instantiates the sweeper with its own wrapped error around what the constructor raises
    ("hydra.sweeper.n_trials=0", "] hydra.sweeper.n_trials must be a positive integer, got 0\n"),
    # a study made before the tracking store was refused would hold the bad URI among its fixed overrides
    ("hydra.sweeper.tracking_uri=mlruns.db", "hydra.sweeper.tracking_uri=mlruns.db: MLflow refuses file stores"),
    ("hydra.sweeper.storage=bogus://x", "hydra.sweeper.storage=bogus://x: "),  # then SQLAlchemy's words
])
def test_malformed_sweeper_settings_name_the_key_before_any_study(workdir: Path, override: str, message: str) -> None:
    result = run_app(workdir, "hparams_search=single", override)
    assert message in stopped_console(result)
    assert not (workdir / "optuna.db").exists()


@pytest.mark.slow
def test_a_study_resumed_with_other_overrides_or_an_unknown_search_key_is_refused(workdir: Path) -> None:
    assert_ok(run_app(workdir, "hparams_search=single", "hydra.sweeper.n_trials=1", "steps=2"))
    # another fixed override under the same study name would mix its trials with the study's
    result = run_app(workdir, "hparams_search=single", "hydra.sweeper.n_trials=2", "steps=1")
    assert result.returncode != 0
    assert ("study 'single' in its storage ran its trials with the overrides ['hparams_search=single', 'steps=2'], "
            "this sweep has ['hparams_search=single', 'steps=1']") in stopped_console(result)
    assert len(load_study(workdir, "single").trials) == 1
    # a search key the config lacks: refused before any study exists
    result = run_app(workdir, "hparams_search=single", "hydra.sweeper.study_name=typo", "model.n_headz=choice(1,2)")
    error = stopped_console(result)
    assert "a trial's config does not compose from the sweep's overrides" in error and "model.n_headz" in error
    assert [s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{workdir / 'optuna.db'}")] == ["single"]


@pytest.mark.slow
def test_a_study_without_results_is_started_again_with_corrected_overrides(workdir: Path) -> None:
    """Every trial of the first command fails by its fixed overrides; the corrected command keeps the study name."""
    result = run_app(workdir, "hparams_search=single", "hydra.sweeper.n_trials=1", "knobs.fail_if_trial=0")
    assert result.returncode == 1 and "1 trials failed in this sweep" in result.stdout, result.stderr[-4000:]
    old_parent = parent_run(mlflow_client(workdir), "single")
    result = run_app(workdir, "hparams_search=single", "hydra.sweeper.n_trials=1")
    assert_ok(result)
    assert ("study 'single' in its storage ran its trials with the overrides ['hparams_search=single', "
            "'knobs.fail_if_trial=0'], this sweep has ['hparams_search=single'], and holds no result (1 trial(s), "
            "all FAIL): it is started again") in result.stdout
    assert [t.state for t in load_study(workdir, "single").trials] == [TrialState.COMPLETE]
    client = mlflow_client(workdir)
    old = client.get_run(old_parent.info.run_id)
    new_id = old.data.tags["sweep.superseded_by"]
    assert old.info.status == "FAILED" and client.get_run(new_id).info.status == "FINISHED"
    assert [run.data.tags["trial.state"] for run in child_runs(client, new_id).values()] == ["COMPLETE"]


def _sweeper(poll_interval: float = 0.01) -> OptunaSweeper:
    return OptunaSweeper(study_name="s", storage=None, n_trials=1, n_jobs=1, sampler={}, pruner={},
                         directions={"loss": "minimize"}, params={}, constraints=[], max_failed_trials=None,
                         tracking_uri=None, experiment_name=None, heartbeat_interval=60, grace_period=None,
                         poll_interval=poll_interval)


def test_a_study_is_started_again_only_when_it_has_trials_and_all_failed(tmp_path: Path) -> None:
    """A worker whose overrides differ from a study just created (no trial yet) by another is refused, not allowed
    to delete and recreate it; a stale restart never deletes the study another worker has started again."""
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    objectives, sampler = Objectives.parse({"loss": "minimize"}), optuna.samplers.RandomSampler(seed=0)
    pruner = optuna.pruners.NopPruner()
    first, created = _sweeper()._open_study(storage, sampler, pruner, objectives, ["steps=2"])
    assert created
    with pytest.raises(SweepConfigError, match=r"^study 's' in its storage ran its trials with the overrides "
                                               r"\['steps=2'\], this sweep has \['steps=1'\]: .*; it has no trial yet: "
                                               r"if no sweep runs it, delete it \(optuna delete-study --study-name s "):
        _sweeper()._open_study(storage, sampler, pruner, objectives, ["steps=1"])
    first.tell(first.ask(), state=TrialState.FAIL)
    stale = first.user_attrs["created_as"]  # the creation a racing worker judged before the others moved
    again, created = _sweeper()._open_study(storage, sampler, pruner, objectives, ["steps=1"])  # all FAIL: restarted
    assert created and again.user_attrs["fixed_overrides"] == ["steps=1"] and again.trials == []
    _sweeper()._delete_if_unchanged(storage, stale)  # the racing worker's delete of the study it had read
    assert optuna.load_study(study_name="s", storage=storage).user_attrs == again.user_attrs


def test_a_grid_point_whose_trial_was_interrupted_is_sampled_again() -> None:
    space = build_search_space({"model.n_heads": {"type": "categorical", "choices": [0, 4, 8]}}, [], [], set())
    study = optuna.create_study(sampler=make_sampler(SamplerConf(kind="grid", seed=0), space))

    def run(state: TrialState, **user_attrs: Any) -> int:
        trial = study.ask()
        for key, value in user_attrs.items():
            trial.set_user_attr(key, value)
        n_heads = trial.suggest_categorical("model.n_heads", [0, 4, 8])
        study.tell(trial, state=state, values=[1.0] if state == TrialState.COMPLETE else None)
        return n_heads

    interrupted = run(TrialState.FAIL, fail_reason="interrupted by KeyboardInterrupt: ", interrupted=True)
    failed = run(TrialState.FAIL, fail_reason="RuntimeError: out of memory")  # its values' doing: stays visited
    last = run(TrialState.COMPLETE)
    assert sorted([interrupted, failed, last]) == [0, 4, 8]
    assert not study.sampler.is_exhausted(study)
    assert run(TrialState.COMPLETE) == interrupted
    assert study.sampler.is_exhausted(study)


# ---------------------------------------------------------------------------- search space


CONFIG = OmegaConf.create({"model": {"n_heads": 4, "window": 128, "values": 7}, "data": {"seq_len": 256}})


def head_ratio_space(constraints: list[str] | None = None) -> Any:
    return build_search_space(
        {
            "model.n_heads": {"type": "categorical", "choices": [0, 4, 8, 16]},
            "model.window": {"type": "int", "low": 64, "high": 512, "step": 64, "when": "model.n_heads > 0"},
            "optim.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
        },
        constraints or [],
        [],
        set(),
    )


def test_conditional_param_is_sampled_only_when_its_expression_holds() -> None:
    space = head_ratio_space()
    assert space.sample(FixedTrial({"model.n_heads": 0, "optim.lr": 1e-3}), CONFIG) == {
        "model.n_heads": 0, "optim.lr": 1e-3
    }
    assert space.sample(FixedTrial({"model.n_heads": 8, "model.window": 192, "optim.lr": 1e-3}), CONFIG) == {
        "model.n_heads": 8, "model.window": 192, "optim.lr": 1e-3
    }


def test_constraints_read_sampled_values_and_the_config() -> None:
    space = head_ratio_space(["model.window <= data.seq_len", "model.values == 7"])
    space.check_names(CONFIG)
    assert space.violated_constraints({"model.n_heads": 4, "model.window": 256, "optim.lr": 1e-3}, CONFIG) == []
    assert space.violated_constraints({"model.n_heads": 4, "model.window": 512, "optim.lr": 1e-3}, CONFIG) == [
        "violates hydra.sweeper.constraints[0]: 'model.window <= data.seq_len'"
    ]
    # A constraint on a parameter this trial does not sample does not apply.
    assert space.violated_constraints({"model.n_heads": 0, "optim.lr": 1e-3}, CONFIG) == []


def test_hydra_sweep_syntax_becomes_optuna_params() -> None:
    assert parse_param("a", "choice(0,4,8)") == CategoricalParam("a", (0, 4, 8), "a")
    assert parse_param("a", "range(64,513,64)") == IntParam("a", 64, 512, "a", step=64)
    assert parse_param("a", "interval(0.1,0.5)") == FloatParam("a", 0.1, 0.5, "a")
    assert parse_param("+a", "tag(log, interval(1e-4,1e-2))") == FloatParam("a", 1e-4, 1e-2, "+a", log=True)


def test_fixed_override_removes_the_param_and_cli_sweep_replaces_it() -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweep = OverridesParser.create().parse_overrides(["optim.lr=0.1,0.2"])
    configured = {
        "model.n_heads": {"type": "categorical", "choices": [0, 4]},
        "optim.lr": {"type": "float", "low": 1e-4, "high": 3e-3},
    }
    space = build_search_space(configured, [], sweep, {"model.n_heads"})
    assert space.params == (CategoricalParam("optim.lr", (0.1, 0.2), "optim.lr"),)


def test_override_values_are_quoted_when_hydra_would_retype_them() -> None:
    assert [override_value(v) for v in (None, True, 3, 1e-05, "adamw", "true", "a b", "it's")] == [
        "null", "true", "3", "1e-05", "adamw", "'true'", "'a b'", "'it\\'s'"
    ]


@pytest.mark.parametrize(
    ("params", "constraints", "message"),
    [
        ({"x": {"type": "gauss"}}, [], "hydra.sweeper.params.x.type must be one of ['categorical', 'int', 'float'], got 'gauss'"),
        ({"x": {"type": "float", "low": 1, "high": 2, "scale": 3}}, [], "hydra.sweeper.params.x: unknown field(s) ['scale'] for type float"),
        ({"x": {"type": "float", "low": 2, "high": 1}}, [], "hydra.sweeper.params.x: low (2) must not exceed high (1)"),
        ({"x": {"type": "float", "low": 0, "high": 1, "log": True}}, [], "hydra.sweeper.params.x: log=true needs low > 0, got low=0"),
        ({"x": {"type": "int", "low": 0.5, "high": 3}}, [], "hydra.sweeper.params.x.low must be an integer for type int, got 0.5"),
        ({"x": {"type": "categorical", "choices": []}}, [], "hydra.sweeper.params.x.choices must be a non-empty list, got []"),
        ({"x": "3"}, [], "hydra.sweeper.params.x: '3' is a single value"),
        ({"x": {"type": "int", "low": 0, "high": 3, "when": "y >"}}, [], "hydra.sweeper.params.x.when: invalid expression 'y >'"),
        (
            {"x": {"type": "int", "low": 0, "high": 3, "when": "y > 0"}, "y": {"type": "int", "low": 0, "high": 3}},
            [],
            "hydra.sweeper.params.x.when: 'y > 0' reads 'y', which is sampled at or after 'x'",
        ),
        ({"x": {"type": "int", "low": 0, "high": 3}}, "x < 2", "hydra.sweeper.constraints must be a list of expression strings"),
    ],
)
def test_malformed_search_space_error_names_the_key(params: Any, constraints: Any, message: str) -> None:
    with pytest.raises(SearchSpaceError) as error:
        build_search_space(params, constraints, [], set())
    assert str(error.value).startswith(message)


def test_expression_reading_an_unknown_name_fails_before_any_trial() -> None:
    space = head_ratio_space(["model.windw <= 512"])
    with pytest.raises(SearchSpaceError, match=r"hydra.sweeper.constraints\[0\]: 'model.windw <= 512' reads 'model.windw'"):
        space.check_names(CONFIG)


@pytest.mark.parametrize(
    ("directions", "message"),
    [
        ({}, "hydra.sweeper.directions must map at least one metric name"),
        ({"loss": "down"}, "hydra.sweeper.directions.loss must be one of ['maximize', 'minimize'], got 'down'"),
    ],
)
def test_malformed_directions_name_the_key(directions: Any, message: str) -> None:
    with pytest.raises(SweepConfigError) as error:
        Objectives.parse(directions)
    assert str(error.value).startswith(message)


def test_sampler_errors_name_the_key() -> None:
    space = head_ratio_space()
    with pytest.raises(SweepConfigError, match=r"hydra.sweeper.sampler.kind must be one of \['tpe', 'nsgaii', 'random', 'grid'\]"):
        make_sampler(SamplerConf(kind="cmaes"), space)
    with pytest.raises(SweepConfigError, match="hydra.sweeper.sampler.population_size applies to kind nsgaii only"):
        make_sampler(SamplerConf(kind="tpe", population_size=4), space)
    with pytest.raises(SweepConfigError, match="hydra.sweeper.params.optim.lr: sampler kind grid needs a finite set"):
        make_sampler(SamplerConf(kind="grid"), space)


def test_objective_values_fail_with_a_reason() -> None:
    objectives = Objectives.parse({"acc": "maximize", "cost": "minimize"})
    assert objectives.values_from({"acc": 0.5, "cost": 2, "other": 1}) == ([0.5, 2.0], None)
    assert objectives.values_from({"acc": 0.5}) == (
        None,
        "metric 'cost' (hydra.sweeper.directions) is missing from the task's return value; it returned ['acc']",
    )
    assert objectives.values_from({"acc": float("inf"), "cost": 1}) == (None, "metric 'acc' is inf")
    assert objectives.values_from(0.5)[1].startswith("the task returned float, not a mapping")


def test_storage_urls_default_beside_mlflow_and_hide_passwords(tmp_path: Path) -> None:
    assert resolve_storage_url(None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'optuna.db'}"
    assert resolve_storage_url("sqlite:///sub/x.db", tmp_path) == f"sqlite:///{tmp_path.resolve() / 'sub' / 'x.db'}"
    assert redact_url("postgresql://lab:s3cret@db:5432/optuna") == "postgresql://lab:***@db:5432/optuna"
    # the sweep.storage tag also drops absolute paths (relative ones and server URLs stay as they are)
    assert hide_absolute_path(redact_url("sqlite:////tmp/stores/optuna_h2.db")) == "sqlite:///<abs>/optuna_h2.db"
    assert hide_absolute_path("sqlite:///optuna.db") == "sqlite:///optuna.db"
    assert hide_absolute_path("postgresql://lab:***@db:5432/optuna") == "postgresql://lab:***@db:5432/optuna"
    # the study keeps its fixed overrides (and a refused resume prints them): without a password either
    assert _without_password("logger.tracking_uri=postgresql://lab:s3cret@db/ml") == \
        "logger.tracking_uri=postgresql://lab:***@db/ml"


def test_current_trial_is_none_outside_a_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_TRIAL_NUMBER, raising=False)
    assert current_trial() is None


def test_a_signal_while_trials_are_recorded_interrupts_once_they_are() -> None:
    # A Ctrl-C inside the recording of a finished trial (MLflow queries take a while) used to discard its result.
    recorded, before = [], signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="signal SIGTERM"):
        with _signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # the handler runs between bytecodes: recording goes on
            recorded.append("trial 0")
    assert recorded == ["trial 0"]
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back
