"""The analytic cache size (components.cache_accounting) equals what InferenceState allocates, and the paper's
Hymba-1.5B numbers (124.7 MB at 16k, 78.6 MB at 8k; DESIGN.md §4) come out of the paper's accounting."""
from __future__ import annotations

import random

import pytest
import torch

from components.cache_accounting import cache_bytes, paper_cache_mb
from components.config import GLOBAL_RULES, LAYER_KINDS, ConfigError, ModelConfig
from components.kv_cache import GlobalKVCache, SlidingWindowKVCache
from components.model import HybridLM
from components.param_count import build_on_meta
from components.presets import preset
from model_factories import one_cpu_thread, random_tokens  # noqa: F401

N_RANDOM_CONFIGS = 20
DTYPES = {torch.bfloat16: 2, torch.float32: 4}


def random_config(rng: random.Random) -> ModelConfig:
    """A small config with a random layer pattern, window, global layers, KV groups, meta tokens and SSM kind."""
    n_layers = rng.randint(2, 6)
    layers = rng.choice(["hybrid", "attention", "ssm", "sequential", "list"])
    if layers == "list":
        layers = [rng.choice(LAYER_KINDS) for _ in range(n_layers)]
    global_layers = rng.choice(list(GLOBAL_RULES) + ["list"])
    if global_layers == "list":
        global_layers = sorted(rng.sample(range(n_layers), rng.randint(0, 2)))
    kv_share = rng.choice([None, 2, 3, "list"])
    if kv_share == "list":
        start = rng.randint(0, n_layers - 2)
        kv_share = [list(range(start, min(start + rng.randint(2, 3), n_layers)))]
    return ModelConfig(
        vocab_size=32, d_model=16, n_layers=n_layers, layers=layers, n_heads=rng.choice([0, 2, 4]),
        n_kv_heads=rng.choice([1, 2]), qk_head_dim=rng.choice([4, 8]), window=rng.choice([None, 1, 3, 6]),
        global_layers=global_layers, kv_share=kv_share, n_meta_tokens=rng.choice([0, 1, 3]),
        ssm=rng.choice(["mamba1", "mamba2"]), ssm_inner=rng.choice([16, 32]), d_state=rng.choice([2, 4]),
        d_conv=rng.choice([2, 3, 4]), ssm_head_dim=8, fusion=rng.choice(["mean", "concat"]), ffn_dim=0,
    )


def random_models(seed: int = 0) -> list[tuple[HybridLM, torch.dtype, int, int]]:
    """N_RANDOM_CONFIGS valid (model, dtype, batch, max_len) draws; invalid configs are skipped."""
    rng, found = random.Random(seed), []
    for _ in range(1000):
        cfg = random_config(rng)
        dtype, batch, max_len = rng.choice(list(DTYPES)), rng.randint(1, 3), rng.randint(1, 20)
        try:
            model = HybridLM(cfg)
        except ConfigError:
            continue
        found.append((model.to(dtype).eval(), dtype, batch, max_len))
        if len(found) == N_RANDOM_CONFIGS:
            return found
    raise AssertionError(f"only {len(found)} valid random configs in 1000 draws")


@pytest.fixture(scope="module")
def models():
    return random_models()


def test_random_configs_cover_the_cache_kinds(models):
    plans = [m.plan for m, *_ in models]
    assert any(s.scope == "global" for p in plans for s in p)
    assert any(s.scope == "local" for p in plans for s in p)
    assert any(p.kv_groups for p in plans)
    assert {m.cfg.ssm for m, *_ in models if any(s.has_ssm for s in m.plan)} == {"mamba1", "mamba2"}
    assert {m.cfg.n_meta_tokens > 0 for m, *_ in models} == {True, False}
    assert {dtype for _, dtype, *_ in models} == set(DTYPES)


def test_allocated_state_size_equals_the_analytic_cache_size(models):
    for model, dtype, batch, max_len in models:
        state = model.new_inference_state(batch, max_len, dtype, "cpu")
        predicted = cache_bytes(model, max_len, batch, DTYPES[dtype], include_meta=True, ssm_state_dtype_bytes=4,
                                full_ring=True)
        assert state.nbytes() == predicted.total, model.cfg
        allocated = {
            "global_kv": sum(c.k.nbytes + c.v.nbytes for c in state.kv if isinstance(c, GlobalKVCache)),
            "local_kv": sum(c.k.nbytes + c.v.nbytes for c in state.kv if isinstance(c, SlidingWindowKVCache)),
            "ssm_state": sum(s.ssm.nbytes for s in state.ssm if s is not None),
            "conv_state": sum(s.conv.nbytes for s in state.ssm if s is not None),
        }
        assert allocated == {k: getattr(predicted, k) for k in allocated}, model.cfg


def test_consumer_layers_and_ssm_only_layers_hold_no_kv(models):
    for model, dtype, batch, max_len in models:
        state = model.new_inference_state(batch, max_len, dtype, "cpu")
        for spec, kv in zip(model.plan, state.kv):
            assert (kv is not None) == spec.owns_kv


def test_state_does_not_grow_while_decoding():
    model = HybridLM(ModelConfig(vocab_size=32, d_model=16, n_layers=3, n_heads=2, n_kv_heads=1, qk_head_dim=4,
                                 ssm_inner=16, window=3, global_layers="first", kv_share=2, n_meta_tokens=2)).eval()
    state = model.new_inference_state(2, 12, torch.float32, "cpu")
    before = state.nbytes()
    with torch.no_grad():
        model.forward_cached(random_tokens(32, 2, 5), state, torch.tensor([0, 2]))
        for t in range(6):
            model.forward_cached(random_tokens(32, 2, 1, seed=t), state)
    assert state.nbytes() == before == cache_bytes(model, 12, 2, 4).total


# ---- the paper's accounting ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hymba_1_5b():
    return build_on_meta(preset("hymba_1_5b"))


@pytest.mark.parametrize("length,paper_mb", [(16384, 124.7), (8192, 78.6)])
def test_hymba_1_5b_cache_matches_the_paper(hymba_1_5b, length, paper_mb):
    assert paper_cache_mb(hymba_1_5b, length) == pytest.approx(paper_mb, rel=0.02)


@pytest.mark.parametrize("length", [100, 8192, 16384])
def test_hymba_1_5b_paper_cache_by_hand(hymba_1_5b, length):
    per_token = 5 * (64 + 128) * 2  # 5 KV heads x (K 64 + V 128) x fp16
    kv = 3 * length * per_token + 14 * min(1024, length) * per_token  # 3 global layers + 14 SWA producers
    ssm = 32 * 3200 * (16 + 3) * 2  # scan state d_inner x d_state + conv state d_inner x (d_conv - 1), fp16
    assert paper_cache_mb(hymba_1_5b, length) * 1e6 == pytest.approx(kv + ssm, abs=1e-3)


def test_serving_accounting_counts_meta_tokens_full_rings_and_float32_scan_state(hymba_1_5b):
    per_token = 5 * (64 + 128) * 2
    got = cache_bytes(hymba_1_5b, 100, batch=3, dtype_bytes=2)
    assert got.global_kv == 3 * 3 * (128 + 100) * per_token
    assert got.local_kv == 3 * 14 * (128 + 1024) * per_token
    assert got.ssm_state == 3 * 32 * 3200 * 16 * 4
    assert got.conv_state == 3 * 32 * 3200 * 3 * 2
