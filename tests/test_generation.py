"""Batched generation: left padding is invisible, sampling is seeded, eos cuts rows, the learned init is reused."""
from __future__ import annotations

import pytest
import torch

from components.generation import Generator
from model_factories import build_model, cpu_config, one_cpu_thread, random_tokens  # noqa: F401

PROMPT_LENS = (5, 2, 8)
MAX_NEW = 6


def prompts_for(model, seed: int = 0) -> list[list[int]]:
    return [random_tokens(model.cfg.vocab_size, k, seed=seed + r).tolist() for r, k in enumerate(PROMPT_LENS)]


@pytest.fixture(scope="module", params=["roadmap_e", "hymba_1_5b"])
def model(request):
    # Both have meta tokens and sliding windows (prompt + generation outgrow them); the Hymba one shares KV.
    return build_model(cpu_config(request.param))


def test_greedy_batch_with_left_padding_equals_each_row_alone(model):
    generator = Generator(model)
    prompts = prompts_for(model)
    batched = generator.generate(prompts, MAX_NEW, greedy=True).tokens
    assert batched == [generator.generate([p], MAX_NEW, greedy=True).tokens[0] for p in prompts]
    assert all(len(row) == MAX_NEW for row in batched)


def test_greedy_tokens_and_kept_logits_follow_the_full_forward(model):
    prompts = prompts_for(model)
    out = Generator(model).generate(prompts, MAX_NEW, greedy=True, keep_logits=True)
    assert len(out.step_logits) == MAX_NEW
    with torch.no_grad():
        for r, prompt in enumerate(prompts):
            ids = list(prompt)
            for step in range(MAX_NEW):
                full = model(torch.tensor([ids]))[0, -1]
                kept = out.step_logits[step][r]
                assert (kept.double() - full).abs().max() <= 2e-6 * full.abs().max()
                assert out.tokens[r][step] == int(full.argmax())  # no cache: the plain argmax continuation
                ids.append(out.tokens[r][step])


def test_sampling_with_a_seed_is_reproducible(model):
    generator = Generator(model)
    prompts = prompts_for(model)
    first = generator.generate(prompts, MAX_NEW, greedy=False, temperature=1.5, seed=7).tokens
    assert generator.generate(prompts, MAX_NEW, greedy=False, temperature=1.5, seed=7).tokens == first
    assert generator.generate(prompts, MAX_NEW, greedy=False, temperature=1.5, seed=8).tokens != first


def test_top_k_sampling_stays_in_the_top_k(model):
    generator = Generator(model)
    prompts = prompts_for(model)
    out = generator.generate(prompts, MAX_NEW, greedy=False, top_k=3, seed=1, keep_logits=True)
    for step, logits in enumerate(out.step_logits):
        top3 = logits.topk(3, dim=-1).indices
        for r in range(len(prompts)):
            assert out.tokens[r][step] in top3[r].tolist()
    assert generator.generate(prompts, MAX_NEW, greedy=False, top_k=1, seed=1).tokens == \
        generator.generate(prompts, MAX_NEW, greedy=True).tokens


def test_eos_truncates_each_row_after_its_first_eos(model):
    generator = Generator(model)
    prompts = prompts_for(model)
    full = generator.generate(prompts, MAX_NEW, greedy=True).tokens
    eos = full[0][2]
    cut = generator.generate(prompts, MAX_NEW, greedy=True, eos_id=eos).tokens
    assert cut[0] == full[0][:full[0].index(eos) + 1] and cut[0][-1] == eos and len(cut[0]) <= 3
    for row, whole in zip(cut[1:], full[1:]):
        assert row == (whole[:whole.index(eos) + 1] if eos in whole else whole)


def test_learned_cache_init_is_computed_once_per_generator(model, monkeypatch):
    calls = []
    original = model.learned_cache_init

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "learned_cache_init", counting)
    generator = Generator(model)
    assert len(calls) == 1
    prompts = prompts_for(model)
    generator.generate(prompts, 3)
    generator.generate(prompts[:1], 2, greedy=False, seed=0)
    assert len(calls) == 1
    fresh = original(torch.float64, "cpu")
    for mine, theirs in zip(generator.learned_init.tensors(), fresh.tensors()):
        assert torch.equal(mine, theirs)


def test_zero_new_tokens_gives_empty_rows(model):
    assert Generator(model).generate(prompts_for(model), 0).tokens == [[], [], []]


@pytest.mark.parametrize("prompts", [[], [[1, 2], []]])
def test_empty_prompt_is_rejected(model, prompts):
    with pytest.raises(ValueError, match=r"^generation needs at least one prompt and every prompt needs >= 1 token$"):
        Generator(model).generate(prompts, 3)


def test_a_cuda_graph_needs_room_for_its_capture_steps(model):
    from components.generation import CUDAGraphDecoder

    generator = Generator(model, cuda_graph=False)
    state = generator.new_state(1, 2)
    with pytest.raises(ValueError, match=r"^capturing a decode step runs 3 steps on the inference state: give it "
                                         r"max_len >= 3, got 2$"):
        CUDAGraphDecoder(generator.decode_step, state, generator.learned_init)


def test_sampling_needs_a_positive_temperature(model):
    with pytest.raises(ValueError, match=r"^temperature must be > 0 for sampling, got 0$"):
        Generator(model).generate([[1, 2]], 2, greedy=False, temperature=0)


@pytest.mark.slow
def test_compiled_decode_step_gives_the_eager_tokens_and_logits():
    """Generator(compile=True) runs each decode step through torch.compile (prefill stays eager): same tokens
    and logits as eager steps, with left padding, meta tokens and a window the generation outgrows."""
    from torch._dynamo.utils import counters

    model = build_model(cpu_config("roadmap_e", n_layers=3))
    prompts = prompts_for(model)
    torch._dynamo.reset()
    counters.clear()
    compiled = Generator(model, compile=True).generate(prompts, MAX_NEW, keep_logits=True)
    eager = Generator(model).generate(prompts, MAX_NEW, keep_logits=True)
    # the decode steps really ran compiled, all from one compilation (the step reads no per-step Python value)
    assert counters["stats"]["unique_graphs"] == 1
    assert compiled.tokens == eager.tokens
    for c, e in zip(compiled.step_logits, eager.step_logits):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)
