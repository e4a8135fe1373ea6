"""The LightningModule: a HybridLM trained by next-token cross-entropy (labels = -100 are ignored)."""
from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F

from components.config import ModelConfig
from components.model import HybridLM

from .data.mqar import mqar_accuracy
from .optim import build_optimizer


class LitHybridLM(L.LightningModule):
    def __init__(self, model_cfg: dict[str, Any], optim_cfg: dict[str, Any], backend: str = "auto",
                 compile: bool = False, tokenizer: Optional[dict[str, Any]] = None):
        super().__init__()
        # Plain dicts only, so checkpoints load with weights_only=True; `tokenizer` (kind, path) lets
        # `python -m arch_lab.generate` rebuild the run's tokenizer from the checkpoint alone.
        self.save_hyperparameters(logger=False)  # the run logs its own flattened, path-free params
        self.model = HybridLM(ModelConfig.from_dict(model_cfg))
        self.model.set_backend(backend)
        self._forward = torch.compile(self.model) if compile else self.model

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._forward(batch["input_ids"])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        return loss, logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, logits = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True)
        if "num_kv_pairs" in batch:
            self.log("val/mqar_acc", mqar_accuracy(logits, batch["labels"]), prog_bar=True, on_epoch=True,
                     sync_dist=True)

    def on_train_start(self) -> None:
        # Resumed mid-epoch: make the shuffling sampler skip what this epoch already consumed.
        sampler = getattr(self.trainer.train_dataloader, "sampler", None)
        if hasattr(sampler, "skip_samples") and self.trainer.train_dataloader is not None:
            per_epoch = len(self.trainer.train_dataloader)
            done = self.trainer.global_step * self.trainer.accumulate_grad_batches
            sampler.skip_samples = (done % per_epoch) * self.trainer.train_dataloader.batch_size

    def configure_optimizers(self):
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        optimizer, scheduler = build_optimizer(self.model, self.hparams.optim_cfg, int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
