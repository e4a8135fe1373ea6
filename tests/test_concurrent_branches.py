"""A hybrid layer's decode step with its branches side by side (ops/concurrent_branches.py) on the CPU, the Triton
step in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py), registered for this module's tests as the
CUDA-only ops' CPU kernels: the op's registration, and a model's decode through it against the same decode with the
branches one after the other. On a GPU the two streams are tested by test_model_gpu_parity.py."""
from __future__ import annotations

import pytest
import torch

from components.generation import Generator
from components.ops.attention import additive_mask
from components.ops.backend import BackendError
from components.ssm_heads import Mamba1Heads, SSMState
from model_factories import cpu_config

pytest.importorskip("triton")
if torch.cuda.is_available():  # conftest.py turns the interpreter on for CPU machines only
    pytest.skip("the GPU tests run the compiled kernels on two streams", allow_module_level=True)
from components.model import HybridLM  # noqa: E402 - after the skips
from components.ops import concurrent_branches, custom_ops  # noqa: E402


@pytest.fixture
def ops_on_cpu(monkeypatch):
    """The fused step and the side-by-side op run (interpreted) on CPU tensors, and Mamba1Heads takes the fused
    step there as it would on a GPU; returns the list of the side-by-side op's calls."""
    import components.ssm_heads as ssm_heads_module

    calls = []

    def side_by_side(*args):
        calls.append(args)
        return concurrent_branches.attention_beside_mamba1_step._init_fn(*args)

    monkeypatch.setattr(ssm_heads_module, "resolve_backend", lambda requested, tensor, op: "kernel")
    with torch.library._scoped_library("arch_lab", "IMPL") as lib:
        lib.impl("mamba1_step", custom_ops.mamba1_step_kernel._init_fn, "CPU")
        lib.impl("attention_beside_mamba1_step", side_by_side, "CPU")
        yield calls


def step_args(batch: int = 3, keys: int = 7) -> tuple:
    """A decode step's attention inputs (4 query heads over 2 key/value heads) and a Mamba1Heads step's inputs."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, 4, 1, 8, generator=g)
    k, v = torch.randn(batch, 2, keys, 8, generator=g), torch.randn(batch, 2, keys, 16, generator=g)
    allowed = torch.rand(batch, 1, 1, keys, generator=g) > 0.3
    allowed[..., 0] = True
    bias = additive_mask(allowed, q.dtype)
    heads = Mamba1Heads(d_model=16, d_inner=24, d_state=8, d_conv=4, dt_rank=4, dt_bc_norm=True, eps=1e-5)
    state = SSMState(conv=torch.randn(batch, 24, 3, generator=g), ssm=torch.randn(batch, 24, 8, generator=g))
    proj = torch.randn(batch, 1, 48, generator=g)
    step = [a.detach() if isinstance(a, torch.Tensor) else a for a in heads.decode_step_inputs(proj, state)]
    return q, k, v, bias, *step  # detached: a decode step has no autograd (nor has the op)


def test_side_by_side_op_passes_opcheck(ops_on_cpu) -> None:
    """The registration torch.compile relies on (schema, declared mutations of both states, fake shapes and
    strides), checked by torch.library.opcheck."""
    torch.library.opcheck(concurrent_branches.attention_beside_mamba1_step, step_args())


def decode(model: HybridLM, decode_branches: str):
    model.set_backend("auto", "triton", decode_branches)
    prompts = [[5, 9, 2, 7, 1, 3, 8, 4, 6, 2, 9, 1], [3, 1, 4], [2, 7, 1, 8, 2, 8, 1]]  # left padding, and a
    return Generator(model, cuda_graph=False).generate(prompts, 6, keep_logits=True)  # window of 5 crossed


def test_decode_with_branches_side_by_side_equals_one_after_the_other(ops_on_cpu) -> None:
    """Row E (global and local layers, KV consumers, meta tokens): every decode step's hybrid layers go through the
    side-by-side op, and the tokens and logits are the one-after-the-other decode's."""
    torch.manual_seed(0)
    model = HybridLM(cpu_config("roadmap_e")).eval()
    sequential = decode(model, "sequential")
    assert ops_on_cpu == []
    concurrent = decode(model, "concurrent")
    assert len(ops_on_cpu) == 5 * model.cfg.n_layers  # 5 decode steps after the prefill's logits; hybrid layers
    assert concurrent.tokens == sequential.tokens
    for c, s in zip(concurrent.step_logits, sequential.step_logits):
        torch.testing.assert_close(c, s, rtol=1e-5, atol=1e-5)


def test_unknown_decode_branches_is_named() -> None:
    model = HybridLM(cpu_config("roadmap_e"))
    with pytest.raises(BackendError, match=r"decode_branches must be one of \['concurrent', 'sequential'\], got "
                                           r"'parallel'"):
        model.set_backend("auto", "triton", "parallel")
    # so is an unknown backend (the bench's backend=cuda ran until an op resolved the name)
    with pytest.raises(BackendError, match=r"^backend must be one of \['auto', 'reference', 'kernel'\], got 'cuda'$"):
        model.set_backend("cuda")
