"""Learnable meta tokens (paper §2.4): m vectors prepended to every sequence, never predicted."""
from __future__ import annotations

import torch
from torch import nn


class MetaTokens(nn.Module):
    def __init__(self, count: int, d_model: int, init_std: float = 0.02):
        super().__init__()
        self.count = count
        self.embeddings = nn.Parameter(torch.randn(count, d_model) * init_std) if count > 0 else None

    def prepend(self, x: torch.Tensor) -> torch.Tensor:
        """x: (b, l, d) token embeddings -> (b, m + l, d)."""
        if self.count == 0:
            return x
        meta = self.embeddings.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return torch.cat([meta, x], dim=1)

    def strip(self, h: torch.Tensor) -> torch.Tensor:
        """Remove the meta positions before the LM head, so they are never predicted nor scored."""
        return h[:, self.count:] if self.count > 0 else h
