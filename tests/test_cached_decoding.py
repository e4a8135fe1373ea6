"""Cached inference (prefill + token-by-token decode) gives the full forward pass's logits, for every preset.

Each batch mixes left-padded rows of different lengths (the padding holds random tokens, which must not matter),
and every sequence outgrows the sliding window (the tests' window is 4-5 tokens), so the ring buffer wraps both
inside the prefill and during decoding. Models are float64; the SSM reference keeps float32 inside, so cached and
full logits agree to ~1e-7 relative, not to float64 round-off.
"""
from __future__ import annotations

import pytest
import torch

import components.attention as attention_module
import components.ssm_heads as ssm_heads_module
from components.kv_cache import GlobalKVCache, SlidingWindowKVCache
from components.model import HybridLM
from model_factories import ALL_PRESETS, build_model, cpu_config, one_cpu_thread, random_tokens, rel_err  # noqa: F401

PROMPT_LENS = (7, 3, 1)  # 7 > window: the prefill itself wraps the ring; the others cross it while decoding
N_DECODE = 6
TOLERANCE = 2e-6  # max |cached - full| relative to max |full|; observed <= 3e-7


def rows_for(model: HybridLM, prompt_lens=PROMPT_LENS, n_decode=N_DECODE, seed=0) -> list[torch.Tensor]:
    return [random_tokens(model.cfg.vocab_size, k + n_decode, seed=seed + r) for r, k in enumerate(prompt_lens)]


def cached_logits(model: HybridLM, rows: list[torch.Tensor], prompt_lens, dtype=torch.float64,
                  junk_seed: int = 99) -> list[torch.Tensor]:
    """Left-padded prefill of each row's prompt, then teacher-forced decoding of the rest of every row.

    Returns per row the logits (len(row), vocab) at its real positions.
    """
    n_decode = len(rows[0]) - prompt_lens[0]
    assert all(len(row) - k == n_decode for row, k in zip(rows, prompt_lens))
    width = max(prompt_lens)
    ids = random_tokens(model.cfg.vocab_size, len(rows), width, seed=junk_seed)  # junk under the padding
    for r, (row, k) in enumerate(zip(rows, prompt_lens)):
        ids[r, width - k:] = row[:k]
    pad = torch.tensor([width - k for k in prompt_lens])
    state = model.new_inference_state(len(rows), width + n_decode, dtype, "cpu")
    with torch.no_grad():
        prefill = model.forward_cached(ids, state, pad)
        out = [[prefill[r, width - k + t] for t in range(k)] for r, k in enumerate(prompt_lens)]
        for step in range(n_decode):
            token = torch.stack([row[k + step] for row, k in zip(rows, prompt_lens)])[:, None]
            logits = model.forward_cached(token, state)
            for r in range(len(rows)):
                out[r].append(logits[r, 0])
    return [torch.stack(o) for o in out]


