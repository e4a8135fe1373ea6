"""Model assembly: the layer plan (and its table), causality of every preset, gradient flow, bf16 forwards."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from components.config import ModelConfig
from components.layer_plan import resolve_layer_plan
from components.presets import HYMBA_1_5B_KV_GROUPS, preset
from model_factories import ALL_PRESETS, build_model, cpu_config, one_cpu_thread, random_tokens, rel_err  # noqa: F401

SEQ_LEN = 12  # > TEST_WINDOW (5) and the shrunk family's window (4): causality is checked across the window edge


# ---- layer plan ----------------------------------------------------------------------------------------------
def known_plan_config() -> ModelConfig:
    return ModelConfig(d_model=32, n_layers=6, layers=["hybrid", "hybrid", "hybrid", "hybrid", "ssm", "attention"],
                       n_heads=2, n_kv_heads=1, qk_head_dim=8, ssm_inner=32, window=8, global_layers=[0, 5],
                       kv_share=[[1, 2, 3]], n_meta_tokens=2)


def test_layer_plan_table_has_one_exact_row_per_layer():
    table = resolve_layer_plan(known_plan_config()).to_table().splitlines()
    assert table == [
        "layer  mixer      attention  reads KV of  meta",
        "----------------------------------------------",
        "    0  hybrid     global     self            2",
        "    1  hybrid     local(8)   self            2",
        "    2  hybrid     local(8)   layer 1         2",
        "    3  hybrid     local(8)   layer 1         2",
        "    4  ssm        -          -               2",
        "    5  attention  global     self            2",
    ]


def test_layer_plan_records_scope_and_kv_owner():
    plan = resolve_layer_plan(known_plan_config())
    assert plan.global_layers == [0, 5]
    assert plan.kv_groups == [[1, 2, 3]]
    assert [(s.kind, s.scope, s.kv_owner, s.owns_kv) for s in plan] == [
        ("hybrid", "global", 0, True), ("hybrid", "local", 1, True), ("hybrid", "local", 1, False),
        ("hybrid", "local", 1, False), ("ssm", None, None, False), ("attention", "global", 5, True),
    ]


def test_hybrid_layers_without_attention_heads_are_planned_as_ssm_layers():
    plan = resolve_layer_plan(ModelConfig(d_model=32, n_layers=2, layers="hybrid", n_heads=0, ssm_inner=32))
    assert [(s.kind, s.scope, s.kv_owner) for s in plan] == [("ssm", None, None), ("ssm", None, None)]


def test_hymba_1_5b_plan_matches_the_released_model():
    plan = resolve_layer_plan(preset("hymba_1_5b"))
    assert plan.global_layers == [0, 15, 31]
    assert plan.kv_groups == HYMBA_1_5B_KV_GROUPS
    assert sum(s.owns_kv for s in plan) == 3 + len(HYMBA_1_5B_KV_GROUPS)  # 17 layers keep a KV cache
    assert all(s.kind == "hybrid" and s.meta_tokens == 128 for s in plan)


def test_rule_based_global_layers_and_kv_pairs():
    # 6 attention layers: first/middle/last = 0, 2, 5; local runs [1] and [3, 4] -> one pair.
    plan = resolve_layer_plan(cpu_config("hymba_125m"))
    assert plan.global_layers == [0, 2, 5]
    assert plan.kv_groups == [[3, 4]]


def test_layer_plan_table_columns_stay_aligned_for_large_windows():
    lines = resolve_layer_plan(preset("hymba_1_5b")).to_table().splitlines()
    assert {len(row) for row in lines} == {len(lines[0])}


# ---- causality -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_PRESETS)
def test_future_tokens_do_not_change_earlier_outputs(name):
    cfg = cpu_config(name)
    model = build_model(cfg)
    ids = random_tokens(cfg.vocab_size, 2, SEQ_LEN, seed=1)
    with torch.no_grad():
        base = model(ids)
        for t in (1, 7):  # inside the first window, and past it
            changed = ids.clone()
            changed[:, t:] = (ids[:, t:] + 1 + random_tokens(cfg.vocab_size - 1, 2, SEQ_LEN - t, seed=t)) \
                % cfg.vocab_size
            out = model(changed)
            scale = base.abs().max()
            # The SSM reference computes in float32 (its chunking depends on the length): ~1e-7 relative.
            assert (out[:, :t] - base[:, :t]).abs().max() <= 1e-6 * scale, f"position < {t} saw the future"
            assert (out[:, t] - base[:, t]).abs().max() > 1e-3 * scale, "the test's change had no effect"


# ---- gradients -----------------------------------------------------------------------------------------------
GRADIENT_VARIANTS = {
    "mean_mamba1": dict(),
    "concat_mamba1": dict(fusion="concat"),
    "mean_mamba2": dict(ssm="mamba2", ssm_head_dim=8),
}


@pytest.fixture(scope="module", params=list(GRADIENT_VARIANTS))
def model_with_grads(request):
    # Shrunk Hymba-1.5B: meta tokens, global + local layers, a KV producer (1) and consumer (2), dt/B/C norms.
    cfg = cpu_config("hymba_1_5b", **GRADIENT_VARIANTS[request.param])
    model = build_model(cfg).train()
    ids = random_tokens(cfg.vocab_size, 2, 10, seed=2)
    float64_loss(model, ids).backward()
    return model, ids


def float64_loss(model, ids: torch.Tensor) -> torch.Tensor:
    # model.loss upcasts to float32 only; finite differences need the float64 logits.
    return F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())


def test_every_parameter_gets_a_finite_nonzero_gradient(model_with_grads):
    model, _ = model_with_grads
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_gradient_reaches_every_meta_token(model_with_grads):
    model, _ = model_with_grads
    assert (model.meta.embeddings.grad.norm(dim=-1) > 0).all()


def test_gradient_reaches_both_branch_norm_weights_beta(model_with_grads):
    model, _ = model_with_grads
    for layer in model.layers:
        mixer = layer.mixer
        assert mixer.fused
        assert (mixer.attn_norm.weight.grad != 0).all()  # β1
        assert (mixer.ssm_norm.weight.grad != 0).all()  # β2


def test_gradient_reaches_every_attention_and_ssm_input_row(model_with_grads):
    model, _ = model_with_grads
    for layer in model.layers:
        mixer = layer.mixer
        row_norms = mixer.in_proj.weight.grad.norm(dim=1)
        attn_rows, ssm_rows = row_norms.split(mixer.split)
        assert (attn_rows > 0).all(), "attention Q (and K/V for producers) rows"
        assert (ssm_rows > 0).all(), "SSM x/z rows"
        ssm = mixer.ssm
        params = [ssm.A_log, ssm.conv1d.weight, ssm.D]
        params += [ssm.x_proj.weight, ssm.dt_proj.weight] if hasattr(ssm, "x_proj") else [ssm.dt_bias]
        for p in params:
            assert p.grad.abs().sum() > 0


def test_meta_token_and_beta_gradients_match_finite_differences(model_with_grads):
    model, ids = model_with_grads
    # The SSM reference runs in float32 inside, so the step is large and the tolerance loose; the entry with
    # the largest gradient is probed so float32 noise stays small next to it.
    eps = 3e-3
    with torch.no_grad():
        for param in (model.meta.embeddings, model.layers[2].mixer.attn_norm.weight,
                      model.layers[1].mixer.ssm_norm.weight):
            flat = param.view(-1)
            index = int(param.grad.abs().argmax())
            original = flat[index].item()
            flat[index] = original + eps
            up = float64_loss(model, ids).item()
            flat[index] = original - eps
            down = float64_loss(model, ids).item()
            flat[index] = original
            assert param.grad.view(-1)[index].item() == pytest.approx((up - down) / (2 * eps), rel=2e-2)


# ---- bf16 ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_PRESETS)
def test_bf16_forward_is_finite_and_close_to_fp32(name):
    cfg = cpu_config(name)
    fp32 = build_model(cfg, dtype=torch.float32)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    ids = random_tokens(cfg.vocab_size, 2, SEQ_LEN, seed=3)
    with torch.no_grad():
        ref, out = fp32(ids), bf16(ids)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 5e-2


def test_mamba2_gated_norm_normalizes_each_bc_group_on_its_own():
    # mamba-ssm's Mamba2: RMSNormGated(d_inner, group_size=d_inner // ngroups), one statistic per B/C group
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=1, layers="ssm", n_heads=0, ssm="mamba2", ssm_head_dim=8,
                      ssm_groups=2, d_state=4, max_seq_len=64)
    heads = build_model(cfg).double().layers[0].mixer.ssm
    torch.nn.init.normal_(heads.norm.weight)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 5, heads.d_inner, dtype=torch.float64, generator=g)
    y = y * torch.linspace(0.2, 3.0, heads.d_inner, dtype=torch.float64)  # the groups' scales differ
    z = torch.randn(y.shape, dtype=torch.float64, generator=g)
    gated = (y * F.silu(z)).unflatten(-1, (2, -1))
    expected = (gated / gated.pow(2).mean(-1, keepdim=True).add(heads.norm.eps).sqrt()).flatten(-2)
    torch.testing.assert_close(heads._gated_out(y, z), expected * heads.norm.weight)
