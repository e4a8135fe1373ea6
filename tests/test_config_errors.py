"""Bad model configs raise one ConfigError (a ValueError) naming the key as `model.<key>` and what is allowed."""
from __future__ import annotations

import pytest

from components.config import ConfigError, ModelConfig
from components.layer_plan import resolve_layer_plan
from components.param_count import build_on_meta
from components.presets import PRESET_NAMES, preset
from model_factories import one_cpu_thread  # noqa: F401

# 6 layers with attention heads, globals [0, 5] -> local layers [1, 2, 3, 4].
BASE = dict(d_model=32, n_layers=6, n_heads=2, n_kv_heads=1, qk_head_dim=8, ssm_inner=32, window=4,
            global_layers=[0, 5])


def config(**changes) -> ModelConfig:
    return ModelConfig(**{**BASE, **changes})


def plan_error(cfg: ModelConfig) -> str:
    """The error both the layer plan and model construction raise (the plan is resolved while building)."""
    with pytest.raises(ConfigError) as from_plan:
        resolve_layer_plan(cfg)
    with pytest.raises(ConfigError) as from_model:
        build_on_meta(cfg)
    assert str(from_model.value) == str(from_plan.value)
    return str(from_plan.value)


def test_a_bad_value_is_caught_as_a_value_error_naming_its_key():
    """Callers outside the lab catch ValueError (ConfigError's base): they get the same one-line message."""
    with pytest.raises(ValueError, match=r"^model\.window: must be an int >= 1 or null \(all global\), got 0$"):
        config(window=0).validate()


@pytest.mark.parametrize("changes,expected", [
    (dict(global_layers=[0, 6]), ["model.global_layers", "[6] out of range", "allowed: 0..5"]),
    (dict(global_layers=[-1]), ["model.global_layers", "[-1] out of range", "allowed: 0..5"]),
    (dict(global_layers="firstlast"), ["model.global_layers", "'firstlast'", "allowed: all, none, first, last, "
                                       "first_last, first_middle_last or a list of layer indices"]),
    (dict(window=0), ["model.window", "int >= 1 or null", "got 0"]),
    (dict(window=-2), ["model.window", "int >= 1 or null", "got -2"]),
    (dict(rope_theta=-1.0), ["model.rope_theta", "must be > 0", "got -1.0"]),  # trained to NaN
    (dict(norm_eps=0.0), ["model.norm_eps", "must be > 0", "got 0.0"]),
    (dict(init_std=-0.02), ["model.init_std", "must be > 0", "got -0.02"]),  # torch's "normal expects std >= 0.0"
    (dict(n_heads=4, n_kv_heads=3, ssm_inner=32), ["model.n_kv_heads", "must divide model.n_heads=4", "got 3"]),
    (dict(ssm_inner=0), ["model.ssm_inner", "leaves no SSM width", "lower model.n_heads"]),
    (dict(layers=["hybrid", "mlp", "ssm", "ssm", "ssm", "attention"]),
     ["model.layers", "unknown layer kind(s) ['mlp']", "allowed: hybrid, attention, ssm"]),
    (dict(layers="mlp"), ["model.layers", "'mlp'", "allowed: hybrid, attention, ssm, sequential"]),
    (dict(layers=["hybrid"] * 5), ["model.layers", "lists 5 layers", "model.n_layers=6"]),
    (dict(ssm="s4"), ["model.ssm", "'s4'", "allowed: mamba1, mamba2"]),
    (dict(fusion="sum"), ["model.fusion", "'sum'", "allowed: mean, concat"]),
    (dict(n_meta_tokens=-1), ["model.n_meta_tokens", "must be >= 0"]),
    (dict(d_model="abc"), ["model.d_model", "must be an int, got 'abc'"]),
    (dict(ssm_inner=32.0), ["model.ssm_inner", "must be an int or null, got 32.0"]),
    (dict(rope_theta="big"), ["model.rope_theta", "must be a number, got 'big'"]),
    (dict(tie_embeddings="yes"), ["model.tie_embeddings", "must be true or false, got 'yes'"]),
    (dict(window=True), ["model.window", "must be an int or null, got True"]),  # YAML's true: not a window of 1
    (dict(v_head_dim=0), ["model.v_head_dim", "int >= 1 or null", "got 0"]),
    (dict(v_head_dim=-4), ["model.v_head_dim", "int >= 1 or null", "got -4"]),
    (dict(ssm="mamba2", ssm_head_dim=0), ["model.ssm_head_dim", "int >= 1", "got 0"]),
    (dict(ssm="mamba2", ssm_groups=0), ["model.ssm_groups", "int >= 1", "got 0"]),
    (dict(ssm="mamba2", ssm_chunk_size=0), ["model.ssm_chunk_size", "int >= 1", "got 0"]),
    (dict(kv_share=[1, 2]), ["model.kv_share", "a list of layer groups like [[1, 2], [3, 4]]", "got [1, 2]"]),
    (dict(kv_share=2, window=None), ["model.kv_share", "model.window is null", "model.kv_share=null"]),
])
def test_invalid_values_are_rejected_by_validate(changes, expected):
    with pytest.raises(ConfigError) as error:
        config(**changes).validate()
    for part in expected:
        assert part in str(error.value)


