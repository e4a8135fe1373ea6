"""Sliding-window + meta-token attention against a dense masked softmax written out by hand.

Reference: softmax(Q K^T / sqrt(d_qk) + M) V with M = 0 where (key <= query) and (query - key < window or the key
is a meta token), -inf elsewhere (DESIGN.md §3); GQA by repeating each K/V head for its group of query heads;
Q/K and V head widths differ.
"""
from __future__ import annotations

import math
from typing import Optional

import pytest
import torch

from components.attention import AttentionHeads
from components.kv_cache import StepInfo
from components.layer_plan import LayerSpec
from components.ops.attention import (HOPPER_FLEX_OPTIONS, _flex_options, additive_mask, allowed_keys,
                                     attention_reference, kernel_sequence_attention, sequence_attention)
from model_factories import one_cpu_thread, rope_by_hand  # noqa: F401

BATCH, SEQ = 2, 11

# (query heads, kv heads, qk dim, v dim, window, meta tokens)
CASES = {
    "gqa_window_meta": (4, 2, 8, 12, 3, 2),
    "mqa_window1_no_meta": (4, 1, 8, 4, 1, 0),
    "mha_global_meta": (2, 2, 6, 10, None, 3),
    "gqa3_window4": (6, 3, 4, 8, 4, 0),
    "window_longer_than_sequence": (4, 4, 8, 8, 20, 2),
}


def hymba_mask(seq: int, window: Optional[int], num_meta: int) -> torch.Tensor:
    """(seq, seq) bool, True where query i may read key j."""
    mask = torch.zeros(seq, seq, dtype=torch.bool)
    for i in range(seq):
        for j in range(i + 1):
            mask[i, j] = window is None or j < num_meta or i - j < window
    return mask


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q (b, hq, lq, d), k (b, hkv, lk, d), v (b, hkv, lk, dv), mask (lq, lk) -> (b, hq, lq, dv)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores + torch.zeros_like(scores).masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def qkv(hq: int, hkv: int, dqk: int, dv: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(BATCH, hq, SEQ, dqk, generator=g, dtype=torch.float64),
            torch.randn(BATCH, hkv, SEQ, dqk, generator=g, dtype=torch.float64),
            torch.randn(BATCH, hkv, SEQ, dv, generator=g, dtype=torch.float64))


def positions() -> torch.Tensor:
    return torch.arange(SEQ).expand(BATCH, SEQ)


@pytest.mark.parametrize("case", list(CASES))
def test_allowed_keys_equals_the_hand_written_mask(case):
    *_, window, meta = CASES[case]
    expected = hymba_mask(SEQ, window, meta).expand(BATCH, 1, SEQ, SEQ)
    assert torch.equal(allowed_keys(positions(), positions(), window, meta), expected)


def test_window_and_meta_tokens_select_the_expected_keys():
    mask = hymba_mask(SEQ, window=3, num_meta=2)
    got = allowed_keys(positions(), positions(), 3, 2)[0, 0]
    assert torch.equal(got, mask)
    assert got[9].nonzero().flatten().tolist() == [0, 1, 7, 8, 9]  # meta 0, 1 + the last 3 tokens
    assert got[3].nonzero().flatten().tolist() == [0, 1, 2, 3]  # the window still reaches the meta tokens
    assert got[1].nonzero().flatten().tolist() == [0, 1]  # meta tokens are causal among themselves


def test_empty_or_padded_key_slots_are_never_visible():
    k_pos = torch.tensor([[0, -1, 2, 3, -1]])
    got = allowed_keys(torch.tensor([[4]]), k_pos, None, 0)
    assert got[0, 0, 0].tolist() == [True, False, True, True, False]


def test_additive_mask_is_zero_where_allowed_and_gives_the_boolean_masks_attention():
    allowed = allowed_keys(positions(), positions(), 3, 1)
    bias = additive_mask(allowed, torch.float64)
    assert bias.dtype == torch.float64 and bias.shape == allowed.shape
    assert (bias[allowed] == 0).all() and (bias[~allowed] == float("-inf")).all()
    q, k, v = qkv(*CASES["gqa_window_meta"][:4])
    torch.testing.assert_close(attention_reference(q, k, v, bias), attention_reference(q, k, v, allowed),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_sequence_attention_reference_equals_dense_masked_softmax(case):
    hq, hkv, dqk, dv, window, meta = CASES[case]
    q, k, v = qkv(hq, hkv, dqk, dv)
    got = sequence_attention(q, k, v, positions(), window, meta, backend="reference")
    expected = dense_attention(q, k, v, hymba_mask(SEQ, window, meta))
    assert got.shape == (BATCH, hq, SEQ, dv)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["gqa_window_meta", "gqa3_window4"])
