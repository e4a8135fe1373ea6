"""Programmatic dependent launch for the compiled decode step (Generator's `pdl`): the option must reach
torch.compile. The bench's decode_pdl key is checked with the other bench keys (test_bench.py); on a GPU, decoding
with it gives what decoding without it gives (test_model_gpu_parity.py)."""
from __future__ import annotations

import pytest
import torch

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

