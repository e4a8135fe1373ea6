"""The Mamba-1 selective scan (selective_scan.py has the recurrence) as Triton kernels, forward and backward.

The lab's default training scan: at row E's training shape its kernels run 2.86x faster than mamba_ssm's
(experiments/performance/RESULTS.md). It also takes an initial state and the last state's gradient (mamba_ssm's
takes neither, so prefill chunks after the first need this one), and inputs of any strides.

Each program owns a batch row and a block of BLOCK_D channels with all their state dims, a float32 tile held in
registers by one warp, and walks steps one at a time: h_t = a_t h_{t-1} + delta_t B_t u_t with
a_t = exp(delta_t A). A sequential walk costs one multiply-add per (channel, state, step), where a parallel
(associative) scan costs a log-depth tree of them (this file's first version did that, and ran at 0.65-0.81x of
mamba_ssm's speed). But a walk's time is its steps times a step's latency, not its work, so no walk crosses the
whole sequence: it is cut into segments of SEGMENT chunks of CHUNK steps, and each step prefetches the inputs of a
step further on into L1.

The tile is shaped (state // LANES_N, BLOCK_D, LANES_N), a float32 tile of 16 values a thread at 16 states. Triton
picks its layout: Triton 3.6 (the GPU machine's; its TTGIR, read with kernel_resources.py) gives each thread 4
adjacent state dims of 4 channels, with 8 lanes along the channels and 4 along the states, so a sum over the state
dims (the output, the step size's gradient) takes 2 shuffles per channel and one over the channels (dB, dC) 3 per
state dim. A (BLOCK_D, state) tile put the 16 state dims across lanes, and its sums over them took 64 shuffles per
step; the 3-D tile made the kernels 1.32x faster. With 8 states along the last axis (LANES_N = 8) Triton 3.6 spread
the states over 2 lanes and the first axis, and the backward's SASS held 64 shuffles where 16 states give 40: its
kernel took 0.84 ms at row E's shape, against 0.73 ms.

- forward: one program per segment walks it from a zero state, giving the segment's own contribution to its end
  state and the sum of its step sizes (the segment's decay is exp(A * sum)); a combine kernel carries the true
  state across the segments, one step per segment; then one program per segment walks it again from its true start,
  writes the outputs, and saves the state where it enters every chunk;
- backward: the same for the adjoint state, from the end,

      g_{t-1} = a_t (g_t + C_t dy_t)        (g_t: the gradient reaching h_t from later steps)

  then one program per segment takes its chunks in reverse: it runs the forward again over the chunk from the saved
  start, writing each h_{t-1} to a per-program scratch buffer, and walks back reading them (recovering h_{t-1} as
  (h_t - x_t) / a_t would blow up where decays underflow).

dB and dC are summed over the block's channels inside the program and over blocks by torch (sum_partials); dA, dD
and the delta-bias gradient over segments and batch rows likewise. The custom op (custom_ops.py) returns the
partial sums, so that a compiled backward fuses their sums with the ops that consume the gradients. Nothing uses
atomics (mamba_ssm's backward adds every channel's dB and dC into the same global memory with atomics), so the
gradients are deterministic.

The launchers work in float32 inside. Importing this module imports triton, so only ops/backend.py (when it looks
for kernels) and custom_ops.py (when an op first runs or is traced) import it. On a CPU, TRITON_INTERPRET=1 runs
the kernels in Triton's interpreter (the CPU tests do that).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

# Launch defaults, among the fastest tried at row E's shape (scan_kernel_bench.py). The chunk has no default: the
# backward must get the forward's, whose start states it reads (the custom op's is TRITON_SCAN_CHUNK).
BLOCK_D = 32  # channels per program: 16 made the forward walks 1.5-1.8x slower, 64 the backward 1.5x
NUM_WARPS = 1  # more warps share the tile across warps, and its reductions go through shared memory: 1.5x slower
# Steps (segments in the combine) between a prefetch and its use; the backward's second walk: a chunk. With
# SEGMENT = 16, all scan kernels took 1.367 ms at row E's shape against 1.391 with 8 and 8 (each change alone 1.38;
# AHEAD = 16: 1.40; runs/2026-11-28-session19/scan_launch_call6.txt and _call7.txt).
AHEAD = 4
UNROLL = 1  # steps per iteration of the walks: 2 made the backward 10-14% slower (all kernels 1.11x, 2026-11-28)
SEGMENT = 16  # chunks per program of the walks within segments: the combine takes one step per segment
# Registers per thread for the backward's segment walk (ptxas spills the rest). Uncapped it took 232 (Triton 3.6),
# which leaves room for 8 one-warp programs per multiprocessor; at 168, 12 fit and it ran 1.09x faster (128: 0.90x;
# measured with LANES_N = 8; with 16, all scan kernels took 1.392 ms at 168 against 1.455-1.512 at 152-184 or
# uncapped, 2026-11-28). Capping the other kernels made them slower.
BWD_MAX_REGISTERS = 168


LOG2E = tl.constexpr(1.4426950408889634)  # decays are exp2(delta * A * log2(e)): one MUFU instruction each
LANES_N = tl.constexpr(16)  # state dims along a state tile's last axis (see the module's docstring)
COMBINE_LANES = tl.constexpr(8)  # the combine's (no sums over lanes): 16 made it 0.072 -> 0.089 ms (two launches)


@triton.jit
def _step_size(raw, SOFTPLUS: tl.constexpr):
    """The float32 step size from the biased pre-softplus delta."""
    if SOFTPLUS:
        return tl.where(raw > 20.0, raw, tl.log(1.0 + tl.exp(raw)))  # torch's softplus threshold
    return raw


@triton.jit
def _program_channels(pid_d, A_ptr, bias_ptr, D_ptr, dim, DSTATE: tl.constexpr, NP: tl.constexpr,
                      HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, LANES: tl.constexpr):
    """This program's channels d with their mask and clamped in bounds (the rows that are loaded and prefetched
    start there: the prefetches need addresses in bounds, the masked loads read the same rows); the state dims as a
    (NP // LANES, LANES) index n with its mask and clamped in bounds as a flat vector; the state tile's mask and
    offsets into (dim, DSTATE) float32 tensors; and its rows of A * log2(e), the delta bias and D (zeros where
    absent)."""
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < dim
    n = tl.arange(0, NP // LANES)[:, None] * LANES + tl.arange(0, LANES)[None, :]
    nmask = n < DSTATE
    smask = _tile(dmask) & nmask[:, None, :]
    state_offsets = _tile(d) * DSTATE + n[:, None, :]
    A = tl.load(A_ptr + state_offsets, mask=smask, other=0.0)  # 0 in padding: decay 1, and B is 0 there
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=dmask, other=0.0)
    Dskip = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        Dskip = tl.load(D_ptr + d, mask=dmask, other=0.0)
    return (d, dmask, tl.minimum(d, dim - 1), n, nmask, tl.minimum(tl.arange(0, NP), DSTATE - 1), smask,
            state_offsets, A * LOG2E, bias, Dskip)


@triton.jit
def _tile(v):
    """A per-channel vector broadcast over the state tile's (state // LANES_N, channel, LANES_N) axes."""
    return v[None, :, None]


@triton.jit
def _sum_states(x):
    """A state tile summed over its state dims: within each thread first, then across lanes."""
    return tl.sum(tl.sum(x, axis=0), axis=1)


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
def _load_step(rows, stride_l, t, seqlen, mask):
    """Step t (clamped in bounds) of a (rows, steps) operand, as stored. The walks load a step's inputs during the
    step before and convert them where they are used: loaded in their own step, the step size's first input
    (delta) held 16-31% of the walks' warp stall samples (Nsight Compute), though prefetched into L1."""
    return tl.load(rows + tl.minimum(tl.maximum(t, 0), seqlen - 1) * stride_l, mask=mask, other=0.0)


@triton.jit
def _walk_inputs(u_stored, delta_stored, bias, SOFTPLUS: tl.constexpr):
    """u, the biased pre-softplus delta and the step size, float32, from a step's stored u and delta."""
    u = u_stored.to(tl.float32)
    raw = delta_stored.to(tl.float32) + bias
    return u, raw, _step_size(raw, SOFTPLUS)


@triton.jit
def _dy_and_dz(dout_stored, z_stored, y_stored, dz_row, sdz_l, t, dmask, HAS_Z: tl.constexpr,
               STORE_DZ: tl.constexpr):
    """The gradient of the scan's output before the gate at step t, from the step's stored dout, z and y (storing
    the gate's gradient if asked)."""
    dy = dout_stored.to(tl.float32)
    if HAS_Z:
        z = z_stored.to(tl.float32)
        gate = tl.sigmoid(z)
        if STORE_DZ:
            y = y_stored.to(tl.float32)
            tl.store(dz_row + t * sdz_l, (dy * y * gate * (1.0 + z * (1.0 - gate))).to(dz_row.dtype.element_ty),
                     mask=dmask)
        dy = dy * z * gate
    return dy


@triton.jit
def _scan_local_states_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, bias_ptr, local_ptr, dtsum_ptr,
    dim, seqlen, nseg,
    su_b, su_d, su_l, sdl_b, sdl_d, sdl_l, sB_b, sB_n, sB_l,
    DSTATE: tl.constexpr, NP: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr,
    SEGLEN: tl.constexpr, PREFETCH: tl.constexpr, AHEAD: tl.constexpr, UNROLL: tl.constexpr,
):
    """The forward's first pass, one program per segment: the state at the segment's end as if it started from
    zero, and the sum of its step sizes (its decay over the segment is exp(A * sum)); _scan_combine_kernel then
    carries the true states across segments."""
    pid_d, b, seg = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)  # int64: prefill batches
    d, dmask, dsafe, cols, nmask, nsafe, smask, state_offsets, A2, bias, _ = _program_channels(
        pid_d, A_ptr, bias_ptr, bias_ptr, dim, DSTATE, NP, False, HAS_BIAS, BLOCK_D, LANES_N)
    h = tl.zeros((NP // LANES_N, BLOCK_D, LANES_N), tl.float32)
    dtsum = tl.zeros((BLOCK_D,), tl.float32)
    u_b, delta_b, B_b = u_ptr + b * su_b, delta_ptr + b * sdl_b, B_ptr + b * sB_b
    # B is loaded as a (state // LANES_N, 1, LANES_N) tile: in the state tile's own layout, so broadcasting it over
    # the channels needs no layout conversion (a round trip through shared memory) at every step, and each thread
    # loads only its own state dims (a channel-sized tile loaded each of them once per channel: 1.3x slower walks).
    # int32 offsets: half a pointer's registers.
    B_col = cols[:, None, :] * sB_n
    u_row, delta_row, B_rows = u_b + dsafe * su_d, delta_b + dsafe * sdl_d, B_b + B_col
    lo = seg * SEGLEN
    u_next = _load_step(u_row, su_l, lo, seqlen, dmask)
    delta_next = _load_step(delta_row, sdl_l, lo, seqlen, dmask)
    B_next = _load_step(B_rows, sB_l, lo, seqlen, nmask[:, None, :])
    for t in tl.range(lo, tl.minimum(lo + SEGLEN, seqlen), loop_unroll_factor=UNROLL):
        _prefetch(u_row, su_l, t + AHEAD, seqlen, PREFETCH)
        _prefetch(delta_row, sdl_l, t + AHEAD, seqlen, PREFETCH)
        _prefetch(B_b + nsafe * sB_n, sB_l, t + AHEAD, seqlen, PREFETCH)
        u, _, dt = _walk_inputs(u_next, delta_next, bias, SOFTPLUS)
        B_t = B_next.to(tl.float32)
        u_next = _load_step(u_row, su_l, t + 1, seqlen, dmask)
        delta_next = _load_step(delta_row, sdl_l, t + 1, seqlen, dmask)
        B_next = _load_step(B_rows, sB_l, t + 1, seqlen, nmask[:, None, :])
        h = tl.exp2(_tile(dt) * A2) * h + _tile(dt * u) * B_t
        dtsum += dt
    row = b * nseg + seg
    tl.store(local_ptr + row * dim * DSTATE + state_offsets, h, mask=smask)
    tl.store(dtsum_ptr + row * dim + d, dtsum, mask=dmask)


@triton.jit
def _scan_combine_kernel(
    A_ptr, local_ptr, dtsum_ptr, x0_ptr, out_ptr, final_ptr,
    dim, nseg, out_rows,
    DSTATE: tl.constexpr, NP: tl.constexpr, HAS_X0: tl.constexpr, REVERSE: tl.constexpr, OUT_STEP: tl.constexpr,
    BLOCK_D: tl.constexpr, PREFETCH: tl.constexpr, AHEAD: tl.constexpr,
):
    """Carry a state across the segments, x <- exp(A * dtsum_s) x + local_s, in order (the forward's state) or in
    reverse (the backward's adjoint state), storing x where it enters each segment (row s * OUT_STEP of out's
    out_rows per batch row) and at the end. Only as many steps as segments: the walks within them run in
    parallel."""
    pid_d, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    d, dmask, _, _, _, _, smask, state_offsets, A2, _, _ = _program_channels(
        pid_d, A_ptr, A_ptr, A_ptr, dim, DSTATE, NP, False, False, BLOCK_D, COMBINE_LANES)
    x = tl.zeros((NP // COMBINE_LANES, BLOCK_D, COMBINE_LANES), tl.float32)
    if HAS_X0:
        x = tl.load(x0_ptr + b * dim * DSTATE + state_offsets, mask=smask, other=0.0)
    local_b, dtsum_b = local_ptr + b * nseg * dim * DSTATE + state_offsets, dtsum_ptr + b * nseg * dim + d
    for i in range(0, nseg):
        seg = nseg - 1 - i if REVERSE else i
        ahead = seg - AHEAD if REVERSE else seg + AHEAD
        _prefetch(local_b, dim * DSTATE, ahead, nseg, PREFETCH)
        _prefetch(dtsum_b, dim, ahead, nseg, PREFETCH)
        tl.store(out_ptr + (b * out_rows + seg * OUT_STEP) * dim * DSTATE + state_offsets, x, mask=smask)
        dtsum = tl.load(dtsum_b + seg * dim, mask=dmask, other=0.0)
        x = tl.exp2(_tile(dtsum) * A2) * x + tl.load(local_b + seg * dim * DSTATE, mask=smask, other=0.0)
    tl.store(final_ptr + b * dim * DSTATE + state_offsets, x, mask=smask)


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, starts_ptr, out_ptr, y_ptr,
    dim, seqlen, nchunks,
    su_b, su_d, su_l, sdl_b, sdl_d, sdl_l, sz_b, sz_d, sz_l, so_b, so_d, so_l,
    sB_b, sB_n, sB_l, sC_b, sC_n, sC_l,
    DSTATE: tl.constexpr, NP: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, SEGMENT: tl.constexpr,
    PREFETCH: tl.constexpr, AHEAD: tl.constexpr, UNROLL: tl.constexpr,
):
    """The outputs: each program walks one segment of SEGMENT chunks from the start state the combine saved, and
    saves the state where it enters each of the segment's other chunks (the backward starts its walks there)."""
    pid_d, b, seg = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    d, dmask, dsafe, cols, nmask, nsafe, smask, state_offsets, A2, bias, Dskip = _program_channels(
        pid_d, A_ptr, bias_ptr, D_ptr, dim, DSTATE, NP, HAS_D, HAS_BIAS, BLOCK_D, LANES_N)
    first = seg * SEGMENT
    h = tl.load(starts_ptr + (b * nchunks + first) * dim * DSTATE + state_offsets, mask=smask, other=0.0)
    u_b, delta_b, z_b = u_ptr + b * su_b, delta_ptr + b * sdl_b, z_ptr + b * sz_b
    B_b, C_b = B_ptr + b * sB_b, C_ptr + b * sC_b
    B_col, C_col = cols[:, None, :] * sB_n, cols[:, None, :] * sC_n  # as above
    out_row, y_row = out_ptr + b * so_b + d * so_d, y_ptr + b * so_b + d * so_d
    u_row, delta_row, z_row = u_b + dsafe * su_d, delta_b + dsafe * sdl_d, z_b + dsafe * sz_d
    B_rows, C_rows = B_b + B_col, C_b + C_col
    # Step t's inputs, loaded during step t - 1 (see _load_step).
    t0 = first * CHUNK
    u_next = _load_step(u_row, su_l, t0, seqlen, dmask)
    delta_next = _load_step(delta_row, sdl_l, t0, seqlen, dmask)
    B_next = _load_step(B_rows, sB_l, t0, seqlen, nmask[:, None, :])
    C_next = _load_step(C_rows, sC_l, t0, seqlen, nmask[:, None, :])
    if HAS_Z:
        z_next = _load_step(z_row, sz_l, t0, seqlen, dmask)
    for c in range(first, tl.minimum(first + SEGMENT, nchunks)):
        if c > first:
            tl.store(starts_ptr + (b * nchunks + c) * dim * DSTATE + state_offsets, h, mask=smask)
        for t in tl.range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, seqlen), loop_unroll_factor=UNROLL):
            _prefetch(u_row, su_l, t + AHEAD, seqlen, PREFETCH)
            _prefetch(delta_row, sdl_l, t + AHEAD, seqlen, PREFETCH)
            _prefetch(B_b + nsafe * sB_n, sB_l, t + AHEAD, seqlen, PREFETCH)
            _prefetch(C_b + nsafe * sC_n, sC_l, t + AHEAD, seqlen, PREFETCH)
            u, _, dt = _walk_inputs(u_next, delta_next, bias, SOFTPLUS)
            B_t, C_t = B_next.to(tl.float32), C_next.to(tl.float32)
            u_next = _load_step(u_row, su_l, t + 1, seqlen, dmask)
            delta_next = _load_step(delta_row, sdl_l, t + 1, seqlen, dmask)
            B_next = _load_step(B_rows, sB_l, t + 1, seqlen, nmask[:, None, :])
            C_next = _load_step(C_rows, sC_l, t + 1, seqlen, nmask[:, None, :])
            if HAS_Z:
                _prefetch(z_row, sz_l, t + AHEAD, seqlen, PREFETCH)
                z = z_next.to(tl.float32)
                z_next = _load_step(z_row, sz_l, t + 1, seqlen, dmask)
            h = tl.exp2(_tile(dt) * A2) * h + _tile(dt * u) * B_t
            y = _sum_states(h * C_t) + Dskip * u
            if HAS_Z:
                tl.store(y_row + t * so_l, y.to(y_ptr.dtype.element_ty), mask=dmask)  # the backward's dz needs it
                y = y * z * tl.sigmoid(z)
            tl.store(out_row + t * so_l, y.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _scan_local_adjoint_kernel(
    delta_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dout_ptr, local_ptr, dtsum_ptr,
    dim, seqlen, nseg,
    sdl_b, sdl_d, sdl_l, sz_b, sz_d, sz_l, sdo_b, sdo_d, sdo_l, sC_b, sC_n, sC_l,
    DSTATE: tl.constexpr, NP: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, SEGLEN: tl.constexpr, PREFETCH: tl.constexpr, AHEAD: tl.constexpr, UNROLL: tl.constexpr,
):
    """The backward's first pass, one program per segment, from its end: the adjoint state g_{t-1} = a_t (g_t +
    C_t dy_t) where it leaves the segment as if none reached the segment's end from later steps, and the sum of the
    segment's step sizes; _scan_combine_kernel then carries the true adjoint states across segments."""
    pid_d, b, seg = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    d, dmask, dsafe, cols, nmask, nsafe, smask, state_offsets, A2, bias, _ = _program_channels(
        pid_d, A_ptr, bias_ptr, bias_ptr, dim, DSTATE, NP, False, HAS_BIAS, BLOCK_D, LANES_N)
    g = tl.zeros((NP // LANES_N, BLOCK_D, LANES_N), tl.float32)
    dtsum = tl.zeros((BLOCK_D,), tl.float32)
    delta_b, z_b, dout_b, C_b = delta_ptr + b * sdl_b, z_ptr + b * sz_b, dout_ptr + b * sdo_b, C_ptr + b * sC_b
    C_col = cols[:, None, :] * sC_n  # as in _scan_local_states_kernel
    delta_row, z_row, dout_row = delta_b + dsafe * sdl_d, z_b + dsafe * sz_d, dout_b + dsafe * sdo_d
    C_rows = C_b + C_col
    lo = seg * SEGLEN
    hi = tl.minimum(lo + SEGLEN, seqlen)
    # Step t's inputs, loaded during step t + 1 (see _load_step).
    delta_next = _load_step(delta_row, sdl_l, hi - 1, seqlen, dmask)
    dout_next = _load_step(dout_row, sdo_l, hi - 1, seqlen, dmask)
    C_next = _load_step(C_rows, sC_l, hi - 1, seqlen, nmask[:, None, :])
    z_next = dout_next  # read only with a gate
    if HAS_Z:
        z_next = _load_step(z_row, sz_l, hi - 1, seqlen, dmask)
    for j in tl.range(0, hi - lo, loop_unroll_factor=UNROLL):
        t = hi - 1 - j
        _prefetch(delta_row, sdl_l, t - AHEAD, seqlen, PREFETCH)
        _prefetch(dout_row, sdo_l, t - AHEAD, seqlen, PREFETCH)
        _prefetch(C_b + nsafe * sC_n, sC_l, t - AHEAD, seqlen, PREFETCH)
        if HAS_Z:
            _prefetch(z_row, sz_l, t - AHEAD, seqlen, PREFETCH)
        raw = delta_next.to(tl.float32) + bias
        dy = _dy_and_dz(dout_next, z_next, z_next, dout_row, 0, t, dmask, HAS_Z, False)  # no dz: y goes unused
        C_t = C_next.to(tl.float32)
        delta_next = _load_step(delta_row, sdl_l, t - 1, seqlen, dmask)
        dout_next = _load_step(dout_row, sdo_l, t - 1, seqlen, dmask)
        C_next = _load_step(C_rows, sC_l, t - 1, seqlen, nmask[:, None, :])
        if HAS_Z:
            z_next = _load_step(z_row, sz_l, t - 1, seqlen, dmask)
        dt = _step_size(raw, SOFTPLUS)
        g = (g + _tile(dy) * C_t) * tl.exp2(_tile(dt) * A2)
        dtsum += dt
    row = b * nseg + seg
    tl.store(local_ptr + row * dim * DSTATE + state_offsets, g, mask=smask)
    tl.store(dtsum_ptr + row * dim + d, dtsum, mask=dmask)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, starts_ptr, ends_ptr, y_ptr, dout_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dparams_ptr, scratch_ptr,
    dim, seqlen, nchunks, batch,
    su_b, su_d, su_l, sdl_b, sdl_d, sdl_l, sz_b, sz_d, sz_l, sy_b, sy_d, sy_l, sdo_b, sdo_d, sdo_l,
    sdu_b, sdu_d, sdu_l, sddl_b, sddl_d, sddl_l, sdz_b, sdz_d, sdz_l, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l,
    DSTATE: tl.constexpr, NP: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, SEGMENT: tl.constexpr,
    PREFETCH: tl.constexpr, UNROLL: tl.constexpr,
):
    """Gradients, each program over one segment of SEGMENT chunks, from the chunks' saved start states and the
    adjoint state where it enters the segment from later steps. dB and dC (dim blocks, b, l, n) and dA, dD and
    dbias (segments, b, dim * (n + 2), dA first) are partial sums, added up by sum_partials."""
    pid_d, b, seg = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    d, dmask, dsafe, cols, nmask, nsafe, smask, state_offsets, A2, bias, Dskip = _program_channels(
        pid_d, A_ptr, bias_ptr, D_ptr, dim, DSTATE, NP, HAS_D, HAS_BIAS, BLOCK_D, LANES_N)
    first, stop = seg * SEGMENT, tl.minimum(seg * SEGMENT + SEGMENT, nchunks)
    # g: the gradient reaching the state after the step at hand from later steps.
    g = tl.load(ends_ptr + (b * tl.num_programs(2) + seg) * dim * DSTATE + state_offsets, mask=smask, other=0.0)
    dA = tl.zeros((NP // LANES_N, BLOCK_D, LANES_N), tl.float32)
    dD = tl.zeros((BLOCK_D,), tl.float32)
    dbias = tl.zeros((BLOCK_D,), tl.float32)
    program = (seg * batch + b) * tl.num_programs(0) + pid_d
    part = (pid_d * batch + b) * seqlen * DSTATE  # this program's rows of the dB/dC partial sums, (l, n): each
    # step's sums go to one contiguous run
    # This program's states before each step of the chunk at hand; each thread reads back only what it wrote.
    scratch = scratch_ptr + program * CHUNK * BLOCK_D * NP + _tile(tl.arange(0, BLOCK_D)) * NP + cols[:, None, :]
    u_b, delta_b, z_b, y_b = u_ptr + b * su_b, delta_ptr + b * sdl_b, z_ptr + b * sz_b, y_ptr + b * sy_b
    dout_b, B_b, C_b = dout_ptr + b * sdo_b, B_ptr + b * sB_b, C_ptr + b * sC_b
    dz_b = dz_ptr + b * sdz_b
    B_col, C_col = cols[:, None, :] * sB_n, cols[:, None, :] * sC_n  # as above
    du_row, ddelta_row = du_ptr + b * sdu_b + d * sdu_d, ddelta_ptr + b * sddl_b + d * sddl_d
    u_row, delta_row, B_rows, C_rows = u_b + dsafe * su_d, delta_b + dsafe * sdl_d, B_b + B_col, C_b + C_col
    dout_row, z_row, y_row, dz_row = dout_b + dsafe * sdo_d, z_b + dsafe * sz_d, y_b + dsafe * sy_d, dz_b + d * sdz_d
    for i in range(0, stop - first):
        c = stop - 1 - i
        lo = c * CHUNK
        hi = tl.minimum(lo + CHUNK, seqlen)
        # A step's inputs are loaded during the step before (see _load_step); the walk back's first C, dout, z and
        # y while the chunk is walked forward.
        u_next = _load_step(u_row, su_l, lo, seqlen, dmask)
        delta_next = _load_step(delta_row, sdl_l, lo, seqlen, dmask)
        B_next = _load_step(B_rows, sB_l, lo, seqlen, nmask[:, None, :])
        C_back = _load_step(C_rows, sC_l, hi - 1, seqlen, nmask[:, None, :])
        dout_back = _load_step(dout_row, sdo_l, hi - 1, seqlen, dmask)
        z_back, y_back = dout_back, dout_back  # read only with a gate
        if HAS_Z:
            z_back = _load_step(z_row, sz_l, hi - 1, seqlen, dmask)
            y_back = _load_step(y_row, sy_l, hi - 1, seqlen, dmask)
        # Forward again over the chunk from its saved start state, keeping h_{t-1} for every step.
        h = tl.load(starts_ptr + (b * nchunks + c) * dim * DSTATE + state_offsets, mask=smask, other=0.0)
        for t in tl.range(lo, hi, loop_unroll_factor=UNROLL):
            tl.store(scratch + (t - lo) * BLOCK_D * NP, h)
            u, _, dt = _walk_inputs(u_next, delta_next, bias, SOFTPLUS)
            B_t = B_next.to(tl.float32)
            u_next = _load_step(u_row, su_l, t + 1, seqlen, dmask)  # after the chunk's last step: unused
            delta_next = _load_step(delta_row, sdl_l, t + 1, seqlen, dmask)
            B_next = _load_step(B_rows, sB_l, t + 1, seqlen, nmask[:, None, :])
            h = tl.exp2(_tile(dt) * A2) * h + _tile(dt * u) * B_t
        # Then the adjoint recurrence backwards: g_t = C_t dy_t + a_{t+1} g_{t+1}.
        u_next = _load_step(u_row, su_l, hi - 1, seqlen, dmask)
        delta_next = _load_step(delta_row, sdl_l, hi - 1, seqlen, dmask)
        B_next = _load_step(B_rows, sB_l, hi - 1, seqlen, nmask[:, None, :])
        for j in tl.range(0, hi - lo, loop_unroll_factor=UNROLL):
            t = hi - 1 - j
            # Both walks over the chunk before (the next one here) read its inputs at these offsets.
            _prefetch(u_row, su_l, t - CHUNK, seqlen, PREFETCH)
            _prefetch(delta_row, sdl_l, t - CHUNK, seqlen, PREFETCH)
            _prefetch(B_b + nsafe * sB_n, sB_l, t - CHUNK, seqlen, PREFETCH)
            _prefetch(C_b + nsafe * sC_n, sC_l, t - CHUNK, seqlen, PREFETCH)
            _prefetch(dout_row, sdo_l, t - CHUNK, seqlen, PREFETCH)
            if HAS_Z:
                _prefetch(z_row, sz_l, t - CHUNK, seqlen, PREFETCH)
                _prefetch(y_row, sy_l, t - CHUNK, seqlen, PREFETCH)
            h_prev = tl.load(scratch + (t - lo) * BLOCK_D * NP)
            u, raw, dt = _walk_inputs(u_next, delta_next, bias, SOFTPLUS)
            B_t, C_t = B_next.to(tl.float32), C_back.to(tl.float32)
            dy = _dy_and_dz(dout_back, z_back, y_back, dz_row, sdz_l, t, dmask, HAS_Z, True)
            prev = tl.maximum(t - 1, lo)  # the chunk's first step loads itself again, unused
            u_next = _load_step(u_row, su_l, prev, seqlen, dmask)
            delta_next = _load_step(delta_row, sdl_l, prev, seqlen, dmask)
            B_next = _load_step(B_rows, sB_l, prev, seqlen, nmask[:, None, :])
            C_back = _load_step(C_rows, sC_l, prev, seqlen, nmask[:, None, :])
            dout_back = _load_step(dout_row, sdo_l, prev, seqlen, dmask)
            if HAS_Z:
                z_back = _load_step(z_row, sz_l, prev, seqlen, dmask)
                y_back = _load_step(y_row, sy_l, prev, seqlen, dmask)
            decay = tl.exp2(_tile(dt) * A2)
            dtu = dt * u
            g += _tile(dy) * C_t
            tl.store(dC_ptr + part + t * DSTATE + cols, tl.sum(_tile(dy) * h, axis=1), mask=nmask)
            tl.store(dB_ptr + part + t * DSTATE + cols, tl.sum(g * _tile(dtu), axis=1), mask=nmask)
            gB = _sum_states(g * B_t)
            decayed = g * decay * h_prev
            ddt = gB * u + _sum_states(decayed * A2) / LOG2E
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(raw)
            ddt = tl.where(dmask, ddt, 0.0)
            dA += decayed * _tile(dt)
            dD += dy * u
            dbias += ddt
            tl.store(du_row + t * sdu_l, (dt * gB + Dskip * dy).to(du_ptr.dtype.element_ty), mask=dmask)
            tl.store(ddelta_row + t * sddl_l, ddt.to(ddelta_ptr.dtype.element_ty), mask=dmask)
            g = g * decay
            h = h_prev  # the state after the step before (the walk forward leaves the chunk's last in h)
    params = dparams_ptr + (seg * batch + b) * dim * (DSTATE + 2)
    tl.store(params + state_offsets, dA, mask=smask)
    tl.store(params + dim * DSTATE + d, dD, mask=dmask)
    tl.store(params + dim * (DSTATE + 1) + d, dbias, mask=dmask)


# Triton's interpreter (the CPU tests) runs no inline PTX.
_PREFETCH = os.environ.get("TRITON_INTERPRET", "0") != "1"


def _strides3(t: Optional[Tensor]) -> tuple[int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0)


def _out_like(u: Tensor, dtype: torch.dtype) -> Tensor:
    """(b, d, l) stored as (b, l, d): the model transposes the scan's output back to (b, l, d) for its projection."""
    batch, dim, seqlen = u.shape
    return torch.empty(batch, seqlen, dim, device=u.device, dtype=dtype).transpose(1, 2)


def _segment_buffers(u: Tensor, segments: int, dstate: int) -> tuple[Tensor, Tensor]:
    """A first pass's outputs: each segment's local state (b, segments, d, n) and step-size sum (b, segments, d)."""
    batch, dim, _ = u.shape
    return (u.new_empty(batch, segments, dim, dstate, dtype=torch.float32),
            u.new_empty(batch, segments, dim, dtype=torch.float32))


def _padded_states(dstate: int) -> int:
    """A state tile's state dims: a power of 2, at least one per lane along its last axis."""
    return max(LANES_N.value, triton.next_power_of_2(dstate))


def _dummy(like: Tensor) -> Tensor:
    return like.new_empty(1, dtype=torch.float32)


def scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
             delta_bias: Optional[Tensor], initial_state: Optional[Tensor], delta_softplus: bool, *, chunk: int,
             block_d: int = BLOCK_D, num_warps: int = NUM_WARPS, ahead: int = AHEAD, unroll: int = UNROLL,
             segment: int = SEGMENT) -> tuple[Tensor, ...]:
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
    blocks, np2 = triton.cdiv(dim, block_d), _padded_states(dstate)
    bias = delta_bias if delta_bias is not None else dummy
    segments = triton.cdiv(nchunks, segment)
    local, dtsum = _segment_buffers(u, segments, dstate)
    _scan_local_states_kernel[(blocks, batch, segments)](
        u, delta, A, B, bias, local, dtsum,
        dim, seqlen, segments, *u.stride(), *delta.stride(), *B.stride(),
        DSTATE=dstate, NP=np2, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, BLOCK_D=block_d,
        SEGLEN=segment * chunk, PREFETCH=_PREFETCH, AHEAD=ahead, UNROLL=unroll, num_warps=num_warps,
    )
    _scan_combine_kernel[(blocks, batch)](
        A, local, dtsum, initial_state if initial_state is not None else dummy, starts, last, dim, segments, nchunks,
        DSTATE=dstate, NP=np2, HAS_X0=initial_state is not None, REVERSE=False, OUT_STEP=segment, BLOCK_D=block_d,
        PREFETCH=_PREFETCH, AHEAD=ahead, num_warps=num_warps,
    )
    _scan_fwd_kernel[(blocks, batch, segments)](
        u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy, bias, starts, out,
        y if z is not None else dummy,
        dim, seqlen, nchunks,
        *u.stride(), *delta.stride(), *_strides3(z), *out.stride(), *B.stride(), *C.stride(),
        DSTATE=dstate, NP=np2, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, BLOCK_D=block_d, CHUNK=chunk, SEGMENT=segment, PREFETCH=_PREFETCH, AHEAD=ahead,
        UNROLL=unroll, num_warps=num_warps,
    )
    return out, y, starts, last


def scan_bwd_partials(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                      z: Optional[Tensor], delta_bias: Optional[Tensor], starts: Tensor, y: Tensor, dout: Tensor,
                      dlast: Optional[Tensor], delta_softplus: bool, *, chunk: int, block_d: int = BLOCK_D,
                      num_warps: int = NUM_WARPS, ahead: int = AHEAD, unroll: int = UNROLL, segment: int = SEGMENT,
                      max_registers: Optional[int] = BWD_MAX_REGISTERS) -> tuple[Tensor, ...]:
    """(du, ddelta, dz or None, dinitial_state, dB and dC's partial sums, dA, dD and ddelta_bias's): the partial
    sums are float32, shaped as bwd_partial_shapes gives, and sum_partials adds them up. Kept apart so that a
    compiled backward fuses those sums with what consumes the gradients (they were nine small kernels of their own).
    dlast may have any strides (autograd passes expanded ones). max_registers caps the segment walk's registers
    per thread (None: as many as ptxas likes)."""
    batch, dim, seqlen = u.shape
    dlast = dlast.float().contiguous() if dlast is not None else None
    dstate = A.shape[1]
    nchunks = starts.shape[1]
    blocks, np2, segments = triton.cdiv(dim, block_d), _padded_states(dstate), triton.cdiv(nchunks, segment)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else None
    dBC_shape, params_shape = bwd_partial_shapes(batch, dim, seqlen, dstate, chunk, block_d=block_d, segment=segment)
    dBC = u.new_empty(dBC_shape, dtype=torch.float32)
    dparams = u.new_empty(params_shape, dtype=torch.float32)
    ends = u.new_empty(batch, segments, dim, dstate, dtype=torch.float32)
    dh0 = u.new_empty(batch, dim, dstate, dtype=torch.float32)
    scratch = u.new_empty(segments * batch * blocks * chunk * block_d * np2, dtype=torch.float32)
    dummy = _dummy(u)
    bias = delta_bias if delta_bias is not None else dummy
    local, dtsum = _segment_buffers(u, segments, dstate)
    _scan_local_adjoint_kernel[(blocks, batch, segments)](
        delta, A, C, z if z is not None else dummy, bias, dout, local, dtsum,
        dim, seqlen, segments, *delta.stride(), *_strides3(z), *dout.stride(), *C.stride(),
        DSTATE=dstate, NP=np2, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        BLOCK_D=block_d, SEGLEN=segment * chunk, PREFETCH=_PREFETCH, AHEAD=ahead, UNROLL=unroll, num_warps=num_warps,
    )
    _scan_combine_kernel[(blocks, batch)](
        A, local, dtsum, dlast if dlast is not None else dummy, ends, dh0, dim, segments, segments,
        DSTATE=dstate, NP=np2, HAS_X0=dlast is not None, REVERSE=True, OUT_STEP=1, BLOCK_D=block_d,
        PREFETCH=_PREFETCH, AHEAD=ahead, num_warps=num_warps,
    )
    _scan_bwd_kernel[(blocks, batch, segments)](
        u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy, bias, starts, ends,
        y if z is not None else dummy, dout,
        du, ddelta, dz if z is not None else dummy, dBC[0], dBC[1], dparams, scratch,
        dim, seqlen, nchunks, batch,
        *u.stride(), *delta.stride(), *_strides3(z), *_strides3(y if z is not None else None), *dout.stride(),
        *du.stride(), *ddelta.stride(), *_strides3(dz), *B.stride(), *C.stride(),
        DSTATE=dstate, NP=np2, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, BLOCK_D=block_d, CHUNK=chunk, SEGMENT=segment, PREFETCH=_PREFETCH, UNROLL=unroll,
        num_warps=num_warps, maxnreg=max_registers,
    )
    return du, ddelta, dz, dh0, dBC, dparams


def bwd_partial_shapes(batch: int, dim: int, seqlen: int, dstate: int, chunk: int, *, block_d: int = BLOCK_D,
                       segment: int = SEGMENT) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of scan_bwd_partials' partial sums: dB and dC's (2, dim blocks, b, l, n), dA, dD and ddelta_bias's
    (segments, b, dim * (n + 2))."""
    segments = triton.cdiv(triton.cdiv(seqlen, chunk), segment)
    return (2, triton.cdiv(dim, block_d), batch, seqlen, dstate), (segments, batch, dim * (dstate + 2))


def sum_partials(dBC: Tensor, dparams: Tensor, B_dtype: torch.dtype, C_dtype: torch.dtype
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dA, dB, dC, dD, ddelta_bias) from scan_bwd_partials' partial sums: float32 sums, dB and dC (b, n, l) cast
    last. Plain torch, so a compiled backward fuses them; dD and ddelta_bias are views of one buffer."""
    dstate = dBC.shape[-1]
    dB, dC = dBC.sum(1).transpose(2, 3)
    sums = dparams.sum((0, 1))
    dim = sums.numel() // (dstate + 2)
    dA, dD, dbias = sums.split((dim * dstate, dim, dim))
    return dA.view(dim, dstate), dB.to(B_dtype), dC.to(C_dtype), dD, dbias


def scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
             delta_bias: Optional[Tensor], starts: Tensor, y: Tensor, dout: Tensor, dlast: Optional[Tensor],
             delta_softplus: bool, **launch) -> tuple[Optional[Tensor], ...]:
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state): each in its input's dtype and shape, the
    state's float32; None for absent inputs. launch: scan_bwd_partials' keywords."""
    du, ddelta, dz, dh0, dBC, dparams = scan_bwd_partials(u, delta, A, B, C, D, z, delta_bias, starts, y, dout, dlast,
                                                          delta_softplus, **launch)
    dA, dB, dC, dD, dbias = sum_partials(dBC, dparams, B.dtype, C.dtype)
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz, dbias if delta_bias is not None else None,
            dh0)
