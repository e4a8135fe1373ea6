"""GPU kernels (mamba_ssm, causal_conv1d) against the PyTorch references: outputs, states and
every input gradient, in float32 and bfloat16. Skipped without CUDA or the kernel packages."""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch

from components.ops.backend import describe_backends, kernel_available, resolve_backend
from components.ops.causal_conv import causal_conv1d, causal_conv1d_step
from components.kv_cache import StepInfo
from components.ops.selective_scan import SCAN_KERNELS, selective_scan, selective_state_update
from components.ops.ssd import ssd_scan, ssd_step
from components.ssm_heads import Mamba1Heads, SSMState

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.float32, torch.bfloat16]
# ‖kernel − reference‖ / ‖reference‖ bounds.
TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 1e-2}
BATCH, SEQLEN = 2, 300  # 300: not a multiple of any chunk size


def require(package: str) -> None:
    # pytest.importorskip only skips on ImportError; mamba_ssm can also fail with OSError.
    if not kernel_available(package):
        pytest.skip(f"{package}: {describe_backends()[package]}")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def compare_kernel_with_reference(
    op: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    inputs: dict[str, torch.Tensor],
    low_precision: tuple[str, ...],
    dtype: torch.dtype,
    grad_of_outputs: tuple[int, ...],
    **options,
) -> None:
    """Run ``op`` with backend="kernel" (``low_precision`` inputs in ``dtype``, the rest float32)
    and backend="reference" (float32 copies of the same values); compare every output and
    the gradient of every input of a random projection of the outputs ``grad_of_outputs``."""
    kernel_inputs = {
        name: (t.to(dtype) if name in low_precision else t.float()).detach().requires_grad_(True)
        for name, t in inputs.items()
    }
    reference_inputs = {name: t.detach().float().requires_grad_(True) for name, t in kernel_inputs.items()}

    def outputs_and_grads(backend: str, leaves: dict[str, torch.Tensor]):
        outs = op(**leaves, **options, backend=backend)
        outs = outs if isinstance(outs, tuple) else (outs,)
        g = generator(99)
        loss = sum((outs[i].float() * torch.randn(outs[i].shape, device="cuda", generator=g)).sum() for i in grad_of_outputs)
        return outs, torch.autograd.grad(loss, list(leaves.values()))

    kernel_outs, kernel_grads = outputs_and_grads("kernel", kernel_inputs)
    reference_outs, reference_grads = outputs_and_grads("reference", reference_inputs)
    tolerance = TOLERANCE[dtype]
    for i, (actual, expected) in enumerate(zip(kernel_outs, reference_outs)):
        assert actual.shape == expected.shape
        assert rel_err(actual, expected) < tolerance, f"output {i}: {rel_err(actual, expected):.2e}"
    for name, actual, expected in zip(kernel_inputs, kernel_grads, reference_grads):
        assert rel_err(actual, expected) < tolerance, f"grad of {name}: {rel_err(actual, expected):.2e}"


# ---------------------------------------------------------------- causal conv1d


