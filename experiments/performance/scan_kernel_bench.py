"""Time the Mamba-1 selective scan's GPU kernels side by side at row E's training shape, and check they agree.

    python experiments/performance/scan_kernel_bench.py                    # batch 8, 1024 channels, 2176 steps
    python experiments/performance/scan_kernel_bench.py --configs 16x16x1x8x2x4 16x16x1x8x2x16 --out scan.json

Inputs are laid out as Mamba1Heads passes them in training (u and z channel-last views of the input projection,
delta a transposed (b, l, d) tensor, B and C contiguous (b, n, l)), bf16 with float32 A, D and delta bias. Rows:
- mamba_ssm: `selective_scan(kernel="mamba_ssm")`, mamba_ssm's CUDA kernel with the copies to contiguous it needs;
- triton: `selective_scan(kernel="triton")`, arch_lab's kernel at its launch defaults;
- triton BxCxWxAxUxS: the Triton launchers with block_d=B channels, chunk=C steps, num_warps=W, prefetches A steps
  ahead, U steps per loop iteration and S chunks per program of the output walks (for choosing defaults).
Forward and forward+backward are timed with CUDA events (median of --iters after --warmup), which count the host's
gaps between launches too; the kernel columns sum the device time of forward+backward's kernels with torch.profiler
(all of them, the scan kernels alone, and each scan kernel by name), as a compiled training step sees them. The
agreement columns are ||triton - mamba_ssm|| / ||mamba_ssm|| for the output and each gradient.
"""
from __future__ import annotations

import argparse
import json
import statistics
from typing import Callable

import torch


def make_inputs(batch: int, dim: int, seqlen: int, dstate: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    proj = torch.randn(batch, seqlen, 2 * dim, generator=g, **bf16)
    return {
        "proj": proj,
        "delta": (0.5 * torch.randn(batch, seqlen, dim, generator=g, **bf16) - 2.0),
        "A": -torch.exp(torch.randn(dim, dstate, device="cuda", generator=g)),
        "B": torch.randn(batch, dstate, seqlen, generator=g, **bf16),
        "C": torch.randn(batch, dstate, seqlen, generator=g, **bf16),
        "D": torch.randn(dim, device="cuda", generator=g),
        "delta_bias": 0.5 * torch.randn(dim, device="cuda", generator=g),
    }


def scan_args(leaves: dict[str, torch.Tensor], dim: int) -> dict[str, torch.Tensor]:
    proj = leaves["proj"]
    return dict(u=proj[..., :dim].transpose(1, 2), delta=leaves["delta"].transpose(1, 2), A=leaves["A"],
                B=leaves["B"], C=leaves["C"], D=leaves["D"], z=proj[..., dim:].transpose(1, 2),
                delta_bias=leaves["delta_bias"])


def launcher_args(leaves: dict[str, torch.Tensor], dim: int) -> tuple:
    """scan_fwd's and scan_bwd's leading positional inputs (u, delta, A, B, C, D, z, delta_bias)."""
    args = scan_args(leaves, dim)
    return tuple(args[name] for name in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))


