"""A decode step's attention over a KV cache in Triton, tried against SDPA's kernel (decode_attention_bench.py):
every query head of a key/value head in one program, so each cached key and value is read once (split-KV "flash
decoding", Dao et al. 2023).

SDPA's kernel (cuDNN's on an H200) runs each query head on its own, so a key/value head's cache is fetched once per
query head sharing it (4 at row E), through L2. Here a program holds the query heads of one key/value head (padded
to 16 rows, tl.dot's least) against one split of the keys and walks it in blocks with an online softmax in float32;
a second kernel merges the splits. The mask is the layer's additive bias (0 or -inf per key), as SDPA takes it.
Measured on an H200 it did not beat cuDNN (RESULTS.md, twenty-fifth session), so the model does not use it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = tl.constexpr(1.4426950408889634)  # scores in log2 units, so each softmax weight is one exp2
LAUNCH_FIELDS = ("split_keys", "block_keys", "warps", "stages")


def parse_launch(text: str) -> dict[str, int]:
    """decode_attention's launch keywords from e.g. "512x64x4x3": keys per split (one program per split and key/value
    head of a row), keys per block of the walk, warps, pipeline stages."""
    values = [int(f) if f.isdigit() else 0 for f in text.split("x")]
    if len(values) != len(LAUNCH_FIELDS) or min(values) <= 0:
        raise ValueError(f"split-KV launch: expected four positive integers joined by 'x' (split keys x block keys x "
                         f"warps x stages, e.g. 512x64x4x3), got {text!r}")
    if values[0] % values[1]:
        raise ValueError(f"split-KV launch: split keys must be a multiple of block keys, got {text!r}")
    return dict(zip(LAUNCH_FIELDS, values))


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, acc_ptr, m_ptr, l_ptr,
    n_kv, keys, group, scale_log2,
    sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sbias_b, sbias_n,
    QK_DIM: tl.constexpr, V_DIM: tl.constexpr, ROWS: tl.constexpr, SPLIT_KEYS: tl.constexpr,
    BLOCK_KEYS: tl.constexpr,
):
    pid_bh, split = tl.program_id(0), tl.program_id(1)
    n_splits = tl.num_programs(1)
    b, kv_head = pid_bh // n_kv, pid_bh % n_kv
    rows = tl.arange(0, ROWS)  # query heads kv_head * group + rows; rows >= group are padding
    d, dv, n = tl.arange(0, QK_DIM), tl.arange(0, V_DIM), tl.arange(0, BLOCK_KEYS)
    head = kv_head * group + rows
    q = tl.load(q_ptr + b * sq_b + head[:, None] * sq_h + d[None, :], mask=(rows < group)[:, None], other=0.0)
    k_base = k_ptr + b * sk_b + kv_head * sk_h
    v_base = v_ptr + b * sv_b + kv_head * sv_h
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, V_DIM], tl.float32)
    start = split * SPLIT_KEYS
    for offset in range(0, SPLIT_KEYS, BLOCK_KEYS):
        idx = start + offset + n
        valid = idx < keys
        k = tl.load(k_base + idx[:, None] * sk_n + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_base + idx[:, None] * sv_n + dv[None, :], mask=valid[:, None], other=0.0)
        bias = tl.load(bias_ptr + b * sbias_b + idx * sbias_n, mask=valid, other=float("-inf")).to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * scale_log2 + (bias * LOG2E)[None, :]
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet stay at zero weight
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    part = (pid_bh * n_splits + split) * ROWS + rows  # (b * n_kv, splits, ROWS) partials, padding rows included
    tl.store(acc_ptr + part[:, None] * V_DIM + dv[None, :], acc)
    tl.store(m_ptr + part, m_i)
    tl.store(l_ptr + part, l_i)


@triton.jit
def _merge_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, n_kv, group, n_splits, so_b, so_h,
                  V_DIM: tl.constexpr, ROWS: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """One program per query head: the softmax over all keys from the splits' maxima, sums and weighted values."""
    pid = tl.program_id(0)  # b * n_heads + head
    n_heads = n_kv * group
    b, head = pid // n_heads, pid % n_heads
    kv_head, row = head // group, head % group
    s, dv = tl.arange(0, SPLITS_PAD), tl.arange(0, V_DIM)
    part = ((b * n_kv + kv_head) * n_splits + s) * ROWS + row
    smask = s < n_splits
    m = tl.load(m_ptr + part, mask=smask, other=float("-inf"))
    l = tl.load(l_ptr + part, mask=smask, other=0.0)
    m_all = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_all))
    acc = tl.load(acc_ptr + part[:, None] * V_DIM + dv[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + b * so_b + head * so_h + dv, out.to(out_ptr.dtype.element_ty))


def decode_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, split_keys: int = 1152, block_keys: int = 64,
                     warps: int = 4, stages: int = 3) -> Tensor:
    """q (b, hq, 1, d), k (b, hkv, lk, d), v (b, hkv, lk, dv), bias (b, 1, 1, lk) additive (0 or -inf) ->
    (b, hq, 1, dv) in q's dtype: SDPA's result with the default scale 1/sqrt(d), GQA as enable_gqa (query head h
    reads key/value head h // (hq / hkv)). Head widths must be powers of 2 (tile widths); the last dims of q, k, v
    must be adjacent (stride 1)."""
    batch, n_heads, lq, qk_dim = q.shape
    n_kv, keys, v_dim = k.shape[1], k.shape[2], v.shape[3]
    if lq != 1 or n_heads % n_kv or bias.shape != (batch, 1, 1, keys):
        raise ValueError(f"decode_attention: expects one query per row, query heads a multiple of key/value heads "
                         f"and a (b, 1, 1, keys) bias; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"bias {tuple(bias.shape)}")
    for name, width in (("query/key", qk_dim), ("value", v_dim)):
        if width & (width - 1) or width < 16:
            raise ValueError(f"decode_attention: {name} head width must be a power of 2 >= 16, got {width}")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("decode_attention: q, k and v need adjacent elements in their last dim (stride 1)")
    group = n_heads // n_kv
    rows = max(16, triton.next_power_of_2(group))
    n_splits = triton.cdiv(keys, split_keys)
    acc = q.new_empty(batch * n_kv, n_splits, rows, v_dim, dtype=torch.float32)
    m = q.new_empty(batch * n_kv, n_splits, rows, dtype=torch.float32)
    l = torch.empty_like(m)
    _split_kernel[(batch * n_kv, n_splits)](
        q, k, v, bias, acc, m, l, n_kv, keys, group, qk_dim ** -0.5 * LOG2E.value,
        q.stride(0), q.stride(1), *k.stride()[:3], *v.stride()[:3], bias.stride(0), bias.stride(3),
        QK_DIM=qk_dim, V_DIM=v_dim, ROWS=rows, SPLIT_KEYS=split_keys, BLOCK_KEYS=block_keys,
        num_warps=warps, num_stages=stages,
    )
    out = q.new_empty(batch, n_heads, 1, v_dim)
    _merge_kernel[(batch * n_heads,)](
        acc, m, l, out, n_kv, group, n_splits, out.stride(0), out.stride(1),
        V_DIM=v_dim, ROWS=rows, SPLITS_PAD=triton.next_power_of_2(n_splits), num_warps=4,
    )
    return out