def conv_inputs(dim: int, width: int = 4) -> dict[str, torch.Tensor]:
    g = generator(0)
    return {
        "x": torch.randn(BATCH, dim, SEQLEN, device="cuda", generator=g),
        "weight": torch.randn(dim, width, device="cuda", generator=g) / width**0.5,
        "bias": torch.randn(dim, device="cuda", generator=g),
        "initial_state": torch.randn(BATCH, dim, width - 1, device="cuda", generator=g),
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_conv1d_kernel_matches_reference(dtype: torch.dtype) -> None:
    require("causal_conv1d")
    inputs = conv_inputs(dim=256)  # several channel blocks of the kernel in both dtypes
    assert resolve_backend("auto", inputs["x"], "causal_conv1d") == "kernel"
    stateless = {k: v for k, v in inputs.items() if k != "initial_state"}
    compare_kernel_with_reference(causal_conv1d, stateless, ("x",), dtype, (0,), return_final_state=True)
    # A transposed (b, l, d) projection, as Mamba feeds it, runs the channel-last variant.
    channel_last = dict(stateless, x=inputs["x"].transpose(1, 2).contiguous().transpose(1, 2))
    compare_kernel_with_reference(causal_conv1d, channel_last, ("x",), dtype, (0,))
    # Initial states need the channel-last variant too.
    compare_kernel_with_reference(
        causal_conv1d, inputs, ("x", "initial_state"), dtype, (0, 1), return_final_state=True
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_conv1d_step_kernel_matches_reference(dtype: torch.dtype) -> None:
    require("causal_conv1d")
    inputs = conv_inputs(dim=256)
    x = inputs["x"].to(dtype)
    states = {backend: inputs["initial_state"].to(dtype).clone() for backend in ("kernel", "reference")}
    for t in range(8):
        y = {
            backend: causal_conv1d_step(x[..., t], states[backend], inputs["weight"], inputs["bias"], backend=backend)
            for backend in states
        }
        assert rel_err(y["kernel"], y["reference"]) < TOLERANCE[dtype]
    assert rel_err(states["kernel"], states["reference"]) == 0.0  # the state only shifts inputs


# ---------------------------------------------------------------- selective scan (Mamba-1)

SCAN_DIM, SCAN_STATE = 64, 16


def scan_inputs() -> dict[str, torch.Tensor]:
    g = generator(1)
    shape = (BATCH, SCAN_DIM, SEQLEN)
    return {
        "u": torch.randn(shape, device="cuda", generator=g),
        "delta": 0.5 * torch.randn(shape, device="cuda", generator=g),  # pre-softplus
        "A": -torch.exp(torch.randn(SCAN_DIM, SCAN_STATE, device="cuda", generator=g)),
        "B": torch.randn(BATCH, SCAN_STATE, SEQLEN, device="cuda", generator=g),
        "C": torch.randn(BATCH, SCAN_STATE, SEQLEN, device="cuda", generator=g),
        "D": torch.randn(SCAN_DIM, device="cuda", generator=g),
        "z": torch.randn(shape, device="cuda", generator=g),
        "delta_bias": -3.0 + 0.5 * torch.randn(SCAN_DIM, device="cuda", generator=g),
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_selective_scan_kernel_matches_reference(dtype: torch.dtype) -> None:
    require("mamba_ssm")
    inputs = scan_inputs()
    assert resolve_backend("auto", inputs["u"], "selective_scan") == "kernel"
    # mamba_ssm's backward ignores gradients into last_state: only output 0 gets a loss.
    compare_kernel_with_reference(
        selective_scan, inputs, ("u", "delta", "B", "C", "z"), dtype, (0,),
        delta_softplus=True, return_last_state=True, kernel="mamba_ssm",  # not the default (triton)
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_selective_scan_matches_reference(dtype: torch.dtype) -> None:
    """arch_lab's Triton scan: outputs, last state and every gradient, including the initial state's and the one
    flowing in from the last state, on channel-last views (as the model passes them) and contiguous inputs, and at
    an odd length (its last chunk and last segment are partial)."""
    require("triton")
    g = generator(2)
    inputs = dict(scan_inputs(), initial_state=torch.randn(BATCH, SCAN_DIM, SCAN_STATE, device="cuda", generator=g))
    assert resolve_backend("auto", inputs["u"], "selective_scan_triton") == "kernel"
    options = dict(delta_softplus=True, return_last_state=True, kernel="triton")
    low = ("u", "delta", "B", "C", "z")
    compare_kernel_with_reference(selective_scan, inputs, low, dtype, (0, 1), **options)
    odd = {name: t[..., :SEQLEN - 1] if t.shape[-1] == SEQLEN else t for name, t in inputs.items()}
    compare_kernel_with_reference(selective_scan, odd, low, dtype, (0, 1), **options)
    channel_last = {name: t.transpose(1, 2).contiguous().transpose(1, 2) if name in ("u", "delta", "z") else t
                    for name, t in inputs.items()}
    del channel_last["initial_state"]
    compare_kernel_with_reference(selective_scan, channel_last, low, dtype, (0,), **options)


@pytest.mark.parametrize("optional", [("D", "z", "delta_bias", "initial_state"), ()])
def test_triton_scan_custom_op_passes_opcheck(optional: tuple[str, ...]) -> None:
    require("triton")
    from components.ops.custom_ops import triton_scan_fwd

    inputs = dict(scan_inputs(), initial_state=torch.randn(BATCH, SCAN_DIM, SCAN_STATE, device="cuda",
                                                           generator=generator(4)))
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
    args = []
    for name in names:
        t = inputs[name].to(torch.bfloat16) if name in ("u", "delta", "B", "C", "z") else inputs[name]
        args.append(t.requires_grad_(True) if name in ("u", "delta", "A", "B", "C") or name in optional else None)
    # Eager autograd hands the backward expanded (stride 0) cotangents, AOT materialized ones, and Triton compiles
    # one kernel per stride pattern: float32 sums differ in the last bits (seen: 5e-6 relative in dA), which can
    # round a bfloat16 gradient one step apart (seen: 3 of 38,400 elements of ddelta). A wrong registration is off
    # by far more; the parity test above checks the values.
    torch.library.opcheck(triton_scan_fwd, (*args, True), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("channel_last", [False, True])
def test_causal_conv1d_custom_op_passes_opcheck(channel_last: bool) -> None:
    require("causal_conv1d")
    from components.ops.custom_ops import causal_conv1d_fwd

    g = generator(3)
    x = torch.randn(BATCH, SEQLEN, 64, device="cuda", generator=g, dtype=torch.bfloat16).transpose(1, 2)
    x = (x if channel_last else x.contiguous()).requires_grad_(True)
    weight = torch.randn(64, 4, device="cuda", generator=g).requires_grad_(True)
    bias = torch.randn(64, device="cuda", generator=g).requires_grad_(True)
    torch.library.opcheck(causal_conv1d_fwd, (x, weight, bias, True))


@pytest.mark.parametrize("optional", [("D", "z", "delta_bias"), ()])
def test_selective_scan_custom_op_passes_opcheck(optional: tuple[str, ...]) -> None:
    """The registration torch.compile relies on: fake shapes and dtypes, autograd, schema (torch.library.opcheck
    runs the real kernel against each), with and without the optional inputs."""
    require("mamba_ssm")
    import components.ops.custom_ops  # noqa: F401 - registers torch.ops.arch_lab.*

    inputs = {name: t.to(torch.bfloat16) if name in ("u", "delta", "B", "C", "z") else t
              for name, t in scan_inputs().items()}
    for name in ("u", "delta", "A", "B", "C", *optional):
        inputs[name].requires_grad_(True)
    args = [inputs[name] if name in ("u", "delta", "A", "B", "C") or name in optional else None
            for name in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    torch.library.opcheck(torch.ops.arch_lab.selective_scan_fwd.default, (*args, True))


# Decode steps have no backward: every opcheck test but the autograd registration's.
OPCHECK_NO_AUTOGRAD = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


def test_decode_step_custom_ops_pass_opcheck() -> None:
    """The decode kernels as custom ops that update their state in place: schema (the declared mutation), fake
    shapes and dtypes, checked by torch.library.opcheck against the real kernels."""
    require("mamba_ssm")
    require("causal_conv1d")
    from components.ops.custom_ops import causal_conv1d_update, selective_state_update_kernel

    g = generator(5)
    x = torch.randn(BATCH, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    conv_state = torch.randn(BATCH, 64, 3, device="cuda", generator=g, dtype=torch.bfloat16)
    weight = torch.randn(64, 4, device="cuda", generator=g, dtype=torch.bfloat16)
    bias = torch.randn(64, device="cuda", generator=g, dtype=torch.bfloat16)
    torch.library.opcheck(causal_conv1d_update, (x, conv_state, weight, bias, True),
                          test_utils=OPCHECK_NO_AUTOGRAD)
    inputs = scan_inputs()
    state = torch.randn(BATCH, SCAN_DIM, SCAN_STATE, device="cuda", generator=g)
    step = (state, inputs["u"][..., 0].contiguous(), inputs["delta"][..., 0].contiguous(), inputs["A"],
            inputs["B"][..., 0].contiguous(), inputs["C"][..., 0].contiguous(), inputs["D"],
            inputs["z"][..., 0].contiguous(), inputs["delta_bias"], True)
    torch.library.opcheck(selective_state_update_kernel, step, test_utils=OPCHECK_NO_AUTOGRAD)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_optional", [True, False])
def test_selective_state_update_kernel_matches_reference(dtype: torch.dtype, with_optional: bool) -> None:
    require("mamba_ssm")
    inputs = scan_inputs()
    start = torch.randn(BATCH, SCAN_DIM, SCAN_STATE, device="cuda", generator=generator(2))
    states = {b: start.clone() for b in ("kernel", "reference")}
    optional = ("D", "z", "delta_bias") if with_optional else ()
    for t in range(8):
        step = {
            "x": inputs["u"][..., t].to(dtype),
            "dt": inputs["delta"][..., t].to(dtype),
            "A": inputs["A"],
            "B": inputs["B"][..., t].to(dtype),
            "C": inputs["C"][..., t].to(dtype),
        }
        if with_optional:
            step.update(D=inputs["D"], z=inputs["z"][..., t].to(dtype), dt_bias=inputs["delta_bias"])
        y = {b: selective_state_update(states[b], **step, dt_softplus=True, backend=b) for b in states}
        assert rel_err(y["kernel"], y["reference"]) < TOLERANCE[dtype], (t, optional)
    assert rel_err(states["kernel"], states["reference"]) < TOLERANCE[torch.float32]


# ---------------------------------------------------------------- the fused Mamba-1 decode step
E_HEADS = dict(d_model=1024, d_inner=1024, d_state=16, d_conv=4, dt_rank=64)  # row E's Mamba-1 heads at 300M
DECODE_BATCH = 128


def mamba1_heads(norm: bool) -> Mamba1Heads:
    torch.manual_seed(0)
    module = Mamba1Heads(**E_HEADS, dt_bc_norm=norm, eps=1e-5).cuda()
    with torch.no_grad():  # away from the init's ones, so a dropped term shows
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [True, False], ids=["dt-B-C-norms", "no-norms"])
def test_fused_mamba1_step_matches_reference_as_the_unfused_kernels_do(dtype: torch.dtype, norm: bool) -> None:
    """8 decode steps of row E's Mamba-1 heads at batch 128: the fused Triton step (scan_kernel=triton) and
    mamba_ssm's and causal_conv1d's step kernels (scan_kernel=mamba_ssm), each against the float32 reference
    module: outputs at every step and both states at the end."""
    for package in ("mamba_ssm", "causal_conv1d", "triton"):
        require(package)
    reference = mamba1_heads(norm)
    reference.backend = "reference"
    modules = {kernel: copy.deepcopy(reference).to(dtype) for kernel in SCAN_KERNELS}
    for kernel, module in modules.items():
        module.backend, module.scan_kernel = "kernel", kernel
    g = generator(7)
    d, n = E_HEADS["d_inner"], E_HEADS["d_state"]
    conv0 = torch.randn(DECODE_BATCH, d, E_HEADS["d_conv"] - 1, device="cuda", generator=g)
    ssm0 = torch.randn(DECODE_BATCH, d, n, device="cuda", generator=g)
    # Each its own copy (the model keeps the SSM state in float32 whatever its dtype).
    states = {name: SSMState(conv=conv0.to(torch.float32 if name == "reference" else dtype, copy=True),
                             ssm=ssm0.clone()) for name in ("reference", *modules)}
    step = StepInfo(positions=torch.zeros(DECODE_BATCH, 1, dtype=torch.long, device="cuda"))
    errors: dict[str, list[float]] = {kernel: [] for kernel in modules}
    with torch.no_grad():
        for _ in range(8):
            proj = torch.randn(DECODE_BATCH, 1, 2 * d, device="cuda", generator=g)
            expected = reference(proj, step, states["reference"])
            for kernel, module in modules.items():
                errors[kernel].append(rel_err(module(proj.to(dtype), step, states[kernel]), expected))
    for kernel in modules:
        assert max(errors[kernel]) < TOLERANCE[dtype], (kernel, errors)
        assert rel_err(states[kernel].ssm, states["reference"].ssm) < TOLERANCE[dtype], kernel
        assert rel_err(states[kernel].conv, states["reference"].conv) < TOLERANCE[dtype], kernel


def test_fused_mamba1_step_custom_op_passes_opcheck() -> None:
    """The fused step as a custom op that updates both states in place: schema, fake shapes and dtypes, dynamic
    shapes, checked by torch.library.opcheck against the compiled kernels."""
    require("triton")
    from components.ops.custom_ops import mamba1_step_kernel

    module = mamba1_heads(True).to(torch.bfloat16)
    g = generator(8)
    d = E_HEADS["d_inner"]
    proj = torch.randn(BATCH, 2 * d, device="cuda", generator=g, dtype=torch.bfloat16)
    state = SSMState(conv=torch.randn(BATCH, d, 3, device="cuda", generator=g, dtype=torch.bfloat16),
                     ssm=torch.randn(BATCH, d, E_HEADS["d_state"], device="cuda", generator=g))
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a
                 for a in module.fused_step_inputs(proj[:, :d], proj[:, d:], state))
    torch.library.opcheck(mamba1_step_kernel, args, test_utils=OPCHECK_NO_AUTOGRAD)


# ---------------------------------------------------------------- SSD (Mamba-2)

HEADS, HEADDIM, GROUPS, SSD_STATE = 8, 32, 2, 64


def ssd_inputs() -> dict[str, torch.Tensor]:
    g = generator(4)
    return {
        "x": torch.randn(BATCH, SEQLEN, HEADS, HEADDIM, device="cuda", generator=g),
        "dt": -3.0 + 0.5 * torch.randn(BATCH, SEQLEN, HEADS, device="cuda", generator=g),  # pre-softplus
        "A": -torch.exp(torch.randn(HEADS, device="cuda", generator=g)),
        "B": torch.randn(BATCH, SEQLEN, GROUPS, SSD_STATE, device="cuda", generator=g),
        "C": torch.randn(BATCH, SEQLEN, GROUPS, SSD_STATE, device="cuda", generator=g),
        "D": torch.randn(HEADS, device="cuda", generator=g),
        "z": torch.randn(BATCH, SEQLEN, HEADS, HEADDIM, device="cuda", generator=g),
        "dt_bias": 0.5 * torch.randn(HEADS, device="cuda", generator=g),
        "initial_state": torch.randn(BATCH, HEADS, HEADDIM, SSD_STATE, device="cuda", generator=g),
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_ssd_scan_kernel_matches_reference(dtype: torch.dtype) -> None:
    require("mamba_ssm")
    inputs = ssd_inputs()
    assert resolve_backend("auto", inputs["x"], "ssd_scan") == "kernel"
    compare_kernel_with_reference(
        ssd_scan, inputs, ("x", "dt", "B", "C", "z"), dtype, (0, 1),
        chunk_size=64, dt_softplus=True, return_final_state=True,
    )


@pytest.mark.parametrize("optional", [("D", "z", "dt_bias", "initial_state"), ()])
def test_ssd_scan_custom_op_passes_opcheck(optional: tuple[str, ...]) -> None:
    """The SSD op's registration for torch.compile: fake shapes and dtypes (the kernels return some gradients in
    float32 and others in x's dtype), autograd and schema, against the real Triton kernels."""
    require("mamba_ssm")
    inputs = {name: t.to(torch.bfloat16) if name in ("x", "dt", "B", "C", "z") else t
              for name, t in ssd_inputs().items()}
    names = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")
    for name in names:
        if name in ("x", "dt", "A", "B", "C") or name in optional:
            inputs[name].requires_grad_(True)
    x, dt, A, B, C, D, z, dt_bias, initial = (inputs[n] if n in ("x", "dt", "A", "B", "C") or n in optional else None
                                              for n in names)
    torch.library.opcheck(torch.ops.arch_lab.ssd_scan_fwd.default, (x, dt, A, B, C, 64, D, z, dt_bias, initial, True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D_shape", ["heads", "channels", None])
def test_ssd_step_kernel_matches_reference(dtype: torch.dtype, D_shape: str | None) -> None:
    require("mamba_ssm")
    inputs = ssd_inputs()
    D = {"heads": inputs["D"], "channels": inputs["D"][:, None].expand(HEADS, HEADDIM) * 0.5, None: None}[D_shape]
    dt_bias = None if D_shape is None else inputs["dt_bias"]
    states = {b: inputs["initial_state"].clone() for b in ("kernel", "reference")}
    for t in range(8):
        step = {
            "x": inputs["x"][:, t].to(dtype),
            "dt": inputs["dt"][:, t].to(dtype),
            "A": inputs["A"],
            "B": inputs["B"][:, t].to(dtype),
            "C": inputs["C"][:, t].to(dtype),
            "D": D,
            "z": inputs["z"][:, t].to(dtype),
            "dt_bias": dt_bias,
        }
        y = {b: ssd_step(states[b], **step, dt_softplus=True, backend=b) for b in states}
        assert rel_err(y["kernel"], y["reference"]) < TOLERANCE[dtype], t
    assert rel_err(states["kernel"], states["reference"]) < TOLERANCE[torch.float32]
