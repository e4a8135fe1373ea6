"""experiments/performance/flex_attention_bench.py's configs: FlexAttention kernel options as KEY=VALUE pairs, parsed
and checked before any GPU work (the timing itself needs a GPU and runs on the GPU machine)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "performance" / "flex_attention_bench.py"
sys.path.insert(0, str(SCRIPT.parent))
from flex_attention_bench import CONFIGS, kernel_options  # noqa: E402


def test_configs_parse_into_kernel_options():
    assert kernel_options("default") is None and kernel_options("max-autotune") is None
    assert kernel_options("fwd_BLOCK_M=128,fwd_num_warps=4,USE_TMA=true,PRESCALE_QK=False") == {
        "fwd_BLOCK_M": 128, "fwd_num_warps": 4, "USE_TMA": True, "PRESCALE_QK": False}
    # the defaults the device calls run: torch's own choice first (every config's output is compared with the
    # first's), each named once
    assert CONFIGS[0] == "default" and len(set(CONFIGS)) == len(CONFIGS)
    for config in CONFIGS:
        options = kernel_options(config)
        if config in ("default", "max-autotune"):
            assert options is None
            continue
        # every pair kept, in order, integers as ints and true/false as bools (not the strings FlexAttention rejects)
        assert [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items()] == config.split(",")
        assert all(type(v) in (int, bool) for v in options.values())


@pytest.mark.parametrize("config, message", [
    ("BLOCK_M", "expected KEY=VALUE pairs joined by commas, got 'BLOCK_M'"),
    ("BLOCK_M=64,num_warps=4x", "num_warps='4x' in 'BLOCK_M=64,num_warps=4x' is neither an integer nor true/false"),
])
def test_a_bad_config_is_refused_before_any_gpu_work(config, message):
    result = subprocess.run([sys.executable, str(SCRIPT), "--configs", "default", config], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert f"--configs: {message}" in result.stderr
