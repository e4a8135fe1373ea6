"""experiments/performance/decode_attention_bench.py on a CPU: its grouped-matmul way computes the model's decode
attention (the timing itself needs a GPU and runs on the GPU machine), and the script refuses to run without one."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from components.kv_cache import GlobalKVCache, SlidingWindowKVCache
from components.ops.attention import allowed_keys, attention_reference

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "performance" / "decode_attention_bench.py"
sys.path.insert(0, str(SCRIPT.parent))
from decode_attention_bench import cache_inputs, grouped_matmul_attention  # noqa: E402


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
    torch.testing.assert_close(grouped_matmul_attention(q, k, v, allowed), attention_reference(q, k, v, allowed),
                               rtol=1e-5, atol=1e-5)


def test_the_bench_attends_over_the_labs_caches_after_they_take_the_token_at_the_context():
    """A ring of 4 after 3 meta slots holds the last 4 tokens, all allowed; a global buffer of 14 slots holds 11
    tokens (0..10) and masks the 3 not yet written."""
    shared = dict(batch=2, n_kv=2, qk_dim=8, v_dim=16, num_meta=3, dtype=torch.float32, device="cpu")
    q, k, v, allowed = cache_inputs(SlidingWindowKVCache(window=4, **shared), 2, 8, 10, 4, 3)
    assert q.shape == (2, 8, 1, 8) and k.shape == (2, 2, 7, 8) and v.shape == (2, 2, 7, 16)
    assert allowed.shape == (2, 1, 1, 7) and bool(allowed.all())
    _, k, _, allowed = cache_inputs(GlobalKVCache(max_len=14, **shared), 2, 8, 10, None, 3)
    assert k.shape[2] == 17 and allowed[0, 0, 0].tolist() == [True] * 14 + [False] * 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gets")
def test_without_a_gpu_the_script_says_so():
    result = subprocess.run([sys.executable, str(SCRIPT), "--ways", "sdpa"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr
