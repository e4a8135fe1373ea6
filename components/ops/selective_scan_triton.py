"""The Mamba-1 selective scan (selective_scan.py has the recurrence) as Triton kernels, forward and backward.

mamba_ssm's kernel takes no initial state, so prefill chunks after the first would fall back to the PyTorch
reference; this one takes an initial state and the last state's gradient, and inputs of any strides. At row E's
training shape it runs at 0.93-0.96x the speed of mamba_ssm's kernels, and E's compiled training step at 0.99x
(experiments/performance/RESULTS.md), so mamba_ssm's stays the default training kernel.

One program owns a batch row and a block of BLOCK_D channels with all their state dims, a (BLOCK_D, state) float32
tile held in registers by one warp, and walks the sequence one step at a time: h_t = exp(delta_t A) h_{t-1} +
delta_t B_t u_t. A sequential walk costs one multiply-add per (channel, state, step), where a parallel
(associative) scan costs a log-depth tree of them (this file's first version did that, and ran at 0.65-0.81x of
mamba_ssm's speed); the parallelism is across batch rows and channels. Every program walks all steps, so a step's
latency, not the bandwidth, sets the time: each step prefetches the inputs of a step further on into L1. The
forward saves the state at the start of every chunk of CHUNK steps. The backward walks the chunks in reverse: it
runs the forward again over the chunk from its saved start, writing each h_{t-1} to a per-program scratch buffer
(small enough to stay in L2), then runs the adjoint recurrence backwards

    g_t = C_t dy_t + a_{t+1} g_{t+1}        (g_t: the gradient of h_t; a_t = exp(delta_t A))

reading h_{t-1} back (recovering it as (h_t - x_t) / a_t would blow up where decays underflow). dB and dC are
summed over the block's channels inside the program and over blocks by torch; dA, dD and the delta-bias gradient per
batch row likewise. Nothing uses atomics (mamba_ssm's backward adds every channel's dB and dC into the same global
memory with atomics), so the gradients are deterministic.

The launchers work in float32 inside. Importing this module imports triton, so only ops/backend.py (when it looks
for kernels) and custom_ops.py (when the op first runs) import it. On a CPU, TRITON_INTERPRET=1 runs the kernels in
Triton's interpreter (the CPU tests do that).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

# Launch defaults, the fastest tried at row E's shape (scan_kernel_bench.py). The chunk has no default: the backward
# must get the forward's, whose start states it reads (the custom op's is TRITON_SCAN_CHUNK).
BLOCK_D = 16  # channels per program: 8 or 4 were slower, 32 too
NUM_WARPS = 1  # more warps share the tile across warps, and its reductions go through shared memory: 2x slower
AHEAD = 8  # steps between a forward step's prefetch and its use
UNROLL = 2  # steps per iteration of the walks: consecutive steps' loads, reductions and stores overlap


LOG2E = tl.constexpr(1.4426950408889634)  # decays are exp2(delta * A * log2(e)): one MUFU instruction each


@triton.jit
def _step_size(raw, SOFTPLUS: tl.constexpr):
    """The float32 step size from the biased pre-softplus delta."""
    if SOFTPLUS:
        return tl.where(raw > 20.0, raw, tl.log(1.0 + tl.exp(raw)))  # torch's softplus threshold
    return raw


@triton.jit
def _program_channels(pid_d, A_ptr, bias_ptr, D_ptr, dim, DSTATE: tl.constexpr, NP: tl.constexpr,
                      HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's channels d with their mask, the state dims with theirs, the (d, state) offsets and mask into
    (dim, DSTATE) float32 tensors, and its rows of A, the delta bias and D (zeros where absent)."""
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < dim
    cols = tl.arange(0, NP)
    nmask = cols < DSTATE
    smask = dmask[:, None] & nmask[None, :]
    state_offsets = d[:, None] * DSTATE + cols[None, :]
    A = tl.load(A_ptr + state_offsets, mask=smask, other=0.0)  # 0 in padding: decay 1, and B is 0 there
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=dmask, other=0.0)
    Dskip = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        Dskip = tl.load(D_ptr + d, mask=dmask, other=0.0)
    return d, dmask, cols, nmask, smask, state_offsets, A, bias, Dskip


