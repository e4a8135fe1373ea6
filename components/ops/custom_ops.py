"""The SSM kernels (mamba_ssm's selective scan, SSD chunked scan and state update, causal_conv1d's conv and conv
update) as torch.library custom ops.

Both packages call their extensions from inside a torch.autograd.Function or through a Python-side launcher.
torch.compile cannot trace into the scan's pybind call, nor into the Triton launchers (state update, SSD) that
switch devices and autotune, and causal_conv1d's own custom ops write into `out=` tensors laid out like the
(strided) input, which Dynamo also refuses. Each broke every SSM layer's compiled graph, and the frames between
the breaks recompiled per layer. As functional custom ops with fake (shape-only) implementations and, for
training, registered backwards, the kernels sit inside one graph. The decode-step ops mutate their state argument
in place, as the kernels do. The extensions are imported when an op first runs, so importing this module needs no
GPU.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# The kernel keeps one float32 (state, carry) pair per state dim for every chunk of this many steps.
_KERNEL_CHUNK = 2048


def _absent(like: Tensor) -> Tensor:
    """Stand-in for a None output (custom ops return tensors only)."""
    return like.new_empty(0)


@torch.library.custom_op("arch_lab::selective_scan_fwd", mutates_args=(), device_types="cuda")
def selective_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       z: Optional[Tensor], delta_bias: Optional[Tensor],
                       delta_softplus: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(out, chunk states x, out gated by silu(z), or an empty tensor without z)."""
    import selective_scan_cuda

    out, x, *rest = selective_scan_cuda.fwd(u, delta, A, B.unsqueeze(1), C.unsqueeze(1), D, z, delta_bias,
                                            delta_softplus)
    return out, x, rest[0] if z is not None else _absent(out)


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    batch, dim, seqlen = u.shape
    chunks = (seqlen + _KERNEL_CHUNK - 1) // _KERNEL_CHUNK
    x = u.new_empty(batch, dim, chunks, 2 * A.shape[1], dtype=torch.float32)
    return torch.empty_like(delta), x, torch.empty_like(z) if z is not None else _absent(delta)


@torch.library.custom_op("arch_lab::selective_scan_bwd", mutates_args=(), device_types="cuda")
def selective_scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       z: Optional[Tensor], delta_bias: Optional[Tensor], dout: Tensor, x: Tensor, out: Tensor,
                       delta_softplus: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), each in its input's dtype; empty for absent
    inputs."""
    import selective_scan_cuda

    du, ddelta, dA, dB, dC, dD, ddelta_bias, *rest = selective_scan_cuda.bwd(
        u, delta, A, B.unsqueeze(1), C.unsqueeze(1), D, z, delta_bias, dout, x, out, None, delta_softplus, False)
    # The kernel accumulates dB/dC (and dD, ddelta_bias) in float32 whatever the inputs' dtype.
    return (du, ddelta, dA, dB.squeeze(1).to(B.dtype), dC.squeeze(1).to(C.dtype),
            dD if D is not None else _absent(du), rest[0] if z is not None else _absent(du),
            ddelta_bias if delta_bias is not None else _absent(du))


@selective_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, dout, x, out, delta_softplus):
    def like(t: Optional[Tensor]) -> Tensor:
        return torch.empty_like(t) if t is not None else _absent(u)

    return like(u), like(delta), like(A), like(B), like(C), like(D), like(z), like(delta_bias)


def _setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = inputs
    out, x, _ = output
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, x, out)
    ctx.delta_softplus = delta_softplus
    ctx.present = (D is not None, z is not None, delta_bias is not None)


def _backward(ctx, d_out, d_x, d_out_z):
    u, delta, A, B, C, D, z, delta_bias, x, out = ctx.saved_tensors
    # The gradient arrives on the output the caller used: out_z with a gate, else out. As in mamba_ssm, the
    # chunk states (and so a last state read from them) get no gradient.
    dout = (d_out_z if z is not None else d_out).contiguous()
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = selective_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, dout, x, out, ctx.delta_softplus)
    has_D, has_z, has_bias = ctx.present
    return (du, ddelta, dA, dB, dC, dD if has_D else None, dz if has_z else None,
            ddelta_bias if has_bias else None, None)


selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_kernel(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                          z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                          return_last_state: bool) -> Tensor | tuple[Tensor, Tensor]:
    """mamba_ssm's selective_scan_fn through the custom op: same arguments and results (inputs already in the
    kernel's dtypes: delta/B/C/z like u, A/D/delta_bias float32)."""
    u, delta, B, C = u.contiguous(), delta.contiguous(), B.contiguous(), C.contiguous()
    z = None if z is None else z.contiguous()
    out, x, out_z = selective_scan_fwd(u, delta, A.contiguous(), B, C, None if D is None else D.contiguous(), z,
                                       delta_bias, delta_softplus)
    y = out_z if z is not None else out
    return (y, x[:, :, -1, 1::2]) if return_last_state else y


