"""Depthwise causal conv1d as used in Mamba, with the semantics of the ``causal_conv1d``
package (Tri Dao, https://github.com/Dao-AILab/causal-conv1d, v1.7.0).

The conv state holds the previous ``width - 1`` inputs, (batch, dim, width - 1).
The reference computes in float32 and returns the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from components.ops.backend import check_shape, resolve_backend
from components.ops.custom_ops import causal_conv1d_fwd, causal_conv1d_update, channel_last

ACTIVATIONS: tuple[str | None, ...] = (None, "silu")
# causal_conv1d's CUDA kernels only instantiate these widths.
KERNEL_WIDTHS = range(2, 5)


def _check_activation(activation: str | None) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")


def _check_conv_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (dim, width), got {tuple(weight.shape)}")
    check_shape("x", x, (x.shape[0], weight.shape[0], *x.shape[2:]))
    if bias is not None:
        check_shape("bias", bias, (weight.shape[0],))


def causal_conv1d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    initial_state: torch.Tensor | None = None,
    activation: str | None = "silu",
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch causal_conv1d (see :func:`causal_conv1d`)."""
    batch, dim, _ = x.shape
    state_len = weight.shape[1] - 1
    if initial_state is None:
        initial_state = x.new_zeros(batch, dim, state_len)
    padded = torch.cat([initial_state.to(x.dtype), x], dim=-1)
    bias32 = None if bias is None else bias.float()
    y = F.conv1d(padded.float(), weight.float().unsqueeze(1), bias32, groups=dim)
    if activation == "silu":
        y = F.silu(y)
    y = y.to(x.dtype)
    return (y, _final_state(x, initial_state, state_len)) if return_final_state else y


def _final_state(x: torch.Tensor, initial_state: torch.Tensor | None, state_len: int) -> torch.Tensor:
    """The last ``state_len`` columns of cat(initial_state, x), copying only those columns."""
    tail = x[..., max(0, x.shape[-1] - state_len) :]
    if tail.shape[-1] < state_len:  # a sequence shorter than the state keeps part of the old one
        if initial_state is None:
            initial_state = x.new_zeros(x.shape[0], x.shape[1], state_len)
        tail = torch.cat([initial_state.to(x.dtype), tail], dim=-1)[..., tail.shape[-1] :]
    # clone: a view would keep the whole sequence alive inside a decode cache.
    return tail.clone()


def _causal_conv1d_kernel(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    activation: str | None,
    return_final_state: bool,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    x_in = x
    # Initial states exist only in the kernel's channel-last variant, which needs
    # dim % 8 == 0; an input that is already channel-last (a transposed (b, l, d)
    # projection, as in Mamba) also uses it without a copy.
    if initial_state is not None or (x.stride(1) == 1 and x.shape[1] % 8 == 0):
        x = channel_last(x)
        if initial_state is not None:
            initial_state = channel_last(initial_state.to(x.dtype))
    elif x.stride(2) != 1:
        x = x.contiguous()
    bias = None if bias is None else bias.to(weight.dtype)
    if initial_state is None:  # training and fresh prefill: the custom op, which torch.compile keeps in its graph
        y = causal_conv1d_fwd(x, weight, bias, activation == "silu")
    else:
        from causal_conv1d import causal_conv1d_fn

        y = causal_conv1d_fn(x, weight, bias, initial_states=initial_state, activation=activation)
    # The final state is sliced here rather than taken from the kernel: in v1.7.0 its
    # channel-last backward reads d(final_states) at wrong offsets unless that gradient
    # is itself channel-last (found by tests/test_ops_ssm_gpu_parity.py in float32).
    return (y, _final_state(x_in, initial_state, weight.shape[1] - 1)) if return_final_state else y


def _kernel_supports(x: torch.Tensor, weight: torch.Tensor, initial_state: torch.Tensor | None) -> bool:
    if weight.shape[1] not in KERNEL_WIDTHS:
        return False
    # Conservative: sequences shorter than the state with an initial state go to the reference.
    return initial_state is None or (x.shape[1] % 8 == 0 and x.shape[2] >= weight.shape[1] - 1)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    initial_state: torch.Tensor | None = None,
    activation: str | None = "silu",
    return_final_state: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv1d: y[:, c, t] = act(bias[c] + sum_k weight[c, k] * xp[:, c, t + k]),
    xp = cat(initial_state, x) along time.

    x: (batch, dim, seqlen); weight: (dim, width); bias: (dim,) or None;
    initial_state: (batch, dim, width - 1), the previous width - 1 inputs (zeros if None);
    activation: None or "silu". Returns y (batch, dim, seqlen) and, if ``return_final_state``,
    final_state (batch, dim, width - 1) = the last width - 1 columns of xp (dtype of x).

    The kernel (causal_conv1d_fn) handles widths 2..4, and an initial state only when
    dim % 8 == 0 and seqlen >= width - 1; other calls run on the reference.
    """
    _check_activation(activation)
    _check_conv_inputs(x, weight, bias)
    if initial_state is not None:
        check_shape("initial_state", initial_state, (x.shape[0], x.shape[1], weight.shape[1] - 1))
    chosen = resolve_backend(backend, x, "causal_conv1d")
    if chosen == "kernel" and _kernel_supports(x, weight, initial_state):
        return _causal_conv1d_kernel(x, weight, bias, initial_state, activation, return_final_state)
    return causal_conv1d_reference(
        x, weight, bias, initial_state=initial_state, activation=activation, return_final_state=return_final_state
    )


def causal_conv1d_step_reference(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = "silu",
) -> torch.Tensor:
    """Pure-PyTorch causal_conv1d_step (see :func:`causal_conv1d_step`)."""
    window = torch.cat([conv_state.float(), x.float().unsqueeze(-1)], dim=-1)  # (batch, dim, width)
    y = (window * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    if activation == "silu":
        y = F.silu(y)
    conv_state.copy_(window[..., 1:])
    return y.to(x.dtype)


def causal_conv1d_step(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = "silu",
    backend: str = "auto",
) -> torch.Tensor:
    """One decode step of :func:`causal_conv1d`.

    x: (batch, dim); conv_state: (batch, dim, width - 1), updated IN PLACE (shift left,
    append x). Returns y (batch, dim) in the dtype of x. The kernel is
    causal_conv1d_update, whose conv_state may have any length >= width - 1.
    """
    _check_activation(activation)
    _check_conv_inputs(x, weight, bias)
    check_shape("conv_state", conv_state, (x.shape[0], x.shape[1], weight.shape[1] - 1))
    chosen = resolve_backend(backend, x, "causal_conv1d_step")
    if chosen == "kernel" and weight.shape[1] in KERNEL_WIDTHS:
        # The kernel wants x in the state's dtype and bias in the weight's dtype.
        y = causal_conv1d_update(x.to(conv_state.dtype), conv_state, weight,
                                 None if bias is None else bias.to(weight.dtype), activation == "silu")
        return y.to(x.dtype)
    return causal_conv1d_step_reference(x, conv_state, weight, bias, activation=activation)