@triton.jit
def _batch_state(ptr, offsets, mask, PRESENT: tl.constexpr, BLOCK_D: tl.constexpr, NP: tl.constexpr):
    """This program's (d, state) tile of an optional (b, dim, DSTATE) float32 tensor; zeros where absent."""
    if PRESENT:
        return tl.load(ptr + offsets, mask=mask, other=0.0)
    return tl.zeros((BLOCK_D, NP), tl.float32)


@triton.jit
def _prefetch(rows, stride_l, t, seqlen, PREFETCH: tl.constexpr):
    """Ask L1 for step t (clamped in bounds) of the rows of a (rows, steps) operand. The walks are bound by
    latency, not bandwidth: each step would otherwise wait out a round trip to DRAM for its inputs, so each step
    asks for the inputs of a step walked later. The interpreter has no inline PTX: the CPU tests run without (it
    changes no values)."""
    if PREFETCH:
        step = tl.minimum(tl.maximum(t, 0), seqlen - 1)
        tl.inline_asm_elementwise("prefetch.global.L1 [$1]; mov.u32 $0, 0;", "=r,l", [rows + step * stride_l],
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_inputs(u_rows, delta_rows, B_rows, C_rows, su_l, sdl_l, sB_l, sC_l, t, seqlen,
                     PREFETCH: tl.constexpr):
    """u, delta, B and C at step t (the inputs every walk reads)."""
    _prefetch(u_rows, su_l, t, seqlen, PREFETCH)
    _prefetch(delta_rows, sdl_l, t, seqlen, PREFETCH)
    _prefetch(B_rows, sB_l, t, seqlen, PREFETCH)
    _prefetch(C_rows, sC_l, t, seqlen, PREFETCH)


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
    out_ptr, y_ptr, starts_ptr, last_ptr,
    dim, seqlen, nchunks,
    su_b, su_d, su_l, sdl_b, sdl_d, sdl_l, sz_b, sz_d, sz_l, so_b, so_d, so_l,
    sB_b, sB_n, sB_l, sC_b, sC_n, sC_l,
    DSTATE: tl.constexpr, NP: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_H0: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
    PREFETCH: tl.constexpr, AHEAD: tl.constexpr, UNROLL: tl.constexpr,
):
    pid_d, b = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64 offsets: prefill batches get large
    d, dmask, cols, nmask, smask, state_offsets, A, bias, Dskip = _program_channels(
        pid_d, A_ptr, bias_ptr, D_ptr, dim, DSTATE, NP, HAS_D, HAS_BIAS, BLOCK_D)
    dsafe, nsafe = tl.minimum(d, dim - 1), tl.minimum(cols, DSTATE - 1)
    A2 = A * LOG2E
    h = _batch_state(h0_ptr, b * dim * DSTATE + state_offsets, smask, HAS_H0, BLOCK_D, NP)
    u_b, delta_b, z_b = u_ptr + b * su_b, delta_ptr + b * sdl_b, z_ptr + b * sz_b
    B_b, C_b = B_ptr + b * sB_b, C_ptr + b * sC_b
    # B and C are loaded as (BLOCK_D, state) tiles that repeat across channels: in the state tile's own layout, with no
    # layout conversion (a round trip through shared memory) at every step. int32 offsets: half a pointer's registers.
    B_col, C_col = cols[None, :] * sB_n + 0 * d[:, None], cols[None, :] * sC_n + 0 * d[:, None]
    out_row, y_row = out_ptr + b * so_b + d * so_d, y_ptr + b * so_b + d * so_d
    for c in range(0, nchunks):
        tl.store(starts_ptr + (b * nchunks + c) * dim * DSTATE + state_offsets, h, mask=smask)
        for t in tl.range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, seqlen), loop_unroll_factor=UNROLL):
            _prefetch_inputs(u_b + dsafe * su_d, delta_b + dsafe * sdl_d, B_b + nsafe * sB_n, C_b + nsafe * sC_n,
                             su_l, sdl_l, sB_l, sC_l, t + AHEAD, seqlen, PREFETCH)
            u = tl.load(u_b + d * su_d + t * su_l, mask=dmask, other=0.0).to(tl.float32)
            dt = _step_size(tl.load(delta_b + d * sdl_d + t * sdl_l, mask=dmask, other=0.0).to(tl.float32) + bias,
                            SOFTPLUS)
            B_t = tl.load(B_b + (B_col + t * sB_l), mask=smask, other=0.0).to(tl.float32)
            C_t = tl.load(C_b + (C_col + t * sC_l), mask=smask, other=0.0).to(tl.float32)
            if HAS_Z:
                _prefetch(z_b + dsafe * sz_d, sz_l, t + AHEAD, seqlen, PREFETCH)
                z = tl.load(z_b + d * sz_d + t * sz_l, mask=dmask, other=0.0).to(tl.float32)
            h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * B_t
            y = tl.sum(h * C_t, axis=1) + Dskip * u
            if HAS_Z:
                tl.store(y_row + t * so_l, y.to(y_ptr.dtype.element_ty), mask=dmask)  # the backward's dz needs it
                y = y * z * tl.sigmoid(z)
            tl.store(out_row + t * so_l, y.to(out_ptr.dtype.element_ty), mask=dmask)
    tl.store(last_ptr + b * dim * DSTATE + state_offsets, h, mask=smask)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, starts_ptr, y_ptr, dout_ptr, dlast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr, scratch_ptr,
    dim, seqlen, nchunks, batch,
    su_b, su_d, su_l, sdl_b, sdl_d, sdl_l, sz_b, sz_d, sz_l, sy_b, sy_d, sy_l, sdo_b, sdo_d, sdo_l,
    sdu_b, sdu_d, sdu_l, sddl_b, sddl_d, sddl_l, sdz_b, sdz_d, sdz_l, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l,
    DSTATE: tl.constexpr, NP: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DLAST: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
    PREFETCH: tl.constexpr, UNROLL: tl.constexpr,
):
    """Gradients. dA (b, dim, n), dD and dbias (b, dim), dB and dC (dim blocks, b, n, l) are partial sums the
    launcher adds up; dh0 is the initial state's gradient."""
    pid_d, b = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64 offsets: prefill batches get large
    d, dmask, cols, nmask, smask, state_offsets, A, bias, Dskip = _program_channels(
        pid_d, A_ptr, bias_ptr, D_ptr, dim, DSTATE, NP, HAS_D, HAS_BIAS, BLOCK_D)
    dsafe, nsafe = tl.minimum(d, dim - 1), tl.minimum(cols, DSTATE - 1)
    A2 = A * LOG2E
    # g: the gradient reaching the state after the step at hand from later steps, first the last state's.
    g = _batch_state(dlast_ptr, b * dim * DSTATE + state_offsets, smask, HAS_DLAST, BLOCK_D, NP)
    dA = tl.zeros((BLOCK_D, NP), tl.float32)
    dD = tl.zeros((BLOCK_D,), tl.float32)
    dbias = tl.zeros((BLOCK_D,), tl.float32)
    program = pid_d * batch + b
    part = program * DSTATE * seqlen  # this program's slice of the dB/dC partial sums
    # This program's states before each step of the chunk at hand; each thread reads back only what it wrote.
    scratch = scratch_ptr + program * CHUNK * BLOCK_D * NP + tl.arange(0, BLOCK_D)[:, None] * NP + cols[None, :]
    u_b, delta_b, z_b, y_b = u_ptr + b * su_b, delta_ptr + b * sdl_b, z_ptr + b * sz_b, y_ptr + b * sy_b
    dout_b, B_b, C_b = dout_ptr + b * sdo_b, B_ptr + b * sB_b, C_ptr + b * sC_b
    B_col, C_col = cols[None, :] * sB_n + 0 * d[:, None], cols[None, :] * sC_n + 0 * d[:, None]  # as in the forward
    du_row, ddelta_row = du_ptr + b * sdu_b + d * sdu_d, ddelta_ptr + b * sddl_b + d * sddl_d
    dz_row = dz_ptr + b * sdz_b + d * sdz_d
    for i in range(0, nchunks):
        c = nchunks - 1 - i
        lo = c * CHUNK
        hi = tl.minimum(lo + CHUNK, seqlen)
        # Forward again over the chunk from its saved start state, keeping h_{t-1} for every step.
        h = tl.load(starts_ptr + (b * nchunks + c) * dim * DSTATE + state_offsets, mask=smask, other=0.0)
        for t in tl.range(lo, hi, loop_unroll_factor=UNROLL):
            tl.store(scratch + (t - lo) * BLOCK_D * NP, h)
            u = tl.load(u_b + d * su_d + t * su_l, mask=dmask, other=0.0).to(tl.float32)
            dt = _step_size(tl.load(delta_b + d * sdl_d + t * sdl_l, mask=dmask, other=0.0).to(tl.float32) + bias,
                            SOFTPLUS)
            B_t = tl.load(B_b + (B_col + t * sB_l), mask=smask, other=0.0).to(tl.float32)
            h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * B_t
        # Then the adjoint recurrence backwards: g_t = C_t dy_t + a_{t+1} g_{t+1}.
        for j in tl.range(0, hi - lo, loop_unroll_factor=UNROLL):
            t = hi - 1 - j
            # Both walks over the chunk before (the next one here) read its inputs at these offsets.
            _prefetch_inputs(u_b + dsafe * su_d, delta_b + dsafe * sdl_d, B_b + nsafe * sB_n, C_b + nsafe * sC_n,
                             su_l, sdl_l, sB_l, sC_l, t - CHUNK, seqlen, PREFETCH)
            _prefetch(dout_b + dsafe * sdo_d, sdo_l, t - CHUNK, seqlen, PREFETCH)
            h_prev = tl.load(scratch + (t - lo) * BLOCK_D * NP)
            u = tl.load(u_b + d * su_d + t * su_l, mask=dmask, other=0.0).to(tl.float32)
            raw = tl.load(delta_b + d * sdl_d + t * sdl_l, mask=dmask, other=0.0).to(tl.float32) + bias
            B_t = tl.load(B_b + (B_col + t * sB_l), mask=smask, other=0.0).to(tl.float32)
            C_t = tl.load(C_b + (C_col + t * sC_l), mask=smask, other=0.0).to(tl.float32)
            dy = tl.load(dout_b + d * sdo_d + t * sdo_l, mask=dmask, other=0.0).to(tl.float32)
            if HAS_Z:
                _prefetch(z_b + dsafe * sz_d, sz_l, t - CHUNK, seqlen, PREFETCH)
                _prefetch(y_b + dsafe * sy_d, sy_l, t - CHUNK, seqlen, PREFETCH)
                z = tl.load(z_b + d * sz_d + t * sz_l, mask=dmask, other=0.0).to(tl.float32)
                y = tl.load(y_b + d * sy_d + t * sy_l, mask=dmask, other=0.0).to(tl.float32)
                gate = tl.sigmoid(z)
                tl.store(dz_row + t * sdz_l, (dy * y * gate * (1.0 + z * (1.0 - gate))).to(dz_ptr.dtype.element_ty),
                         mask=dmask)
                dy = dy * z * gate
            dt = _step_size(raw, SOFTPLUS)
            decay = tl.exp2(dt[:, None] * A2)
            dtu = dt * u
            h = decay * h_prev + dtu[:, None] * B_t
            g += dy[:, None] * C_t
            tl.store(dC_ptr + part + cols * seqlen + t, tl.sum(dy[:, None] * h, axis=0), mask=nmask)
            tl.store(dB_ptr + part + cols * seqlen + t, tl.sum(g * dtu[:, None], axis=0), mask=nmask)
            gB = tl.sum(g * B_t, axis=1)
            decayed = g * decay * h_prev
            ddt = gB * u + tl.sum(decayed * A2, axis=1) / LOG2E
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(raw)
            ddt = tl.where(dmask, ddt, 0.0)
            dA += decayed * dt[:, None]
            dD += dy * u
            dbias += ddt
            tl.store(du_row + t * sdu_l, (dt * gB + Dskip * dy).to(du_ptr.dtype.element_ty), mask=dmask)
            tl.store(ddelta_row + t * sddl_l, ddt.to(ddelta_ptr.dtype.element_ty), mask=dmask)
            g = g * decay
    tl.store(dA_ptr + b * dim * DSTATE + state_offsets, dA, mask=smask)
    tl.store(dh0_ptr + b * dim * DSTATE + state_offsets, g, mask=smask)
    tl.store(dD_ptr + b * dim + d, dD, mask=dmask)
    tl.store(dbias_ptr + b * dim + d, dbias, mask=dmask)


