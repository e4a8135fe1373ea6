"""The hybrid-head mixer (paper Eq. 3): one input projection feeds attention heads and SSM heads in parallel.

    Y = out_proj( fuse( β1 ⊙ rmsnorm(Y_attn), β2 ⊙ rmsnorm(Y_ssm) ) )

β1, β2 are the weights of the per-branch RMSNorms; fusion is "mean" (default) or "concat" (Table 9 row 11).
A layer with only one branch is a plain attention layer (Llama) or a plain Mamba layer: no branch norm, and
out_proj is that layer's own output projection. Sequential hybrids (Table 1 row A) are layer plans that
alternate single-branch layers.

In a GPU decode step with Mamba-1 heads the two branches run side by side on two CUDA streams
(ops/concurrent_branches.py); `decode_branches = "sequential"` runs them one after the other, as everywhere else.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import AttentionHeads
from .config import ModelConfig
from .kv_cache import StepInfo
from .layer_plan import LayerSpec
from .norms import RMSNorm
from .ops.concurrent_branches import attention_beside_mamba1_step
from .ssm_heads import Mamba1Heads, Mamba2Heads

DECODE_BRANCHES = ("concurrent", "sequential")


def build_ssm_heads(cfg: ModelConfig) -> nn.Module:
    if cfg.ssm == "mamba2":
        return Mamba2Heads(cfg.d_model, cfg.resolved_ssm_inner, cfg.d_state, cfg.d_conv, cfg.ssm_head_dim,
                           cfg.ssm_groups, cfg.ssm_chunk_size, cfg.norm_eps)
    return Mamba1Heads(cfg.d_model, cfg.resolved_ssm_inner, cfg.d_state, cfg.d_conv, cfg.resolved_dt_rank,
                       cfg.dt_bc_norm, cfg.norm_eps)


class HybridHeadMixer(nn.Module):
    def __init__(self, spec: LayerSpec, cfg: ModelConfig):
        super().__init__()
        self.attn = (AttentionHeads(spec, cfg.n_heads, cfg.n_kv_heads, cfg.qk_head_dim,
                                    cfg.resolved_v_head_dim(spec.kind), cfg.window, cfg.n_meta_tokens,
                                    cfg.rope_theta)
                     if spec.has_attention else None)
        self.ssm = build_ssm_heads(cfg) if spec.has_ssm else None
        branches = [m for m in (self.attn, self.ssm) if m is not None]
        self.split = [m.proj_width for m in branches]
        self.in_proj = nn.Linear(cfg.d_model, sum(self.split), bias=False)
        self.fused = len(branches) == 2
        self.fusion = cfg.fusion
        if self.fused:
            self.attn_norm = RMSNorm(self.attn.out_width, cfg.norm_eps)  # weight = β1
            self.ssm_norm = RMSNorm(self.ssm.out_width, cfg.norm_eps)  # weight = β2
            out_in = self.ssm.out_width if cfg.fusion == "mean" else self.attn.out_width + self.ssm.out_width
        else:
            out_in = branches[0].out_width
        self.out_proj = nn.Linear(out_in, cfg.d_model, bias=False)
        self.decode_branches = "concurrent"  # one of DECODE_BRANCHES (HybridLM.set_backend)

    def forward(self, h: torch.Tensor, step: StepInfo, kv_cache=None, ssm_state=None) -> torch.Tensor:
        parts = self.in_proj(h).split(self.split, dim=-1)
        if self._branches_run_concurrently(parts[-1], step, ssm_state):
            q, view = self.attn.queries_and_keys(parts[0], step, kv_cache)
            y_attn, y_ssm = attention_beside_mamba1_step(q, view.k, view.v, self.attn.cached_bias(step, view, q.dtype),
                                                         *self.ssm.decode_step_inputs(parts[-1], ssm_state))
            outputs = [self.attn.merge_heads(y_attn), y_ssm[:, None, :]]
        else:
            outputs = []
            if self.attn is not None:
                outputs.append(self.attn(parts[0], step, kv_cache))
            if self.ssm is not None:
                outputs.append(self.ssm(parts[-1], step, ssm_state))
        if not self.fused:
            return self.out_proj(outputs[0])
        y_attn, y_ssm = self.attn_norm(outputs[0]), self.ssm_norm(outputs[1])
        fused = (y_attn + y_ssm) / 2 if self.fusion == "mean" else torch.cat([y_attn, y_ssm], dim=-1)
        return self.out_proj(fused)

    def _branches_run_concurrently(self, ssm_proj: torch.Tensor, step: StepInfo, ssm_state) -> bool:
        """A decode step of both branches whose SSM heads take the fused Triton step (so the GPU kernels are there),
        with nothing recording attention maps (they are read from the attention heads' own forward)."""
        return (self.fused and self.decode_branches == "concurrent" and isinstance(self.ssm, Mamba1Heads)
                and self.attn.captured_maps is None and self.ssm.runs_fused_step(ssm_proj, step, ssm_state))

    def branch_param_counts(self) -> dict[str, float]:
        """Parameters per branch; the shared projections are split by the widths each branch uses.

        in_proj rows go to the branch they feed; out_proj columns go to the branch they read (for mean fusion,
        half each, since both branches are read through every column).
        """
        d_model = self.in_proj.in_features
        counts = {"attention": 0.0, "ssm": 0.0}
        if self.attn is not None:
            counts["attention"] += self.split[0] * d_model
        if self.ssm is not None:
            counts["ssm"] += sum(p.numel() for p in self.ssm.parameters()) + self.split[-1] * d_model
        out = self.out_proj.weight.numel()
        if not self.fused:
            counts["attention" if self.attn is not None else "ssm"] += out
        elif self.fusion == "mean":
            counts["attention"] += out / 2 + self.attn_norm.weight.numel()
            counts["ssm"] += out / 2 + self.ssm_norm.weight.numel()
        else:
            counts["attention"] += self.attn.out_width * d_model + self.attn_norm.weight.numel()
            counts["ssm"] += self.ssm.out_width * d_model + self.ssm_norm.weight.numel()
        return counts
