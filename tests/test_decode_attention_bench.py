"""experiments/performance/decode_attention_bench.py on a CPU: its grouped-matmul way and its split-KV Triton kernel
(split_kv_attention.py, in Triton's interpreter: TRITON_INTERPRET=1, set by conftest.py) compute the model's decode
attention (the timing itself needs a GPU and runs on the GPU machine), and the script refuses to run without one."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from components.kv_cache import GlobalKVCache, SlidingWindowKVCache
from components.ops.attention import additive_mask, allowed_keys, attention_reference

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "performance" / "decode_attention_bench.py"
sys.path.insert(0, str(SCRIPT.parent))
from decode_attention_bench import cache_inputs, failure_reason, grouped_matmul_attention  # noqa: E402
from split_kv_attention import decode_attention, parse_launch  # noqa: E402


def test_grouped_matmul_way_matches_the_models_attention_over_a_ring():
    """8 query heads over 2 KV heads; a ring of 6 after 3 meta slots, one slot still empty (-1) in row 0."""
    g = torch.Generator().manual_seed(0)
    batch, meta, window = 3, 3, 6
    q = torch.randn(batch, 8, 1, 16, generator=g)
    k, v = torch.randn(batch, 2, meta + window, 16, generator=g), torch.randn(batch, 2, meta + window, 32, generator=g)
    positions = torch.cat([torch.arange(meta), torch.arange(meta + 4, meta + 10)])[None].repeat(batch, 1)
    positions[0, -1] = -1
    allowed = allowed_keys(torch.full((batch, 1), meta + 9), positions, window, meta)
    assert not allowed[0, 0, 0, -1] and allowed[1, 0, 0, -1]
    bias = additive_mask(allowed, q.dtype)
    torch.testing.assert_close(grouped_matmul_attention(q, k, v, bias), attention_reference(q, k, v, bias),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blocks", ["32x16x4x1", "128x32x4x2"])
def test_split_kv_kernel_matches_sdpa_with_masked_keys_and_whole_masked_splits(blocks):
    """8 query heads over 2 KV heads (and 3 over 3, one query head each): 70 keys, not a multiple of a block; the
    first 3 and, in row 0, keys 32-63 (all of a 32-key split) masked; the splits' merge must weigh them by zero."""
    g = torch.Generator().manual_seed(1)
    for heads, kv_heads in ((8, 2), (3, 3)):
        q = torch.randn(2, 1, heads, 32, generator=g).transpose(1, 2)  # strided, as the model's queries
        k, v = torch.randn(2, kv_heads, 70, 32, generator=g), torch.randn(2, kv_heads, 70, 16, generator=g)
        allowed = torch.rand(2, 1, 1, 70, generator=g) > 0.3
        allowed[..., :3] = False
        allowed[0, ..., 32:64] = False
        allowed[..., -1] = True
        bias = additive_mask(allowed, q.dtype)
        out = decode_attention(q, k, v, bias, **parse_launch(blocks))
        torch.testing.assert_close(out, attention_reference(q, k, v, bias), rtol=1e-5, atol=1e-5)


def test_split_kv_launch_strings_are_checked():
    assert parse_launch("512x64x4x3") == dict(split_keys=512, block_keys=64, warps=4, stages=3)
    with pytest.raises(ValueError, match="multiple of block keys"):
        parse_launch("100x64x4x3")
    for bad in ("512x64x4", "512x64x0x3", "512x64xfourx3"):
        with pytest.raises(ValueError, match="four positive integers"):
            parse_launch(bad)


def test_the_bench_attends_over_the_labs_caches_after_they_take_the_token_at_the_context():
    """A ring of 4 after 3 meta slots holds the last 4 tokens, all allowed; a global buffer of 14 slots holds 11
    tokens (0..10) and masks the 3 not yet written."""
    shared = dict(batch=2, n_kv=2, qk_dim=8, v_dim=16, num_meta=3, dtype=torch.float32, device="cpu")
    q, k, v, bias = cache_inputs(SlidingWindowKVCache(window=4, **shared), 2, 8, 10, 4, 3)
    assert q.shape == (2, 8, 1, 8) and k.shape == (2, 2, 7, 8) and v.shape == (2, 2, 7, 16)
    assert bias.shape == (2, 1, 1, 7) and bool((bias == 0).all())
    _, k, _, bias = cache_inputs(GlobalKVCache(max_len=14, **shared), 2, 8, 10, None, 3)
    assert k.shape[2] == 17 and (bias[0, 0, 0] == 0).tolist() == [True] * 14 + [False] * 3


def test_a_failed_way_reports_the_uncompiled_calls_error_or_else_the_compiled_ones():
    """Dynamo's error names its graph node and arguments; the uncompiled call's says why (as SDPA's 'No available
    kernel' for its memory-efficient kernel with GQA and a mask)."""
    def no_kernel(*_):
        raise RuntimeError("No available kernel. Aborting execution.\nmore detail")

    compiled_error = ValueError("Dynamo failed to run FX node with fake tensors: ...\nSet TORCHDYNAMO_VERBOSE=1")
    assert failure_reason(no_kernel, (1,), compiled_error) == "RuntimeError: No available kernel. Aborting execution."
    assert failure_reason(lambda *_: None, (1,), compiled_error) == (
        "ValueError: Dynamo failed to run FX node with fake tensors: ...")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gets")
def test_without_a_gpu_the_script_says_so():
    result = subprocess.run([sys.executable, str(SCRIPT), "--ways", "sdpa"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr
