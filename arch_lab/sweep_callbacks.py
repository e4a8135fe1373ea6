"""Lightning callback that reports a validation metric to the running Optuna trial, so hopeless trials are pruned."""
from __future__ import annotations

import lightning as L

from components.config import ConfigError

# What LitHybridLM.validation_step logs (val/mqar_acc on MQAR data only) and which way is better. Optuna's pruner
# compares a trial's reports in the study's direction: a metric that improves the other way prunes the best trials.
VALIDATION_METRICS = {"val/loss": "minimize", "val/mqar_acc": "maximize"}


def check_prune_metric(metric: str | None, data_kind: str, directions: list[str] | None) -> None:
    """`prune_metric` names a metric validation logs for this data, and, in a single-objective study
    (`directions`), one that improves the way the study's objective does."""
    if metric is None:
        return
    logged = {name: way for name, way in VALIDATION_METRICS.items() if name != "val/mqar_acc" or data_kind == "mqar"}
    single = directions is not None and len(directions) == 1
    same_way = [name for name, way in logged.items() if not single or way == directions[0]]
    if metric not in logged:
        raise ConfigError(f"prune_metric={metric!r} is not logged by validation on data.kind={data_kind}; allowed: "
                          f"{', '.join(same_way + ['null'])}")
    if single and logged[metric] != directions[0]:
        better = {"minimize": "lower", "maximize": "higher"}
        raise ConfigError(f"prune_metric={metric} is better {better[logged[metric]]}, the study's objective "
                          f"{better[directions[0]]}: the pruner would stop the best trials; use "
                          f"{' or '.join(same_way) or 'null'}")


class TrialPruningCallback(L.Callback):
    def __init__(self, trial, metric: str):
        self.trial, self.metric = trial, metric

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.metric not in trainer.callback_metrics:
            return
        self.trial.report(float(trainer.callback_metrics[self.metric]), trainer.global_step)