def assert_matches_full_forward(model: HybridLM, rows: list[torch.Tensor], cached: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for r, row in enumerate(rows):
            full = model(row[None])[0]  # this row alone, unpadded
            err = (cached[r].double() - full.double()).abs().max() / full.abs().max()
            assert err <= TOLERANCE, f"row {r}: relative error {err:.2e}"


# ---- every preset --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_PRESETS)
def test_prefill_then_decode_equals_full_forward(name):
    model = build_model(cpu_config(name))
    rows = rows_for(model)
    assert_matches_full_forward(model, rows, cached_logits(model, rows, PROMPT_LENS))


VARIANTS = {
    # The tiny budget can't be met with Mamba-2 hybrid heads (ssm_inner moves in steps of 8), so fix the width.
    "mamba2_hybrid_with_meta": ("roadmap_e", dict(ssm="mamba2", param_budget=None, ssm_inner=64)),
    "concat_fusion_with_meta": ("roadmap_e", dict(fusion="concat")),
    "hymba_mamba2_concat": ("hymba_1_5b", dict(ssm="mamba2", ssm_head_dim=8, fusion="concat")),
    "mamba2_chunks_shorter_than_prompt": ("mamba2", dict(ssm_chunk_size=2)),
    "more_meta_tokens_than_window": ("roadmap_e", dict(n_meta_tokens=7)),
    "window_of_one": ("roadmap_e", dict(window=1)),
    "kv_group_of_three": ("hymba_1_5b", dict(n_layers=5, global_layers=[0, 4], kv_share=[[1, 2, 3]])),
    "no_dt_bc_norm": ("hymba_1_5b", dict(dt_bc_norm=False)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_prefill_then_decode_equals_full_forward(variant):
    name, overrides = VARIANTS[variant]
    model = build_model(cpu_config(name, **overrides))
    rows = rows_for(model, seed=10)
    assert_matches_full_forward(model, rows, cached_logits(model, rows, PROMPT_LENS))


def test_single_row_without_padding():
    model = build_model(cpu_config("hymba_125m"))
    rows = rows_for(model, prompt_lens=(4,), n_decode=9)
    assert_matches_full_forward(model, rows, cached_logits(model, rows, (4,)))


@pytest.mark.parametrize("name", ["roadmap_e", "mamba2", "hymba_1_5b"])
def test_tokens_under_the_padding_do_not_matter_at_all(name):
    model = build_model(cpu_config(name))
    rows = rows_for(model)
    first = cached_logits(model, rows, PROMPT_LENS, junk_seed=1)
    second = cached_logits(model, rows, PROMPT_LENS, junk_seed=2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)  # masked exactly, not approximately


def test_bf16_cached_decoding_is_finite_and_close_to_fp32():
    cfg = cpu_config("hymba_1_5b")
    reference = build_model(cfg, dtype=torch.float32)
    model = build_model(cfg, dtype=torch.bfloat16)
    rows = rows_for(model)
    cached = cached_logits(model, rows, PROMPT_LENS, dtype=torch.bfloat16)
    with torch.no_grad():
        for r, row in enumerate(rows):
            assert cached[r].dtype == torch.bfloat16 and torch.isfinite(cached[r]).all()
            assert rel_err(cached[r], reference(row[None])[0]) < 5e-2


# ---- chunked prefill -----------------------------------------------------------------------------------------
def chunked_logits(model: HybridLM, rows: list[torch.Tensor], pad: list[int], first: int,
                   chunk: int) -> list[torch.Tensor]:
    """Left-padded rows run as a `first`-position prefill, a `chunk`-position prefill, then one-token decode steps.

    Returns per row the logits at its real positions after the first chunk.
    """
    padded = torch.stack([torch.cat([torch.zeros(p, dtype=torch.long), row]) for row, p in zip(rows, pad)])
    width = padded.shape[1]
    state = model.new_inference_state(len(rows), width, torch.float64, "cpu")
    with torch.no_grad():
        model.forward_cached(padded[:, :first], state, torch.tensor(pad))
        outs = [model.forward_cached(padded[:, first:first + chunk], state)]
        outs += [model.forward_cached(padded[:, t:t + 1], state) for t in range(first + chunk, width)]
    logits = torch.cat(outs, dim=1)  # padded positions first .. width - 1
    return [logits[r, max(p - first, 0):] for r, p in enumerate(pad)]


def assert_chunked_matches_full_forward(name: str, pad: list[int], first: int, chunk: int) -> None:
    model = build_model(cpu_config(name))
    width = first + chunk + 2  # two decode steps after the second chunk
    rows = [random_tokens(model.cfg.vocab_size, width - p, seed=r) for r, p in enumerate(pad)]
    got = chunked_logits(model, rows, pad, first, chunk)
    with torch.no_grad():
        for r, (row, p) in enumerate(zip(rows, pad)):
            full = model(row[None])[0, max(first - p, 0):]
            assert (got[r] - full).abs().max() <= TOLERANCE * full.abs().max(), f"row {r}"


@pytest.mark.parametrize("name", ["roadmap_e", "mamba2", "hymba_1_5b"])
def test_two_prefill_chunks_without_padding_equal_full_forward(name):
    assert_chunked_matches_full_forward(name, pad=[0, 0], first=5, chunk=6)


@pytest.mark.parametrize("name,pad,first,chunk", [
    ("roadmap_e", [0, 1], 6, 3), ("mamba2", [0, 1], 6, 3),
    ("mamba", [0, 4], 6, 3),  # pad > chunk length
    ("hymba_1_5b", [0, 5], 3, 4),  # the padding runs past the first chunk
], ids=["roadmap_e", "mamba2", "mamba-pad_longer_than_chunk", "hymba_1_5b-padding_spans_two_chunks"])
def test_prefill_chunk_after_a_left_padded_prefill_equals_full_forward(name, pad, first, chunk):
    assert_chunked_matches_full_forward(name, pad, first, chunk)


def test_state_rejects_more_tokens_than_max_len():
    model = build_model(cpu_config("roadmap_e"))
    state = model.new_inference_state(1, 4, torch.float64, "cpu")
    with torch.no_grad():
        model.forward_cached(random_tokens(model.cfg.vocab_size, 1, 3), state)
        with pytest.raises(ValueError, match=r"^5 tokens exceed the inference state's max_len=4$"):
            model.forward_cached(random_tokens(model.cfg.vocab_size, 1, 2), state)


def test_ids_of_the_wrong_shape_are_refused_with_the_shape_expected():
    model = build_model(cpu_config("roadmap_e"))
    state = model.new_inference_state(2, 8, torch.float64, "cpu")
    ids = random_tokens(model.cfg.vocab_size, 1, 3)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"^input_ids must be \(batch, length\) token ids, got shape \(3,\)$"):
            model(ids[0])  # an embedding of 1-D ids would fail later, deep in a layer
        with pytest.raises(ValueError, match=r"for the inference state's batch of 2, got shape \(1, 3\)$"):
            model.forward_cached(ids, state)


# ---- learned cache initialization (paper §2.4) ---------------------------------------------------------------
@pytest.mark.parametrize("name,overrides", [("roadmap_e", {}), ("hymba_1_5b", {}),
                                            ("hymba_1_5b", dict(ssm="mamba2", ssm_head_dim=8, n_meta_tokens=2))])
def test_fresh_state_holds_the_meta_tokens_kv_and_ssm_state(name, overrides, monkeypatch):
    """A fresh state's meta K/V and SSM/conv states equal what a full forward computes for the meta positions."""
    model = build_model(cpu_config(name, **overrides))
    m = model.cfg.n_meta_tokens
    state = model.new_inference_state(2, 4, torch.float64, "cpu")  # before any patching below

    attention_calls, scan_calls, ssm_inputs = {}, {}, {}

    def record_ssm_input(index: int):
        def hook(module, args) -> None:
            ssm_inputs[index] = args[0]
        return hook

    for i, layer in enumerate(model.layers):
        layer.mixer.ssm.register_forward_pre_hook(record_ssm_input(i))
    layer_of_call = iter(range(model.cfg.n_layers))
    scan_name = "ssd_scan" if model.cfg.ssm == "mamba2" else "selective_scan"
    original_scan = getattr(ssm_heads_module, scan_name)
    original_attention = attention_module.sequence_attention

    def recording_attention(q, k, v, *args, **kwargs):
        attention_calls[len(attention_calls)] = (k, v)
        return original_attention(q, k, v, *args, **kwargs)

    def recording_scan(*args, **kwargs):
        scan_calls[next(layer_of_call)] = (args, kwargs)
        return original_scan(*args, **kwargs)

    monkeypatch.setattr(attention_module, "sequence_attention", recording_attention)
    monkeypatch.setattr(ssm_heads_module, scan_name, recording_scan)
    with torch.no_grad():
        model(random_tokens(model.cfg.vocab_size, 1, 5))

    for i, layer in enumerate(model.layers):
        kv, ssm = state.kv[i], state.ssm[i]
        if layer.mixer.attn.owns_kv:  # every layer has attention heads in these presets
            k, v = attention_calls[i]
            # Earlier layers' SSM outputs carry float32 round-off (chunking depends on the length): ~1e-7.
            torch.testing.assert_close(kv.k[:, :, :m], k[:, :, :m].expand(2, -1, -1, -1), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(kv.v[:, :, :m], v[:, :, :m].expand(2, -1, -1, -1), rtol=1e-5, atol=1e-6)
        else:
            assert kv is None
        heads = layer.mixer.ssm
        proj = ssm_inputs[i][0]  # (m + l, proj_width) of the one row
        conv_in = proj[:, :heads.d_inner] if scan_name == "selective_scan" else \
            proj[:, heads.d_inner:heads.d_inner + heads.conv_channels]
        hist = heads.d_conv - 1
        expected_conv = torch.cat([torch.zeros(max(hist - m, 0), conv_in.shape[1], dtype=proj.dtype),
                                   conv_in[max(m - hist, 0):m]]).T
        torch.testing.assert_close(ssm.conv, expected_conv.expand(2, -1, -1), rtol=1e-5, atol=1e-6)
        expected_ssm = scan_state_after(original_scan, *scan_calls[i], m)
        torch.testing.assert_close(ssm.ssm, expected_ssm.expand_as(ssm.ssm), rtol=1e-5, atol=1e-6)


def scan_state_after(scan, args: tuple, kwargs: dict, m: int) -> torch.Tensor:
    """Re-run a recorded full-sequence scan (selective_scan or ssd_scan) over its first m steps; its end state."""
    if len(args) == 7:  # selective_scan(u, delta, A, B, C, D, z): time is the last axis
        u, delta, A, B, C, D, z = args
        _, last = scan(u[..., :m], delta[..., :m], A, B[..., :m], C[..., :m], D, z[..., :m], return_last_state=True,
                       **kwargs)
        return last
    x, dt, A, B, C = args  # ssd_scan: time is axis 1
    _, last = scan(x[:, :m], dt[:, :m], A, B[:, :m], C[:, :m], return_final_state=True, **kwargs)
    return last


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "lm_head"])
def test_inference_logits_equal_logits_in_rows_for_a_step_and_vocabulary_major_for_a_prefill(tied):
    """The cached path's LM head multiplies (W h^T): the same values as `logits`. A prefill's are a view of the
    (vocab, b * l) product, which leaves the matmul's rows aligned for a vocabulary that is not a multiple of 8;
    a decode step's are copied to contiguous rows, which its sampler reduces over."""
    model = build_model(cpu_config("roadmap_e", vocab_size=61, tie_embeddings=tied))
    assert (model.lm_head is None) == tied
    for length, strides in [(2, (2, 1, 6)), (1, (61, 61, 1))]:
        h = torch.randn(3, length, model.cfg.d_model, dtype=torch.float64)
        with torch.no_grad():
            expected, actual = model.logits(h), model.inference_logits(h)
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
        assert actual.shape == (3, length, 61) and actual.stride() == strides


def test_a_decode_step_builds_each_kind_of_key_positions_and_each_scopes_mask_once(monkeypatch):
    """Caches of one kind hold the same key positions in a step, and layers of one scope attend with the same mask:
    `StepInfo.once` builds each once a step (a decode step or a prefill chunk), where every layer built its own
    (the logits stay those of the full forward: the tests above)."""
    model = build_model(cpu_config("roadmap_e"))
    state = model.new_inference_state(2, 12, torch.float64, "cpu")
    kinds = [type(cache) for cache in state.kv if cache is not None]
    assert kinds.count(GlobalKVCache) == 3 and kinds.count(SlidingWindowKVCache) == 2
    built = []
    for cls, name in [(GlobalKVCache, "_positions"), (SlidingWindowKVCache, "_ring_positions")]:
        original = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda self, *a, original=original, name=name: built.append(name)
                            or original(self, *a))
    original_mask = attention_module.allowed_keys
    monkeypatch.setattr(attention_module, "allowed_keys", lambda q, k, window, m: built.append(f"mask {window}")
                        or original_mask(q, k, window, m))
    with torch.no_grad():
        model.forward_cached(random_tokens(model.cfg.vocab_size, 2, 6), state)
        # a prefill chunk builds each once too
        assert sorted(built) == ["_positions", "_ring_positions", "mask 5", "mask None"]
        built.clear()
        model.forward_cached(random_tokens(model.cfg.vocab_size, 2, 1, seed=1), state)
    assert sorted(built) == ["_positions", "_ring_positions", "mask 5", "mask None"]


def test_a_prefill_can_return_the_last_positions_logits_alone():
    """`last_only` projects only the last position (what a prompt's prefill needs; Generator.prefill asks for it):
    the same logits as the full chunk's last row, and the same state after."""
    model = build_model(cpu_config("roadmap_e"))
    ids = random_tokens(model.cfg.vocab_size, 2, 7)
    states = [model.new_inference_state(2, 8, torch.float64, "cpu") for _ in range(2)]
    with torch.no_grad():
        every = model.forward_cached(ids, states[0])
        last = model.forward_cached(ids, states[1], last_only=True)
        assert every.shape == (2, 7, model.cfg.vocab_size) and last.shape == (2, 1, model.cfg.vocab_size)
        torch.testing.assert_close(last, every[:, -1:], rtol=1e-12, atol=1e-12)
        token = ids[:, :1]
        torch.testing.assert_close(model.forward_cached(token, states[1]), model.forward_cached(token, states[0]),
                                   rtol=1e-12, atol=1e-12)
