"""CPU tests of the SSM ops' PyTorch references against step-by-step oracles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from components.ops.backend import describe_backends, resolve_backend
from components.ops.causal_conv import causal_conv1d, causal_conv1d_step
from components.ops.selective_scan import (
    selective_scan,
    selective_scan_implicit_attention,
    selective_scan_naive,
    selective_scan_reference,
    selective_state_update,
)
from components.ops.ssd import segsum, ssd_implicit_attention, ssd_naive, ssd_reference, ssd_scan, ssd_step

BATCH, DIM, DSTATE, SEQLEN = 2, 4, 3, 37  # 37: neither a square nor a multiple of the chunks used


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def scan_inputs(seed: int = 0, seqlen: int = SEQLEN) -> dict[str, torch.Tensor]:
    """Mamba-1 inputs at realistic magnitudes: A < 0, small positive delta."""
    g = torch.Generator().manual_seed(seed)
    return {
        "u": torch.randn(BATCH, DIM, seqlen, generator=g),
        "delta": 0.02 + 0.2 * torch.rand(BATCH, DIM, seqlen, generator=g),
        "A": -torch.exp(torch.randn(DIM, DSTATE, generator=g)),
        "B": torch.randn(BATCH, DSTATE, seqlen, generator=g),
        "C": torch.randn(BATCH, DSTATE, seqlen, generator=g),
        "D": torch.randn(DIM, generator=g),
        "z": torch.randn(BATCH, DIM, seqlen, generator=g),
        # Before softplus: softplus(-3 + ...) ~ 0.05, the Mamba dt init range.
        "delta_bias": -3.0 + 0.5 * torch.randn(DIM, generator=g),
        "initial_state": torch.randn(BATCH, DIM, DSTATE, generator=g),
    }


SCAN_VARIANTS = {
    "plain": ("u", "delta", "A", "B", "C"),
    "D_and_z": ("u", "delta", "A", "B", "C", "D", "z"),
    "bias_softplus": ("u", "delta", "A", "B", "C", "delta_bias"),
    "initial_state": ("u", "delta", "A", "B", "C", "initial_state"),
    "everything": ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"),
}


def scan_kwargs(inputs: dict[str, torch.Tensor], names: tuple[str, ...]) -> dict:
    kwargs = {name: inputs[name] for name in names}
    if "delta_bias" in names:
        kwargs["delta"] = inputs["delta"] * 0.5  # pre-softplus values
        kwargs["delta_softplus"] = True
    return kwargs


# ---------------------------------------------------------------- selective scan


@pytest.mark.parametrize("variant", sorted(SCAN_VARIANTS))
@pytest.mark.parametrize("chunk_size", [None, 8, 64])  # 64 > seqlen: the one-chunk path
def test_selective_scan_reference_matches_naive(variant: str, chunk_size: int | None) -> None:
    kwargs = scan_kwargs(scan_inputs(), SCAN_VARIANTS[variant])
    expected, expected_state = selective_scan_naive(**kwargs, return_last_state=True)
    out, state = selective_scan_reference(**kwargs, return_last_state=True, chunk_size=chunk_size)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, expected_state, rtol=1e-5, atol=1e-5)
    assert out.dtype == torch.float32 and state.shape == (BATCH, DIM, DSTATE)


def test_selective_scan_reference_gradients_match_naive() -> None:
    names = SCAN_VARIANTS["everything"]
    kwargs = scan_kwargs(scan_inputs(seed=1), names)
    leaves = {name: kwargs[name].clone().requires_grad_(True) for name in names}
    kwargs.update(leaves)
    g = torch.Generator().manual_seed(2)
    out_weight = torch.randn(BATCH, DIM, SEQLEN, generator=g)
    state_weight = torch.randn(BATCH, DIM, DSTATE, generator=g)

    def gradients(fn) -> tuple[torch.Tensor, ...]:
        out, state = fn(**kwargs, return_last_state=True)
        loss = (out * out_weight).sum() + (state * state_weight).sum()
        return torch.autograd.grad(loss, list(leaves.values()))

    expected = gradients(selective_scan_naive)
    actual = gradients(lambda **kw: selective_scan_reference(**kw, chunk_size=8))
    for name, grad, grad_expected in zip(leaves, actual, expected):
        assert rel_err(grad, grad_expected) < 1e-5, name


def test_selective_scan_dispatch_on_cpu_uses_the_reference() -> None:
    kwargs = scan_kwargs(scan_inputs(), SCAN_VARIANTS["everything"])
    expected = selective_scan_naive(**kwargs)
    torch.testing.assert_close(selective_scan(**kwargs, backend="auto"), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(selective_scan(**kwargs, backend="reference"), expected, rtol=1e-5, atol=1e-5)


def test_selective_scan_split_with_state_passing_equals_one_call() -> None:
    inputs = scan_inputs(seed=3)
    kwargs = scan_kwargs(inputs, ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    full, full_state = selective_scan(**kwargs, return_last_state=True)
    cut = 15

    def part(sl: slice) -> dict:
        return {k: (v[..., sl] if k in ("u", "delta", "B", "C", "z") else v) for k, v in kwargs.items()}

    first, state = selective_scan(**part(slice(0, cut)), return_last_state=True)
    second, last_state = selective_scan(**part(slice(cut, None)), initial_state=state, return_last_state=True)
    torch.testing.assert_close(torch.cat([first, second], dim=-1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last_state, full_state, rtol=1e-5, atol=1e-5)


def test_selective_state_update_token_by_token_equals_scan() -> None:
    inputs = scan_inputs(seed=4)
    kwargs = scan_kwargs(inputs, SCAN_VARIANTS["everything"])
    full, full_state = selective_scan(**kwargs, return_last_state=True)
    state = inputs["initial_state"].clone()
    ys = [
        selective_state_update(
            state, kwargs["u"][..., t], kwargs["delta"][..., t], kwargs["A"], kwargs["B"][..., t],
            kwargs["C"][..., t], kwargs["D"], kwargs["z"][..., t], dt_bias=kwargs["delta_bias"], dt_softplus=True,
        )
        for t in range(SEQLEN)
    ]
    torch.testing.assert_close(torch.stack(ys, dim=-1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, full_state, rtol=1e-5, atol=1e-5)


def test_implicit_attention_reproduces_the_scan() -> None:
    inputs = scan_inputs(seed=5, seqlen=12)
    delta = inputs["delta"] * 0.5
    alpha = selective_scan_implicit_attention(
        delta, inputs["A"], inputs["B"], inputs["C"], delta_bias=inputs["delta_bias"], delta_softplus=True
    )
    assert alpha.shape == (BATCH, DIM, 12, 12)
    assert torch.all(alpha.triu(diagonal=1) == 0)
    expected = selective_scan_naive(
        inputs["u"], delta, inputs["A"], inputs["B"], inputs["C"], delta_bias=inputs["delta_bias"], delta_softplus=True
    )
    torch.testing.assert_close(torch.einsum("bdts,bds->bdt", alpha, inputs["u"]), expected, rtol=1e-5, atol=1e-5)


def test_selective_scan_equals_ssd_when_decay_is_scalar_per_channel() -> None:
    """Two independent oracles agree: Mamba-1 with A[d, :] constant is Mamba-2 with headdim 1."""
    inputs = scan_inputs(seed=6)
    A_scalar = inputs["A"][:, 0]
    A = A_scalar[:, None].expand(DIM, DSTATE)
    mamba1 = selective_scan_naive(inputs["u"], inputs["delta"], A, inputs["B"], inputs["C"], inputs["D"])
    mamba2 = ssd_naive(
        inputs["u"].transpose(1, 2)[..., None],
        inputs["delta"].transpose(1, 2),
        A_scalar,
        inputs["B"].transpose(1, 2)[:, :, None, :],
        inputs["C"].transpose(1, 2)[:, :, None, :],
        D=inputs["D"],
    )
    torch.testing.assert_close(mamba2[..., 0].transpose(1, 2), mamba1, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- causal conv1d


def conv_inputs(seed: int = 0, width: int = 4, seqlen: int = SEQLEN) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(BATCH, DIM, seqlen, generator=g),
        "weight": torch.randn(DIM, width, generator=g) / width**0.5,
        "bias": torch.randn(DIM, generator=g),
        "initial_state": torch.randn(BATCH, DIM, width - 1, generator=g),
    }


@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_matches_its_definition(activation: str | None) -> None:
    inputs = conv_inputs(seed=7)
    x, weight, bias, state = inputs["x"], inputs["weight"], inputs["bias"], inputs["initial_state"]
    padded = torch.cat([state, x], dim=-1)
    width = weight.shape[1]
    expected = bias[None, :, None] + sum(weight[None, :, k, None] * padded[:, :, k : k + SEQLEN] for k in range(width))
    if activation == "silu":
        expected = F.silu(expected)
    y, final_state = causal_conv1d(
        x, weight, bias, initial_state=state, activation=activation, return_final_state=True
    )
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final_state, x[..., -(width - 1) :])
    # Without an initial state the past is zeros.
    zero_start = causal_conv1d(x, weight, bias, initial_state=torch.zeros_like(state), activation=activation)
    torch.testing.assert_close(causal_conv1d(x, weight, bias, activation=activation), zero_start)


def test_causal_conv1d_final_state_of_a_short_sequence_keeps_the_old_state() -> None:
    inputs = conv_inputs(seed=8, seqlen=2)
    _, final_state = causal_conv1d(
        inputs["x"], inputs["weight"], initial_state=inputs["initial_state"], return_final_state=True
    )
    expected = torch.cat([inputs["initial_state"][..., -1:], inputs["x"]], dim=-1)
    torch.testing.assert_close(final_state, expected)


def test_causal_conv1d_split_with_state_passing_equals_one_call() -> None:
    inputs = conv_inputs(seed=9)
    x, weight, bias = inputs["x"], inputs["weight"], inputs["bias"]
    full, full_state = causal_conv1d(x, weight, bias, return_final_state=True)
    first, state = causal_conv1d(x[..., :20], weight, bias, return_final_state=True)
    second, last_state = causal_conv1d(x[..., 20:], weight, bias, initial_state=state, return_final_state=True)
    torch.testing.assert_close(torch.cat([first, second], dim=-1), full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(last_state, full_state)


def test_causal_conv1d_step_token_by_token_equals_full_conv() -> None:
    inputs = conv_inputs(seed=10)
    x, weight, bias = inputs["x"], inputs["weight"], inputs["bias"]
    full, full_state = causal_conv1d(
        x, weight, bias, initial_state=inputs["initial_state"], return_final_state=True
    )
    conv_state = inputs["initial_state"].clone()
    ys = [causal_conv1d_step(x[..., t], conv_state, weight, bias) for t in range(SEQLEN)]
    torch.testing.assert_close(torch.stack(ys, dim=-1), full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(conv_state, full_state)


def test_causal_conv1d_gradients_flow_into_initial_state() -> None:
    inputs = conv_inputs(seed=11)
    state = inputs["initial_state"].requires_grad_(True)
    y = causal_conv1d(inputs["x"], inputs["weight"], initial_state=state, activation=None)
    (grad,) = torch.autograd.grad(y[..., 0].sum(), state)
    # y_0 = sum_k w_k * padded_k, and padded_0..2 is the initial state.
    torch.testing.assert_close(grad, inputs["weight"][None, :, :-1].expand(BATCH, -1, -1))


# ---------------------------------------------------------------- SSD (Mamba-2)

HEADS, HEADDIM, SSD_STATE = 4, 3, 5


def ssd_inputs(seed: int = 0, ngroups: int = 2, seqlen: int = SEQLEN) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(BATCH, seqlen, HEADS, HEADDIM, generator=g),
        "dt": -3.0 + 0.5 * torch.randn(BATCH, seqlen, HEADS, generator=g),  # pre-softplus
        "A": -torch.exp(torch.randn(HEADS, generator=g)),
        "B": torch.randn(BATCH, seqlen, ngroups, SSD_STATE, generator=g),
        "C": torch.randn(BATCH, seqlen, ngroups, SSD_STATE, generator=g),
        "z": torch.randn(BATCH, seqlen, HEADS, HEADDIM, generator=g),
        "dt_bias": 0.5 * torch.randn(HEADS, generator=g),
        "initial_state": torch.randn(BATCH, HEADS, HEADDIM, SSD_STATE, generator=g),
        "D_heads": torch.randn(HEADS, generator=g),
        "D_channels": torch.randn(HEADS, HEADDIM, generator=g),
    }


def ssd_kwargs(inputs: dict[str, torch.Tensor], D: str | None, z: bool, state: bool) -> dict:
    kwargs = {name: inputs[name] for name in ("x", "dt", "A", "B", "C", "dt_bias")}
    kwargs["dt_softplus"] = True
    if D is not None:
        kwargs["D"] = inputs[D]
    if z:
        kwargs["z"] = inputs["z"]
    if state:
        kwargs["initial_state"] = inputs["initial_state"]
    return kwargs


@pytest.mark.parametrize(
    ("ngroups", "D", "z", "state"),
    [(1, None, False, False), (2, "D_heads", True, False), (4, "D_channels", False, True), (2, "D_channels", True, True)],
)
@pytest.mark.parametrize("chunk_size", [8, 16])
def test_ssd_reference_matches_naive(ngroups: int, D: str | None, z: bool, state: bool, chunk_size: int) -> None:
    kwargs = ssd_kwargs(ssd_inputs(ngroups=ngroups), D, z, state)
    expected, expected_state = ssd_naive(**kwargs, return_final_state=True)
    out, final_state = ssd_reference(**kwargs, chunk_size=chunk_size, return_final_state=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final_state, expected_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ssd_scan(**kwargs, chunk_size=chunk_size), expected, rtol=1e-5, atol=1e-5)


def test_ssd_implicit_attention_reproduces_the_scan() -> None:
    inputs = ssd_inputs(seed=14, seqlen=12)
    alpha = ssd_implicit_attention(inputs["dt"], inputs["A"], inputs["B"], inputs["C"], inputs["dt_bias"], True)
    assert alpha.shape == (BATCH, HEADS, 12, 12)
    assert torch.all(alpha.triu(diagonal=1) == 0)
    expected = ssd_naive(**ssd_kwargs(inputs, None, z=False, state=False))
    torch.testing.assert_close(torch.einsum("bhts,bshp->bthp", alpha, inputs["x"]), expected, rtol=1e-5, atol=1e-5)


def test_ssd_reference_gradients_match_naive() -> None:
    kwargs = ssd_kwargs(ssd_inputs(seed=12), "D_channels", z=True, state=True)
    names = ("x", "dt", "A", "B", "C", "dt_bias", "D", "z", "initial_state")
    leaves = {name: kwargs[name].clone().requires_grad_(True) for name in names}
    kwargs.update(leaves)
    g = torch.Generator().manual_seed(13)
    out_weight = torch.randn(BATCH, SEQLEN, HEADS, HEADDIM, generator=g)
    state_weight = torch.randn(BATCH, HEADS, HEADDIM, SSD_STATE, generator=g)

    def gradients(fn) -> tuple[torch.Tensor, ...]:
        out, state = fn(**kwargs, return_final_state=True)
        loss = (out * out_weight).sum() + (state * state_weight).sum()
        return torch.autograd.grad(loss, list(leaves.values()))

    expected = gradients(ssd_naive)
    actual = gradients(lambda **kw: ssd_reference(**kw, chunk_size=8))
    for name, grad, grad_expected in zip(leaves, actual, expected):
        assert rel_err(grad, grad_expected) < 1e-5, name


def test_ssd_split_with_state_passing_equals_one_call() -> None:
    kwargs = ssd_kwargs(ssd_inputs(seed=14), "D_heads", z=True, state=False)
    full, full_state = ssd_scan(**kwargs, chunk_size=8, return_final_state=True)
    cut = 13
    per_step = ("x", "dt", "B", "C", "z")

    def part(sl: slice) -> dict:
        return {k: (v[:, sl] if k in per_step else v) for k, v in kwargs.items()}

    first, state = ssd_scan(**part(slice(0, cut)), chunk_size=8, return_final_state=True)
    second, last_state = ssd_scan(
        **part(slice(cut, None)), chunk_size=8, initial_state=state, return_final_state=True
    )
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last_state, full_state, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("D", ["D_heads", "D_channels"])
def test_ssd_step_token_by_token_equals_scan(D: str) -> None:
    inputs = ssd_inputs(seed=15)
    kwargs = ssd_kwargs(inputs, D, z=True, state=True)
    full, full_state = ssd_scan(**kwargs, chunk_size=8, return_final_state=True)
    state = inputs["initial_state"].clone()
    ys = [
        ssd_step(
            state, kwargs["x"][:, t], kwargs["dt"][:, t], kwargs["A"], kwargs["B"][:, t], kwargs["C"][:, t],
            D=kwargs["D"], z=kwargs["z"][:, t], dt_bias=kwargs["dt_bias"], dt_softplus=True,
        )
        for t in range(SEQLEN)
    ]
    torch.testing.assert_close(torch.stack(ys, dim=1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, full_state, rtol=1e-5, atol=1e-5)


def test_segsum_values() -> None:
    x = torch.tensor([1.0, 2.0, 4.0])
    expected = torch.tensor([[0.0, -torch.inf, -torch.inf], [2.0, 0.0, -torch.inf], [6.0, 4.0, 0.0]])
    torch.testing.assert_close(segsum(x), expected)


# ---------------------------------------------------------------- bf16 and errors


def test_bf16_inputs_land_near_the_float32_result() -> None:
    bf16 = torch.bfloat16
    scan = scan_kwargs(scan_inputs(seed=16), SCAN_VARIANTS["everything"])
    low = {k: (v.to(bf16) if k in ("u", "delta", "B", "C", "z") else v) for k, v in scan.items()}
    out = selective_scan(**low)
    assert out.dtype == bf16
    assert rel_err(out, selective_scan(**scan)) < 2e-2

    conv = conv_inputs(seed=17)
    out = causal_conv1d(conv["x"].to(bf16), conv["weight"], conv["bias"])
    assert out.dtype == bf16
    assert rel_err(out, causal_conv1d(conv["x"], conv["weight"], conv["bias"])) < 2e-2

    ssd = ssd_kwargs(ssd_inputs(seed=18), "D_heads", z=True, state=True)
    low = {k: (v.to(bf16) if k in ("x", "dt", "B", "C", "z") else v) for k, v in ssd.items()}
    out = ssd_scan(**low, chunk_size=8)
    assert out.dtype == bf16
    assert rel_err(out, ssd_scan(**ssd, chunk_size=8)) < 2e-2


def test_unknown_backend_is_rejected_by_name() -> None:
    kwargs = scan_kwargs(scan_inputs(), SCAN_VARIANTS["plain"])
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'reference', 'kernel'\], got 'cuda'"):
        selective_scan(**kwargs, backend="cuda")
    conv = conv_inputs()
    with pytest.raises(ValueError, match="backend must be one of"):
        causal_conv1d(conv["x"], conv["weight"], backend="triton")


def test_kernel_backend_on_cpu_is_a_clear_error() -> None:
    kwargs = scan_kwargs(scan_inputs(), SCAN_VARIANTS["plain"])
    message = r"backend='kernel' requested for selective_scan_triton but its inputs are on cpu; the triton kernel needs"
    with pytest.raises(ValueError, match=message):
        selective_scan(**kwargs, backend="kernel")  # the default scan kernel
    message = r"backend='kernel' requested for selective_scan but its inputs are on cpu; the mamba_ssm kernel needs"
    with pytest.raises(ValueError, match=message):
        selective_scan(**kwargs, backend="kernel", kernel="mamba_ssm")
    ssd = ssd_kwargs(ssd_inputs(), None, z=False, state=False)
    with pytest.raises(ValueError, match="backend='kernel' requested for ssd_scan"):
        ssd_scan(**ssd, backend="kernel")
    conv = conv_inputs()
    with pytest.raises(ValueError, match="the causal_conv1d kernel needs CUDA"):
        causal_conv1d_step(conv["x"][..., 0], conv["initial_state"], conv["weight"], backend="kernel")


def test_resolve_backend_and_describe_backends_on_cpu() -> None:
    x = torch.zeros(1)
    assert resolve_backend("auto", x, "ssd_scan") == "reference"
    assert resolve_backend("reference", x, "causal_conv1d") == "reference"
    with pytest.raises(ValueError, match="op must be one of"):
        resolve_backend("auto", x, "flash_attention")
    report = describe_backends()
    assert {"mamba_ssm", "causal_conv1d", "cuda"} <= set(report)
    if not torch.cuda.is_available():
        assert report["cuda"] == "unavailable"


def test_mismatched_shapes_name_the_argument() -> None:
    kwargs = scan_kwargs(scan_inputs(), SCAN_VARIANTS["plain"])
    kwargs["C"] = kwargs["C"][..., :-1]
    with pytest.raises(ValueError, match=r"C must have shape \(2, 3, 37\), got \(2, 3, 36\)"):
        selective_scan(**kwargs)
    inputs = ssd_inputs(ngroups=2)
    with pytest.raises(ValueError, match=r"D must have shape \(4,\) or \(4, 3\), got \(3,\)"):
        ssd_scan(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], D=torch.zeros(3))
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        ssd_scan(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], chunk_size=0)
    conv = conv_inputs()
    with pytest.raises(ValueError, match="activation must be one of"):
        causal_conv1d(conv["x"], conv["weight"], activation="gelu")


def test_compiled_code_reads_cached_import_outcomes() -> None:
    """The backend check runs inside every op call. Under torch.compile it must read the cached outcome as a
    constant: a functools.lru_cache there makes Dynamo trace the wrapped import code on every call (what made the
    300M compile outlive its time limit on the GPU), which Dynamo announces with a warning."""
    import warnings

    import torch._dynamo

    from components.ops import backend

    backend.describe_backends()

    def op(x: torch.Tensor) -> torch.Tensor:
        return x * 2 if backend.kernel_available("mamba_ssm") else x + 1

    torch._dynamo.reset()
    expected = op(torch.ones(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explanation = torch._dynamo.explain(op)(torch.ones(3))
        torch.testing.assert_close(torch.compile(op)(torch.ones(3)), expected)
    assert explanation.graph_break_count == 0
    assert not [w for w in caught if "lru_cache" in str(w.message)]
