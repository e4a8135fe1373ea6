"""Our Llama-style model copied into Hugging Face `LlamaForCausalLM`: same logits, same greedy tokens.

This is what makes the bench's `decode_speedup_vs_hf` a comparison of two decoders of one and the same model.
"""
from __future__ import annotations

import pytest
import torch

from arch_lab.bench.hf_llama import NotLlamaError, _TokenClock, greedy_generate, llama_incompatibility, to_hf_llama
from components.generation import Generator
from components.presets import preset
from model_factories import build_model, one_cpu_thread, random_tokens  # noqa: F401

pytest.importorskip("transformers")

LLAMA_VARIANTS = {
    "transformer_tiny": {},
    "gqa_untied_theta": dict(n_kv_heads=2, tie_embeddings=False, rope_theta=500.0, norm_eps=1e-5),
}


@pytest.mark.parametrize("variant", sorted(LLAMA_VARIANTS))
def test_hf_llama_logits_match_ours(variant: str):
    model = build_model(preset("transformer", "tiny", **LLAMA_VARIANTS[variant]), dtype=torch.float32)
    hf = to_hf_llama(model)
    ids = random_tokens(model.cfg.vocab_size, 3, 40, seed=1)
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_hf_greedy_generate_matches_our_generator():
    # A larger init spreads the logits, so greedy decoding does not settle on one token (a weak comparison).
    model = build_model(preset("transformer", "tiny", n_kv_heads=2, init_std=0.3), dtype=torch.float32)
    hf = to_hf_llama(model)
    prompts = random_tokens(model.cfg.vocab_size, 3, 12, seed=2)
    theirs = greedy_generate(hf, prompts, 10).tolist()
    ours = Generator(model).generate(prompts.tolist(), 10, greedy=True).tokens
    assert theirs == ours
    assert all(len(set(row)) > 2 for row in ours)


def test_generate_puts_the_prompt_then_every_new_token_to_the_clock():
    # measure_hf_decode times from the 2nd put (first generated token) to the last: this is its premise.
    model = build_model(preset("transformer", "tiny"), dtype=torch.float32)
    clock = _TokenClock()
    greedy_generate(to_hf_llama(model), random_tokens(model.cfg.vocab_size, 2, 8), 5, clock)
    assert len(clock.times) == 1 + 5
    assert clock.times == sorted(clock.times)


def test_non_llama_configs_are_named_and_refused():
    cfg = preset("roadmap_e", "tiny")
    reason = llama_incompatibility(cfg)
    for key in ("model.layers='hybrid'", f"model.window={cfg.window}", f"model.n_meta_tokens={cfg.n_meta_tokens}",
                f"model.kv_share={cfg.kv_share}"):
        assert key in reason
    assert llama_incompatibility(preset("transformer", "tiny")) is None
    with pytest.raises(NotLlamaError, match="model 'roadmap_e_tiny' is not Llama-style: model.layers='hybrid'"):
        to_hf_llama(build_model(cfg, dtype=torch.float32))