def test_keys_in_ring_buffer_order_with_empty_slots_give_the_same_attention(case):
    # Cached layers hold keys in ring order, plus never-written slots (position -1, garbage values): only the
    # keys' positions may decide visibility.
    hq, hkv, dqk, dv, window, meta = CASES[case]
    q, k, v = qkv(hq, hkv, dqk, dv)
    order = torch.randperm(SEQ, generator=torch.Generator().manual_seed(1))
    junk_k, junk_v = 1e3 * torch.ones(BATCH, hkv, 2, dqk, dtype=q.dtype), torch.ones(BATCH, hkv, 2, dv, dtype=q.dtype)
    k_shuffled = torch.cat([k[:, :, order], junk_k], dim=2)
    v_shuffled = torch.cat([v[:, :, order], junk_v], dim=2)
    k_pos = torch.cat([order, torch.tensor([-1, -1])]).expand(BATCH, -1)
    got = attention_reference(q, k_shuffled, v_shuffled, allowed_keys(positions(), k_pos, window, meta))
    torch.testing.assert_close(got, dense_attention(q, k, v, hymba_mask(SEQ, window, meta)), rtol=1e-12, atol=1e-12)


LAYER_CASES = [(case, scope) for case in CASES for scope in ("local", "global")
               if scope == "global" or CASES[case][4] is not None]


@pytest.mark.parametrize("case,scope", LAYER_CASES)
def test_attention_heads_layer_equals_rope_plus_dense_reference(case, scope):
    hq, hkv, dqk, dv, window, meta = CASES[case]
    spec = LayerSpec(index=0, kind="attention", scope=scope, kv_owner=0, meta_tokens=meta)
    heads = AttentionHeads(spec, hq, hkv, dqk, dv, window, meta, rope_theta=10000.0)
    heads.backend = "reference"
    assert heads.proj_width == hq * dqk + hkv * (dqk + dv)
    assert heads.out_width == hq * dv
    proj = torch.randn(BATCH, SEQ, heads.proj_width, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = heads(proj, StepInfo(positions=positions()))

    q, k, v = proj.split([hq * dqk, hkv * dqk, hkv * dv], dim=-1)
    q = rope_by_hand(q.view(BATCH, SEQ, hq, dqk), positions()).transpose(1, 2)
    k = rope_by_hand(k.view(BATCH, SEQ, hkv, dqk), positions()).transpose(1, 2)
    v = v.view(BATCH, SEQ, hkv, dv).transpose(1, 2)
    mask = hymba_mask(SEQ, window if scope == "local" else None, meta)  # a global layer ignores the window
    expected = dense_attention(q, k, v, mask).transpose(1, 2).reshape(BATCH, SEQ, hq * dv)
    # RoPE angles are computed in float32 (as the kernels do), so ~1e-7 relative, not float64 round-off.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compiled", [False, True])
def test_kernel_path_flex_attention_equals_dense_masked_softmax_without_tracing_caches(compiled):
    """FlexAttention (compiled here on the CPU) with the window + meta block mask gives the reference, eagerly and
    inside a compiled function; there its masks are built in the graph, so Dynamo never meets the eager path's
    lru_caches (it would trace through them, warning on every compiled model's first step)."""
    import warnings

    from components.ops.attention import flex_takes

    hq, hkv, dqk, dv, window, meta = 4, 2, 16, 32, 3, 2  # heads FlexAttention takes (CASES' are narrower)
    assert flex_takes(dqk, dv)
    q, k, v = (t.float() for t in qkv(hq, hkv, dqk, dv))
    fn = torch.compile(kernel_sequence_attention, fullgraph=True) if compiled else kernel_sequence_attention
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = fn(q, k, v, window, meta)
    expected = dense_attention(q, k, v, hymba_mask(SEQ, window, meta))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not [str(w.message) for w in caught if "lru_cache" in str(w.message)]


def test_hopper_flex_options_are_options_flex_attention_takes_and_stay_off_the_cpu():
    """The tuned FlexAttention tiles name options of torch's FlexKernelOptions (a misspelt key would be passed to the
    kernel template unread), each for one pass, and only Hopper GPUs get them."""
    from typing import get_type_hints

    from torch.nn.attention.flex_attention import FlexKernelOptions

    known = set(get_type_hints(FlexKernelOptions))
    for key in HOPPER_FLEX_OPTIONS:
        prefix, _, option = key.partition("_")
        assert prefix in ("fwd", "bwd") and option in known, key
    assert _flex_options(torch.zeros(1)) is None


def test_flex_attention_takes_only_power_of_two_heads_from_16_to_128():
    from components.ops.attention import flex_takes

    assert flex_takes(16, 16) and flex_takes(64, 128) and flex_takes(128, 32)
    assert not flex_takes(16, 8) and not flex_takes(64, 256)  # Inductor's limits
    assert not flex_takes(16, 26) and not flex_takes(48, 64)  # no kernel for a float32 batch (H200)
