"""arch_lab's Triton selective scan on the CPU, in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py),
against the step-by-step oracle: outputs, last state and every gradient. The GPU tests run the compiled kernels
(test_ops_ssm_gpu_parity.py)."""
from __future__ import annotations

import pytest
import torch

from components.ops.backend import BackendError
from components.ops.selective_scan import selective_scan, selective_scan_naive

pytest.importorskip("triton")
if torch.cuda.is_available():  # conftest.py turns the interpreter on for CPU machines only
    pytest.skip("the GPU tests run the compiled kernels", allow_module_level=True)
from components.ops import selective_scan_triton as kernels  # noqa: E402 - after the skips

# Small launch shapes keep the interpreter fast; dim, length and state are not multiples of them, and the three
# chunks fall into two segments (the output walks run per segment, from the states the first walks saved).
LAUNCH = dict(block_d=8, chunk=8, num_warps=1, segment=2)
BATCH, DIM, SEQLEN, DSTATE = 2, 12, 21, 10


def scan_case(full: bool, seed: int = 0) -> dict:
    """Inputs as the model passes them: u and z channel-last views of one projection, delta transposed."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(BATCH, SEQLEN, 2 * DIM, generator=g)
    case = {
        "proj": proj,
        "delta": (0.5 * torch.randn(BATCH, SEQLEN, DIM, generator=g)).abs().transpose(1, 2),
        "A": -torch.exp(0.5 * torch.randn(DIM, DSTATE, generator=g)),
        "B": torch.randn(BATCH, DSTATE, SEQLEN, generator=g),
        "C": torch.randn(BATCH, DSTATE, SEQLEN, generator=g),
    }
    if full:
        case.update(D=torch.randn(DIM, generator=g), delta_bias=0.3 * torch.randn(DIM, generator=g),
                    initial_state=torch.randn(BATCH, DIM, DSTATE, generator=g))
    leaves = {name: t.clone().requires_grad_(True) for name, t in case.items()}
    dout = torch.randn(BATCH, DIM, SEQLEN, generator=g)
    dlast = torch.randn(BATCH, DIM, DSTATE, generator=g) if full else None
    return {"leaves": leaves, "dout": dout, "dlast": dlast, "full": full}


def split(leaves: dict, full: bool) -> tuple:
    u = leaves["proj"][..., :DIM].transpose(1, 2)
    z = leaves["proj"][..., DIM:].transpose(1, 2) if full else None
    return u, z


@pytest.mark.parametrize("full", [True, False], ids=["D-z-bias-softplus-initial-dlast", "plain"])
def test_triton_scan_matches_oracle_with_gradients(full: bool) -> None:
    case = scan_case(full)
    leaves, dout, dlast = case["leaves"], case["dout"], case["dlast"]
    u, z = split(leaves, full)
    opt = {name: leaves.get(name) for name in ("D", "delta_bias", "initial_state")}

    ref, ref_last = selective_scan_naive(u, leaves["delta"], leaves["A"], leaves["B"], leaves["C"], opt["D"], z,
                                         opt["delta_bias"], full, initial_state=opt["initial_state"],
                                         return_last_state=True)
    loss = (ref * dout).sum() + ((ref_last * dlast).sum() if full else 0.0)
    expected = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))

    with torch.no_grad():
        out, y, starts, last = kernels.scan_fwd(u, leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
                                                    opt["D"], z, opt["delta_bias"], opt["initial_state"], full,
                                                    **LAUNCH)
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = kernels.scan_bwd(
            u, leaves["delta"], leaves["A"], leaves["B"], leaves["C"], opt["D"], z, opt["delta_bias"], starts, y,
            dout, dlast, full, **LAUNCH)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, ref_last, rtol=1e-5, atol=1e-5)
    assert starts.shape == (BATCH, 3, DIM, DSTATE)  # ceil(21 / 8) chunks
    assert out.transpose(1, 2).is_contiguous()  # stored (b, l, d), as the model's output projection reads it
    dproj = torch.cat([du.transpose(1, 2), dz.transpose(1, 2) if full else torch.zeros_like(du.transpose(1, 2))], -1)
    actual = {"proj": dproj, "delta": ddelta, "A": dA, "B": dB, "C": dC}
    if full:
        actual.update(D=dD, delta_bias=dbias, initial_state=dh0)
    else:
        assert dD is None and dz is None and dbias is None
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad of {name}: {m}")


def test_triton_scan_keeps_strong_decays_finite() -> None:
    """Decays near 0 (large steps times -A) are where dividing by a decay would blow up: gradients stay finite and
    match the oracle."""
    case = scan_case(False, seed=1)
    leaves = case["leaves"]
    with torch.no_grad():
        leaves["delta"].mul_(0).add_(30.0)  # exp(30 * A) underflows to 0 for most channels
    u, _ = split(leaves, False)
    ref = selective_scan_naive(u, leaves["delta"], leaves["A"], leaves["B"], leaves["C"])
    expected = torch.autograd.grad((ref * case["dout"]).sum(), [leaves["delta"], leaves["A"]])
    with torch.no_grad():
        out, y, starts, _ = kernels.scan_fwd(u, leaves["delta"], leaves["A"], leaves["B"], leaves["C"], None,
                                                 None, None, None, False, **LAUNCH)
        grads = kernels.scan_bwd(u, leaves["delta"], leaves["A"], leaves["B"], leaves["C"], None, None, None,
                                     starts, y, case["dout"], None, False, **LAUNCH)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for actual, wanted in zip((grads[1], grads[2]), expected):
        assert torch.isfinite(actual).all()
        torch.testing.assert_close(actual, wanted, rtol=1e-4, atol=1e-4)


def test_unknown_scan_kernel_is_named() -> None:
    case = scan_case(False)["leaves"]
    u, _ = split(case, False)
    with pytest.raises(BackendError, match=r"scan_kernel must be one of \['mamba_ssm', 'triton'\], got 'cuda'"):
        selective_scan(u, case["delta"], case["A"], case["B"], case["C"], kernel="cuda")


def test_triton_scan_custom_op_passes_opcheck_on_cpu() -> None:
    """The op registration torch.compile relies on (schema, fake shapes and strides, autograd, AOT dispatch with
    dynamic shapes), checked by torch.library.opcheck against the interpreted kernels, which are given to the
    CUDA-only ops as CPU kernels for this test only. opcheck's cotangents are expanded (stride 0) tensors."""
    from components.ops import custom_ops

    def fwd(*args):
        return kernels.scan_fwd(*args, chunk=custom_ops.TRITON_SCAN_CHUNK)

    def bwd(*args):
        du, ddelta, dz, *rest = kernels.scan_bwd_partials(*args, chunk=custom_ops.TRITON_SCAN_CHUNK)
        return du, ddelta, dz if dz is not None else args[0].new_empty(0), *rest

    case = scan_case(True)["leaves"]
    u, z = split(case, True)
    bf16 = {name: case[name].detach().to(torch.bfloat16).requires_grad_(True) for name in ("delta", "B", "C")}
    args = (u.detach().to(torch.bfloat16).requires_grad_(True), bf16["delta"], case["A"], bf16["B"], bf16["C"],
            case["D"], z.detach().to(torch.bfloat16).requires_grad_(True), case["delta_bias"], case["initial_state"],
            True)
    with torch.library._scoped_library("arch_lab", "IMPL") as lib:
        lib.impl("triton_scan_fwd", fwd, "CPU")
        lib.impl("triton_scan_bwd", bwd, "CPU")
        torch.library.opcheck(custom_ops.triton_scan_fwd, args)
