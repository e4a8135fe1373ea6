"""Lightning callback that reports a validation metric to the running Optuna trial, so hopeless trials are pruned."""
from __future__ import annotations

import lightning as L


class TrialPruningCallback(L.Callback):
    def __init__(self, trial, metric: str):
        self.trial, self.metric = trial, metric

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.metric not in trainer.callback_metrics:
            return
        self.trial.report(float(trainer.callback_metrics[self.metric]), trainer.global_step)
