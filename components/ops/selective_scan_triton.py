"""The Mamba-1 selective scan (selective_scan.py has the recurrence) as Triton kernels, forward and backward.

Why another kernel: mamba_ssm's takes no initial state, so prefill chunks after the first would fall back to the
PyTorch reference; this one takes an initial state and the last state's gradient, and inputs of any strides. It was
also a try at row E's training step, where mamba_ssm's CUDA backward is 3.0 of 4.0 ms per layer: its thread blocks
each own one channel and add dB and dC into global memory with atomics. Measured at E's shape it is slower than
mamba_ssm's (0.65-0.81x, experiments/performance/RESULTS.md), so mamba_ssm's stays the training kernel.

Here one program owns a batch row and a block of BLOCK_D channels and walks the sequence in chunks of CHUNK steps.
Inside a chunk each state dim n is one `tl.associative_scan` of (decay, input) pairs over a (BLOCK_D, CHUNK) tile,
started from the state carried out of the chunk before. The backward walks the chunks in reverse: it rescans the
chunk's states from the start states the forward saved, and runs the adjoint recurrence

    g_t = C_t dy_t + a_{t+1} g_{t+1}        (g_t: the gradient of h_t; a_t = exp(delta_t A))

as a reverse scan. The decay's gradient needs h_{t-1}: the backward scans the inputs shifted by one step, which gives
h_{t-1} exactly (h_t - x_t would cancel catastrophically where decays underflow), and h_t = a_t h_{t-1} + x_t.
dB and dC are summed over the block's channels inside the program and over blocks by torch; dA, dD and the
delta-bias gradient per batch row likewise. Nothing uses atomics, so the gradients are deterministic.

The launchers work in float32 inside. Importing this module imports triton, so only ops/backend.py (when it looks
for kernels) and custom_ops.py (when the op first runs) import it. On a CPU, TRITON_INTERPRET=1 runs the kernels in
Triton's interpreter (the CPU tests do that).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

# Launch defaults, the ones the GPU parity tests ran (scan_kernel_bench.py timed 4 channels and 2 warps 20% faster
# at row E's shape). The state dims run as a loop: unrolled, both kernels spilled registers. The chunk has no
# default: the backward must get the forward's, whose start states it reads (the custom op's is TRITON_SCAN_CHUNK).
BLOCK_D = 8  # channels per program
NUM_WARPS = 4


@triton.jit
def _affine_compose(a1, x1, a2, x2):
    """h -> a1 h + x1, then h -> a2 h + x2."""
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _column(tile, cols, n):
    """tile[:, n] of a (rows, cols) register tile."""
    return tl.sum(tl.where(cols[None, :] == n, tile, 0.0), axis=1)


@triton.jit
def _set_column(tile, cols, n, values):
    return tl.where(cols[None, :] == n, values[:, None], tile)


@triton.jit
def _step_size(delta_ptr, offsets, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(pre-softplus delta, float32 step size, 0 where masked: decay 1 and no input there)."""
    raw = tl.load(delta_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += bias[:, None]
    dt = raw
    if SOFTPLUS:
        dt = tl.where(raw > 20.0, raw, tl.log(1.0 + tl.exp(raw)))  # torch's softplus threshold
    return raw, tl.where(mask, dt, 0.0)


@triton.jit
def _program_channels(pid_d, A_ptr, bias_ptr, D_ptr, dim, DSTATE: tl.constexpr, NP: tl.constexpr,
                      HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr):
    """This program's channels d with their mask, state and step index ranges, the (d, state) offsets and mask into
    (dim, DSTATE) float32 tensors, and its rows of A, the delta bias and D (zeros where absent)."""
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < dim
    cols = tl.arange(0, NP)
    steps = tl.arange(0, CHUNK)
    smask = dmask[:, None] & (cols[None, :] < DSTATE)
    state_offsets = d[:, None] * DSTATE + cols[None, :]
    A = tl.load(A_ptr + state_offsets, mask=smask, other=0.0)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=dmask, other=0.0)
    Dskip = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        Dskip = tl.load(D_ptr + d, mask=dmask, other=0.0)
    return d, dmask, cols, steps, smask, state_offsets, A, bias, Dskip