# ---- arch_lab's own Triton selective scan (selective_scan_triton.py), the same op boundary ----------------------
# Its kernels keep one float32 start state per chunk of this many steps for the backward, whose walks keep every
# state of a chunk in a scratch buffer (8 was 1.15x faster than 16 at row E's shape, and 4 only 4% faster than 8;
# each chunk costs b x d_inner x d_state x 4 bytes of saved memory: 142 MB per layer at E's shape).
TRITON_SCAN_CHUNK = 8


@torch.library.custom_op("arch_lab::triton_scan_fwd", mutates_args=(), device_types="cuda")
def triton_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                    z: Optional[Tensor], delta_bias: Optional[Tensor], initial_state: Optional[Tensor],
                    delta_softplus: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, the output before the gate or an empty tensor without z, chunk start states, last state)."""
    from components.ops.selective_scan_triton import scan_fwd

    return scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk=TRITON_SCAN_CHUNK)


@triton_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    batch, dim, seqlen = u.shape
    out = u.new_empty(batch, seqlen, dim).transpose(1, 2)  # the kernel's (b, l, d) storage
    y = u.new_empty(batch, seqlen, dim).transpose(1, 2) if z is not None else _absent(u)
    starts = u.new_empty(batch, -(-seqlen // TRITON_SCAN_CHUNK), dim, A.shape[1], dtype=torch.float32)
    return out, y, starts, u.new_empty(batch, dim, A.shape[1], dtype=torch.float32)


@torch.library.custom_op("arch_lab::triton_scan_bwd", mutates_args=(), device_types="cuda")
def triton_scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                    z: Optional[Tensor], delta_bias: Optional[Tensor], starts: Tensor, y: Tensor, dout: Tensor,
                    dlast: Optional[Tensor], delta_softplus: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                          Tensor]:
    """(du, ddelta, dz or an empty tensor, dinitial_state, dB and dC's partial sums, dA, dD and ddelta_bias's):
    the backward adds the partial sums up outside the op, where torch.compile fuses them with their consumers."""
    from components.ops.selective_scan_triton import scan_bwd_partials

    du, ddelta, dz, dh0, dBC, dparams = scan_bwd_partials(u, delta, A, B, C, D, z, delta_bias, starts, y, dout,
                                                          dlast, delta_softplus, chunk=TRITON_SCAN_CHUNK)
    return du, ddelta, dz if dz is not None else _absent(u), dh0, dBC, dparams


@triton_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, starts, y, dout, dlast, delta_softplus):
    from components.ops.selective_scan_triton import bwd_partial_shapes

    batch, dim, seqlen = u.shape
    dBC_shape, params_shape = bwd_partial_shapes(batch, dim, seqlen, A.shape[1], TRITON_SCAN_CHUNK)
    return (torch.empty_like(u), torch.empty_like(delta), torch.empty_like(z) if z is not None else _absent(u),
            u.new_empty(batch, dim, A.shape[1], dtype=torch.float32), u.new_empty(dBC_shape, dtype=torch.float32),
            u.new_empty(params_shape, dtype=torch.float32))


def _triton_scan_setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus = inputs
    _, y, starts, _ = output
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, starts, y)
    ctx.delta_softplus = delta_softplus
    ctx.present = (D is not None, z is not None, delta_bias is not None, initial_state is not None)


def _triton_scan_backward(ctx, d_out, d_y, d_starts, d_last):
    from components.ops.selective_scan_triton import sum_partials

    u, delta, A, B, C, D, z, delta_bias, starts, y = ctx.saved_tensors
    # Unlike mamba_ssm's kernel, this one takes the last state's gradient too (prefill chunks chain through it).
    du, ddelta, dz, dh0, dBC, dparams = triton_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, starts, y, d_out, d_last, ctx.delta_softplus)
    dA, dB, dC, dD, dbias = sum_partials(dBC, dparams, B.dtype, C.dtype)
    has_D, has_z, has_bias, has_h0 = ctx.present
    return (du, ddelta, dA, dB, dC, dD if has_D else None, dz if has_z else None, dbias if has_bias else None,
            dh0 if has_h0 else None, None)


triton_scan_fwd.register_autograd(_triton_scan_backward, setup_context=_triton_scan_setup_context)


def triton_scan_kernel(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       z: Optional[Tensor], delta_bias: Optional[Tensor], initial_state: Optional[Tensor],
                       delta_softplus: bool, return_last_state: bool) -> Tensor | tuple[Tensor, Tensor]:
    """The Triton selective scan through its custom op: selective_scan_kernel's arguments plus an initial state
    (float32, like A, D and delta_bias). Any strides: nothing is copied to contiguous first."""
    out, _, _, last = triton_scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus)
    return (out, last) if return_last_state else out


def channel_last(t: Tensor) -> Tensor:
    """(batch, dim, len) with stride(1) == 1 and the other strides multiples of 8 (causal_conv1d's rule)."""
    if t.stride(1) == 1 and t.stride(0) % 8 == 0 and t.stride(2) % 8 == 0:
        return t
    return t.transpose(1, 2).contiguous().transpose(1, 2)


@torch.library.custom_op("arch_lab::causal_conv1d_fwd", mutates_args=(), device_types="cuda")
def causal_conv1d_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool) -> Tensor:
    """causal_conv1d's forward without initial or final states; out has x's layout (channel-first or -last)."""
    import causal_conv1d_cuda

    out = torch.empty_like(x)
    causal_conv1d_cuda.causal_conv1d_fwd(x, weight, bias, None, None, out, None, silu)
    return out


