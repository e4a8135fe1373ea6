"""What a run prints: Lightning's console made to fit a Hydra run that trains for a number of steps."""
from __future__ import annotations

import logging
import warnings
from typing import Optional

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE


def _not_an_advert(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")  # Lightning's, at every fit


def quiet_lightning_console() -> None:
    """Lightning's `lightning` package gives its logger a console handler of its own ("INFO: ...") and passes every
    record up to the root logger as well, where Hydra prints it again (and keeps it in the job's log file): with a
    root handler, Lightning's own goes. Its advertisements for its cloud products are dropped, and so is torch
    2.13's FutureWarning at every fit about a class Lightning 2.6 uses (LeafSpec), which no user can act on. So is
    its advice at every fit to raise a DataLoader's num_workers: the lab's data sets sit in memory, where workers
    only add start-up time, and data.num_workers is there for a stream that needs them (data=text_hf). On resume,
    its warnings that the dataloader is not resumable (the lab's sampler is: arch_lab/data/sampler.py) and that the
    checkpoint folder changed (every run writes its own) are dropped too."""
    lightning_logger = logging.getLogger("lightning")
    if logging.getLogger().hasHandlers():
        for handler in [h for h in lightning_logger.handlers if type(h) is logging.StreamHandler]:
            lightning_logger.removeHandler(handler)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_an_advert)  # once: same function
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    for message in (r"The '\w+_dataloader' does not have many workers",
                    r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader",
                    r"The dirpath has changed from"):
        warnings.filterwarnings("ignore", message=message)


class StepsProgressBar(RichProgressBar):
    """Lightning's rich progress bar, titled "Epoch <n>" where a run that stops at trainer.max_steps has no last
    epoch (the Trainer's max_epochs=-1, which the stock bar prints as "Epoch 0/-2")."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
            # padded as Lightning pads its own, so the bar does not flicker beside the validation bar's
            return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"
        return super()._get_train_description(current_epoch)


def progress_bar(enabled: bool) -> Optional[RichProgressBar]:
    """The progress bar callback a run adds: none when trainer.enable_progress_bar is off (Lightning refuses one
    then) or without `rich`, where Lightning's own tqdm bar already reads "Epoch <n>"."""
    return StepsProgressBar() if enabled and _RICH_AVAILABLE else None
