"""AdamW parameter groups and learning-rate schedules (warmup-stable-decay as in the paper, cosine, constant)."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

SCHEDULES = ("wsd", "cosine", "constant")
# Parameters that are not matrices, or that set state dynamics, are not decayed.
NO_DECAY_SUFFIXES = ("A_log", "D", "dt_bias", "embeddings", "bias")


# Name parts that wrappers (FSDP, activation checkpointing, torch.compile) insert into parameter names.
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def unwrapped_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def parameter_groups(model: nn.Module, weight_decay: float,
                     ndims: Optional[dict[str, int]] = None) -> list[dict[str, Any]]:
    """`ndims`: parameter name -> number of dimensions before wrapping (FSDP hands the optimizer flat 1-D shards)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = unwrapped_name(name)
        ndim = ndims[name] if ndims is not None else p.ndim
        (no_decay if ndim < 2 or name.endswith(NO_DECAY_SUFFIXES) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_multiplier(step: int, total_steps: int, schedule: str, warmup_steps: int, decay_fraction: float,
                  min_lr_ratio: float) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = int(total_steps * (1 - decay_fraction))
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    return 1.0 - (1 - min_lr_ratio) * progress


def build_optimizer(model: nn.Module, optim_cfg: dict, total_steps: int, ndims: Optional[dict[str, int]] = None):
    opt = torch.optim.AdamW(parameter_groups(model, optim_cfg["weight_decay"], ndims), lr=optim_cfg["lr"],
                            betas=tuple(optim_cfg["betas"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_multiplier(
        step, total_steps, optim_cfg["schedule"], optim_cfg["warmup_steps"], optim_cfg["decay_fraction"],
        optim_cfg["min_lr_ratio"]))
    return opt, scheduler
