"""Named model configurations: baselines, the paper's roadmap rows (Table 1) and the Hymba family.

The roadmap rows B–E and the SSM-bearing baselines hold the Transformer row's parameter count through
`param_budget` (ssm_inner is re-solved), so the comparison stays at equal size as the paper requires.
"""
from __future__ import annotations

from typing import Any

from .config import ConfigError, ModelConfig

# Released Hymba-1.5B (DESIGN.md §2): KV shared by consecutive sliding-window layers.
HYMBA_1_5B_KV_GROUPS = [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12], [13, 14], [16, 17, 18],
                        [19, 20], [21, 22], [23, 24], [25, 26], [27, 28], [29, 30]]

# The ~300M comparison size of Table 1 (Llama-style: hidden 1024, 24 layers, 16 heads, SwiGLU 2816).
_ROADMAP_BASE: dict[str, Any] = dict(vocab_size=32001, d_model=1024, n_layers=24, qk_head_dim=64, ffn_dim=2816,
                                     d_state=16, max_seq_len=8192)
ROADMAP_PARAM_BUDGET = 341_100_544  # the `transformer` preset's count; the other rows solve ssm_inner to match

PRESETS: dict[str, dict[str, Any]] = {
    # baselines (Tables 1, 3, 8)
    "transformer": dict(_ROADMAP_BASE, layers="attention", n_heads=16, n_kv_heads=16),
    "mamba": dict(_ROADMAP_BASE, layers="ssm", ffn_dim=0, n_heads=0, param_budget=ROADMAP_PARAM_BUDGET),
    "mamba2": dict(_ROADMAP_BASE, layers="ssm", ssm="mamba2", ssm_head_dim=64, ffn_dim=0, n_heads=0,
                   param_budget=ROADMAP_PARAM_BUDGET),
    "mamba_ffn": dict(_ROADMAP_BASE, layers="ssm", n_heads=0, param_budget=ROADMAP_PARAM_BUDGET),
    "samba": dict(_ROADMAP_BASE, layers="sequential", n_heads=16, n_kv_heads=4, window=2048, global_layers="none",
                  param_budget=ROADMAP_PARAM_BUDGET),
    # roadmap (Table 1): A sequential, B parallel heads, C + local/global, D + KV sharing, E + meta tokens
    "roadmap_a": dict(_ROADMAP_BASE, layers="sequential", n_heads=16, n_kv_heads=4,
                      param_budget=ROADMAP_PARAM_BUDGET),
    "roadmap_b": dict(_ROADMAP_BASE, layers="hybrid", n_heads=8, n_kv_heads=2, param_budget=ROADMAP_PARAM_BUDGET),
    "roadmap_c": dict(_ROADMAP_BASE, layers="hybrid", n_heads=8, n_kv_heads=2, window=1024,
                      global_layers="first_middle_last", param_budget=ROADMAP_PARAM_BUDGET),
    "roadmap_d": dict(_ROADMAP_BASE, layers="hybrid", n_heads=8, n_kv_heads=2, window=1024,
                      global_layers="first_middle_last", kv_share=2, param_budget=ROADMAP_PARAM_BUDGET),
    "roadmap_e": dict(_ROADMAP_BASE, layers="hybrid", n_heads=8, n_kv_heads=2, window=1024,
                      global_layers="first_middle_last", kv_share=2, n_meta_tokens=128,
                      param_budget=ROADMAP_PARAM_BUDGET),
    # the Hymba family (paper App. E, DESIGN.md §2)
    "hymba_125m": dict(vocab_size=32001, d_model=512, n_layers=24, n_heads=8, n_kv_heads=4, qk_head_dim=64,
                       ssm_inner=1024, ffn_dim=1664, window=1024, global_layers="first_middle_last", kv_share=2,
                       n_meta_tokens=128, dt_bc_norm=True, max_seq_len=8192),
    "hymba_350m": dict(vocab_size=32001, d_model=768, n_layers=32, n_heads=12, n_kv_heads=4, qk_head_dim=64,
                       ssm_inner=1536, ffn_dim=2432, window=1024, global_layers="first_middle_last", kv_share=2,
                       n_meta_tokens=128, dt_bc_norm=True, max_seq_len=8192),
    "hymba_1_5b": dict(vocab_size=32001, d_model=1600, n_layers=32, n_heads=25, n_kv_heads=5, qk_head_dim=64,
                       v_head_dim=128, ssm_inner=3200, d_state=16, d_conv=4, dt_rank=100, dt_bc_norm=True,
                       ffn_dim=5504, n_meta_tokens=128, window=1024, global_layers=[0, 15, 31],
                       kv_share=HYMBA_1_5B_KV_GROUPS, max_seq_len=16384),
}
ROADMAP_ROWS = ("transformer", "mamba", "roadmap_a", "roadmap_b", "roadmap_c", "roadmap_d", "roadmap_e")


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"model preset {name!r} is unknown; allowed: {', '.join(sorted(PRESETS))}")
    values = dict(PRESETS[name], name=name)
    values.update(overrides)
    return ModelConfig.from_dict(values).validate()
