"""Named model configurations: baselines, the paper's roadmap rows (Table 1) and the Hymba family.

A roadmap/baseline preset is a *structure* (mixer per layer, attention scope, KV sharing, meta tokens) applied
at a *size* (tiny: CPU tests and the default run; small: minutes on one GPU; 300m: the paper's comparison size).
Rows with SSM heads hold the `transformer` row's parameter count at the same size through `param_budget`
(ssm_inner is re-solved), so the comparison stays at equal size as the paper requires (±3%; we land within 1%).
The Hymba family presets have their own, published sizes.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

from .config import ConfigError, ModelConfig

# Released Hymba-1.5B (DESIGN.md §2): KV shared by consecutive sliding-window layers.
HYMBA_1_5B_KV_GROUPS = [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12], [13, 14], [16, 17, 18],
                        [19, 20], [21, 22], [23, 24], [25, 26], [27, 28], [29, 30]]

# Per size: shared dims, then head counts per structure (MHA for the Transformer, GQA in hybrids as Table 9 row 5).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(dims=dict(vocab_size=512, d_model=64, n_layers=6, qk_head_dim=16, ffn_dim=128, d_state=8,
                           ssm_head_dim=8, max_seq_len=1024),
                 mha=(4, 4), hybrid=(2, 1), sequential=(4, 2), window=16, meta=4),
    "small": dict(dims=dict(vocab_size=8192, d_model=384, n_layers=8, qk_head_dim=64, ffn_dim=1024, d_state=16,
                            ssm_head_dim=32, max_seq_len=4096),
                  mha=(6, 6), hybrid=(4, 1), sequential=(6, 2), window=128, meta=32),
    "300m": dict(dims=dict(vocab_size=32001, d_model=1024, n_layers=24, qk_head_dim=64, ffn_dim=2816, d_state=16,
                           ssm_head_dim=64, max_seq_len=16384),
                 mha=(16, 16), hybrid=(8, 2), sequential=(16, 4), window=1024, meta=128),
}

# Structures. "heads" picks the size's head pair; "window"/"meta" True takes the size's value.
STRUCTURES: dict[str, dict[str, Any]] = {
    "transformer": dict(layers="attention", heads="mha"),
    "mamba": dict(layers="ssm", heads=None, ffn_dim=0),
    "mamba2": dict(layers="ssm", heads=None, ffn_dim=0, ssm="mamba2"),
    "mamba_ffn": dict(layers="ssm", heads=None),
    "samba": dict(layers="sequential", heads="sequential", window=True, global_layers="none"),
    "roadmap_a": dict(layers="sequential", heads="sequential"),
    "roadmap_b": dict(layers="hybrid", heads="hybrid"),
    "roadmap_c": dict(layers="hybrid", heads="hybrid", window=True, global_layers="first_middle_last"),
    "roadmap_d": dict(layers="hybrid", heads="hybrid", window=True, global_layers="first_middle_last", kv_share=2),
    "roadmap_e": dict(layers="hybrid", heads="hybrid", window=True, global_layers="first_middle_last", kv_share=2,
                      meta=True),
}

# The Hymba family (paper App. E, DESIGN.md §2): fixed sizes.
FAMILY: dict[str, dict[str, Any]] = {
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
PRESET_NAMES = tuple(STRUCTURES) + tuple(FAMILY)
ROADMAP_ROWS = ("transformer", "mamba", "roadmap_a", "roadmap_b", "roadmap_c", "roadmap_d", "roadmap_e")


@lru_cache(maxsize=None)
def _transformer_params(size: str) -> int:
    from .param_count import count_parameters

    return count_parameters(preset_values_to_config("transformer", size)).total


def preset_values_to_config(name: str, size: str) -> ModelConfig:
    return ModelConfig.from_dict(preset_values(name, size))


def preset_values(name: str, size: str = "tiny") -> dict[str, Any]:
    """The full key/value description of a preset at a size (what conf/model/*.yaml files hold)."""
    if name in FAMILY:
        return dict(FAMILY[name], name=name)
    if name not in STRUCTURES:
        raise ConfigError(f"model preset {name!r} is unknown; allowed: {', '.join(PRESET_NAMES)}")
    if size not in SIZES:
        raise ConfigError(f"model size {size!r} is unknown; allowed: {', '.join(SIZES)}")
    s, st = SIZES[size], STRUCTURES[name]
    values: dict[str, Any] = dict(s["dims"], name=f"{name}_{size}", layers=st["layers"])
    if st["heads"] is None:
        values["n_heads"] = 0
    else:
        values["n_heads"], values["n_kv_heads"] = s[st["heads"]]
    for key in ("ffn_dim", "ssm", "global_layers", "kv_share"):
        if key in st:
            values[key] = st[key]
    if st.get("window"):
        values["window"] = s["window"]
    if st.get("meta"):
        values["n_meta_tokens"] = s["meta"]
    if name != "transformer":
        values["param_budget"] = _transformer_params(size)
    return values


def preset(name: str, size: str = "tiny", **overrides: Any) -> ModelConfig:
    from .layer_plan import resolve_layer_plan

    values = preset_values(name, size)
    values.update(overrides)
    cfg = ModelConfig.from_dict(values).validate()
    resolve_layer_plan(cfg)  # global-layer and KV-group rules fail here, not at model build time
    return cfg
