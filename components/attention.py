"""Attention heads of a layer: GQA with RoPE, separate Q/K and V head widths, global or sliding-window scope.

The heads receive their slice of the layer's shared input projection. A KV-owning layer projects K/V and
publishes its post-RoPE K/V for the step; a KV-consumer layer (cross-layer KV sharing, paper §2.3) projects
only Q and reads its producer's K/V, so it owns no K/V weights and no cache.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .kv_cache import KVView, StepInfo
from .layer_plan import LayerSpec
from .ops.attention import additive_mask, allowed_keys, attention_reference, sequence_attention
from .rope import apply_rope, rope_angles


class AttentionHeads(nn.Module):
    def __init__(self, spec: LayerSpec, n_heads: int, n_kv_heads: int, qk_dim: int, v_dim: int,
                 window: Optional[int], num_meta: int, rope_theta: float):
        super().__init__()
        self.layer_index = spec.index
        self.kv_owner = spec.kv_owner
        self.owns_kv = spec.owns_kv
        self.n_heads, self.n_kv_heads, self.qk_dim, self.v_dim = n_heads, n_kv_heads, qk_dim, v_dim
        self.window = window if spec.scope == "local" else None
        self.num_meta = num_meta
        self.rope_theta = rope_theta
        self.backend = "auto"
        self.captured_maps: Optional[list] = None  # set to a list to record attention probabilities (analysis)
        kv_width = n_kv_heads * (qk_dim + v_dim) if self.owns_kv else 0
        self.proj_width = n_heads * qk_dim + kv_width
        self.out_width = n_heads * v_dim

    def forward(self, proj: torch.Tensor, step: StepInfo, cache=None) -> torch.Tensor:
        q, view = self.queries_and_keys(proj, step, cache)
        if self.captured_maps is not None:
            self.captured_maps.append(self._probabilities(q, view, step))
        if view.positions is step.positions:  # keys are this very sequence: training / full forward
            y = sequence_attention(q, view.k, view.v, step.positions, self.window, self.num_meta, self.backend)
        else:
            y = attention_reference(q, view.k, view.v, self.cached_bias(step, view, q.dtype))
        return self.merge_heads(y)

    def queries_and_keys(self, proj: torch.Tensor, step: StepInfo, cache=None) -> tuple[torch.Tensor, KVView]:
        """Post-RoPE queries (b, heads, l, qk_dim) and the keys/values they attend to: a KV owner's own (written to
        its cache when it has one, and published for its consumers), or a consumer's producer's."""
        b, l, _ = proj.shape
        q_width = self.n_heads * self.qk_dim
        q = proj[..., :q_width].view(b, l, self.n_heads, self.qk_dim)
        cos, sin = rope_angles(step.positions, self.qk_dim, self.rope_theta)
        q = apply_rope(q, cos, sin)
        if self.owns_kv:
            k_width = self.n_kv_heads * self.qk_dim
            k = proj[..., q_width:q_width + k_width].view(b, l, self.n_kv_heads, self.qk_dim)
            v = proj[..., q_width + k_width:].view(b, l, self.n_kv_heads, self.v_dim)
            k = apply_rope(k, cos, sin)
            if cache is None:
                view = KVView(k.transpose(1, 2), v.transpose(1, 2), step.positions)
            else:
                view = cache.update(k, v, step)
            step.kv_bus[self.layer_index] = view
        else:
            view = step.kv_bus[self.kv_owner]
        return q.transpose(1, 2), view

    def cached_bias(self, step: StepInfo, view: KVView, dtype: torch.dtype) -> torch.Tensor:
        """Which cached keys each query may attend to, as an additive mask in `dtype` (0 or -inf). Every layer of this
        scope attends over the same key positions in a step, so it is built once per step and scope; SDPA would
        convert a boolean mask in every layer (three kernels each outside a compiled graph)."""
        return step.once(("attention bias", self.window, view.positions.shape[1], dtype),
                         lambda: additive_mask(allowed_keys(step.positions, view.positions, self.window,
                                                            self.num_meta), dtype))

    def merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        """(b, heads, l, v_dim) -> (b, l, heads * v_dim), the out_proj's input."""
        return y.transpose(1, 2).reshape(y.shape[0], y.shape[2], self.out_width)

    def _probabilities(self, q: torch.Tensor, view: KVView, step: StepInfo) -> torch.Tensor:
        """Attention probabilities (b, hq, lq, lk), spelled out for analysis (Fig. 8/9 of the paper)."""
        k = view.k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1).float()
        scores = q.float() @ k.transpose(-1, -2) / self.qk_dim ** 0.5
        allowed = allowed_keys(step.positions, view.positions, self.window, self.num_meta)
        return scores.masked_fill(~allowed, float("-inf")).softmax(-1)
