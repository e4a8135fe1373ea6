"""SSM heads of a layer: Mamba-1 (selective scan) and Mamba-2 (SSD, scalar decay per head).

Like the attention heads, each receives its slice of the layer's shared input projection and returns its
output before the shared output projection. With an `SSMState` they run incrementally (prefill or one decode
step); left-padded rows are handled so padding never touches the state: padded inputs are zeroed, their step
size dt is zero (exp(0·A) = 1 keeps the state), and the conv sees the previous real inputs (see `_conv_window`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .analysis import normalize_implicit_attention
from .kv_cache import StepInfo
from .norms import RMSNorm
from .ops.backend import resolve_backend
from .ops.causal_conv import causal_conv1d, causal_conv1d_step
from .ops.custom_ops import mamba1_step_kernel
from .ops.selective_scan import (DEFAULT_SCAN_KERNEL, selective_scan, selective_scan_implicit_attention,
                                 selective_state_update)
from .ops.ssd import ssd_implicit_attention, ssd_scan, ssd_step


@dataclass
class SSMState:
    conv: torch.Tensor  # (b, conv_channels, d_conv - 1): the last d_conv - 1 conv inputs
    ssm: torch.Tensor  # Mamba-1: (b, d_inner, d_state); Mamba-2: (b, heads, head_dim, d_state)

    def tensors(self) -> list[torch.Tensor]:
        return [self.conv, self.ssm]


def _conv_window(x: torch.Tensor, conv_state: torch.Tensor, pad: Optional[torch.Tensor]) -> torch.Tensor:
    """[conv_state ; x] with each row's left padding moved in front of the conv state.

    x (b, c, l) is a left-padded chunk; the result (b, c, k-1+l) places the previous real inputs right before
    the first real token, so a valid convolution over it equals the unpadded computation.
    """
    window = torch.cat([conv_state.to(x.dtype), x], dim=-1)
    if pad is None or not bool((pad > 0).any()):
        return window
    hist, length = conv_state.shape[-1], window.shape[-1]
    j = torch.arange(length, device=x.device)[None, :]
    p = pad[:, None]
    src = torch.where(j < p, hist + j, torch.where(j < p + hist, j - p, j))
    return window.gather(-1, src[:, None, :].expand(-1, window.shape[1], -1))


def _chunk_padding(step: StepInfo, length: int) -> Optional[torch.Tensor]:
    """Left padding that falls inside this chunk (a later prefill chunk starts past the padding)."""
    return None if step.token_mask is None else (step.pad - step.start).clamp(0, length)


def _is_decode_step(step: StepInfo, state: Optional[SSMState], length: int) -> bool:
    """One new token a sequence, no padding, and a state to update: what the single-step kernels take."""
    return state is not None and length == 1 and step.token_mask is None


def _dt_bias_init(d: int, dt_min: float = 1e-3, dt_max: float = 0.1) -> torch.Tensor:
    # Mamba's init: dt log-uniform in [dt_min, dt_max], stored through the inverse softplus.
    dt = torch.exp(torch.rand(d) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
    return dt + torch.log(-torch.expm1(-dt))


class Mamba1Heads(nn.Module):
    """Mamba-1 selective-scan heads (Gu & Dao 2023), with the released Hymba's optional RMSNorm on dt/B/C."""

    def __init__(self, d_model: int, d_inner: int, d_state: int, d_conv: int, dt_rank: int, dt_bc_norm: bool,
                 eps: float):
        super().__init__()
        self.d_inner, self.d_state, self.d_conv, self.dt_rank = d_inner, d_state, d_conv, dt_rank
        self.proj_width = 2 * d_inner  # x | gate z
        self.out_width = d_inner
        self.conv_channels = d_inner
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, bias=True)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.dt_norm = RMSNorm(dt_rank, eps) if dt_bc_norm else None
        self.B_norm = RMSNorm(d_state, eps) if dt_bc_norm else None
        self.C_norm = RMSNorm(d_state, eps) if dt_bc_norm else None
        self.backend = "auto"
        self.scan_kernel = DEFAULT_SCAN_KERNEL  # the selective scan's GPU kernel (ops/selective_scan.py: SCAN_KERNELS)
        self.captured_maps: Optional[list] = None  # set to a list to record the implicit attention (analysis)
        with torch.no_grad():
            self.dt_proj.bias.copy_(_dt_bias_init(d_inner))

    def state_shapes(self, batch: int) -> tuple[tuple, tuple]:
        return (batch, self.conv_channels, self.d_conv - 1), (batch, self.d_inner, self.d_state)

    def _dt_b_c(self, xc: torch.Tensor):
        dt, B, C = self.x_proj(xc.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.dt_norm is not None:
            dt, B, C = self.dt_norm(dt), self.B_norm(B), self.C_norm(C)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # (b, d, l); bias goes in as delta_bias
        return dt, B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()

    def fused_step_inputs(self, x: torch.Tensor, z: torch.Tensor, state: SSMState) -> tuple:
        """The arguments of the fused decode step (ops/mamba1_step_triton.py, and its custom op) for this layer:
        x, z (b, d), the states, then the layer's weights."""
        if self.dt_norm is not None:
            norms = (self.dt_norm.weight, self.B_norm.weight, self.C_norm.weight, self.dt_norm.eps)
        else:
            norms = (None, None, None, 0.0)
        return (x, z, state.conv, state.ssm, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.x_proj.weight,
                self.dt_proj.weight, self.dt_proj.bias, self.A_log, self.D, *norms)

    def runs_fused_step(self, proj: torch.Tensor, step: StepInfo, state: Optional[SSMState]) -> bool:
        """Whether this call is a decode step (one token, no padding) run by the fused Triton step. Only with the
        Triton scan chosen: scan_kernel=mamba_ssm keeps mamba_ssm's and causal_conv1d's step kernels (the chain in
        forward), so the two can be compared."""
        return (_is_decode_step(step, state, proj.shape[1]) and self.scan_kernel == "triton"
                and resolve_backend(self.backend, proj, "mamba1_step") == "kernel")

    def decode_step_inputs(self, proj: torch.Tensor, state: SSMState) -> tuple:
        """fused_step_inputs for a decode step's (b, 1, proj_width) slice of the input projection."""
        return self.fused_step_inputs(proj[:, 0, :self.d_inner], proj[:, 0, self.d_inner:], state)

    def forward(self, proj: torch.Tensor, step: StepInfo, state: Optional[SSMState] = None) -> torch.Tensor:
        if self.runs_fused_step(proj, step, state):
            return mamba1_step_kernel(*self.decode_step_inputs(proj, state))[:, None, :]
        x, z = proj.transpose(1, 2).split([self.d_inner, self.d_inner], dim=1)  # (b, d, l) each
        A = -torch.exp(self.A_log.float())
        weight = self.conv1d.weight.squeeze(1)
        if state is None:
            xc = causal_conv1d(x, weight, self.conv1d.bias, activation="silu", backend=self.backend)
            dt, B, C = self._dt_b_c(xc)
            if self.captured_maps is not None:
                self.captured_maps.append(self._implicit_attention(dt, A, B, C))
            y = selective_scan(xc, dt, A, B, C, self.D.float(), z, delta_bias=self.dt_proj.bias.float(),
                               delta_softplus=True, backend=self.backend, kernel=self.scan_kernel)
            return y.transpose(1, 2)
        if _is_decode_step(step, state, x.shape[-1]):
            xc = causal_conv1d_step(x[..., 0], state.conv, weight, self.conv1d.bias, activation="silu",
                                    backend=self.backend)[..., None]
            dt, B, C = self._dt_b_c(xc)
            y = selective_state_update(state.ssm, xc[..., 0], dt[..., 0], A, B[..., 0], C[..., 0], self.D.float(),
                                       z[..., 0], dt_bias=self.dt_proj.bias.float(), dt_softplus=True,
                                       backend=self.backend)
            return y[:, None, :]
        window = _conv_window(x, state.conv, _chunk_padding(step, x.shape[-1]))
        xc = causal_conv1d(window, weight, self.conv1d.bias, activation="silu", backend=self.backend)
        # A fresh, aligned buffer: the sliced view starts d_conv - 1 elements in, which the scan kernel's
        # vectorised loads reject ("misaligned address" on the H100).
        xc = xc[..., self.d_conv - 1:].contiguous()
        state.conv.copy_(window[..., -(self.d_conv - 1):])
        dt, B, C = self._dt_b_c(xc)
        delta = F.softplus(dt.float() + self.dt_proj.bias.float()[:, None])
        if step.token_mask is not None:
            keep = step.token_mask[:, None, :]
            xc, delta = xc * keep, delta * keep
        # delta is rounded to xc's dtype (mamba-ssm's scan takes u and delta in one dtype): in bf16 a cached prefill
        # differs from the full forward, which adds the bias inside the scan, by ~1e-2 (both as far from float64)
        y, last = selective_scan(xc, delta.to(xc.dtype), A, B, C, self.D.float(), z,
                                 initial_state=None if step.fresh_ssm_state else state.ssm, return_last_state=True,
                                 backend=self.backend, kernel=self.scan_kernel)
        state.ssm.copy_(last)
        return y.transpose(1, 2)


    def _implicit_attention(self, dt, A, B, C) -> torch.Tensor:
        """|implicit attention| averaged over channels, row-normalized: (b, 1, l, l), one "head" per layer."""
        alpha = selective_scan_implicit_attention(dt, A, B, C, self.dt_proj.bias.float(), True)
        return normalize_implicit_attention(alpha.abs().mean(1, keepdim=True))


class Mamba2Heads(nn.Module):
    """Mamba-2 SSD heads (Dao & Gu 2024): scalar decay per head, B/C shared within groups, gated RMSNorm."""

    def __init__(self, d_model: int, d_inner: int, d_state: int, d_conv: int, head_dim: int, n_groups: int,
                 chunk_size: int, eps: float):
        super().__init__()
        self.d_inner, self.d_state, self.d_conv = d_inner, d_state, d_conv
        self.head_dim, self.n_heads, self.n_groups, self.chunk_size = head_dim, d_inner // head_dim, n_groups, chunk_size
        self.conv_channels = d_inner + 2 * n_groups * d_state  # x | B | C go through the conv
        self.proj_width = d_inner + self.conv_channels + self.n_heads  # z | xBC | dt
        self.out_width = d_inner
        self.conv1d = nn.Conv1d(self.conv_channels, self.conv_channels, d_conv, groups=self.conv_channels, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.empty(self.n_heads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.dt_bias = nn.Parameter(_dt_bias_init(self.n_heads))
        self.norm = RMSNorm(d_inner, eps, group_size=d_inner // n_groups)
        self.backend = "auto"
        self.captured_maps: Optional[list] = None  # set to a list to record the implicit attention (analysis)

    def state_shapes(self, batch: int) -> tuple[tuple, tuple]:
        return (batch, self.conv_channels, self.d_conv - 1), (batch, self.n_heads, self.head_dim, self.d_state)

    def _split_xbc(self, xbc: torch.Tensor):
        """xbc (b, l, c) -> x (b, l, h, p), B, C (b, l, g, n)."""
        b, l, _ = xbc.shape
        gn = self.n_groups * self.d_state
        x, B, C = xbc.split([self.d_inner, gn, gn], dim=-1)
        return (x.reshape(b, l, self.n_heads, self.head_dim), B.reshape(b, l, self.n_groups, self.d_state),
                C.reshape(b, l, self.n_groups, self.d_state))

    def _gated_out(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.norm(y * F.silu(z))

    def forward(self, proj: torch.Tensor, step: StepInfo, state: Optional[SSMState] = None) -> torch.Tensor:
        b, l, _ = proj.shape
        z, xbc, dt = proj.split([self.d_inner, self.conv_channels, self.n_heads], dim=-1)
        A = -torch.exp(self.A_log.float())
        weight = self.conv1d.weight.squeeze(1)
        if state is None:
            xbc = causal_conv1d(xbc.transpose(1, 2), weight, self.conv1d.bias, activation="silu",
                                backend=self.backend).transpose(1, 2)
            x, B, C = self._split_xbc(xbc)
            if self.captured_maps is not None:  # |implicit attention| averaged over heads, as Mamba1Heads records
                alpha = ssd_implicit_attention(dt, A, B, C, self.dt_bias.float(), True)
                self.captured_maps.append(normalize_implicit_attention(alpha.abs().mean(1, keepdim=True)))
            y = ssd_scan(x, dt, A, B, C, chunk_size=self.chunk_size, D=self.D.float(), dt_bias=self.dt_bias.float(),
                         dt_softplus=True, backend=self.backend)
            return self._gated_out(y.reshape(b, l, self.d_inner), z)
        if _is_decode_step(step, state, l):
            xc = causal_conv1d_step(xbc[:, 0], state.conv, weight, self.conv1d.bias, activation="silu",
                                    backend=self.backend)
            x, B, C = self._split_xbc(xc[:, None])
            y = ssd_step(state.ssm, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D=self.D.float(),
                         dt_bias=self.dt_bias.float(), dt_softplus=True, backend=self.backend)
            return self._gated_out(y.reshape(b, 1, self.d_inner), z)
        window = _conv_window(xbc.transpose(1, 2), state.conv, _chunk_padding(step, l))
        xc = causal_conv1d(window, weight, self.conv1d.bias, activation="silu", backend=self.backend)
        xc = xc[..., self.d_conv - 1:].transpose(1, 2).contiguous()  # aligned for the SSD kernel, as above
        state.conv.copy_(window[..., -(self.d_conv - 1):])
        delta = F.softplus(dt.float() + self.dt_bias.float())
        if step.token_mask is not None:
            xc, delta = xc * step.token_mask[..., None], delta * step.token_mask[..., None]
        x, B, C = self._split_xbc(xc)
        y, last = ssd_scan(x, delta.to(x.dtype), A, B, C, chunk_size=self.chunk_size, D=self.D.float(),
                           initial_state=state.ssm, return_final_state=True, backend=self.backend)
        state.ssm.copy_(last)
        return self._gated_out(y.reshape(b, l, self.d_inner), z)
