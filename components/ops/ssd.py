"""Mamba-2 state-space duality (SSD) scan (Dao & Gu 2024, "Transformers are SSMs"), with
the semantics of mamba_ssm's ``mamba_chunk_scan_combined`` (https://github.com/state-spaces/mamba).

Shapes: x, z: (b, l, h, p); dt: (b, l, h); A: (h,) negative scalar decay per head;
B, C: (b, l, g, n) with h divisible by g (head i reads group i // (h / g));
D: (h,) or (h, p); dt_bias: (h,); states: (b, h, p, n). With dt' = softplus(dt + dt_bias):

    h_t = exp(dt'_t * A) * h_{t-1} + dt'_t * x_t ⊗ B_t
    y_t = h_t C_t + D * x_t ;  out = y * silu(z)

States are float32; outputs have the dtype of x.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from components.ops.backend import check_shape, resolve_backend
from components.ops.custom_ops import selective_state_update_kernel, ssd_scan_kernel


def discretization_step(
    delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool, channel_dim: int = 1
) -> torch.Tensor:
    """float32 softplus(delta + delta_bias) (bias and softplus optional); bias indexed on ``channel_dim``: 1 for
    the Mamba-1 scan's (b, d, ...) channels, -1 for the SSD's heads (selective_scan.py uses it too)."""
    delta = delta.float()
    if delta_bias is not None:
        shape = [1] * delta.dim()
        shape[channel_dim] = -1
        delta = delta + delta_bias.float().view(shape)
    return F.softplus(delta) if delta_softplus else delta


def segsum(x: torch.Tensor) -> torch.Tensor:
    """Stable segment sums: out[..., i, j] = sum_{k=j+1..i} x[..., k] for j <= i, -inf above.

    Built by masked cumsum rather than cumsum differences, which lose precision
    (the ``segsum`` of the "ssd_minimal" listing, Dao & Gu 2024).
    """
    length = x.shape[-1]
    x = x.unsqueeze(-1).expand(*x.shape, length)  # x[..., i, j] = x_i
    strictly_lower = torch.tril(torch.ones(length, length, dtype=torch.bool, device=x.device), diagonal=-1)
    sums = torch.cumsum(x.masked_fill(~strictly_lower, 0), dim=-2)
    lower = torch.tril(torch.ones(length, length, dtype=torch.bool, device=x.device), diagonal=0)
    return sums.masked_fill(~lower, -torch.inf)


def _check_ssd_inputs(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    state: torch.Tensor | None,
    state_name: str,
) -> None:
    """Shapes of a sequence call (x 4-D) or a decode step (x 3-D: no time axis)."""
    if x.dim() not in (3, 4) or B.dim() != x.dim():
        raise ValueError(f"x must be (b, l, h, p) or (b, h, p) with B alike; got x {tuple(x.shape)}, B {tuple(B.shape)}")
    leading = x.shape[:-2]  # (b, l) or (b,)
    nheads, headdim = x.shape[-2:]
    ngroups, dstate = B.shape[-2:]
    if nheads % ngroups != 0:
        raise ValueError(f"the number of heads ({nheads}) must be divisible by ngroups ({ngroups}, from B)")
    check_shape("A", A, (nheads,))
    check_shape("dt", dt, (*leading, nheads))
    check_shape("B", B, (*leading, ngroups, dstate))
    check_shape("C", C, (*leading, ngroups, dstate))
    if D is not None and tuple(D.shape) not in ((nheads,), (nheads, headdim)):
        raise ValueError(f"D must have shape ({nheads},) or ({nheads}, {headdim}), got {tuple(D.shape)}")
    for name, tensor, shape in (
        ("z", z, tuple(x.shape)),
        ("dt_bias", dt_bias, (nheads,)),
        (state_name, state, (x.shape[0], nheads, headdim, dstate)),
    ):
        if tensor is not None:
            check_shape(name, tensor, shape)


def _heads_from_groups(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """(..., g, n) -> (..., h, n): head i reads group i // (h / g), as in mamba_ssm."""
    return t.repeat_interleave(nheads // t.shape[-2], dim=-2)


def _skip_and_gate(
    y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """y + D*x, gated by silu(z), cast to ``dtype`` (head and headdim are the last two axes)."""
    if D is not None:
        D32 = D.float() if D.dim() == 2 else D.float()[:, None]
        y = y + x.float() * D32
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


def ssd_naive(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Step-by-step recurrence (the test oracle; slow)."""
    _check_ssd_inputs(x, dt, A, B, C, D, z, dt_bias, initial_state, "initial_state")
    batch, _, nheads, headdim = x.shape
    dt32 = discretization_step(dt, dt_bias, dt_softplus, channel_dim=-1)
    Bh, Ch = _heads_from_groups(B.float(), nheads), _heads_from_groups(C.float(), nheads)  # (b, l, h, n)
    x32 = x.float()
    h = x32.new_zeros(batch, nheads, headdim, B.shape[-1]) if initial_state is None else initial_state.float()
    ys = []
    for dt_t, x_t, B_t, C_t in zip(dt32.unbind(1), x32.unbind(1), Bh.unbind(1), Ch.unbind(1)):
        decay = torch.exp(dt_t * A.float())[:, :, None, None]
        h = decay * h + (dt_t[..., None] * x_t)[..., None] * B_t[:, :, None, :]
        ys.append((h * C_t[:, :, None, :]).sum(-1))
    out = _skip_and_gate(torch.stack(ys, dim=1), x, D, z, x.dtype)
    return (out, h) if return_final_state else out


def ssd_implicit_attention(
    dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> torch.Tensor:
    """The SSD's implicit attention matrix, as selective_scan_implicit_attention's for Mamba-1; float32,
    (b, h, l, l), 0 above the diagonal:

        alpha[b, h, t, s] = (C_t . B_s) exp(sum_{k=s+1..t} dt'_k A_h) dt'_s,   y_t = sum_s alpha[t, s] x_s (+ D x_t).
    """
    nheads = A.shape[0]
    dt32 = discretization_step(dt, dt_bias, dt_softplus, channel_dim=-1).transpose(1, 2)  # (b, h, l)
    Bh, Ch = _heads_from_groups(B.float(), nheads), _heads_from_groups(C.float(), nheads)  # (b, l, h, n)
    decay = torch.exp(segsum(dt32 * A.float()[:, None]))  # (b, h, t, s); exp(-inf) = 0 above the diagonal
    return torch.einsum("bthn,bshn->bhts", Ch, Bh) * decay * dt32[:, :, None, :]


def ssd_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    chunk_size: int = 64,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD in pure PyTorch, float32 inside, differentiable: the "ssd_minimal"
    listing of Dao & Gu 2024 (intra-chunk quadratic form with segsum, inter-chunk
    state passing), extended with padding, groups, D, z, dt_bias/softplus and states.
    """
    _check_ssd_inputs(x, dt, A, B, C, D, z, dt_bias, initial_state, "initial_state")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    batch, seqlen, nheads, headdim = x.shape
    dstate = B.shape[-1]
    nchunks = math.ceil(seqlen / chunk_size)
    pad = nchunks * chunk_size - seqlen
    # Padding with dt = 0 gives decay 1 and input 0: the final state is unchanged.
    dt32 = F.pad(discretization_step(dt, dt_bias, dt_softplus, channel_dim=-1), (0, 0, 0, pad))  # (b, L, h)

    def by_chunk(t: torch.Tensor) -> torch.Tensor:  # (b, l, h, k) -> (b, c, T, h, k)
        return F.pad(t.float(), (0, 0, 0, 0, 0, pad)).view(batch, nchunks, chunk_size, nheads, -1)

    xdt = by_chunk(x) * dt32.view(batch, nchunks, chunk_size, nheads, 1)  # (b, c, T, h, p)
    Bc = by_chunk(_heads_from_groups(B, nheads))  # (b, c, T, h, n)
    Cc = by_chunk(_heads_from_groups(C, nheads))
    log_decay = (dt32 * A.float()).view(batch, nchunks, chunk_size, nheads).permute(0, 3, 1, 2)  # (b, h, c, T)
    log_decay_cumsum = torch.cumsum(log_decay, dim=-1)

    # 1. Within each chunk: y_t = sum_{s<=t} (C_t . B_s) exp(sum_{s<k<=t} dt_k A) dt_s x_s.
    decay_within = torch.exp(segsum(log_decay))  # (b, h, c, T, S)
    scores = torch.einsum("bcthn,bcshn->bhcts", Cc, Bc) * decay_within
    y_diag = torch.einsum("bhcts,bcshp->bcthp", scores, xdt)

    # 2. Each chunk's state contribution, decayed to the chunk's end.
    decay_to_end = torch.exp(log_decay_cumsum[..., -1:] - log_decay_cumsum)  # (b, h, c, T)
    chunk_states = torch.einsum("bcshn,bhcs,bcshp->bchpn", Bc, decay_to_end, xdt)

    # 3. Pass states across chunks: state entering chunk c (index 0 = initial state).
    if initial_state is None:
        initial_state = chunk_states.new_zeros(batch, nheads, headdim, dstate)
    chunk_states = torch.cat([initial_state.float().unsqueeze(1), chunk_states], dim=1)  # (b, c+1, h, p, n)
    decay_chunks = torch.exp(segsum(F.pad(log_decay_cumsum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    entering = torch.einsum("bhzc,bchpn->bzhpn", decay_chunks, chunk_states)
    entering, final_state = entering[:, :-1], entering[:, -1]

    # 4. Read the entering state out at every position of its chunk.
    decay_from_start = torch.exp(log_decay_cumsum)  # (b, h, c, T)
    y_off = torch.einsum("bcthn,bchpn,bhct->bcthp", Cc, entering, decay_from_start)

    y = (y_diag + y_off).reshape(batch, nchunks * chunk_size, nheads, headdim)[:, :seqlen]
    out = _skip_and_gate(y, x, D, z, x.dtype)
    return (out, final_state) if return_final_state else out


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    chunk_size: int = 64,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SSD scan over a sequence (see the module docstring for the recurrence).

    Returns y (b, l, h, p) in x's dtype and, if ``return_final_state``, the float32 final
    state (b, h, p, n). The kernel is mamba_ssm's mamba_chunk_scan_combined (as a custom op).
    """
    chosen = resolve_backend(backend, x, "ssd_scan")
    if chosen == "kernel":
        _check_ssd_inputs(x, dt, A, B, C, D, z, dt_bias, initial_state, "initial_state")
        return ssd_scan_kernel(x, dt, A.float(), B, C, chunk_size, None if D is None else D.float(), z,
                               None if dt_bias is None else dt_bias.float(), initial_state, dt_softplus,
                               return_final_state)
    return ssd_reference(
        x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
        initial_state=initial_state, return_final_state=return_final_state,
    )


def ssd_step_reference(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> torch.Tensor:
    """Pure-PyTorch ssd_step (see :func:`ssd_step`)."""
    nheads = x.shape[1]
    dt32 = discretization_step(dt, dt_bias, dt_softplus, channel_dim=-1)  # (b, h)
    Bh, Ch = _heads_from_groups(B.float(), nheads), _heads_from_groups(C.float(), nheads)  # (b, h, n)
    decay = torch.exp(dt32 * A.float())[:, :, None, None]
    new_state = decay * state.float() + (dt32[..., None] * x.float())[..., None] * Bh[:, :, None, :]
    state.copy_(new_state)
    # Like the kernel, read out the float32 state before it is cast to the cache's dtype.
    y = (new_state * Ch[:, :, None, :]).sum(-1)
    return _skip_and_gate(y, x, D, z, x.dtype)


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """One decode step of :func:`ssd_scan`.

    state: (b, h, p, n), updated IN PLACE; x, z: (b, h, p); dt: (b, h); B, C: (b, g, n).
    Returns y (b, h, p) in x's dtype. Kernel: mamba_ssm's Triton selective_state_update in
    its multi-head layout, with A, dt and dt_bias broadcast over headdim by stride-0
    expands (as mamba_ssm's Mamba2.step does).
    """
    _check_ssd_inputs(x, dt, A, B, C, D, z, dt_bias, state, "state")
    chosen = resolve_backend(backend, x, "ssd_step")
    if chosen == "kernel":
        batch, nheads, headdim = x.shape
        dstate = B.shape[-1]
        # mamba_ssm 2.3.2 reads dt_bias.stride()/D.stride() without a None check, so
        # absent ones are passed as zeros (same result; allocated only then, this runs every decode step).
        def zeros() -> torch.Tensor:
            return torch.zeros(nheads, device=x.device, dtype=torch.float32)

        D_heads = zeros() if D is None else D.float()
        return selective_state_update_kernel(
            state,
            x,
            dt[..., None].expand(batch, nheads, headdim),
            A.float()[:, None, None].expand(nheads, headdim, dstate),
            B,
            C,
            D_heads if D_heads.dim() == 2 else D_heads[:, None].expand(nheads, headdim),
            z,
            (zeros() if dt_bias is None else dt_bias.float())[:, None].expand(nheads, headdim),
            dt_softplus,
        )
    return ssd_step_reference(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