@pytest.mark.parametrize("changes,key", [(dict(window=0), "model.window"), (dict(fusion="sum"), "model.fusion"),
                                         (dict(global_layers=[6]), "model.global_layers")])
def test_preset_overrides_are_validated(changes, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        preset("roadmap_e", **changes)


def test_global_layer_without_attention_heads():
    message = plan_error(config(layers=["ssm", "hybrid", "hybrid", "hybrid", "hybrid", "hybrid"]))
    assert message == ("model.global_layers: layers [0] have no attention heads; "
                       "allowed: layers with attention [1, 2, 3, 4, 5]")


def test_kv_group_containing_a_global_layer():
    message = plan_error(config(kv_share=[[4, 5]]))
    assert message.startswith("model.kv_share: group [4, 5] contains global layer(s) [5]")
    assert "only local (sliding-window) layers may share KV" in message


def test_kv_group_containing_a_global_layer_lists_the_local_layers():
    assert "[1, 2, 3, 4]" in plan_error(config(kv_share=[[4, 5]]))


@pytest.mark.parametrize("kv_share,expected", [
    ([[1, 3]], "model.kv_share: group [1, 3] must list consecutive layers in order"),
    ([[2, 1]], "model.kv_share: group [2, 1] must list consecutive layers in order"),
    ([[1, 2], [2, 3]], "model.kv_share: layers [2] appear in more than one group"),
    ([[]], "model.kv_share: group [] must be a non-empty list of layer indices"),
    (0, "model.kv_share: group size must be >= 1, got 0"),
])
def test_bad_kv_groups(kv_share, expected):
    assert plan_error(config(kv_share=kv_share)) == expected


def test_kv_group_with_a_layer_without_attention():
    message = plan_error(config(layers=["hybrid", "hybrid", "ssm", "hybrid", "hybrid", "hybrid"],
                                kv_share=[[1, 2]]))
    assert message == ("model.kv_share: group [1, 2] has layers without attention heads; "
                       "allowed: local attention layers [1, 3, 4]")


def test_kv_group_mixing_value_widths():
    # mean fusion gives hybrid layers V heads of ssm_inner / n_heads = 16, attention layers qk_head_dim = 8
    message = plan_error(config(layers=["hybrid", "hybrid", "attention", "hybrid", "hybrid", "hybrid"],
                                kv_share=[[1, 2]]))
    assert message.startswith("model.kv_share: group [1, 2] mixes value head widths {1: 16, 2: 8}")
    resolve_layer_plan(config(layers=["hybrid", "hybrid", "attention", "hybrid", "hybrid", "hybrid"],
                              kv_share=[[1, 2]], v_head_dim=16))  # one width for both kinds: allowed


def test_head_ratio_that_leaves_no_ssm_width_under_the_budget():
    cfg = preset("roadmap_b", "small", n_heads=32, n_kv_heads=1)  # attention alone exceeds the budget
    with pytest.raises(ConfigError) as error:
        build_on_meta(cfg)
    message = str(error.value)
    assert message.startswith(f"model.param_budget={cfg.param_budget}: the head ratio leaves no SSM width")
    assert message.endswith("lower model.n_heads or raise the budget")


def test_param_budget_conflicts():
    cfg = preset("roadmap_b", ssm_inner=64)
    with pytest.raises(ConfigError, match=rf"^model\.param_budget={cfg.param_budget} re-sizes model\.ssm_inner, "
                                          r"which is also set \(64\); set one of them to null$"):
        build_on_meta(cfg)
    with pytest.raises(ConfigError, match=r"^model\.param_budget: only models with SSM heads can hold a budget"):
        build_on_meta(preset("transformer", param_budget=197184))


def test_unknown_key_from_dict():
    with pytest.raises(ConfigError) as error:
        ModelConfig.from_dict({"d_model": 32, "windw": 4, "fusoin": "mean"})
    message = str(error.value)
    assert message.startswith("unknown model config key(s) model.fusoin, model.windw; allowed keys: ")
    assert "window" in message and "fusion" in message and "n_meta_tokens" in message


def test_unknown_preset_and_size():
    with pytest.raises(ConfigError) as error:
        preset("hymba_3b")
    assert str(error.value) == f"model preset 'hymba_3b' is unknown; allowed: {', '.join(PRESET_NAMES)}"
    with pytest.raises(ConfigError, match=r"^model size 'huge' is unknown; allowed: tiny, small, 300m$"):
        preset("transformer", "huge")
