"""Choosing between the pure-PyTorch reference ops and the fused GPU kernels.

An op's kernel package (``mamba_ssm``, ``causal_conv1d``, ``triton``, ``torch``) is imported lazily, once, and any
failure (ImportError, but also e.g. an OSError from a broken CUDA library inside ``mamba_ssm/__init__``) marks the
kernel as unavailable. mamba_ssm and causal_conv1d import only where CUDA and their compiled extensions are; a
kernel also needs its tensors on CUDA, whatever imports.
"""

from __future__ import annotations

import importlib
from typing import Literal, get_args

import torch

from components.config import ConfigError

Backend = Literal["auto", "reference", "kernel"]
BACKENDS: tuple[str, ...] = get_args(Backend)

# The package whose kernel each op dispatches to.
KERNEL_PACKAGE_OF_OP: dict[str, str] = {
    "causal_conv1d": "causal_conv1d",
    "causal_conv1d_step": "causal_conv1d",
    "selective_scan": "mamba_ssm",
    "selective_scan_triton": "triton",
    "mamba1_step": "triton",  # arch_lab's fused Mamba-1 decode step
    "selective_state_update": "mamba_ssm",
    "ssd_scan": "mamba_ssm",
    "ssd_step": "mamba_ssm",
    "attention": "torch",  # FlexAttention / SDPA ship with torch: only CUDA is needed
}
KERNEL_PACKAGES: tuple[str, ...] = tuple(sorted(set(KERNEL_PACKAGE_OF_OP.values())))


class BackendError(ConfigError):
    """An unknown backend name, or a kernel backend that cannot run here."""


# The modules the ops import their kernels from, loaded together with the package: an op's own
# function-level import then only finds them in sys.modules, which torch.compile traces for free.
KERNEL_MODULES: dict[str, tuple[str, ...]] = {
    "causal_conv1d": ("causal_conv1d",),
    "mamba_ssm": ("mamba_ssm", "mamba_ssm.ops.selective_scan_interface", "mamba_ssm.ops.triton.ssd_combined",
                  "mamba_ssm.ops.triton.selective_state_update"),
    "torch": ("torch",),
    "triton": ("triton", "components.ops.selective_scan_triton", "components.ops.mamba1_step_triton"),
}
# A plain dict, not functools.lru_cache: torch.compile traces through an lru_cache wrapper into the
# wrapped function (here: the import machinery) on every call, but reads a dict as a constant.
_IMPORT_OUTCOMES: dict[str, str] = {}


def _import_outcome(package: str) -> str:
    """'ok', or why the package does not import (cached: importing is slow and sticky)."""
    if package not in _IMPORT_OUTCOMES:
        try:
            for module in KERNEL_MODULES[package]:
                importlib.import_module(module)
            _IMPORT_OUTCOMES[package] = "ok"
        except Exception as error:  # noqa: BLE001 - any failure means "no kernel here"
            _IMPORT_OUTCOMES[package] = f"unavailable ({type(error).__name__}: {error})"
    return _IMPORT_OUTCOMES[package]


def kernel_available(package: str) -> bool:
    """Whether ``package`` imports on this machine."""
    return _import_outcome(package) == "ok"


def describe_backends() -> dict[str, str]:
    """Which kernel packages import here, e.g. ``{"mamba_ssm": "ok", ...}`` (for run logs). Call it before
    torch.compile, so that compiled code finds the outcomes cached and never traces an import."""
    report = {package: _import_outcome(package) for package in KERNEL_PACKAGES}
    report["cuda"] = "ok" if torch.cuda.is_available() else "unavailable"
    return report


def resolve_backend(requested: str, tensor: torch.Tensor, op: str) -> str:
    """Map a requested backend to the one that runs: "kernel" or "reference".

    "auto" picks the kernel when ``tensor`` is on CUDA and the op's kernel package
    imports, else the reference. "kernel" insists on the kernel and raises if it cannot run.
    """
    if requested not in BACKENDS:
        raise BackendError(f"backend must be one of {list(BACKENDS)}, got {requested!r} (op {op})")
    if op not in KERNEL_PACKAGE_OF_OP:
        raise ValueError(f"op must be one of {sorted(KERNEL_PACKAGE_OF_OP)}, got {op!r}")
    if requested == "reference":
        return "reference"
    package = KERNEL_PACKAGE_OF_OP[op]
    if not tensor.is_cuda:
        if requested == "kernel":
            raise BackendError(
                f"backend='kernel' requested for {op} but its inputs are on {tensor.device}; "
                f"the {package} kernel needs CUDA tensors. Use backend='auto' or 'reference'."
            )
        return "reference"
    if kernel_available(package):
        return "kernel"
    if requested == "kernel":
        raise BackendError(
            f"backend='kernel' requested for {op} but {package} is {_import_outcome(package)}. "
            "Use backend='auto' or 'reference'."
        )
    return "reference"


class ShapeError(ValueError):
    """An op input whose shape does not match the others."""


def check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    """Raise ShapeError naming ``name`` unless ``tensor.shape == expected``."""
    if tuple(tensor.shape) != tuple(expected):
        raise ShapeError(f"{name} must have shape {tuple(expected)}, got {tuple(tensor.shape)}")