@causal_conv1d_fwd.register_fake
def _(x, weight, bias, silu):
    return torch.empty_like(x)


@torch.library.custom_op("arch_lab::causal_conv1d_bwd", mutates_args=(), device_types="cuda")
def causal_conv1d_bwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], dout: Tensor,
                      silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias or an empty tensor without bias), in the inputs' dtypes."""
    import causal_conv1d_cuda

    dx = torch.empty_like(x)
    dweight = torch.zeros_like(weight, dtype=torch.float32)
    dbias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None else None
    causal_conv1d_cuda.causal_conv1d_bwd(x, weight, bias, dout, None, None, None, dx, dweight, dbias, None, silu)
    return dx, dweight.to(weight.dtype), dbias.to(bias.dtype) if bias is not None else _absent(dx)


@causal_conv1d_bwd.register_fake
def _(x, weight, bias, dout, silu):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias) if bias is not None else _absent(x)


def _conv_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, silu = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.silu = silu


def _conv_backward(ctx, dout):
    x, weight, bias = ctx.saved_tensors
    # The kernel wants dout in x's layout: contiguous or channel-last.
    dout = dout.contiguous() if x.stride(2) == 1 else channel_last(dout)
    dx, dweight, dbias = causal_conv1d_bwd(x, weight, bias, dout, ctx.silu)
    return dx, dweight, dbias if bias is not None else None, None


causal_conv1d_fwd.register_autograd(_conv_backward, setup_context=_conv_setup_context)


# ---- Mamba-2's SSD chunked scan (mamba_ssm's Triton kernels) -----------------------------------------------------
@torch.library.custom_op("arch_lab::ssd_scan_fwd", mutates_args=(), device_types="cuda")
def ssd_scan_fwd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Optional[Tensor],
                 z: Optional[Tensor], dt_bias: Optional[Tensor], initial_states: Optional[Tensor],
                 dt_softplus: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(out, out_x: the output before the gate, empty without z, final states float32 (b, h, p, n))."""
    from mamba_ssm.ops.triton.ssd_combined import _mamba_chunk_scan_combined_fwd

    out, out_x, *_, final_states = _mamba_chunk_scan_combined_fwd(
        x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states, dt_softplus=dt_softplus)
    return out, out_x if z is not None else _absent(out), final_states


@ssd_scan_fwd.register_fake
def _(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus):
    batch, _, nheads, headdim = x.shape
    final = x.new_empty((batch, nheads, headdim, B.shape[-1]), dtype=torch.float32)
    return x.new_empty(x.shape), x.new_empty(x.shape) if z is not None else _absent(x), final


@torch.library.custom_op("arch_lab::ssd_scan_bwd", mutates_args=(), device_types="cuda")
def ssd_scan_bwd(dout: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, out: Tensor, chunk_size: int,
                 D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
                 initial_states: Optional[Tensor], dfinal_states: Optional[Tensor],
                 dt_softplus: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states); absent inputs get empty tensors."""
    from mamba_ssm.ops.triton.ssd_combined import _mamba_chunk_scan_combined_bwd

    grads = _mamba_chunk_scan_combined_bwd(dout, x, dt, A, B, C, out, chunk_size, D=D, z=z, dt_bias=dt_bias,
                                           initial_states=initial_states, dfinal_states=dfinal_states,
                                           dt_softplus=dt_softplus)
    return tuple(g if g is not None else _absent(x) for g in grads)


