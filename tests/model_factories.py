"""Shared builders for the model tests: every preset at a CPU-test size, seeded models, token batches.

Roadmap/baseline presets run at their `tiny` size with a short sliding window, so a dozen tokens already cross
the window boundary. The Hymba family has fixed, large sizes; for forward tests it is shrunk here while keeping
its structure: global layers (an explicit list for 1.5B, the first/middle/last rule for 125M/350M), KV groups
(explicit for 1.5B, pairs of consecutive local layers for 125M/350M), meta tokens and the dt/B/C RMSNorm.
"""
from __future__ import annotations

from typing import Any, Iterator

import pytest
import torch

from components.config import ModelConfig
from components.model import HybridLM
from components.presets import FAMILY, PRESET_NAMES, preset

TEST_WINDOW = 5  # sliding window used for windowed presets in forward tests (the tiny size has 16)

_SHRUNK_FAMILY_DIMS: dict[str, Any] = dict(
    d_model=32, n_heads=2, n_kv_heads=1, qk_head_dim=8, v_head_dim=16, ssm_inner=32, dt_rank=4, d_state=8,
    ffn_dim=48, vocab_size=64, n_meta_tokens=3, window=4,
)
SHRUNK_FAMILY: dict[str, dict[str, Any]] = {
    # 6 layers: first_middle_last -> globals {0, 2, 5}; kv_share=2 pairs the consecutive local layers [3, 4].
    "hymba_125m": dict(_SHRUNK_FAMILY_DIMS, n_layers=6),
    "hymba_350m": dict(_SHRUNK_FAMILY_DIMS, n_layers=6),
    "hymba_1_5b": dict(_SHRUNK_FAMILY_DIMS, n_layers=4, global_layers=[0, 3], kv_share=[[1, 2]]),
}
assert set(SHRUNK_FAMILY) == set(FAMILY), "a new family preset needs a shrunk test size here"


def cpu_config(name: str, **overrides: Any) -> ModelConfig:
    """`name` at a size small enough for CPU forward tests (see the module docstring)."""
    if name in FAMILY:
        return preset(name, **{**SHRUNK_FAMILY[name], **overrides})
    base = preset(name, "tiny")
    window = {"window": TEST_WINDOW} if base.window is not None else {}
    return preset(name, "tiny", **{**window, **overrides})


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread() -> Iterator[None]:
    """Run a test module on one intra-op thread (import this fixture into the module to apply it).

    Tiny models are dominated by per-op overhead; with two OpenMP threads on a busy 2-core machine each small
    matmul waits for the other thread, which makes these tests several times slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def build_model(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float64) -> HybridLM:
    """A seeded model in eval mode, cast to `dtype` (float64 for tight equality checks)."""
    torch.manual_seed(seed)
    return HybridLM(cfg).to(dtype).eval()


def random_tokens(vocab_size: int, *shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, computed in float64."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def rope_by_hand(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE: x (b, l, h, d), pair (i, i + d/2) rotated by position * theta^(-2i/d)."""
    half = x.shape[-1] // 2
    angle = positions[..., None].double() * theta ** (-2 * torch.arange(half, dtype=torch.float64) / x.shape[-1])
    cos, sin = angle.cos()[:, :, None], angle.sin()[:, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


ALL_PRESETS: tuple[str, ...] = PRESET_NAMES
