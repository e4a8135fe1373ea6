"""SSM compute ops: pure functions with a PyTorch reference and an optional GPU kernel path."""

from components.ops.backend import Backend, describe_backends, resolve_backend
from components.ops.causal_conv import causal_conv1d, causal_conv1d_step
from components.ops.selective_scan import (
    selective_scan,
    selective_scan_implicit_attention,
    selective_state_update,
)
from components.ops.ssd import ssd_scan, ssd_step

__all__ = [
    "Backend",
    "causal_conv1d",
    "causal_conv1d_step",
    "describe_backends",
    "resolve_backend",
    "selective_scan",
    "selective_scan_implicit_attention",
    "selective_state_update",
    "ssd_scan",
    "ssd_step",
]