@triton.jit
def _batch_state(ptr, offsets, mask, PRESENT: tl.constexpr, BLOCK_D: tl.constexpr, NP: tl.constexpr):
    """This program's (d, state) tile of an optional (b, dim, DSTATE) float32 tensor; zeros where absent."""
    if PRESENT:
        return tl.load(ptr + offsets, mask=mask, other=0.0)
    return tl.zeros((BLOCK_D, NP), tl.float32)


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
    out_ptr, y_ptr, starts_ptr, last_ptr,
    dim, seqlen, nchunks,
    su_b, su_d, su_l, sdl_b, sdl_d, sdl_l, sz_b, sz_d, sz_l, so_b, so_d, so_l,
    sB_b, sB_n, sB_l, sC_b, sC_n, sC_l,
    DSTATE: tl.constexpr, NP: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_H0: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
):
    pid_d, b = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64 offsets: prefill batches get large
    d, dmask, cols, steps, smask, state_offsets, A, bias, Dskip = _program_channels(
        pid_d, A_ptr, bias_ptr, D_ptr, dim, DSTATE, NP, HAS_D, HAS_BIAS, BLOCK_D, CHUNK)
    h = _batch_state(h0_ptr, b * dim * DSTATE + state_offsets, smask, HAS_H0, BLOCK_D, NP)
    for c in range(0, nchunks):
        t = c * CHUNK + steps
        tmask = t < seqlen
        m2 = dmask[:, None] & tmask[None, :]
        u = tl.load(u_ptr + b * su_b + d[:, None] * su_d + t[None, :] * su_l, mask=m2, other=0.0).to(tl.float32)
        _, dt = _step_size(delta_ptr, b * sdl_b + d[:, None] * sdl_d + t[None, :] * sdl_l, m2, bias, HAS_BIAS,
                           SOFTPLUS)
        dtu = dt * u
        tl.store(starts_ptr + (b * nchunks + c) * dim * DSTATE + state_offsets, h, mask=smask)
        y = Dskip[:, None] * u
        for n in range(DSTATE):  # a loop, not unrolled: unrolled, the kernels spill and compile for a minute
            B_n = tl.load(B_ptr + b * sB_b + n * sB_n + t * sB_l, mask=tmask, other=0.0).to(tl.float32)
            C_n = tl.load(C_ptr + b * sC_b + n * sC_n + t * sC_l, mask=tmask, other=0.0).to(tl.float32)
            decay_prod, drive = tl.associative_scan((tl.exp(dt * _column(A, cols, n)[:, None]), dtu * B_n[None, :]),
                                                    1, _affine_compose)
            h_n = drive + decay_prod * _column(h, cols, n)[:, None]
            y += h_n * C_n[None, :]
            # Masked steps have decay 1 and no input, so the chunk's last column is the state after its last step.
            h = _set_column(h, cols, n, tl.sum(tl.where(steps[None, :] == CHUNK - 1, h_n, 0.0), axis=1))
        out_offsets = b * so_b + d[:, None] * so_d + t[None, :] * so_l
        if HAS_Z:
            tl.store(y_ptr + out_offsets, y.to(y_ptr.dtype.element_ty), mask=m2)  # the backward's dz needs it
            z = tl.load(z_ptr + b * sz_b + d[:, None] * sz_d + t[None, :] * sz_l, mask=m2, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(out_ptr + out_offsets, y.to(out_ptr.dtype.element_ty), mask=m2)
    tl.store(last_ptr + b * dim * DSTATE + state_offsets, h, mask=smask)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, starts_ptr, y_ptr, dout_ptr, dlast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    dim, seqlen, nchunks, batch,
    su_b, su_d, su_l, sdl_b, sdl_d, sdl_l, sz_b, sz_d, sz_l, sy_b, sy_d, sy_l, sdo_b, sdo_d, sdo_l,
    sdu_b, sdu_d, sdu_l, sddl_b, sddl_d, sddl_l, sdz_b, sdz_d, sdz_l, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l,
    DSTATE: tl.constexpr, NP: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DLAST: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
):
    """Gradients. dA (b, dim, n), dD and dbias (b, dim), dB and dC (dim blocks, b, n, l) are partial sums the
    launcher adds up; dh0 is the initial state's gradient."""
    pid_d, b = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64 offsets: prefill batches get large
    d, dmask, cols, steps, smask, state_offsets, A, bias, Dskip = _program_channels(
        pid_d, A_ptr, bias_ptr, D_ptr, dim, DSTATE, NP, HAS_D, HAS_BIAS, BLOCK_D, CHUNK)
    # q: the gradient reaching the state just before the current chunk (a_t0 g_t0), first that of the last state.
    q = _batch_state(dlast_ptr, b * dim * DSTATE + state_offsets, smask, HAS_DLAST, BLOCK_D, NP)
    dA = tl.zeros((BLOCK_D, NP), tl.float32)
    dD = tl.zeros((BLOCK_D,), tl.float32)
    dbias = tl.zeros((BLOCK_D,), tl.float32)
    part = (pid_d * batch + b) * DSTATE * seqlen  # this program's slice of the dB/dC partial sums
    for i in range(0, nchunks):
        c = nchunks - 1 - i
        t = c * CHUNK + steps
        tmask = t < seqlen
        m2 = dmask[:, None] & tmask[None, :]
        u = tl.load(u_ptr + b * su_b + d[:, None] * su_d + t[None, :] * su_l, mask=m2, other=0.0).to(tl.float32)
        raw, dt = _step_size(delta_ptr, b * sdl_b + d[:, None] * sdl_d + t[None, :] * sdl_l, m2, bias, HAS_BIAS,
                             SOFTPLUS)
        # a_{t+1} inside the chunk; 1 at its last step, where q carries the rest.
        nmask = m2 & (steps[None, :] < CHUNK - 1) & (t[None, :] + 1 < seqlen)
        _, dt_next = _step_size(delta_ptr, b * sdl_b + d[:, None] * sdl_d + (t[None, :] + 1) * sdl_l, nmask, bias,
                                HAS_BIAS, SOFTPLUS)
        # The step before each step inside the chunk (none before its first: the start state is the carry there).
        pmask = m2 & (steps[None, :] > 0)
        _, dt_prev = _step_size(delta_ptr, b * sdl_b + d[:, None] * sdl_d + (t[None, :] - 1) * sdl_l, pmask, bias,
                                HAS_BIAS, SOFTPLUS)
        u_prev = tl.load(u_ptr + b * su_b + d[:, None] * su_d + (t[None, :] - 1) * su_l, mask=pmask,
                         other=0.0).to(tl.float32)
        dtu_prev = dt_prev * u_prev
        dout = tl.load(dout_ptr + b * sdo_b + d[:, None] * sdo_d + t[None, :] * sdo_l, mask=m2,
                       other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + b * sz_b + d[:, None] * sz_d + t[None, :] * sz_l, mask=m2, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + b * sy_b + d[:, None] * sy_d + t[None, :] * sy_l, mask=m2, other=0.0).to(tl.float32)
            gate = tl.sigmoid(z)
            tl.store(dz_ptr + b * sdz_b + d[:, None] * sdz_d + t[None, :] * sdz_l,
                     (dout * y * gate * (1.0 + z * (1.0 - gate))).to(dz_ptr.dtype.element_ty), mask=m2)
            dy = dout * z * gate
        else:
            dy = dout
        dtu = dt * u
        du = Dskip[:, None] * dy
        ddt = tl.zeros((BLOCK_D, CHUNK), tl.float32)
        start = tl.load(starts_ptr + (b * nchunks + c) * dim * DSTATE + state_offsets, mask=smask, other=0.0)
        q_next = tl.zeros((BLOCK_D, NP), tl.float32)
        for n in range(DSTATE):  # a loop, not unrolled: unrolled, the kernels spill and compile for a minute
            A_n = _column(A, cols, n)[:, None]
            B_n = tl.load(B_ptr + b * sB_b + n * sB_n + t * sB_l, mask=tmask, other=0.0).to(tl.float32)
            C_n = tl.load(C_ptr + b * sC_b + n * sC_n + t * sC_l, mask=tmask, other=0.0).to(tl.float32)
            B_prev = tl.load(B_ptr + b * sB_b + n * sB_n + (t - 1) * sB_l, mask=tmask & (steps > 0),
                             other=0.0).to(tl.float32)
            decay_prod, drive = tl.associative_scan((tl.exp(dt_prev * A_n), dtu_prev * B_prev[None, :]), 1,
                                                    _affine_compose)
            h_prev = drive + decay_prod * _column(start, cols, n)[:, None]
            decay = tl.exp(dt * A_n)
            x = dtu * B_n[None, :]
            h = decay * h_prev + x
            later_decay, later_grad = tl.associative_scan((tl.exp(dt_next * A_n), C_n[None, :] * dy), 1,
                                                          _affine_compose, reverse=True)
            g = later_grad + later_decay * _column(q, cols, n)[:, None]
            tl.store(dC_ptr + part + n * seqlen + t, tl.sum(h * dy, axis=0), mask=tmask)
            tl.store(dB_ptr + part + n * seqlen + t, tl.sum(g * dtu, axis=0), mask=tmask)
            gB = g * B_n[None, :]
            decayed = g * decay * h_prev
            du += gB * dt
            ddt += gB * u + decayed * A_n
            dA = _set_column(dA, cols, n, _column(dA, cols, n) + tl.sum(decayed * dt, axis=1))
            q_next = _set_column(q_next, cols, n, tl.sum(tl.where(steps[None, :] == 0, decay * g, 0.0), axis=1))
        q = q_next
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(raw)
        ddt = tl.where(m2, ddt, 0.0)
        dD += tl.sum(dy * u, axis=1)
        dbias += tl.sum(ddt, axis=1)
        tl.store(du_ptr + b * sdu_b + d[:, None] * sdu_d + t[None, :] * sdu_l, du.to(du_ptr.dtype.element_ty),
                 mask=m2)
        tl.store(ddelta_ptr + b * sddl_b + d[:, None] * sddl_d + t[None, :] * sddl_l,
                 ddt.to(ddelta_ptr.dtype.element_ty), mask=m2)
    tl.store(dA_ptr + b * dim * DSTATE + state_offsets, dA, mask=smask)
    tl.store(dh0_ptr + b * dim * DSTATE + state_offsets, q, mask=smask)
    tl.store(dD_ptr + b * dim + d, dD, mask=dmask)
    tl.store(dbias_ptr + b * dim + d, dbias, mask=dmask)


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
             block_d: int = BLOCK_D, num_warps: int = NUM_WARPS) -> tuple[Tensor, ...]:
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
        BLOCK_D=block_d, CHUNK=chunk, num_warps=num_warps,
    )
    return out, y, starts, last


def scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
             delta_bias: Optional[Tensor], starts: Tensor, y: Tensor, dout: Tensor, dlast: Optional[Tensor],
             delta_softplus: bool, *, chunk: int, block_d: int = BLOCK_D,
             num_warps: int = NUM_WARPS) -> tuple[Tensor, ...]:
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
    dummy = _dummy(u)
    _scan_bwd_kernel[(blocks, batch)](
        u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, starts, y if z is not None else dummy, dout,
        dlast if dlast is not None else dummy,
        du, ddelta, dz if z is not None else dummy, dA, dB, dC, dD, dbias, dh0,
        dim, seqlen, nchunks, batch,
        *u.stride(), *delta.stride(), *_strides3(z), *_strides3(y if z is not None else None), *dout.stride(),
        *du.stride(), *ddelta.stride(), *_strides3(dz), *B.stride(), *C.stride(),
        DSTATE=dstate, NP=triton.next_power_of_2(dstate), HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None, HAS_DLAST=dlast is not None, SOFTPLUS=delta_softplus,
        BLOCK_D=block_d, CHUNK=chunk, num_warps=num_warps,
    )
    return (du, ddelta, dA.sum(0), dB.sum(0).to(B.dtype), dC.sum(0).to(C.dtype),
            dD.sum(0) if D is not None else None, dz, dbias.sum(0) if delta_bias is not None else None, dh0)
