"""arch_lab's fused Mamba-1 decode step on the CPU, in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py),
against the unfused step of Mamba1Heads on the reference ops: output, conv state and SSM state. The GPU tests run the
compiled kernels (test_ops_ssm_gpu_parity.py)."""
from __future__ import annotations

import pytest
import torch

from components.kv_cache import StepInfo
from components.ssm_heads import Mamba1Heads, SSMState

pytest.importorskip("triton")
if torch.cuda.is_available():  # conftest.py turns the interpreter on for CPU machines only
    pytest.skip("the GPU tests run the compiled kernels", allow_module_level=True)
from components.ops import mamba1_step_triton as kernels  # noqa: E402 - after the skips

# 19 rows: two row blocks, the second partial; 40 channels: partial channel blocks in both kernels (16 wide here).
BATCH, D_INNER, D_STATE, D_CONV, DT_RANK = 19, 40, 10, 4, 5
LAUNCH = kernels.StepBlocks(conv_channels=16, conv_warps=1, state_warps=1)


def heads(norm: bool, seed: int = 0, d_conv: int = D_CONV) -> Mamba1Heads:
    torch.manual_seed(seed)
    module = Mamba1Heads(d_model=32, d_inner=D_INNER, d_state=D_STATE, d_conv=d_conv, dt_rank=DT_RANK,
                         dt_bc_norm=norm, eps=1e-5)
    with torch.no_grad():  # away from the init's ones, so a dropped term shows
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    module.backend = "reference"
    return module


def step_case(seed: int = 1, d_conv: int = D_CONV) -> tuple[torch.Tensor, SSMState]:
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(BATCH, 1, 2 * D_INNER, generator=g)
    state = SSMState(conv=torch.randn(BATCH, D_INNER, d_conv - 1, generator=g),
                     ssm=torch.randn(BATCH, D_INNER, D_STATE, generator=g))
    return proj, state


def decode_step_info() -> StepInfo:
    return StepInfo(positions=torch.zeros(BATCH, 1, dtype=torch.long))


def fused(module: Mamba1Heads, proj: torch.Tensor, state: SSMState, blocks: kernels.StepBlocks) -> torch.Tensor:
    return kernels.mamba1_step(*module.decode_step_inputs(proj, state), blocks=blocks)


@pytest.mark.parametrize("norm,d_conv", [(True, D_CONV), (False, D_CONV), (True, 3)],
                         ids=["dt-B-C-norms", "no-norms", "conv-width-3"])  # 3: the kernel pads the window to 4
def test_fused_step_equals_unfused_reference_step(norm: bool, d_conv: int) -> None:
    module = heads(norm, d_conv=d_conv)
    proj, start = step_case(d_conv=d_conv)
    ref_state = SSMState(conv=start.conv.clone(), ssm=start.ssm.clone())
    kernel_state = SSMState(conv=start.conv.clone(), ssm=start.ssm.clone())
    with torch.no_grad():
        for _ in range(3):  # consecutive steps: each reads the states the previous one wrote
            expected = module(proj, decode_step_info(), ref_state)[:, 0]
            actual = fused(module, proj, kernel_state, LAUNCH)
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
            proj = proj.roll(1, dims=-1)
    torch.testing.assert_close(kernel_state.conv, ref_state.conv, rtol=0, atol=0)
    torch.testing.assert_close(kernel_state.ssm, ref_state.ssm, rtol=1e-5, atol=1e-5)
    assert not torch.equal(kernel_state.ssm, start.ssm)


def test_fused_step_does_not_depend_on_its_launch_blocks() -> None:
    """The x-projection's reduction is split by the conv kernel's channel blocks: other splits (3, 2, 1) and other
    row blocks (2 or 1 of the 19 rows), same result."""
    module = heads(True, seed=2)
    proj, start = step_case(seed=3)
    outs = []
    for launch in (LAUNCH, kernels.StepBlocks(32, 32, 1, 32, 64, 1), kernels.StepBlocks.from_string("16x64x2x32x16x2")):
        state = SSMState(conv=start.conv.clone(), ssm=start.ssm.clone())
        with torch.no_grad():
            outs.append((fused(module, proj, state, launch), state.ssm))
    for y, ssm in outs[1:]:
        torch.testing.assert_close(y, outs[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ssm, outs[0][1], rtol=1e-5, atol=1e-5)


def test_step_blocks_read_from_a_launch_string_or_name_the_format() -> None:
    assert kernels.StepBlocks.from_string("32x64x8x16x32x4") == kernels.StepBlocks(32, 64, 8, 16, 32, 4)
    assert str(kernels.StepBlocks()) == "16x64x8x16x16x4"
    with pytest.raises(ValueError, match=r"six positive integers joined by 'x' .* got '64x16x4'"):
        kernels.StepBlocks.from_string("64x16x4")  # the launcher's old three-field form


def test_fused_step_custom_op_passes_opcheck_on_cpu() -> None:
    """The op registration torch.compile relies on (schema with both states mutated, fake shapes and dtypes),
    checked by torch.library.opcheck against the interpreted kernels, given to the CUDA-only op as its CPU kernel
    for this test only."""
    from components.ops import custom_ops

    module = heads(True)
    proj, state = step_case()
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in module.decode_step_inputs(proj, state))
    with torch.library._scoped_library("arch_lab", "IMPL") as lib:
        lib.impl("mamba1_step", custom_ops.mamba1_step_kernel._init_fn, "CPU")
        torch.library.opcheck(custom_ops.mamba1_step_kernel, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_fused_step_names_a_state_it_cannot_index() -> None:
    module = heads(False)
    proj, state = step_case()
    strided = SSMState(conv=state.conv, ssm=state.ssm.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match=r"ssm_state needs adjacent state dims \(stride 1\), got \(400, 1, 40\)"):
        fused(module, proj, strided, LAUNCH)


@pytest.mark.parametrize("scan_kernel,fused_calls", [("triton", 1), ("mamba_ssm", 0)])
def test_heads_run_the_fused_step_only_with_the_triton_kernel_chosen(monkeypatch, scan_kernel, fused_calls) -> None:
    """Where the kernels can run (faked here: the interpreted op stands in for the CUDA one), a decode step of
    Mamba1Heads goes through the fused op with scan_kernel=triton and through the unfused chain with mamba_ssm;
    both give the reference step."""
    import components.ssm_heads as ssm_heads_module
    from components.ops import custom_ops

    calls = []

    def interpreted_op(*args):
        calls.append(args)
        return custom_ops.mamba1_step_kernel._init_fn(*args)

    monkeypatch.setattr(ssm_heads_module, "resolve_backend", lambda requested, tensor, op: "kernel")
    monkeypatch.setattr(ssm_heads_module, "mamba1_step_kernel", interpreted_op)
    module = heads(True)
    module.scan_kernel = scan_kernel
    proj, start = step_case()
    reference = heads(True)
    reference.scan_kernel = "mamba_ssm"  # the chain, on the reference ops (their own backend choice is unpatched)
    ref_state = SSMState(conv=start.conv.clone(), ssm=start.ssm.clone())
    with torch.no_grad():
        expected = reference(proj, decode_step_info(), ref_state)
        actual = module(proj, decode_step_info(), start)
    assert len(calls) == fused_calls
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(start.ssm, ref_state.ssm, rtol=1e-5, atol=1e-5)
