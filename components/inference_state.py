"""Per-layer inference state, allocated up front for a batch and a maximum length.

Global attention layers get a K/V buffer for meta tokens + the whole context; sliding-window layers get the
meta-token K/V followed by a ring of `window` slots; KV-consumer layers get nothing (they read their producer's);
SSM heads get conv state + scan state. `nbytes()` is what `cache_accounting.cache_bytes` predicts.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .kv_cache import GlobalKVCache, SlidingWindowKVCache
from .ssm_heads import SSMState

KVCache = Union[GlobalKVCache, SlidingWindowKVCache]


class InferenceState:
    def __init__(self, kv: list[Optional[KVCache]], ssm: list[Optional[SSMState]], batch: int, max_len: int,
                 device: torch.device):
        self.kv, self.ssm = kv, ssm
        self.batch, self.max_len = batch, max_len
        self.seq_len = 0  # padded token positions consumed so far (meta tokens not included), host copy
        self.position = torch.zeros((), dtype=torch.long, device=device)  # the same on the device (graph-safe)
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_pad = 0  # host-side copy of pad.max(), so decode steps never sync with the device

    @classmethod
    def allocate(cls, model, batch: int, max_len: int, dtype: torch.dtype, device) -> "InferenceState":
        device = torch.device(device)
        cfg, kv, ssm = model.cfg, [], []
        for spec, layer in zip(model.plan, model.layers):
            attn, heads = layer.mixer.attn, layer.mixer.ssm
            if attn is not None and attn.owns_kv:
                args = (batch, attn.n_kv_heads)
                dims = (attn.qk_dim, attn.v_dim, cfg.n_meta_tokens, dtype, device)
                kv.append(GlobalKVCache(*args, max_len, *dims) if spec.scope == "global"
                          else SlidingWindowKVCache(*args, cfg.window, *dims))
            else:
                kv.append(None)
            if heads is not None:
                conv_shape, ssm_shape = heads.state_shapes(batch)
                ssm.append(SSMState(torch.zeros(conv_shape, dtype=dtype, device=device),
                                    torch.zeros(ssm_shape, dtype=torch.float32, device=device)))
            else:
                ssm.append(None)
        return cls(kv, ssm, batch, max_len, device)

    def tensors(self) -> list[torch.Tensor]:
        return [t for c in self.kv if c is not None for t in c.tensors()] + \
               [t for s in self.ssm if s is not None for t in s.tensors()]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def load_learned_init(self, template: "InferenceState") -> None:
        """Copy the meta-token K/V and the post-meta SSM states (computed once per model) into every row, and
        rewind to position 0 (in place: a captured CUDA graph keeps pointing at these tensors)."""
        self.seq_len = 0
        self.position.zero_()
        self.pad.zero_()
        self.max_pad = 0
        for mine, theirs in zip(self.kv, template.kv):
            if mine is not None and mine.num_meta:
                mine.k[:, :, :mine.num_meta] = theirs.k[:, :, :theirs.num_meta]
                mine.v[:, :, :mine.num_meta] = theirs.v[:, :, :theirs.num_meta]
        for mine, theirs in zip(self.ssm, template.ssm):
            if mine is not None:
                mine.conv.copy_(theirs.conv.expand_as(mine.conv))
                mine.ssm.copy_(theirs.ssm.expand_as(mine.ssm))
