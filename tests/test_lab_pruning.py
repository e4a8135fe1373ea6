"""prune_metric: in a sweep with a pruner, a lab run reports its validation metric to its Optuna trial at every
validation, and a metric that validation does not log, or that improves the other way than the study's objective
(which would prune the best trials), is refused."""
from __future__ import annotations

from pathlib import Path

import pytest

from arch_lab.sweep_callbacks import check_prune_metric
from components.config import ConfigError
from lab_helpers import TINY, metric_history, run_lab

SEARCH = ["-m", "hparams_search=meta_tokens", "hydra.sweeper.pruner.kind=median",
          "hydra.sweeper.pruner.n_startup_trials=1", *TINY, "eval.analysis.enabled=false"]


@pytest.mark.parametrize("metric, kind, directions, message", [
    ("val/acc", "mqar", None, "prune_metric='val/acc' is not logged by validation on data.kind=mqar; allowed: "
                              "val/loss, val/mqar_acc, null"),
    ("val/acc", "mqar", ["maximize"], "prune_metric='val/acc' is not logged by validation on data.kind=mqar; "
                                      "allowed: val/mqar_acc, null"),  # val/loss would be refused for this study
    ("val/mqar_acc", "text", None, "prune_metric='val/mqar_acc' is not logged by validation on data.kind=text; "
                                   "allowed: val/loss, null"),
    ("val/loss", "mqar", ["maximize"], "prune_metric=val/loss is better lower, the study's objective higher: the "
                                       "pruner would stop the best trials; use val/mqar_acc"),
    ("val/mqar_acc", "mqar", ["minimize"], "prune_metric=val/mqar_acc is better higher, the study's objective lower: "
                                           "the pruner would stop the best trials; use val/loss"),
])
def test_a_prune_metric_that_is_not_logged_or_improves_the_other_way_is_refused(metric, kind, directions, message):
    with pytest.raises(ConfigError) as error:
        check_prune_metric(metric, kind, directions)
    assert str(error.value) == message


def test_a_prune_metric_logged_and_improving_the_objectives_way_passes():
    check_prune_metric("val/mqar_acc", "mqar", ["maximize"])
    check_prune_metric("val/loss", "text", ["minimize"])
    check_prune_metric("val/loss", "mqar", ["maximize", "minimize"])  # Optuna prunes single-objective studies only
    check_prune_metric(None, "mqar", ["maximize"])


def test_a_sweep_trial_reports_its_validation_metric_at_every_validation(tmp_path: Path):
    import optuna

    run_lab([*SEARCH, "hydra.sweeper.n_trials=1", "prune_metric=val/mqar_acc",
             f"hydra.sweep.dir={tmp_path / 'multirun'}"], tmp_path)
    study = optuna.load_study(study_name="meta_tokens", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    logged = metric_history(tmp_path, trial.user_attrs["mlflow_run_id"], "val/mqar_acc")
    # Lightning logs the validation after step k at step k - 1; the trial gets global_step k
    assert trial.intermediate_values == pytest.approx({step + 1: value for step, value in logged})
    assert sorted(trial.intermediate_values) == [3, 6]


def test_a_sweep_whose_prune_metric_improves_the_other_way_fails_its_trial(tmp_path: Path):
    import optuna

    proc = run_lab([*SEARCH, "hydra.sweeper.n_trials=1", "prune_metric=val/loss",
                    f"hydra.sweep.dir={tmp_path / 'multirun'}"], tmp_path, check=False)
    assert proc.returncode == 1
    study = optuna.load_study(study_name="meta_tokens", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.FAIL
    assert "prune_metric=val/loss is better lower, the study's objective higher" in trial.user_attrs["fail_reason"]
