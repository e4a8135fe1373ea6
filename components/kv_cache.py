"""Attention K/V caches for inference: a full buffer for global layers, meta slots + a ring for local ones.

Both keep the meta-token K/V in their first `num_meta` slots (the learned cache initialization, copied in when
`HybridLM.new_inference_state` allocates the state). Slots are indexed by *padded* position: with left padding,
row r's first `pad[r]` positions are padding, and a slot's RoPE position is `num_meta + padded_index - pad[r]` (or -1
when empty or padding).
KV-consumer layers own no cache: they read their producer's `KVView` for the current step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable, Optional

import torch


@dataclass
class KVView:
    """What an attention layer attends over this step: keys/values (b, hkv, lk, d) and key positions (b, lk)."""
    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor


@dataclass
class StepInfo:
    """Per-forward bookkeeping shared by all layers of one model call."""
    positions: torch.Tensor  # (b, l) RoPE positions of this chunk's queries (meta offset included)
    start: Optional[torch.Tensor] = None  # 0-dim: padded index of the chunk's first token (inference only)
    pad: Optional[torch.Tensor] = None  # (b,) left-padding per row (inference only)
    token_mask: Optional[torch.Tensor] = None  # (b, l) False at padding (inference prefill only)
    meta_phase: bool = False  # True while the meta tokens themselves are being cached
    fresh_ssm_state: bool = False  # SSM states are all zero (first chunk, no meta tokens): kernels need no init
    kv_bus: Optional[dict] = None  # producer layer index -> KVView, for KV-consumer layers
    shared: dict = field(default_factory=dict)  # what every layer of one kind computes alike this step (`once`)

    def __post_init__(self):
        if self.kv_bus is None:
            self.kv_bus = {}

    def once(self, key: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`compute()` for the first layer that asks for `key` this step, the same tensor for the others. Every
        cache of one kind holds the same key positions in a step, and every layer of one scope attends with the
        same mask. Built per cache, the positions were 14 kernels of row E's compiled decode step on the H200, by
        their names and count (83 us a step; experiments/performance/RESULTS.md, fourteenth session)."""
        if key not in self.shared:
            self.shared[key] = compute()
        return self.shared[key]


