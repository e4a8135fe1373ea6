"""One decode step of a layer's Mamba-1 heads in three Triton kernels, from the conv input to the gated output.

The unfused step (ssm_heads.py) is a chain: the conv update, the x-projection (to dt, B and C), the RMSNorms of
dt/B/C, the dt-projection, mamba_ssm's state update, and the casts between them. At decode's batch of 128 each of
those kernels is too small to fill the GPU and costs its few microseconds of latency whatever its bytes: a step of
row E spends more on them than on its 24 state updates (experiments/performance/RESULTS.md). Here:

- `_conv_xproj_kernel`, one program per block of rows and block of channels: the conv step (shifting the conv
  state), the silu, and the block's share of the x-projection, a partial product stored per channel block. It
  issues all its loads before its first store (the conv state as one (rows, channels, window) tile): shifting the
  state slot by slot, each load waited for the store before it, and the kernel took 9.1 against 6.4 us at row E;
- `_xproj_reduce_kernel`, one program per row: the x-projection, summed over those partials in one load (no atomics,
  so the step is deterministic), and the RMSNorms of dt, B and C. Summing the partials in the state update instead
  made every one of its programs read all of them: at row Mamba's 3,944 channels the step was 1.6x slower than the
  unfused one;
- `_state_update_kernel`, one program per block of rows and block of channels: the dt-projection of its channels,
  softplus, the state update h = exp(dt A) h + dt B x, the output C.h + D x and the gate silu(z).

Everything runs in float32 inside; the two projections multiply in the weights' dtype (as the unfused step's
matmuls do) and accumulate in float32. Importing this module imports triton: only ops/backend.py (when it looks for
kernels) and custom_ops.py (when the op first runs) import it. On a CPU, TRITON_INTERPRET=1 runs the kernels in
Triton's interpreter (the CPU tests do that).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .selective_scan_triton import _step_size


@dataclass(frozen=True)
class StepBlocks:
    """How the step's kernels are launched: rows (at least 16, tl.dot's least on the GPU) and channels per program,
    and warps, for the conv kernel (whose channel blocks also split the x-projection's reduction) and the state
    update. `from_string("16x64x8x16x16x4")` reads them in that order."""
    conv_rows: int = 16
    conv_channels: int = 64
    conv_warps: int = 8  # 4: 5% slower at rows E and Mamba (fifteenth session)
    state_rows: int = 16
    state_channels: int = 16  # a (16, 16, 16) float32 state tile (32 channels: 4-9% slower, twelfth session)
    state_warps: int = 4

    @classmethod
    def from_string(cls, text: str) -> "StepBlocks":
        fields = text.split("x")
        if len(fields) != 6 or not all(f.isdigit() and int(f) > 0 for f in fields):
            raise ValueError(f"StepBlocks: expected six positive integers joined by 'x' (conv rows x channels x "
                             f"warps x state rows x channels x warps, e.g. 16x64x8x16x16x4), got {text!r}")
        return cls(*(int(f) for f in fields))

    def __str__(self) -> str:
        return "x".join(str(v) for v in vars(self).values())


@triton.jit
def _conv_xproj_kernel(
    x_ptr, conv_state_ptr, conv_w_ptr, conv_b_ptr, xproj_w_ptr, xc_ptr, part_ptr,
    batch, dim, nproj, sx_b, scs_b, scs_d, scs_k, sw_d, sw_k, sxw_j, sxw_d,
    WIDTH: tl.constexpr, WIDTH_PAD: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr, NPROJ_PAD: tl.constexpr, ALIGN: tl.constexpr,
):
    pid_b, pid_d = tl.program_id(0), tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    ch = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    k = tl.arange(0, WIDTH_PAD)  # conv window slots: 0 .. WIDTH - 2 from the state, WIDTH - 1 the new x
    j = tl.arange(0, NPROJ_PAD)
    # ALIGN (a power of 2 dividing dim and the x-projection's row stride) tells Triton what it cannot see when dim is
    # not a multiple of 16 (row Mamba's 3,944): that runs of ALIGN channels share their mask and start aligned, so
    # the weight and xc are moved in 16-byte vectors, not element by element.
    cmask = tl.max_constancy(ch < dim, ALIGN)
    mask = (rows < batch)[:, None] & cmask[None, :]
    # Every load is issued before the first store: a store to the conv state between its loads (as a shift slot
    # by slot would do) makes each load wait for the one before, a memory latency each.
    x = tl.load(x_ptr + rows[:, None] * sx_b + ch[None, :], mask=mask, other=0.0)
    states = conv_state_ptr + rows[:, None, None] * scs_b + ch[None, :, None] * scs_d + k[None, None, :] * scs_k
    past = tl.load(states, mask=mask[:, :, None] & (k < WIDTH - 1)[None, None, :], other=0.0)
    conv_w = tl.load(conv_w_ptr + ch[:, None] * sw_d + k[None, :] * sw_k, mask=cmask[:, None] & (k < WIDTH)[None, :],
                     other=0.0).to(tl.float32)
    # This channel block's share of xc @ x_proj.weight^T, as a (BLOCK_D, NPROJ_PAD) slice of the weight transposed.
    w_rows = tl.multiple_of(j[None, :] * sxw_j, [1, ALIGN])
    w = tl.load(xproj_w_ptr + w_rows + ch[:, None] * sxw_d, mask=(j < nproj)[None, :] & cmask[:, None], other=0.0)
    window = tl.where((k == WIDTH - 1)[None, None, :], x.to(tl.float32)[:, :, None], past.to(tl.float32))
    acc = tl.sum(window * conv_w[None, :, :], axis=2)
    if HAS_CONV_BIAS:
        acc += tl.load(conv_b_ptr + ch, mask=cmask, other=0.0).to(tl.float32)[None, :]
    # The state keeps the window's last WIDTH - 1 entries: slot k is stored at slot k - 1.
    tl.store(states - scs_k, window.to(conv_state_ptr.dtype.element_ty),
             mask=mask[:, :, None] & ((k >= 1) & (k < WIDTH))[None, None, :])
    xc = acc * tl.sigmoid(acc)
    tl.store(xc_ptr + tl.multiple_of(rows[:, None] * dim, [ALIGN, 1]) + ch[None, :], xc, mask=mask)
    part = tl.dot(xc.to(w.dtype), w, input_precision="ieee")
    tl.store(part_ptr + (pid_d * batch + rows[:, None]) * NPROJ_PAD + j[None, :], part,
             mask=(rows < batch)[:, None])


@triton.jit
def _segment_scale(v, seg, w_ptr, w_offset, width, eps):
    """RMSNorm factors (1 / rms times the weight) on the columns where seg holds, for one row v."""
    inv = 1.0 / tl.sqrt(tl.sum(tl.where(seg, v * v, 0.0), axis=0) / width + eps)
    return inv * tl.load(w_ptr + w_offset, mask=seg, other=0.0).to(tl.float32)


@triton.jit
def _xproj_reduce_kernel(part_ptr, dtn_w_ptr, Bn_w_ptr, Cn_w_ptr, out_ptr, batch, nsplit, rank, dstate, eps,
                         HAS_NORM: tl.constexpr, NSPLIT_PAD: tl.constexpr, NPROJ_PAD: tl.constexpr):
    row = tl.program_id(0)
    k = tl.arange(0, NSPLIT_PAD)
    cols = tl.arange(0, NPROJ_PAD)
    parts = tl.load(part_ptr + (k[:, None] * batch + row) * NPROJ_PAD + cols[None, :], mask=(k < nsplit)[:, None],
                    other=0.0)
    v = tl.sum(parts, axis=0)  # [dt | B | C | zeros]
    if HAS_NORM:
        is_dt, is_B = cols < rank, (cols >= rank) & (cols < rank + dstate)
        is_C = (cols >= rank + dstate) & (cols < rank + 2 * dstate)
        v = v * (_segment_scale(v, is_dt, dtn_w_ptr, cols, rank, eps)
                 + _segment_scale(v, is_B, Bn_w_ptr, cols - rank, dstate, eps)
                 + _segment_scale(v, is_C, Cn_w_ptr, cols - rank - dstate, dstate, eps))
    tl.store(out_ptr + row * NPROJ_PAD + cols, v)


@triton.jit
def _state_update_kernel(
    xproj_ptr, xc_ptr, z_ptr, dtproj_w_ptr, dt_bias_ptr, A_log_ptr, D_ptr, state_ptr, y_ptr,
    batch, dim, rank, dstate, sz_b, sdw_d, sdw_r, ss_b, ss_d,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, NPROJ_PAD: tl.constexpr, R_PAD: tl.constexpr, N_PAD: tl.constexpr,
    ALIGN: tl.constexpr,
):
    pid_b, pid_d = tl.program_id(0), tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    ch = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, N_PAD)
    rmask, cmask, nmask = rows < batch, tl.max_constancy(ch < dim, ALIGN), n < dstate
    row_offs = tl.multiple_of(rows[:, None] * dim, [ALIGN, 1])  # of xc and y, rows of dim (ALIGN as above)
    mask = rmask[:, None] & cmask[None, :]
    # The small per-channel operands are loaded first, so their latency passes while the state waits; loaded where
    # they are used, after the state's store, z alone held 11% of the warps' stalls (Nsight Compute, row Mamba),
    # and A_log, loaded after the dt-projection, 22% once z was moved.
    # The state tile itself stays after the dt-projection: loaded first too, it raised the registers and slowed
    # the kernel (29.5 against 25.9 us).
    x = tl.load(xc_ptr + row_offs + ch[None, :], mask=mask, other=0.0)
    z = tl.load(z_ptr + rows[:, None] * sz_b + ch[None, :], mask=mask, other=0.0)
    D = tl.load(D_ptr + ch, mask=cmask, other=0.0)
    dt_bias = tl.load(dt_bias_ptr + ch, mask=cmask, other=0.0)
    A_log = tl.load(A_log_ptr + ch[:, None] * dstate + n[None, :], mask=cmask[:, None] & nmask[None, :], other=0.0)
    xproj = xproj_ptr + rows[:, None] * NPROJ_PAD
    r = tl.arange(0, R_PAD)
    dt_low = tl.load(xproj + r[None, :], mask=rmask[:, None] & (r < rank)[None, :], other=0.0)
    B = tl.load(xproj + rank + n[None, :], mask=rmask[:, None] & nmask[None, :], other=0.0)
    C = tl.load(xproj + rank + dstate + n[None, :], mask=rmask[:, None] & nmask[None, :], other=0.0)
    w = tl.load(dtproj_w_ptr + ch[None, :] * sdw_d + r[:, None] * sdw_r, mask=(r < rank)[:, None] & cmask[None, :],
                other=0.0)
    raw = tl.dot(dt_low.to(w.dtype), w, input_precision="ieee")
    dt = _step_size(raw + dt_bias.to(tl.float32)[None, :], True)
    smask = mask[:, :, None] & nmask[None, None, :]
    A = -tl.exp(A_log.to(tl.float32))
    states = state_ptr + rows[:, None, None] * ss_b + ch[None, :, None] * ss_d + n[None, None, :]
    h = tl.load(states, mask=smask, other=0.0).to(tl.float32)
    h = tl.exp(dt[:, :, None] * A[None, :, :]) * h + (dt * x)[:, :, None] * B[:, None, :]
    tl.store(states, h.to(state_ptr.dtype.element_ty), mask=smask)
    y = tl.sum(h * C[:, None, :], axis=2) + x * D.to(tl.float32)[None, :]
    z = z.to(tl.float32)
    y = y * z * tl.sigmoid(z)
    tl.store(y_ptr + row_offs + ch[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def _pad(width: int) -> int:
    """A tile width: a power of 2, at least 16 (tl.dot's least)."""
    return max(16, triton.next_power_of_2(width))


def mamba1_step(x: Tensor, z: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor,
                conv_bias: Optional[Tensor], x_proj_weight: Tensor, dt_proj_weight: Tensor, dt_bias: Tensor,
                A_log: Tensor, D: Tensor, dt_norm_weight: Optional[Tensor], B_norm_weight: Optional[Tensor],
                C_norm_weight: Optional[Tensor], eps: float, *, blocks: StepBlocks = StepBlocks(),
                out: Optional[Tensor] = None) -> Tensor:
    """y (b, d) in x's dtype, written to `out` when given (contiguous); conv_state (b, d, width - 1) and ssm_state
    (b, d, n) are updated in place.

    x, z: (b, d) conv input and gate, any row stride; conv_weight (d, width); x_proj_weight (rank + 2n, d);
    dt_proj_weight (d, rank); dt_bias, D (d,); A_log (d, n) contiguous (A = -exp(A_log)); the RMSNorm weights of
    dt (rank,), B and C (n,), all three or none; Mamba1Heads.fused_step_inputs gives a layer's arguments. The kernels
    index the channels of x and z and the state dims of ssm_state without a stride, so their loads are vectorised:
    x and z are copied where their channels are not adjacent; ssm_state must have adjacent state dims.
    """
    if ssm_state.stride(2) != 1:
        raise ValueError(f"mamba1_step: ssm_state needs adjacent state dims (stride 1), got {ssm_state.stride()}")
    x, z = (t if t.stride(1) == 1 else t.contiguous() for t in (x, z))
    batch, dim = x.shape
    rank, dstate, width = dt_proj_weight.shape[1], A_log.shape[1], conv_weight.shape[1]
    nproj = rank + 2 * dstate
    nproj_pad, nsplit = _pad(nproj), triton.cdiv(dim, blocks.conv_channels)
    xc = x.new_empty(batch, dim, dtype=torch.float32)
    part = x.new_empty(nsplit, batch, nproj_pad, dtype=torch.float32)
    y = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    _conv_xproj_kernel[(triton.cdiv(batch, blocks.conv_rows), nsplit)](
        x, conv_state, conv_weight, conv_bias if conv_bias is not None else conv_weight, x_proj_weight, xc, part,
        batch, dim, nproj, x.stride(0), *conv_state.stride(), *conv_weight.stride(), *x_proj_weight.stride(),
        WIDTH=width, WIDTH_PAD=triton.next_power_of_2(width), HAS_CONV_BIAS=conv_bias is not None,
        BLOCK_B=blocks.conv_rows, BLOCK_D=blocks.conv_channels, NPROJ_PAD=nproj_pad,
        ALIGN=math.gcd(dim, x_proj_weight.stride(0), blocks.conv_channels, 16), num_warps=blocks.conv_warps,
    )
    xproj = x.new_empty(batch, nproj_pad, dtype=torch.float32)
    has_norm = dt_norm_weight is not None
    norms = (dt_norm_weight, B_norm_weight, C_norm_weight) if has_norm else (dt_bias,) * 3  # unread stand-ins
    _xproj_reduce_kernel[(batch,)](
        part, *norms, xproj, batch, nsplit, rank, dstate, eps,
        HAS_NORM=has_norm, NSPLIT_PAD=triton.next_power_of_2(nsplit), NPROJ_PAD=nproj_pad, num_warps=4,
    )
    _state_update_kernel[(triton.cdiv(batch, blocks.state_rows), triton.cdiv(dim, blocks.state_channels))](
        xproj, xc, z, dt_proj_weight, dt_bias, A_log, D, ssm_state, y,
        batch, dim, rank, dstate, z.stride(0), *dt_proj_weight.stride(), *ssm_state.stride()[:2],
        BLOCK_B=blocks.state_rows, BLOCK_D=blocks.state_channels, NPROJ_PAD=nproj_pad, R_PAD=_pad(rank),
        N_PAD=_pad(dstate), ALIGN=math.gcd(dim, blocks.state_channels, 16), num_warps=blocks.state_warps,
    )
    return y
