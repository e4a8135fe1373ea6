"""Parameter counts computed on the meta device (no weights allocated), and the attention:SSM ratio knob."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import ConfigError, ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int
    attention: float
    ssm: float
    ffn: int
    embedding: int
    other: int  # layer norms, final norm, meta tokens

    @property
    def attn_to_ssm(self) -> str:
        """Table 9's "Param. Ratio Attn:Mamba" column, e.g. "1:4.24", "0:1" or "1:0"."""
        if self.ssm == 0:
            return "1:0"
        if self.attention == 0:
            return "0:1"
        return f"1:{self.ssm / self.attention:.2f}"

    def as_metrics(self) -> dict[str, float]:
        """The counts, and attention over SSM parameters where the model has SSM heads (an infinite ratio would be
        stored by MLflow's SQL stores as the largest float, 1.8e308)."""
        ratio = {"params/attn_to_ssm": self.attention / self.ssm} if self.ssm else {}
        return {"params/total": self.total, "params/attention": self.attention, "params/ssm": self.ssm,
                "params/ffn": self.ffn, "params/embedding": self.embedding, **ratio}


def build_on_meta(cfg: ModelConfig):
    from .model import HybridLM

    with torch.device("meta"):
        return HybridLM(cfg)


def count_parameters(cfg: ModelConfig) -> ParamCounts:
    return counts_of(build_on_meta(cfg))


def counts_of(model) -> ParamCounts:
    total = sum(p.numel() for p in model.parameters())
    attention = ssm = 0.0
    ffn = 0
    for layer in model.layers:
        branch = layer.mixer.branch_param_counts()
        attention += branch["attention"]
        ssm += branch["ssm"]
        if layer.ffn is not None:
            ffn += sum(p.numel() for p in layer.ffn.parameters())
    embedding = model.embed.weight.numel() + (model.lm_head.weight.numel() if model.lm_head is not None else 0)
    # counted from the modules themselves (not as the remainder), so a branch split that loses or double-counts
    # mixer parameters shows as a breakdown that no longer adds up to the total
    other = sum(p.numel() for name, p in model.named_parameters()
                if not name.startswith(("embed.", "lm_head.")) and ".mixer." not in name and ".ffn." not in name)
    return ParamCounts(total, attention, ssm, ffn, embedding, other)


def _ssm_granules(cfg: ModelConfig) -> list[int]:
    """Widths ssm_inner may step by, coarsest first: multiples of 8 per attention head (and per Mamba-2 head)
    keep head dims kernel-friendly; finer steps are the fallback when a small model cannot reach its budget."""
    fine = 1
    if cfg.n_heads > 0 and cfg.fusion == "mean" and "hybrid" in cfg.layer_kinds() and cfg.v_head_dim is None:
        fine = math.lcm(fine, cfg.n_heads)
    if cfg.ssm == "mamba2":
        fine = math.lcm(fine, cfg.ssm_head_dim * cfg.ssm_groups)
    return [math.lcm(fine, 8 * max(cfg.n_heads, 1)), fine]


def solve_param_budget(cfg: ModelConfig) -> ModelConfig:
    """Choose ssm_inner so the model has `param_budget` parameters (±1%), as Table 9 rows 1–4 hold size fixed.

    The count is affine in ssm_inner (with v_head_dim following ssm_inner / n_heads), so two meta-device builds
    give the slope; the result is rounded to a width every head layout accepts.
    """
    budget = cfg.param_budget
    if cfg.ssm_inner is not None:
        raise ConfigError(f"model.param_budget={budget} re-sizes model.ssm_inner, which is also set "
                          f"({cfg.ssm_inner}); set one of them to null")
    if not any(k in ("hybrid", "ssm") for k in cfg.layer_kinds()):
        raise ConfigError("model.param_budget: only models with SSM heads can hold a budget (it re-sizes "
                          "model.ssm_inner); set model.param_budget=null")
    probe = cfg.replace(param_budget=None)
    for g in _ssm_granules(cfg):
        p1 = count_parameters(probe.replace(ssm_inner=g)).total
        p2 = count_parameters(probe.replace(ssm_inner=2 * g)).total
        k = round((budget - p1) / (p2 - p1)) + 1
        if k < 1:
            raise ConfigError(f"model.param_budget={budget}: the head ratio leaves no SSM width (attention, FFN and "
                              f"embeddings alone need {p1 - (p2 - p1)} parameters); lower model.n_heads or raise "
                              f"the budget")
        solved = probe.replace(ssm_inner=k * g)
        total = count_parameters(solved).total
        if abs(total - budget) <= 0.01 * budget:
            return solved
    raise ConfigError(f"model.param_budget={budget}: closest reachable size is {total} (>1% off); "
                      f"change model.d_model or model.ffn_dim")
