"""Checkpoints that are never half-written (temp file + atomic rename) and load with weights_only=True."""
from __future__ import annotations

import logging
import math
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, Timer
from lightning.pytorch.utilities.exceptions import SIGTERMException

from components.config import ConfigError

from .lit_module import STEP_BATCHES_KEY, step_batches
from .optim import lr_multiplier
from .run_checks import changed_settings, refuse_changed_resume

log = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would keep colleagues from the run's checkpoints
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never a torso
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = None):
        if not Path(path).is_file():
            raise FileNotFoundError(f"ckpt_path: no checkpoint at {path}")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def hybrid_lm_state(module_state: dict) -> dict:
    """The HybridLM's own state dict out of the LightningModule's (its `model.` entries)."""
    return {k.removeprefix("model."): v for k, v in module_state.items() if k.startswith("model.")}


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, saving every `every_n_train_steps` and also where training ends between two of
    those saves (a max_steps that is not a multiple, trainer.max_time, Ctrl-C, SIGTERM): its own on_train_end
    writes last.ckpt only when nothing was saved before, which left generate, resume and log_checkpoints a stale
    model, and Lightning ends a fit on SIGTERM by raising at a step boundary, past on_train_end."""

    @property
    def state_key(self) -> str:
        """A run has one StepCheckpoint: its state is restored on a resume with another trainer.val_check_interval,
        where Lightning's key (which holds the interval) would match no callback and warn that one is missing."""
        return type(self).__name__

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._save_where_training_ended(trainer):
            super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not (isinstance(exception, SIGTERMException) and self._save_where_training_ended(trainer)):
            super().on_exception(trainer, pl_module, exception)

    def _save_where_training_ended(self, trainer: L.Trainer) -> bool:
        if self._should_skip_saving_checkpoint(trainer):  # fast_dev_run, or saved at this very step
            return False
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
        return True


class CheckpointError(ConfigError):
    """A file that is not a checkpoint the lab can use; the message names the argument or key that gave it."""


def read_lab_checkpoint(path: str, key: str, mmap: bool = False) -> dict:
    """The checkpoint `python -m arch_lab` wrote at `path` (weights_only; `mmap` reads tensors lazily), or one clear
    error naming `key`: torch's own for a text file is "Unsupported operand", and a bare state_dict lacks the
    model's config."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception:  # torch raises UnpicklingError, RuntimeError, KeyError, EOFError... by the file's content
        raise CheckpointError(f"{key}: {path} is not a checkpoint (torch cannot load it)") from None
    try:
        with zipfile.ZipFile(path) as archive:  # torch does not check the CRCs: damaged bytes would load as weights
            damaged = archive.testzip()
    except zipfile.BadZipFile:  # torch.save's format before 1.6, which torch still reads
        raise CheckpointError(f"{key}: {path} is in torch.save's legacy format; re-save it with a torch >= 1.6 "
                              f"(a zip file)") from None
    if damaged is not None:
        raise CheckpointError(f"{key}: {path} is damaged ({damaged} fails its CRC check)")
    if not isinstance(ckpt, dict) or "model_cfg" not in ckpt.get("hyper_parameters", {}) or "state_dict" not in ckpt:
        raise CheckpointError(f"{key}: {path} is not a checkpoint written by `python -m arch_lab` "
                              "(no hyper_parameters.model_cfg or state_dict)")
    return ckpt


def check_resumable(path: Optional[str], lit: L.LightningModule, datamodule: L.LightningDataModule,
                    trainer: L.Trainer, trainer_cfg: dict[str, Any]) -> None:
    """Before the run opens, so a refused resume leaves no FAILED run: the checkpoint is one `python -m arch_lab`
    wrote (read lazily), leaves something to train within the run's trainer.max_steps and trainer.max_time, and
    holds this run's model, optimizer and data settings (the checks that Lightning's restore repeats inside fit),
    and as many batches a step as `trainer` (the run's, as configured) takes."""
    if path is None:
        return
    ckpt = read_lab_checkpoint(path, "ckpt_path", mmap=True)
    finished = training_finished(ckpt, trainer_cfg)
    if finished:
        why, remedy = finished
        raise CheckpointError(f"ckpt_path: {why}: nothing is left to train; {remedy} to train on")
    lit.check_resumable(ckpt)
    if STEP_BATCHES_KEY in ckpt:  # not in checkpoints written before it was recorded
        refuse_changed_resume(changed_settings("trainer.", ckpt[STEP_BATCHES_KEY], step_batches(trainer)))
    datamodule.load_state_dict(ckpt.get(type(datamodule).__qualname__) or {})
    _point_out_a_moved_schedule(ckpt, lit.hparams.optim_cfg, trainer_cfg["max_steps"])


def training_finished(ckpt: dict, trainer_cfg: dict[str, Any]) -> Optional[tuple[str, str]]:
    """Why training from `ckpt` has no step left under the trainer settings' max_steps and max_time, and what would
    leave some, or None. Lightning's Timer resumes from the time the checkpoint already trained: max_time budgets a
    run and its resumes together."""
    step, max_steps, max_time = ckpt.get("global_step", 0), trainer_cfg["max_steps"], trainer_cfg.get("max_time")
    if step >= max_steps:
        return f"the checkpoint is at step {step} and trainer.max_steps={max_steps}", "raise trainer.max_steps"
    budget = Timer(duration=max_time).time_remaining() if max_time else None  # a Timer not started: all of it
    trained = ckpt.get("callbacks", {}).get("Timer", {}).get("time_elapsed", {}).get("train", 0.0)
    if budget is not None and trained >= budget:
        return (f"the checkpoint has trained for {trained:.0f} s and trainer.max_time allows {budget:.0f} s in all",
                "raise trainer.max_time (or set it to null)")
    return None


def resume_hint(last: Path, trainer_cfg: dict[str, Any]) -> str:
    """What the console adds after an interrupt: the checkpoint to resume from, or, when training had ended and
    only the evaluation was cut short, that (a resume from it would be refused: nothing is left to train)."""
    if not last.is_file():
        return ""
    finished = training_finished(torch.load(last, map_location="cpu", weights_only=True, mmap=True), trainer_cfg)
    return f"; training had finished ({finished[0]}), only its evaluation was cut short" if finished else \
        f"; resume with ckpt_path='{last}'"


def _point_out_a_moved_schedule(ckpt: dict, optim_cfg: dict, max_steps: int) -> None:
    """The schedule is laid out over trainer.max_steps: a resume with another one (to train on, say) continues at
    another learning rate than the checkpoint's run had reached, e.g. back at the peak after a finished decay."""
    def lr_at(step: int) -> float:
        return optim_cfg["lr"] * lr_multiplier(step, max_steps, optim_cfg["schedule"], optim_cfg["warmup_steps"],
                                               optim_cfg["decay_fraction"], optim_cfg["min_lr_ratio"])

    schedulers = ckpt.get("lr_schedulers") or [{}]
    before = (schedulers[0].get("_last_lr") or [None])[0]  # what the restored optimizer trains the next step at
    step = ckpt.get("global_step", 0)
    if before is not None and not math.isclose(before, lr_at(step), rel_tol=1e-6):
        log.warning("trainer.max_steps=%d lays the %s schedule out anew: step %d trains at the checkpoint's lr %.3g, "
                    "step %d at %.3g", max_steps, optim_cfg["schedule"], step, before, step + 1, lr_at(step + 1))
