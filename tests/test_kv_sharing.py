"""Cross-layer KV sharing (paper §2.3): consumer layers project only Q and read their producer's post-RoPE K/V."""
from __future__ import annotations

import pytest
import torch

import components.attention as attention_module
from components.kv_cache import StepInfo
from components.layer_plan import resolve_layer_plan
from components.param_count import build_on_meta
from components.presets import HYMBA_1_5B_KV_GROUPS, preset
from model_factories import build_model, cpu_config, one_cpu_thread, random_tokens, rope_by_hand  # noqa: F401

PRODUCER, CONSUMER = 1, 2  # the shrunk Hymba-1.5B shares KV in group [1, 2]


@pytest.fixture(scope="module")
def model():
    return build_model(cpu_config("hymba_1_5b"))


def q_width(model) -> int:
    return model.cfg.n_heads * model.cfg.qk_head_dim


def kv_width(model) -> int:
    cfg = model.cfg
    return cfg.n_kv_heads * (cfg.qk_head_dim + cfg.v_head_dim)


# ---- parameters ----------------------------------------------------------------------------------------------
def test_consumer_in_proj_has_no_kv_rows(model):
    ssm_width = 2 * model.cfg.ssm_inner
    producer, consumer = model.layers[PRODUCER].mixer, model.layers[CONSUMER].mixer
    assert producer.attn.owns_kv and not consumer.attn.owns_kv
    assert producer.split == [q_width(model) + kv_width(model), ssm_width]
    assert consumer.split == [q_width(model), ssm_width]
    assert producer.in_proj.weight.shape == (q_width(model) + kv_width(model) + ssm_width, model.cfg.d_model)
    assert consumer.in_proj.weight.shape == (q_width(model) + ssm_width, model.cfg.d_model)
    # Everything else in the two layers has the same shapes: the K/V rows are the only difference.
    assert shapes_besides_in_proj(model.layers[PRODUCER]) == shapes_besides_in_proj(model.layers[CONSUMER])


def shapes_besides_in_proj(layer) -> dict:
    return {name: p.shape for name, p in layer.named_parameters() if name != "mixer.in_proj.weight"}


def test_consumer_gets_no_kv_cache(model):
    state = model.new_inference_state(1, 8, torch.float64, "cpu")
    assert state.kv[PRODUCER] is not None
    assert state.kv[CONSUMER] is None


def test_hymba_1_5b_in_proj_widths_follow_the_kv_groups():
    meta_model = build_on_meta(preset("hymba_1_5b"))
    consumers = {i for g in HYMBA_1_5B_KV_GROUPS for i in g[1:]}
    assert len(consumers) == 15
    for i, layer in enumerate(meta_model.layers):
        kv_rows = 0 if i in consumers else 5 * (64 + 128)
        assert layer.mixer.in_proj.weight.shape == (25 * 64 + kv_rows + 2 * 3200, 1600), i
        assert layer.mixer.in_proj.weight.is_meta


@pytest.mark.parametrize("size", ["tiny", "small", "300m"])
def test_roadmap_d_shares_kv_at_every_size(size):
    assert resolve_layer_plan(preset("roadmap_d", size)).kv_groups


# ---- the consumer reads the producer's K/V -------------------------------------------------------------------
def run_pair(model, x_producer: torch.Tensor, x_consumer: torch.Tensor) -> torch.Tensor:
    """Producer mixer then consumer mixer on one step (the K/V travel through step.kv_bus); consumer output."""
    b, l, _ = x_producer.shape
    step = StepInfo(positions=torch.arange(l).expand(b, l))
    model.layers[PRODUCER].mixer(x_producer, step)
    return model.layers[CONSUMER].mixer(x_consumer, step)


def perturbed_rows_output(model, rows: slice, x_p: torch.Tensor, x_c: torch.Tensor) -> torch.Tensor:
    weight = model.layers[PRODUCER].mixer.in_proj.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[rows] += 0.5 * torch.randn_like(weight[rows])
        out = run_pair(model, x_p, x_c)
        weight.copy_(saved)
    return out