@ssd_scan_bwd.register_fake
def _(dout, x, dt, A, B, C, out, chunk_size, D, z, dt_bias, initial_states, dfinal_states, dt_softplus):
    def like(t: Optional[Tensor], dtype: Optional[torch.dtype] = None) -> Tensor:
        return torch.empty_like(t, dtype=dtype) if t is not None else _absent(x)

    # The kernels return dA and ddt_bias in float32, and the initial state's gradient in x's dtype.
    return (like(x), like(dt), like(A, torch.float32), like(B), like(C), like(D), like(z),
            like(dt_bias, torch.float32), like(initial_states, x.dtype))


def _ssd_setup_context(ctx, inputs, output) -> None:
    x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus = inputs
    out, out_x, _ = output
    # As mamba_ssm: the backward recomputes the chunk states and needs the output before the gate.
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, out_x if z is not None else out)
    ctx.chunk_size, ctx.dt_softplus = chunk_size, dt_softplus


def _ssd_backward(ctx, d_out, d_out_x, d_final_states):
    x, dt, A, B, C, D, z, dt_bias, initial_states, out = ctx.saved_tensors
    dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial = ssd_scan_bwd(
        d_out.contiguous(), x, dt, A, B, C, out, ctx.chunk_size, D, z, dt_bias, initial_states,
        None if d_final_states is None else d_final_states.contiguous(), ctx.dt_softplus)
    return (dx, ddt, dA, dB, dC, None, dD if D is not None else None, dz if z is not None else None,
            ddt_bias if dt_bias is not None else None,
            dinitial if initial_states is not None else None, None)  # autograd casts it to the state's dtype


ssd_scan_fwd.register_autograd(_ssd_backward, setup_context=_ssd_setup_context)


def ssd_scan_kernel(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Optional[Tensor],
                    z: Optional[Tensor], dt_bias: Optional[Tensor], initial_states: Optional[Tensor],
                    dt_softplus: bool, return_final_states: bool) -> Tensor | tuple[Tensor, Tensor]:
    """mamba_ssm's mamba_chunk_scan_combined through the custom op: same arguments and results (A, D, dt_bias
    float32). Inputs are made contiguous so the kernels' gradients are laid out as the fake ones say."""
    x, dt, B, C = x.contiguous(), dt.contiguous(), B.contiguous(), C.contiguous()
    z = None if z is None else z.contiguous()
    out, _, final_states = ssd_scan_fwd(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus)
    return (out, final_states) if return_final_states else out


# ---- decode steps: the state is updated in place -----------------------------------------------------------------
@torch.library.custom_op("arch_lab::causal_conv1d_update", mutates_args=("conv_state",), device_types="cuda")
def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor],
                         silu: bool) -> Tensor:
    """One conv step: x (batch, dim) in conv_state's dtype; conv_state (batch, dim, width - 1) shifts in x."""
    import causal_conv1d_cuda

    x = x.contiguous()[..., None]
    out = torch.empty_like(x)
    causal_conv1d_cuda.causal_conv1d_update(x, conv_state, weight, bias, out, silu, None, None)
    return out[..., 0]


@causal_conv1d_update.register_fake
def _(x, conv_state, weight, bias, silu):
    return x.new_empty(x.shape)


@torch.library.custom_op("arch_lab::selective_state_update", mutates_args=("state",), device_types="cuda")
def selective_state_update_kernel(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                                  z: Optional[Tensor], dt_bias: Tensor, dt_softplus: bool) -> Tensor:
    """mamba_ssm's Triton selective_state_update (Mamba-1 layout, or Mamba-2's multi-head one with A, dt, D and
    dt_bias broadcast over the head dim); y has x's shape and dtype."""
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update as update_kernel

    return update_kernel(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)


@selective_state_update_kernel.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    return x.new_empty(x.shape)


@torch.library.custom_op("arch_lab::mamba1_step", mutates_args=("conv_state", "ssm_state"), device_types="cuda")
def mamba1_step_kernel(x: Tensor, z: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor,
                       conv_bias: Optional[Tensor], x_proj_weight: Tensor, dt_proj_weight: Tensor, dt_bias: Tensor,
                       A_log: Tensor, D: Tensor, dt_norm_weight: Optional[Tensor], B_norm_weight: Optional[Tensor],
                       C_norm_weight: Optional[Tensor], eps: float) -> Tensor:
    """arch_lab's fused Triton decode step of Mamba-1 heads (mamba1_step_triton.py): y (b, d) contiguous in x's
    dtype; both states updated in place. The three norm weights are given together or not at all."""
    from components.ops.mamba1_step_triton import mamba1_step

    return mamba1_step(x, z, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias,
                       A_log, D, dt_norm_weight, B_norm_weight, C_norm_weight, eps)


@mamba1_step_kernel.register_fake
def _(x, z, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A_log, D,
      dt_norm_weight, B_norm_weight, C_norm_weight, eps):
    return x.new_empty(x.shape)
