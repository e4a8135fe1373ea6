"""RMSNorm (statistics in float32, or float64 for a float64 input; weight in the input's dtype)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, or over each consecutive `group_size` channels of it (Mamba-2's gated norm
    normalizes each B/C group's channels on their own, as mamba-ssm's RMSNormGated(group_size=d_inner // ngroups))."""

    def __init__(self, dim: int, eps: float = 1e-6, group_size: Optional[int] = None):
        super().__init__()
        self.eps = eps
        self.group_size = group_size or dim
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        grouped = self.group_size < xf.shape[-1]  # without groups, the statistics as they always were computed
        xf = xf.unflatten(-1, (-1, self.group_size)) if grouped else xf
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf.flatten(-2) if grouped else xf).to(x.dtype) * self.weight.to(x.dtype)
