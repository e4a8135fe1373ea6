"""The run's console: the progress bar's title for step-bounded runs, and which bar a run adds."""
from __future__ import annotations

from types import SimpleNamespace

from lightning.pytorch.callbacks import RichProgressBar

from arch_lab.console import StepsProgressBar, progress_bar, quiet_lightning_console


def _title(bar: RichProgressBar, max_epochs) -> str:
    bar._trainer = SimpleNamespace(max_epochs=max_epochs)
    title = bar._get_train_description(0)
    assert len(title) >= len(bar.validation_description)  # padded: the two bars' titles keep one width
    return title.rstrip()


def test_a_step_bounded_run_has_no_last_epoch_in_its_title():
    assert _title(RichProgressBar(), -1) == "Epoch 0/-2"  # Lightning's own, what the run used to print
    assert _title(StepsProgressBar(), -1) == "Epoch 0"


def test_an_epoch_bounded_run_keeps_lightnings_title():
    assert _title(StepsProgressBar(), 3) == _title(RichProgressBar(), 3) == "Epoch 0/2"


def test_no_bar_when_the_trainer_disables_it():
    assert progress_bar(False) is None  # Lightning refuses a progress bar callback with enable_progress_bar=false
    assert isinstance(progress_bar(True), StepsProgressBar)


def test_lightnings_advice_that_does_not_apply_is_filtered_and_other_warnings_pass(recwarn):
    import warnings

    quiet_lightning_console()
    warnings.warn("The 'train_dataloader' does not have many workers which may be a bottleneck.", UserWarning)
    warnings.warn("The 'val_dataloader' does not have many workers which may be a bottleneck.", UserWarning)
    warnings.warn("You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not "
                  "resumable.", UserWarning)
    warnings.warn("The dirpath has changed from '/a' to '/b', therefore `best_model_score` ...", UserWarning)
    warnings.warn("something else about the dataloader", UserWarning)
    assert [str(w.message) for w in recwarn] == ["something else about the dataloader"]
