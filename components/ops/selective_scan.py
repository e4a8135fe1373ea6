"""Mamba-1 selective scan (Gu & Dao 2023), with the semantics of mamba_ssm's
``selective_scan_fn`` and ``selective_state_update`` (https://github.com/state-spaces/mamba).

Shapes: u, delta, z: (b, d, l); A: (d, n), real and negative; B, C: (b, n, l); D: (d,);
delta_bias: (d,). With delta' = softplus(delta + delta_bias) (bias/softplus optional):

    h_t = exp(delta'_t * A) * h_{t-1} + delta'_t * B_t * u_t        (per channel d, state n)
    y_t = <C_t, h_t> + D * u_t ;  out = y * silu(z)

States are float32; outputs have the dtype of u.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from components.ops.backend import BackendError, check_shape, resolve_backend
from components.ops.custom_ops import selective_scan_kernel, selective_state_update_kernel, triton_scan_kernel
from components.ops.ssd import discretization_step, segsum

# The GPU kernels of selective_scan: mamba_ssm's CUDA kernel, or arch_lab's Triton one (selective_scan_triton.py).
SCAN_KERNELS: tuple[str, ...] = ("mamba_ssm", "triton")
DEFAULT_SCAN_KERNEL = "triton"  # faster than mamba_ssm's kernel at row E's training shape (selective_scan_triton.py)


def check_scan_kernel(kernel: str) -> None:
    """The error for a scan kernel that is not one of SCAN_KERNELS (the model's and the op's, one message)."""
    if kernel not in SCAN_KERNELS:
        raise BackendError(f"scan_kernel must be one of {list(SCAN_KERNELS)}, got {kernel!r}")


# Default chunking target of selective_scan_reference: elements in one per-step slice.
_STEP_ELEMENTS = 1 << 16


def _check_scan_inputs(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
) -> None:
    if u.dim() != 3 or A.dim() != 2:
        raise ValueError(f"u must be (b, d, l) and A (d, n); got u {tuple(u.shape)}, A {tuple(A.shape)}")
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    check_shape("A", A, (dim, dstate))
    check_shape("delta", delta, (batch, dim, seqlen))
    check_shape("B", B, (batch, dstate, seqlen))
    check_shape("C", C, (batch, dstate, seqlen))
    for name, tensor, shape in (
        ("D", D, (dim,)),
        ("z", z, (batch, dim, seqlen)),
        ("delta_bias", delta_bias, (dim,)),
        ("initial_state", initial_state, (batch, dim, dstate)),
    ):
        if tensor is not None:
            check_shape(name, tensor, shape)


def _finish_output(
    y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """y + D*u, gated by silu(z), cast to ``dtype`` (y, u: (b, d, ...), D: (d,))."""
    if D is not None:
        y = y + u.float() * D.float().view(-1, *([1] * (u.dim() - 2)))
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


def selective_scan_naive(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    initial_state: torch.Tensor | None = None,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Step-by-step recurrence (the test oracle; slow)."""
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    delta = discretization_step(delta, delta_bias, delta_softplus)
    u32, A32, B32, C32 = u.float(), A.float(), B.float(), C.float()
    batch, dim, seqlen = u.shape
    h = u32.new_zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state.float()
    ys = []
    for delta_t, u_t, B_t, C_t in zip(delta.unbind(2), u32.unbind(2), B32.unbind(2), C32.unbind(2)):
        h = torch.exp(delta_t[..., None] * A32) * h + (delta_t * u_t)[..., None] * B_t[:, None, :]
        ys.append((h * C_t[:, None, :]).sum(-1))
    out = _finish_output(torch.stack(ys, dim=-1), u, D, z, u.dtype)
    return (out, h) if return_last_state else out


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    initial_state: torch.Tensor | None = None,
    return_last_state: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked pure-PyTorch selective scan: differentiable, float32 inside, no kernel needed.

    The sequence is cut into ``nchunks`` chunks of ``chunk_size`` steps:
    1. all chunks are scanned at once, chunk 0 from ``initial_state`` and the others from
       zero, keeping the decay accumulated since the chunk start,
       P_t = exp(sum of delta*A from the chunk start to t);
    2. the chunk-end states are carried across chunks, giving each chunk's true start state;
    3. chunks 1.. add the start state's contribution, <C_t, P_t * h_chunk_start>.
    That takes about 2 * chunk_size + nchunks sequential steps instead of l. Only decays <= 1
    are ever formed (no exp(-cumsum) trick), so it is stable for any decay strength.

    Each step works on one (b, c, d, n) slice and reduces it to y at once instead of
    materialising (b, d, l, n) intermediates: on CPU that memory traffic costs more than
    Python overhead once a slice is large. So by default the chunk count grows only until a
    slice holds about 2^16 elements (and at most to sqrt(l)); with one chunk this is the
    plain recurrence and steps 2-3 vanish.
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
    if chunk_size is None:
        slice_elements = batch * dim * dstate
        nchunks = max(1, min(math.ceil(math.sqrt(seqlen)), _STEP_ELEMENTS // max(1, slice_elements)))
        chunk_size = math.ceil(seqlen / nchunks)
    nchunks = math.ceil(seqlen / chunk_size)
    pad = nchunks * chunk_size - seqlen
    A32 = A.float()
    # Padding with delta = 0 gives decay 1 and input 0: the state passes through unchanged.
    delta32 = F.pad(discretization_step(delta, delta_bias, delta_softplus), (0, pad))

    def steps(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(b, k, L) -> chunk_size tensors (b, c, k), one per position inside the chunks.

        unbind, not indexing in the loops: each indexing backward would write a
        full-size gradient tensor.
        """
        # One copy to time-major layout makes every per-step slice contiguous.
        return t.view(batch, t.shape[1], nchunks, chunk_size).permute(3, 0, 2, 1).contiguous().unbind(0)

    delta_steps = steps(delta32)
    drive_steps = steps(delta32 * F.pad(u.float(), (0, pad)))
    B_steps, C_steps = steps(F.pad(B.float(), (0, pad))), steps(F.pad(C.float(), (0, pad)))

    h = delta32.new_zeros(batch, nchunks, dim, dstate)
    if initial_state is not None:
        h = torch.cat([initial_state.float().unsqueeze(1), h[:, 1:]], dim=1)
    ys, decay_since_start = [], []
    for j in range(chunk_size):
        decay = torch.exp(delta_steps[j].unsqueeze(-1) * A32)  # (b, c, d, n)
        h = decay * h + drive_steps[j].unsqueeze(-1) * B_steps[j].unsqueeze(2)
        ys.append((h * C_steps[j].unsqueeze(2)).sum(-1))  # (b, c, d)
        if nchunks > 1:
            decay_since_start.append(decay[:, 1:] if j == 0 else decay_since_start[-1] * decay[:, 1:])

    chunk_ends = h.unbind(1)
    carry = chunk_ends[0]
    if nchunks > 1:
        starts = []
        for chunk_decay, chunk_end in zip(decay_since_start[-1].unbind(1), chunk_ends[1:]):
            starts.append(carry)
            carry = chunk_decay * carry + chunk_end
        chunk_starts = torch.stack(starts, dim=1)  # (b, c - 1, d, n), the starts of chunks 1..
        for j in range(chunk_size):
            from_start = (decay_since_start[j] * chunk_starts * C_steps[j][:, 1:].unsqueeze(2)).sum(-1)
            ys[j] = ys[j] + F.pad(from_start, (0, 0, 1, 0))
    y = torch.stack(ys, dim=-1).permute(0, 2, 1, 3).reshape(batch, dim, nchunks * chunk_size)[..., :seqlen]
    out = _finish_output(y, u, D, z, u.dtype)
    return (out, carry) if return_last_state else out


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    initial_state: torch.Tensor | None = None,
    return_last_state: bool = False,
    backend: str = "auto",
    kernel: str = DEFAULT_SCAN_KERNEL,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan over a sequence (see the module docstring for the recurrence).

    Returns out (b, d, l) in u's dtype and, if ``return_last_state``, the float32 state
    after the last step (b, d, n). ``kernel`` picks the GPU kernel (both are custom ops that
    torch.compile keeps in its graph: custom_ops.py):
    - "triton" (the default): arch_lab's Triton kernel (selective_scan_triton.py), with an initial
      state and gradients for it and from last_state, on inputs of any strides; deterministic (no
      atomics). At row E's training shape its kernels run faster than mamba_ssm's (by how much:
      scan_kernel_bench.py; experiments/performance/RESULTS.md).
    - "mamba_ssm": mamba_ssm's selective-scan CUDA kernel. It has no initial-state input, so calls
      with ``initial_state`` (prefill chunks after the first) run on the Triton kernel, or on the
      reference where triton is missing. As in mamba_ssm, its backward ignores gradients flowing
      into last_state.
    """
    check_scan_kernel(kernel)
    if kernel == "triton" or initial_state is not None:
        if resolve_backend(backend, u, "selective_scan_triton") == "kernel":
            _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
            return triton_scan_kernel(
                u, delta, A.float().contiguous(), B, C, None if D is None else D.float().contiguous(), z,
                None if delta_bias is None else delta_bias.float().contiguous(),
                None if initial_state is None else initial_state.float().contiguous(), delta_softplus,
                return_last_state,
            )
    elif resolve_backend(backend, u, "selective_scan") == "kernel":
        _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, None)
        # The CUDA kernel wants delta/B/C/z in u's dtype and A/D/delta_bias in float32.
        dtype = u.dtype
        return selective_scan_kernel(
            u,
            delta.to(dtype),
            A.float(),
            B.to(dtype),
            C.to(dtype),
            None if D is None else D.float(),
            None if z is None else z.to(dtype),
            None if delta_bias is None else delta_bias.float(),
            delta_softplus,
            return_last_state,
        )
    return selective_scan_reference(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus,
        initial_state=initial_state, return_last_state=return_last_state,
    )


def selective_state_update_reference(
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
    """Pure-PyTorch selective_state_update (see :func:`selective_state_update`)."""
    dt32 = discretization_step(dt, dt_bias, dt_softplus)  # (b, d)
    x32 = x.float()
    new_state = torch.exp(dt32[..., None] * A.float()) * state.float() + (dt32 * x32)[..., None] * B.float()[:, None, :]
    state.copy_(new_state)
    # Like the kernel, read out the float32 state before it is cast to the cache's dtype.
    y = (new_state * C.float()[:, None, :]).sum(-1)
    return _finish_output(y, x, D, z, x.dtype)


def selective_state_update(
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
    """One decode step of :func:`selective_scan`.

    state: (b, d, n), updated IN PLACE; x, dt, z: (b, d); A: (d, n); B, C: (b, n);
    D, dt_bias: (d,). Returns y (b, d) in x's dtype. Kernel: mamba_ssm's Triton
    selective_state_update.
    """
    batch, dim, dstate = state.shape
    check_shape("A", A, (dim, dstate))
    for name, tensor in (("x", x), ("dt", dt), ("z", z)):
        if tensor is not None:
            check_shape(name, tensor, (batch, dim))
    check_shape("B", B, (batch, dstate))
    check_shape("C", C, (batch, dstate))
    for name, tensor in (("D", D), ("dt_bias", dt_bias)):
        if tensor is not None:
            check_shape(name, tensor, (dim,))
    chosen = resolve_backend(backend, x, "selective_state_update")
    if chosen == "kernel":
        # mamba_ssm 2.3.2 unpacks D.stride()/dt_bias.stride() without a None check, so
        # absent ones are passed as zeros (same result; allocated only then, this runs every decode step).
        def zeros() -> torch.Tensor:
            return torch.zeros(dim, device=x.device, dtype=torch.float32)

        return selective_state_update_kernel(state, x, dt, A, B, C, zeros() if D is None else D, z,
                                             zeros() if dt_bias is None else dt_bias, dt_softplus)
    return selective_state_update_reference(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def selective_scan_implicit_attention(
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """The selective scan's implicit attention matrix (Ali, Zimerman & Wolf 2024,
    "The Hidden Attention of Mamba Models"), float32, shape (b, d, l, l):

        alpha[b, d, t, s] = C_t . (prod_{k=s+1..t} exp(delta_k A)) . (delta_s B_s)  for s <= t,

    0 above the diagonal, so that y_t = sum_s alpha[t, s] u_s (+ D u_t). Memory is
    O(b * d * l^2): meant for analysis of a few channels, not for training.
    """
    delta32 = discretization_step(delta, delta_bias, delta_softplus)  # (b, d, l)
    A32, B32, C32 = A.float(), B.float(), C.float()
    batch, dim, seqlen = delta32.shape
    alpha = delta32.new_zeros(batch, dim, seqlen, seqlen)
    # One state dimension at a time keeps the peak at a few (b, d, l, l) tensors.
    for n in range(A.shape[1]):
        decay = torch.exp(segsum(delta32 * A32[:, n, None]))  # (b, d, t, s)
        alpha = alpha + C32[:, None, n, :, None] * decay * (delta32 * B32[:, None, n, :])[:, :, None, :]
    return alpha
