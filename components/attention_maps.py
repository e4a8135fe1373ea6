"""Record attention maps of a full forward pass: explicit attention probabilities per attention layer and the
selective scan's implicit attention per Mamba-1 layer (Ali et al. 2024), for the paper's Fig. 8/9 analyses."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMaps:
    attention: dict[int, torch.Tensor]  # layer index -> (b, heads, m+L, m+L) probabilities, meta positions included
    ssm: dict[int, torch.Tensor]  # layer index -> (b, 1, m+L, m+L) normalized |implicit attention|
    num_meta: int


@torch.no_grad()
def collect_attention_maps(model, input_ids: torch.Tensor) -> AttentionMaps:
    recorders = {}
    for i, layer in enumerate(model.layers):
        for kind, heads in (("attention", layer.mixer.attn), ("ssm", layer.mixer.ssm)):
            if heads is not None and hasattr(heads, "captured_maps"):
                heads.captured_maps = []
                recorders[(kind, i)] = heads
    try:
        model(input_ids)
        maps = {key: heads.captured_maps[0] for key, heads in recorders.items()}
    finally:  # the heads stop recording whether or not the forward pass failed (its error is the news)
        for heads in recorders.values():
            heads.captured_maps = None
    return AttentionMaps(attention={i: m for (k, i), m in maps.items() if k == "attention"},
                         ssm={i: m for (k, i), m in maps.items() if k == "ssm"},
                         num_meta=model.cfg.n_meta_tokens)
