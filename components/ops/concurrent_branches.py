"""A hybrid layer's decode step with its two branches side by side: the SSM heads' fused step on a second CUDA stream
while the attention heads attend on the current one (paper §2.1: the heads are parallel, so neither waits for the
other).

At batch 128 and an 8k context, row E's decode step spends most of its time in attention kernels that read the KV
caches; the Mamba-1 step's three small kernels (about 15 us a layer on an H200) can fill in the SMs attention leaves
idle. It is one custom op, so a compiled decode step keeps it as a single node (torch 2.11's Inductor places
every kernel on one stream) and a CUDA-graph capture records both streams. The CPU path (and any GPU without the
kernels) runs the branches one after the other through the modules' own forwards: see HybridHeadMixer.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
from torch import Tensor

from .attention import attention_reference


@lru_cache(maxsize=None)
def _side_stream(device_index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=device_index)


@torch.library.custom_op("arch_lab::attention_beside_mamba1_step", mutates_args=("conv_state", "ssm_state"),
                         device_types="cuda")
def attention_beside_mamba1_step(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, x: Tensor, z: Tensor,
                                 conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor,
                                 conv_bias: Optional[Tensor], x_proj_weight: Tensor, dt_proj_weight: Tensor,
                                 dt_bias: Tensor, A_log: Tensor, D: Tensor, dt_norm_weight: Optional[Tensor],
                                 B_norm_weight: Optional[Tensor], C_norm_weight: Optional[Tensor],
                                 eps: float) -> tuple[Tensor, Tensor]:
    """(attention_reference(q, k, v, bias), the fused Mamba-1 step of x, z): `bias` is the attention's
    additive_mask (a boolean one would be converted here, by three more kernels a layer), the arguments after it are
    Mamba1Heads.fused_step_inputs'. Both states are updated in place, as by arch_lab::mamba1_step."""
    from .mamba1_step_triton import mamba1_step

    # Allocated on the current stream, so its memory is never handed to the side stream's later work.
    y_ssm = torch.empty_like(x, memory_format=torch.contiguous_format)
    side = _side_stream(q.device.index) if q.is_cuda else None  # None: Triton's interpreter on the CPU (tests)
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(q.device))  # after the in_proj that made x and z
    with torch.cuda.stream(side):  # a no-op for None
        mamba1_step(x, z, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias,
                    A_log, D, dt_norm_weight, B_norm_weight, C_norm_weight, eps, out=y_ssm)
    y_attn = attention_reference(q, k, v, bias).contiguous()  # the layout the fake below promises
    if side is not None:
        torch.cuda.current_stream(q.device).wait_stream(side)  # what follows sees y_ssm and both states
    return y_attn, y_ssm


@attention_beside_mamba1_step.register_fake
def _(q, k, v, bias, x, z, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias,
      A_log, D, dt_norm_weight, B_norm_weight, C_norm_weight, eps):
    return q.new_empty(*q.shape[:-1], v.shape[-1]), x.new_empty(x.shape)