class _KVBuffer:
    def __init__(self, batch: int, n_kv: int, slots: int, qk_dim: int, v_dim: int, num_meta: int,
                 dtype: torch.dtype, device: torch.device):
        self.num_meta = num_meta
        self.k = torch.zeros(batch, n_kv, num_meta + slots, qk_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, n_kv, num_meta + slots, v_dim, dtype=dtype, device=device)

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v]

    def _write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (b, l, hkv, d) at buffer slots (l,): tensor indices only, so decoding can be graph-captured."""
        self.k.index_copy_(2, slots, k.transpose(1, 2).to(self.k.dtype))
        self.v.index_copy_(2, slots, v.transpose(1, 2).to(self.v.dtype))

    def write_meta(self, k: torch.Tensor, v: torch.Tensor) -> KVView:
        m = self.num_meta
        self.k[:, :, :m] = k.transpose(1, 2).to(self.k.dtype)
        self.v[:, :, :m] = v.transpose(1, 2).to(self.v.dtype)
        pos = torch.arange(m, device=k.device).expand(k.shape[0], m)
        return KVView(k.transpose(1, 2), v.transpose(1, 2), pos)

    def _meta_positions(self, batch: int, device) -> torch.Tensor:
        return torch.arange(self.num_meta, device=device).expand(batch, self.num_meta)

    def _token_positions(self, padded_idx: torch.Tensor, pad: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        pos = self.num_meta + padded_idx[None, :] - pad[:, None]
        return torch.where(valid & (padded_idx[None, :] >= pad[:, None]), pos, torch.full_like(pos, -1))


class GlobalKVCache(_KVBuffer):
    """K/V for every position up to `max_len`; attends over the whole (statically shaped) buffer."""

    def __init__(self, batch, n_kv, max_len, qk_dim, v_dim, num_meta, dtype, device):
        super().__init__(batch, n_kv, max_len, qk_dim, v_dim, num_meta, dtype, device)
        self.max_len = max_len

    def update(self, k: torch.Tensor, v: torch.Tensor, step: StepInfo) -> KVView:
        """k, v: (b, l, hkv, d) post-RoPE for the chunk at padded positions [start, start + l)."""
        if step.meta_phase:
            return self.write_meta(k, v)
        m, l = self.num_meta, k.shape[1]
        self._write(m + step.start + torch.arange(l, device=k.device), k, v)
        return KVView(self.k, self.v, step.once(("global cache positions", self.max_len),
                                                lambda: self._positions(k.shape[0], step.start + l, step.pad)))

    def _positions(self, batch: int, end: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """RoPE position of each slot once padded indices below `end` are written (-1: empty or padding)."""
        idx = torch.arange(self.max_len, device=pad.device)
        token_pos = self._token_positions(idx, pad, (idx < end)[None, :])
        return torch.cat([self._meta_positions(batch, pad.device), token_pos], dim=1)


class SlidingWindowKVCache(_KVBuffer):
    """Meta-token K/V followed by a ring of `window` slots: slot s holds the latest padded index = s (mod window)."""

    def __init__(self, batch, n_kv, window, qk_dim, v_dim, num_meta, dtype, device):
        super().__init__(batch, n_kv, window, qk_dim, v_dim, num_meta, dtype, device)
        self.window = window

    def update(self, k: torch.Tensor, v: torch.Tensor, step: StepInfo) -> KVView:
        if step.meta_phase:
            return self.write_meta(k, v)
        if k.shape[1] == 1:
            return self._decode_update(k, v, step)
        m, w, l = self.num_meta, self.window, k.shape[1]
        chunk_idx = step.start + torch.arange(l, device=k.device)
        # Attend over [ring as it was before this chunk] + [the chunk itself]; the mask drops what fell out.
        positions = step.once(("ring and chunk positions", w),
                              lambda: self._chunk_view_positions(k.shape[0], chunk_idx, step.start, step.pad))
        view = KVView(torch.cat([self.k, k.transpose(1, 2)], dim=2), torch.cat([self.v, v.transpose(1, 2)], dim=2),
                      positions)
        keep = min(l, w)
        self._write(m + torch.remainder(chunk_idx[l - keep:], w), k[:, l - keep:], v[:, l - keep:])
        return view

    def _chunk_view_positions(self, batch: int, chunk_idx: torch.Tensor, start: torch.Tensor,
                              pad: torch.Tensor) -> torch.Tensor:
        """Key positions of [meta slots, ring before the chunk, the chunk's tokens at padded indices chunk_idx]."""
        chunk_pos = self._token_positions(chunk_idx, pad, torch.ones_like(chunk_idx, dtype=torch.bool)[None, :])
        return torch.cat([self._meta_positions(batch, pad.device), self._ring_positions(start - 1, pad), chunk_pos],
                         dim=1)

    def _decode_update(self, k: torch.Tensor, v: torch.Tensor, step: StepInfo) -> KVView:
        """One new token: it takes the slot of the token `window` positions back, which its window no longer
        admits, so write it first and attend over the buffer itself. Copying the whole ring into a [ring + chunk]
        tensor was the largest cost of a decode step (a quarter of row E's step at 8k context, batch 128)."""
        self._write((self.num_meta + torch.remainder(step.start, self.window)).reshape(1), k, v)
        positions = step.once(("ring positions", self.window), lambda: torch.cat(
            [self._meta_positions(k.shape[0], k.device), self._ring_positions(step.start, step.pad)], dim=1))
        return KVView(self.k, self.v, positions)

    def _ring_positions(self, last: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """RoPE position of each ring slot once padded indices up to `last` are written (-1: empty or padding)."""
        slot = torch.arange(self.window, device=pad.device)
        held = last - torch.remainder(last - slot, self.window)  # padded index each slot holds (negative: never)
        return self._token_positions(held, pad, (held >= 0)[None, :])
