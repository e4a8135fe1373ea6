"""Lightning's MLflow logger for a run whose MLflow run the lab opens and ends itself."""
from __future__ import annotations

from lightning.pytorch.loggers import MLFlowLogger


class OpenRunMLFlowLogger(MLFlowLogger):
    """MLFlowLogger ends its MLflow run FINISHED when fit ends; the lab's run then evaluates, and the run context
    that opened it ends it with what really happened (FINISHED, FAILED or KILLED). So the logger leaves it open, and
    the UI shows a run still evaluating as RUNNING."""

    def finalize(self, status: str = "success") -> None:
        return None  # no checkpoints to upload either: the lab never sets log_model