def test_only_the_producers_kv_rows_change_the_consumer_output(model):
    g = torch.Generator().manual_seed(0)
    x_p = torch.randn(2, 7, model.cfg.d_model, dtype=torch.float64, generator=g)
    x_c = torch.randn(2, 7, model.cfg.d_model, dtype=torch.float64, generator=g)
    qw, kvw = q_width(model), kv_width(model)
    with torch.no_grad():
        base = run_pair(model, x_p, x_c)
    kv_changed = perturbed_rows_output(model, slice(qw, qw + kvw), x_p, x_c)
    assert (kv_changed - base).abs().max() > 1e-3 * base.abs().max()
    assert torch.equal(perturbed_rows_output(model, slice(0, qw), x_p, x_c), base)  # producer's Q
    assert torch.equal(perturbed_rows_output(model, slice(qw + kvw, None), x_p, x_c), base)  # producer's SSM


def test_consumer_output_gradient_reaches_only_the_producers_kv_rows(model):
    g = torch.Generator().manual_seed(1)
    x_p = torch.randn(2, 7, model.cfg.d_model, dtype=torch.float64, generator=g)
    x_c = torch.randn(2, 7, model.cfg.d_model, dtype=torch.float64, generator=g)
    model.zero_grad()
    run_pair(model, x_p, x_c).square().sum().backward()
    grad = model.layers[PRODUCER].mixer.in_proj.weight.grad
    qw, kvw = q_width(model), kv_width(model)
    assert (grad[qw:qw + kvw].norm(dim=1) > 0).all()
    assert grad[:qw].abs().max() == 0 and grad[qw + kvw:].abs().max() == 0
    model.zero_grad()


def capture_attention_calls(monkeypatch, function_name: str) -> list[tuple]:
    """Record (q, k, v) of every call of an attention function used by components.attention."""
    calls, original = [], getattr(attention_module, function_name)

    def recording(q, k, v, *args, **kwargs):
        calls.append((q, k, v))
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention_module, function_name, recording)
    return calls


def test_full_forward_consumer_keys_are_the_producers_post_rope_keys(model, monkeypatch):
    calls = capture_attention_calls(monkeypatch, "sequence_attention")
    proj = {}
    hook = model.layers[PRODUCER].mixer.in_proj.register_forward_hook(lambda m, i, out: proj.setdefault("p", out))
    ids = random_tokens(model.cfg.vocab_size, 2, 9, seed=3)
    with torch.no_grad():
        model(ids)
    hook.remove()
    assert len(calls) == model.cfg.n_layers  # one attention call per layer, in layer order
    _, k_producer, v_producer = calls[PRODUCER]
    _, k_consumer, v_consumer = calls[CONSUMER]
    assert torch.equal(k_consumer, k_producer) and torch.equal(v_consumer, v_producer)

    cfg, (b, l, _) = model.cfg, proj["p"].shape
    qw, kw = q_width(model), cfg.n_kv_heads * cfg.qk_head_dim
    k_raw = proj["p"][..., qw:qw + kw].view(b, l, cfg.n_kv_heads, cfg.qk_head_dim)
    v_raw = proj["p"][..., qw + kw:qw + kv_width(model)].view(b, l, cfg.n_kv_heads, cfg.v_head_dim)
    k_expected = rope_by_hand(k_raw, torch.arange(l).expand(b, l)).transpose(1, 2)  # meta tokens included
    torch.testing.assert_close(k_consumer, k_expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(v_consumer, v_raw.transpose(1, 2))


def test_cached_decode_consumer_reads_the_producers_cache_view(model, monkeypatch):
    ids = random_tokens(model.cfg.vocab_size, 2, 8, seed=4)
    state = model.new_inference_state(2, 8, torch.float64, "cpu")
    with torch.no_grad():
        model.forward_cached(ids[:, :6], state)
        calls = capture_attention_calls(monkeypatch, "attention_reference")
        model.forward_cached(ids[:, 6:7], state)
    assert len(calls) == model.cfg.n_layers
    assert torch.equal(calls[CONSUMER][1], calls[PRODUCER][1])
    assert torch.equal(calls[CONSUMER][2], calls[PRODUCER][2])
    # A decode step attends over the producer's cache buffer itself (meta K/V + window slots, this step's key
    # already written into its slot), not over a copy of it.
    ring = state.kv[PRODUCER]
    assert calls[PRODUCER][1].shape[2] == model.cfg.n_meta_tokens + model.cfg.window
    assert calls[PRODUCER][1].data_ptr() == ring.k.data_ptr() and calls[PRODUCER][2].data_ptr() == ring.v.data_ptr()
