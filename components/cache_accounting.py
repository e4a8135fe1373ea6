"""Analytic inference-cache size (DESIGN.md §4), equal to what `InferenceState` allocates.

Counted per row of the batch:
- a KV-owning global layer: (num_meta + length) x kv_heads x (qk_dim + v_dim) elements;
- a KV-owning sliding-window layer: (num_meta + window) x kv_heads x (qk_dim + v_dim) (the ring is allocated
  in full, as a decoding server would);
- a KV-consumer layer: nothing;
- SSM heads: scan state (float32, as the kernels keep it) + conv state of d_conv - 1 inputs.

`include_meta=False, ssm_state_dtype_bytes=None, full_ring=False` (`paper_cache_mb`) gives the paper's accounting
(Table 1 / Table 9 "Cache (MB)"): meta tokens are not counted, a window holds min(window, length) tokens, and every
element, SSM state included, has the cache dtype's size (fp16). MB means 10^6 bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class CacheBreakdown:
    global_kv: int
    local_kv: int
    ssm_state: int
    conv_state: int

    @property
    def total(self) -> int:
        return self.global_kv + self.local_kv + self.ssm_state + self.conv_state


def kv_bytes(model, spec, attn, length: int, dtype_bytes: int = 2, *, include_meta: bool = True,
             full_ring: bool = True) -> int:
    """K/V bytes per row that one attention layer's keys span at `length` tokens: its own cache if it owns one, its
    producer's if it is a KV consumer (the same scope, so the same size)."""
    meta = model.cfg.n_meta_tokens if include_meta else 0
    window = model.cfg.window
    slots = length if spec.scope == "global" else (window if full_ring else min(window, length))
    return (meta + slots) * attn.n_kv_heads * (attn.qk_dim + attn.v_dim) * dtype_bytes


def cache_bytes(model, length: int, batch: int = 1, dtype_bytes: int = 2, *, include_meta: bool = True,
                ssm_state_dtype_bytes: Optional[int] = 4, full_ring: bool = True) -> CacheBreakdown:
    glob = local = scan = conv = 0
    for spec, layer in zip(model.plan, model.layers):
        attn, heads = layer.mixer.attn, layer.mixer.ssm
        if attn is not None and attn.owns_kv:
            kv = kv_bytes(model, spec, attn, length, dtype_bytes, include_meta=include_meta, full_ring=full_ring)
            if spec.scope == "global":
                glob += kv
            else:
                local += kv
        if heads is not None:
            (_, c, hist), ssm_shape = heads.state_shapes(1)
            n = 1
            for s in ssm_shape[1:]:
                n *= s
            scan += n * (ssm_state_dtype_bytes or dtype_bytes)
            conv += c * hist * dtype_bytes
    return CacheBreakdown(glob * batch, local * batch, scan * batch, conv * batch)


def paper_cache_mb(model, length: int) -> float:
    """Cache size as the paper reports it: fp16, meta tokens excluded, MB = 1e6 bytes, batch 1."""
    return cache_bytes(model, length, 1, 2, include_meta=False, ssm_state_dtype_bytes=None,
                       full_ring=False).total / 1e6
