"""Checkpoints that are never half-written (temp file + atomic rename) and load with weights_only=True."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


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