# Triton's interpreter (the CPU tests) runs no inline PTX.
_PREFETCH = os.environ.get("TRITON_INTERPRET", "0") != "1"


def _strides3(t: Optional[Tensor]) -> tuple[int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0)


def _out_like(u: Tensor, dtype: torch.dtype) -> Tensor:
    """(b, d, l) stored as (b, l, d): the model transposes the scan's output back to (b, l, d) for its projection."""
    batch, dim, seqlen = u.shape
    return torch.empty(batch, seqlen, dim, device=u.device, dtype=dtype).transpose(1, 2)


def _dummy(like: Tensor) -> Tensor:
    return like.new_empty(1, dtype=torch.float32)


def scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
             delta_bias: Optional[Tensor], initial_state: Optional[Tensor], delta_softplus: bool, *, chunk: int,
             block_d: int = BLOCK_D, num_warps: int = NUM_WARPS, ahead: int = AHEAD,
             unroll: int = UNROLL) -> tuple[Tensor, ...]:
    """(out in u's dtype, the output before the gate (empty without z), float32 start states of the chunks of
    ``chunk`` steps (b, chunks, d, n), float32 last state (b, d, n)). A, D, delta_bias, initial_state: float32
    and contiguous (selective_scan passes them so); the others any strides."""
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    nchunks = triton.cdiv(seqlen, chunk)
    out = _out_like(u, u.dtype)
    y = _out_like(u, u.dtype) if z is not None else u.new_empty(0)
    starts = u.new_empty(batch, nchunks, dim, dstate, dtype=torch.float32)
    last = u.new_empty(batch, dim, dstate, dtype=torch.float32)
    dummy = _dummy(u)
    _scan_fwd_kernel[(triton.cdiv(dim, block_d), batch)](
        u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, initial_state if initial_state is not None else dummy,
        out, y if z is not None else dummy, starts, last,
        dim, seqlen, nchunks,
        *u.stride(), *delta.stride(), *_strides3(z), *out.stride(), *B.stride(), *C.stride(),
        DSTATE=dstate, NP=triton.next_power_of_2(dstate), HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None, HAS_H0=initial_state is not None, SOFTPLUS=delta_softplus,
        BLOCK_D=block_d, CHUNK=chunk, PREFETCH=_PREFETCH, AHEAD=ahead, UNROLL=unroll, num_warps=num_warps,
    )
    return out, y, starts, last


def scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
             delta_bias: Optional[Tensor], starts: Tensor, y: Tensor, dout: Tensor, dlast: Optional[Tensor],
             delta_softplus: bool, *, chunk: int, block_d: int = BLOCK_D,
             num_warps: int = NUM_WARPS, unroll: int = UNROLL) -> tuple[Tensor, ...]:
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state): each in its input's dtype and layout, the
    state's float32; None for absent inputs. dlast may have any strides (autograd passes expanded ones)."""
    batch, dim, seqlen = u.shape
    dlast = dlast.float().contiguous() if dlast is not None else None
    dstate = A.shape[1]
    nchunks = starts.shape[1]
    blocks = triton.cdiv(dim, block_d)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else None
    dA = u.new_empty(batch, dim, dstate, dtype=torch.float32)
    dB = u.new_empty(blocks, batch, dstate, seqlen, dtype=torch.float32)
    dC = torch.empty_like(dB)
    dD = u.new_empty(batch, dim, dtype=torch.float32)
    dbias = torch.empty_like(dD)
    dh0 = torch.empty_like(dA)
    scratch = u.new_empty(blocks * batch * chunk * block_d * triton.next_power_of_2(dstate), dtype=torch.float32)
    dummy = _dummy(u)
    _scan_bwd_kernel[(blocks, batch)](
        u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, starts, y if z is not None else dummy, dout,
        dlast if dlast is not None else dummy,
        du, ddelta, dz if z is not None else dummy, dA, dB, dC, dD, dbias, dh0, scratch,
        dim, seqlen, nchunks, batch,
        *u.stride(), *delta.stride(), *_strides3(z), *_strides3(y if z is not None else None), *dout.stride(),
        *du.stride(), *ddelta.stride(), *_strides3(dz), *B.stride(), *C.stride(),
        DSTATE=dstate, NP=triton.next_power_of_2(dstate), HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None, HAS_DLAST=dlast is not None, SOFTPLUS=delta_softplus,
        BLOCK_D=block_d, CHUNK=chunk, PREFETCH=_PREFETCH, UNROLL=unroll, num_warps=num_warps,
    )
    return (du, ddelta, dA.sum(0), dB.sum(0).to(B.dtype), dC.sum(0).to(C.dtype),
            dD.sum(0) if D is not None else None, dz, dbias.sum(0) if delta_bias is not None else None, dh0)