def cuda_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_times(fn: Callable[[], object], iters: int) -> dict[str, float]:
    """Each kernel's device ms per call of `fn`, by kernel name, summed by torch.profiler: the GPU's time without
    the host's gaps between launches, as a compiled training step sees them."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return {e.key: e.self_device_time_total / 1000 / iters for e in prof.key_averages()
            if e.device_type == DeviceType.CUDA}


def kernel_ms(fn: Callable[[], object], iters: int) -> tuple[float, float, dict[str, float]]:
    """(all kernels, the scan kernels alone, each scan kernel by name) in device ms per call (kernel_times)."""
    times = kernel_times(fn, iters)
    scan = {name[:40]: ms for name, ms in times.items() if "scan" in name.lower()}
    return sum(times.values()), sum(scan.values()), scan


def timed(forward: Callable[[], object], forward_backward: Callable[[], object], warmup: int, iters: int) -> dict:
    with torch.no_grad():
        fwd_ms = cuda_ms(forward, warmup, iters)
    kernels, scan, by_kernel = kernel_ms(forward_backward, iters)
    return {"fwd_ms": fwd_ms, "fwd_bwd_ms": cuda_ms(forward_backward, warmup, iters), "kernel_ms": kernels,
            "scan_kernel_ms": scan, "by_kernel": by_kernel}


def autograd_row(kernel: str, inputs: dict, dim: int, dout: torch.Tensor, warmup: int, iters: int) -> dict:
    from components.ops.selective_scan import selective_scan

    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in inputs.items()}

    def forward() -> torch.Tensor:
        return selective_scan(**scan_args(leaves, dim), delta_softplus=True, backend="kernel", kernel=kernel)

    def forward_backward() -> None:
        torch.autograd.grad(forward(), list(leaves.values()), dout)

    row = timed(forward, forward_backward, warmup, iters)
    out = forward()
    grads = torch.autograd.grad(out, list(leaves.values()), dout)
    return {**row, "out": out.detach(), "grads": dict(zip(leaves, grads))}


def launcher_row(config: str, inputs: dict, dim: int, dout: torch.Tensor, warmup: int, iters: int) -> dict:
    from components.ops import selective_scan_triton as kernels

    block_d, chunk, num_warps, ahead, unroll, segment = (int(v) for v in config.split("x"))
    launch = dict(block_d=block_d, chunk=chunk, num_warps=num_warps, ahead=ahead, unroll=unroll, segment=segment)
    positional = launcher_args(inputs, dim)

    def forward():
        return kernels.scan_fwd(*positional, None, True, **launch)

    def forward_backward() -> None:
        _, y, starts, _ = forward()
        kernels.scan_bwd(*positional, starts, y, dout, None, True, **launch)

    return timed(forward, forward_backward, warmup, iters)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dim", type=int, default=1024,
                        help="SSM channels (row E at 300M: its parameter budget sets ssm_inner to 1,024)")
    parser.add_argument("--seqlen", type=int, default=2176, help="2048 tokens + 128 meta tokens")
    parser.add_argument("--dstate", type=int, default=16)
    parser.add_argument("--configs", nargs="*", default=[],
                        help="Triton launches BLOCK_DxCHUNKxWARPSxAHEADxUNROLLxSEGMENT to time too")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the kernels are mamba_ssm's and Triton's)")

    inputs = make_inputs(args.batch, args.dim, args.seqlen, args.dstate)
    dout = torch.randn(args.batch, args.seqlen, args.dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    shape = f"batch {args.batch}, {args.dim} channels, {args.seqlen} steps, state {args.dstate}, bf16"
    print(f"{torch.cuda.get_device_name()}: selective scan, {shape}")
    reference = autograd_row("mamba_ssm", inputs, args.dim, dout, args.warmup, args.iters)
    triton_row = autograd_row("triton", inputs, args.dim, dout, args.warmup, args.iters)
    agreement = {"out": rel(triton_row["out"], reference["out"])}
    agreement.update({f"d{name}": rel(triton_row["grads"][name], reference["grads"][name]) for name in inputs})
    rows = {"mamba_ssm": reference, "triton": triton_row}
    for config in args.configs:
        rows[f"triton {config}"] = launcher_row(config, inputs, args.dim, dout, args.warmup, args.iters)

    base = reference["fwd_bwd_ms"]
    base_scan = reference["scan_kernel_ms"]
    print(f"{'kernel':<24}{'forward ms':>11}{'fwd+bwd ms':>11}{'speed-up':>9}{'kernels ms':>11}{'scan kernels ms':>16}"
          f"{'speed-up':>9}")
    for name, row in rows.items():
        print(f"{name:<24}{row['fwd_ms']:>11.3f}{row['fwd_bwd_ms']:>11.3f}{base / row['fwd_bwd_ms']:>8.2f}x"
              f"{row['kernel_ms']:>11.3f}{row['scan_kernel_ms']:>16.3f}{base_scan / row['scan_kernel_ms']:>8.2f}x")
    for name, row in rows.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row["by_kernel"].items()))
    print("triton vs mamba_ssm, relative error: " + ", ".join(f"{k} {v:.2e}" for k, v in agreement.items()))
    if args.out:
        table = {name: {k: row[k] for k in ("fwd_ms", "fwd_bwd_ms", "kernel_ms", "scan_kernel_ms", "by_kernel")}
                 for name, row in rows.items()}
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "shape": shape, "rows": table,
                       "agreement": agreement}, f, indent=2)


if __name__ == "__main__":
    main()
