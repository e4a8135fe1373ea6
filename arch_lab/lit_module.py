"""The LightningModule: a HybridLM trained by next-token cross-entropy (labels = -100 are ignored)."""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import MLFlowLogger

from components.config import ConfigError, ModelConfig
from components.model import HybridLM
from components.ops.selective_scan import DEFAULT_SCAN_KERNEL

from .optim import build_optimizer
from .run_checks import changed_settings, refuse_changed_resume
from .tracking import RESUMED_FROM_TAG, end_if_its_process_died

log = logging.getLogger(__name__)
RUN_ID_KEY = "mlflow_run_id"  # in a checkpoint: the MLflow run that wrote it
STEP_BATCHES_KEY = "batches_per_step"  # in a checkpoint: how many batches an optimizer step took (step_batches)


def step_batches(trainer: L.Trainer) -> dict[str, int]:
    """What decides the batches one optimizer step takes besides data.batch_size: a resumed sampler skips the
    batches of the steps done, counted with the resumed run's values (on_train_start)."""
    return {"accumulate_grad_batches": trainer.accumulate_grad_batches, "devices*num_nodes": trainer.world_size}


class LitHybridLM(L.LightningModule):
    def __init__(self, model_cfg: dict[str, Any], optim_cfg: dict[str, Any], backend: str = "auto",
                 compile: bool = False, tokenizer: Optional[dict[str, Any]] = None,
                 scan_kernel: str = DEFAULT_SCAN_KERNEL):
        super().__init__()
        # Plain dicts only, so checkpoints load with weights_only=True; `tokenizer` (kind, path) lets
        # `python -m arch_lab.generate` rebuild the run's tokenizer from the checkpoint alone.
        self.save_hyperparameters(logger=False)  # the run logs its own flattened, path-free params
        self.model = HybridLM(ModelConfig.from_dict(model_cfg))
        self.model.set_backend(backend, scan_kernel)
        if compile:
            self.model.compile()  # in place: a torch.compile wrapper held here would save every weight twice
        # Weight decay is chosen by parameter shape; FSDP flattens parameters before the optimizer is built.
        self._param_ndims = {name: p.ndim for name, p in self.model.named_parameters()}

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The token-mean loss over the labelled positions, and the float32 logits as (positions, vocabulary)."""
        logits = self.model(batch["input_ids"]).float().flatten(0, 1)
        return F.cross_entropy(logits, batch["labels"].flatten(), ignore_index=-100), logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.trainer.world_size == 1:
            loss, _ = self._loss(batch)
            logged = loss.detach()
        else:
            loss, logged = self._data_parallel_loss(batch)
        self.log("train/loss", logged, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def _data_parallel_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to backpropagate, global mean loss) under DDP/FSDP, where the W ranks' gradients are averaged.

        Ranks hold different numbers of labelled tokens (MQAR labels only the queries), so the mean of per-rank
        means is not the token mean of the global batch. Each rank scales its summed loss by W / (labelled tokens
        on all ranks): the averaged gradient is then the gradient of the global batch's token-mean loss, as one
        device with the whole batch computes it, and the logged loss is that global mean on every rank.
        """
        logits = self.model(batch["input_ids"])
        labels = batch["labels"].flatten()
        summed = F.cross_entropy(logits.float().flatten(0, 1), labels, ignore_index=-100, reduction="sum")
        totals = torch.stack([summed.detach(), (labels != -100).sum().to(summed.dtype)])
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        return summed * self.trainer.world_size / totals[1], totals[0] / totals[1]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """val/loss (and val/mqar_acc) as token means over the labelled tokens of all validation batches, as the
        end-of-run evaluation computes them: MQAR batches label different numbers of tokens, and a mean of batch
        means set the curve's last point apart from the evaluation's value of the same weights. (Every rank reads
        the same validation batches: the datamodules do not shard them.)"""
        loss, logits = self._loss(batch)
        labels = batch["labels"].flatten()
        labelled = labels != -100
        # Lightning's epoch mean weights each batch's value by its batch_size; a tensor keeps the GPU from syncing
        tokens = labelled.sum()
        self.log("val/loss", loss, batch_size=tokens, prog_bar=True, on_epoch=True, sync_dist=True)
        if "num_kv_pairs" in batch:
            accuracy = ((logits.argmax(-1) == labels) & labelled).sum() / tokens.clamp_min(1)
            self.log("val/mqar_acc", accuracy, batch_size=tokens, prog_bar=True, on_epoch=True, sync_dist=True)

    def on_train_start(self) -> None:
        # Resumed: the shuffling sampler continues from the optimizer steps taken, not from Lightning's epoch
        # count (one ahead after a stop mid-epoch): the data's epoch, and what that epoch already consumed.
        sampler = getattr(self.trainer.train_dataloader, "sampler", None)
        if hasattr(sampler, "skip_samples") and self.trainer.train_dataloader is not None:
            per_epoch = len(self.trainer.train_dataloader)  # batches per rank
            done = self.trainer.global_step * self.trainer.accumulate_grad_batches
            sampler.epoch_offset = done // per_epoch - self.trainer.current_epoch
            # in positions of the permutation all ranks share: every rank's batches so far
            sampler.skip_samples = ((done % per_epoch) * self.trainer.train_dataloader.batch_size
                                    * self.trainer.world_size)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Under FSDP each rank holds a shard of every gradient: only the root FSDP module can compute the global
        # norm (Lightning's FSDP precision plugin refuses norm clipping for that reason).
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = self.trainer.strategy.model
        if gradient_clip_val and isinstance(model, FullyShardedDataParallel):
            if gradient_clip_algorithm not in (None, "norm"):
                raise ConfigError(f"trainer.gradient_clip_algorithm: FSDP clips gradients by norm only, not "
                                  f"{gradient_clip_algorithm!r}")
            model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if isinstance(self.logger, MLFlowLogger):  # fast_dev_run swaps in a DummyLogger
            checkpoint[RUN_ID_KEY] = self.logger.run_id  # a run resumed from it is tagged with its origin
        checkpoint[STEP_BATCHES_KEY] = step_batches(self.trainer)

    def check_resumable(self, checkpoint: dict[str, Any]) -> None:
        """A resumed run must train the checkpoint's model with its optimizer settings: a different shape fails to
        load in a hundred lines, and a different lr or schedule would be overridden by the restored optimizer and
        scheduler state while the run's params claimed it."""
        saved = checkpoint.get("hyper_parameters", {})
        refuse_changed_resume([change for group, prefix in (("model_cfg", "model."), ("optim_cfg", "optim."))
                               if saved.get(group)  # empty in a checkpoint written outside the lab's runs
                               for change in changed_settings(prefix, saved[group], self.hparams.get(group) or {})])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_resumable(checkpoint)
        if RUN_ID_KEY in checkpoint and isinstance(self.logger, MLFlowLogger):
            origin, client = checkpoint[RUN_ID_KEY], self.logger.experiment
            client.set_tag(self.logger.run_id, RESUMED_FROM_TAG, origin)
            if end_if_its_process_died(client, origin, self.logger.run_id):
                log.warning("run %s, whose checkpoint this run resumes, was still RUNNING though its process is "
                            "gone (killed): it is marked KILLED", origin)
        # Checkpoints written before compile=true compiled in place hold a second copy of every weight under
        # "_forward."; drop it so that those runs still resume.
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("_forward.")]:
            del state[key]
        # Those written before StepCheckpoint had one state key keep its state under Lightning's key, which holds
        # the checkpoint interval ("StepCheckpoint{'monitor': None, ...}"); the callbacks are restored after this.
        callbacks = checkpoint.get("callbacks", {})
        for key in [k for k in callbacks if k.startswith("StepCheckpoint{")]:
            callbacks.setdefault("StepCheckpoint", callbacks.pop(key))

    def configure_optimizers(self):
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        optimizer, scheduler = build_optimizer(self.model, self.hparams.optim_cfg, int(total), self._param_ndims)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class DivergenceCheck(L.Callback):
    """Ends the run FAILED once the training loss is NaN or infinite, instead of training on and finishing with
    NaN metrics. Checked at the steps the loss is logged (where Lightning reads it back anyway); all ranks decide
    together, so none waits forever in its next collective."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step % trainer.log_every_n_steps == 0 and outputs is not None:
            self._check(trainer, outputs["loss"].detach())

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        # a run shorter than trainer.log_every_n_steps, or one that diverged after its last logged step
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self._check(trainer, loss)

    @staticmethod
    def _check(trainer: L.Trainer, loss: torch.Tensor) -> None:
        diverged = not bool(torch.isfinite(loss))
        if trainer.world_size > 1:
            diverged = trainer.strategy.reduce_boolean_decision(diverged, all=False)
        if diverged:
            raise FloatingPointError(
                f"train/loss is {loss.item()} at step {trainer.global_step}: training diverged; lower optim.lr, "
                f"raise optim.warmup_steps or set trainer.gradient_clip_val")


class TrainingThroughput(L.Callback):
    """Training tokens (input positions) per second over all devices, timed from the start of this process's batch
    `skip` (compilation, autotuning and allocator warm-up left out) to the end of fit; and every rank's peak CUDA
    memory. `metrics()` holds them on rank 0 after fit."""

    def __init__(self, skip: int = 0) -> None:
        self.skip, self.seen, self.tokens = skip, 0, 0
        self.start: Optional[float] = None
        self.tokens_per_s: Optional[float] = None
        self.peak_gpu_mem_gb: list[float] = []

    @staticmethod
    def _sync(trainer: L.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if self.seen == self.skip and self.start is None:
            self._sync(trainer)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.seen += 1
        if self.start is not None:
            self.tokens += batch["input_ids"].numel() * trainer.world_size

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self._sync(trainer)
        if self.start is not None and self.tokens:
            self.tokens_per_s = self.tokens / (time.perf_counter() - self.start)
        device = trainer.strategy.root_device
        if device.type == "cuda":
            peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
            self.peak_gpu_mem_gb = trainer.strategy.all_gather(peak).flatten().tolist()  # a collective: every rank
            log.info("rank %d: peak GPU memory %.2f GiB", trainer.global_rank, peak.item())

    def metrics(self) -> dict[str, float]:
        out = {} if self.tokens_per_s is None else {"train/tokens_per_s": self.tokens_per_s}
        if self.peak_gpu_mem_gb:
            out["train/peak_gpu_mem_gb"] = max(self.peak_gpu_mem_gb)
            if len(self.peak_gpu_mem_gb) > 1:
                out.update({f"train/peak_gpu_mem_gb_rank{r}": v for r, v in enumerate(self.peak_gpu_mem_gb)})
        return out
