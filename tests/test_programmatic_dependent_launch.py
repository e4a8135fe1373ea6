"""Programmatic dependent launch for the compiled decode step (Generator's `pdl`, the bench's decode_pdl): the option
must reach torch.compile, and a bad value is named. On a GPU, decoding with it gives what decoding without it gives
(test_model_gpu_parity.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from arch_lab.bench.__main__ import BenchConfigError, BenchSettings
from components.generation import Generator
from components.model import HybridLM
from model_factories import cpu_config


@pytest.fixture
def compile_calls(monkeypatch) -> list[dict]:
    """The `options` of every torch.compile call, which still compiles."""
    calls, compile_ = [], torch.compile

    def recorded(*args, **kwargs):
        calls.append(kwargs.get("options"))
        return compile_(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", recorded)
    return calls


@pytest.mark.parametrize("pdl", [True, False])
def test_generator_compiles_the_decode_step_with_its_pdl(pdl: bool, compile_calls) -> None:
    Generator(HybridLM(cpu_config("roadmap_e")), cuda_graph=False, compile=True, pdl=pdl)
    assert compile_calls == [{"triton.enable_pdl": pdl}]


def test_generator_uses_pdl_by_default(compile_calls) -> None:
    Generator(HybridLM(cpu_config("roadmap_e")), cuda_graph=False, compile=True)
    assert compile_calls == [{"triton.enable_pdl": True}]


def bench_cfg(**overrides):
    cfg = OmegaConf.load(Path(__file__).parents[1] / "conf" / "bench.yaml")
    cfg.merge_with(overrides)
    return cfg


def test_bench_reads_decode_pdl() -> None:
    assert BenchSettings.from_cfg(bench_cfg(), cuda_available=False).decode_pdl is True
    assert BenchSettings.from_cfg(bench_cfg(decode_pdl=False), cuda_available=False).decode_pdl is False


def test_bench_names_a_bad_decode_pdl() -> None:
    with pytest.raises(BenchConfigError, match=r"decode_pdl must be true or false; got 'yes'"):
        BenchSettings.from_cfg(bench_cfg(decode_pdl="yes"), cuda_available=False)
