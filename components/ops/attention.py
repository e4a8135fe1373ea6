"""Attention with the Hymba mask: causal, optionally sliding-window, meta tokens always visible.

Keys carry absolute positions (`-1` marks an empty or padded slot), so one mask rule serves training
(keys = the sequence itself) and cached inference (keys = a ring buffer or a global buffer).

Two paths: the reference (dense boolean mask through PyTorch SDPA's math, runs anywhere) and, on CUDA
for full-sequence training forwards, FlexAttention with a block mask for local layers and causal SDPA
(FlashAttention-style kernels) for global ones.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F

from .backend import resolve_backend


def allowed_keys(q_pos: torch.Tensor, k_pos: torch.Tensor, window: Optional[int], num_meta: int) -> torch.Tensor:
    """Boolean mask (b, 1, lq, lk): key valid, not in the future, and a meta token or inside the window."""
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    allowed = (k >= 0) & (k <= q)
    if window is not None:
        allowed &= (k < num_meta) | (q - k < window)
    return allowed[:, None]


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The boolean mask as the scores' bias: 0 where allowed, -inf elsewhere (what SDPA makes of a boolean mask)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """q (b, hq, lq, d), k (b, hkv, lk, d), v (b, hkv, lk, dv), allowed (b, 1, lq, lk) -> (b, hq, lq, dv);
    `allowed` is boolean or an additive_mask."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=q.shape[1] != k.shape[1])


def _block_mask(seq_len: int, window: int, num_meta: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((kv_idx < num_meta) | (q_idx - kv_idx < window))

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device)


# FlexAttention's Triton kernels keep a (block x head_dim) tile of V in shared memory; wider heads (the hybrid rows
# tie v_head_dim to ssm_inner / n_heads) exceed it, and Inductor refuses heads narrower than 16 (a tiny model's
# value heads of 8). Widths that are no power of two (a budget-solved tiny model's value heads of 26) built in bf16
# training but left Inductor no kernel for a float32 batch of 68 tokens (NoValidChoicesError, H200). Those heads
# take masked SDPA (memory-efficient kernel) instead.
FLEX_MIN_HEAD_DIM, FLEX_MAX_HEAD_DIM = 16, 128


def flex_takes(qk_dim: int, v_dim: int) -> bool:
    """Whether FlexAttention runs heads of these widths (else masked SDPA does)."""
    return all(FLEX_MIN_HEAD_DIM <= d <= FLEX_MAX_HEAD_DIM and d & (d - 1) == 0 for d in (qk_dim, v_dim))


def _dense_mask(seq_len: int, window: int, num_meta: int, device: str) -> torch.Tensor:
    pos = torch.arange(seq_len, device=device)[None]
    return allowed_keys(pos, pos, window, num_meta)


# FlexAttention's kernel options on Hopper (sm_90). At row E's local layers' training shape (keys 64, values 128)
# they ran the forward 1.48x and the backward 1.08x faster than torch's own choice on an H200, as fast as Inductor's
# autotuning found (experiments/performance/flex_attention_bench.py, RESULTS.md). Other GPUs keep torch's choices:
# none was measured.
HOPPER_FLEX_OPTIONS = {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3,
                       "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
                       "bwd_num_warps": 4, "bwd_num_stages": 3}


def _flex_options(q: torch.Tensor) -> Optional[dict]:
    # Dynamo folds get_device_properties to a constant, so a compiled model takes no graph break here.
    hopper = q.device.type == "cuda" and torch.cuda.get_device_properties(q.device).major == 9
    return HOPPER_FLEX_OPTIONS if hopper else None


# Eager calls build each mask once per shape and compile flex_attention once.
_cached_block_mask = lru_cache(maxsize=32)(_block_mask)
_cached_dense_mask = lru_cache(maxsize=8)(_dense_mask)


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def kernel_sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Optional[int],
                              num_meta: int) -> torch.Tensor:
    """The fast path of :func:`sequence_attention`: causal SDPA for global layers (or a window covering the
    sequence), FlexAttention with a block mask for local ones, masked SDPA for heads too wide or too narrow for
    FlexAttention."""
    gqa = q.shape[1] != k.shape[1]
    if window is None or window >= q.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    # Inside a compiled model Dynamo would trace through the caches anyway (warning that it ignores them): there
    # the masks are built in the graph, and flex_attention is called as is, compiled with the model.
    compiling = torch.compiler.is_compiling()
    shape = (q.shape[2], window, num_meta, str(q.device))
    if not flex_takes(q.shape[-1], v.shape[-1]):
        mask = _dense_mask(*shape) if compiling else _cached_dense_mask(*shape)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if compiling:
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(q, k, v, block_mask=_block_mask(*shape), enable_gqa=gqa, kernel_options=_flex_options(q))
    return _compiled_flex()(q, k, v, block_mask=_cached_block_mask(*shape), enable_gqa=gqa,
                            kernel_options=_flex_options(q))


def sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                       window: Optional[int], num_meta: int, backend: str = "auto") -> torch.Tensor:
    """Full-sequence (training / no cache) attention where keys are the queries' own sequence."""
    if resolve_backend(backend, q, "attention") == "kernel":
        return kernel_sequence_attention(q, k, v, window, num_meta)
    return attention_reference(q, k, v, allowed_keys(positions, positions, window, num_meta))
