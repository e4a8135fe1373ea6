r"""Time versions of the Triton scan module side by side, in one process, at row E's training shape.

    mkdir -p experiments/performance/_ab    # untracked files in the working tree travel to the device machine
    git show 709d0bf:components/ops/selective_scan_triton.py > experiments/performance/_ab/old.py
    N=components/ops/selective_scan_triton.py
    python experiments/performance/scan_variant_ab.py old=experiments/performance/_ab/old.py new=$N \
        new_uncapped=$N:max_registers=none new_cap144=$N:max_registers=144

Each variant is LABEL=PATH[:KEY=VALUE,...]: a copy of components/ops/selective_scan_triton.py, with launch keywords
for its scan_bwd (and scan_fwd where it takes them), integers or none. Kernel times come from torch.profiler (device
ms per forward + backward, each kernel by name), the median of --rounds rounds that take the variants in turn, so
that a machine's drift falls on all of them alike. Every variant's output and gradients are compared with the
first's.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import statistics
import sys
from pathlib import Path
from typing import Optional

import torch

from scan_kernel_bench import kernel_ms, launcher_args, make_inputs, rel


def load_variant(spec: str) -> tuple[str, object, dict[str, Optional[int]]]:
    label, _, rest = spec.partition("=")
    path, _, options = rest.partition(":")
    if not label or not Path(path).is_file():
        raise SystemExit(f"variant {spec!r}: expected LABEL=PATH[:KEY=VALUE,...] with an existing file")
    name = f"scan_variant_{len(sys.modules)}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # triton reads the kernels' source through the module
    module_spec.loader.exec_module(module)
    launch = {key: None if value == "none" else int(value)
              for key, value in (item.split("=") for item in options.split(",") if item)}
    return label, module, launch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", help="LABEL=PATH[:KEY=VALUE,...]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=8, help="steps per saved state, unless a variant sets chunk")
    args = parser.parse_args()
    variants = [load_variant(spec) for spec in args.variants]
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the variants' kernels are compiled Triton)")
    batch, dim, seqlen, dstate = 8, 1024, 2176, 16
    inputs = make_inputs(batch, dim, seqlen, dstate)
    dout = torch.randn(batch, seqlen, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    positional = launcher_args(inputs, dim)

    def run(module, launch: dict[str, Optional[int]]) -> tuple:
        launch = {"chunk": args.chunk, **launch}
        fwd_launch = {k: v for k, v in launch.items() if k in inspect.signature(module.scan_fwd).parameters}
        out, y, starts, _ = module.scan_fwd(*positional, None, True, **fwd_launch)
        return (out, *module.scan_bwd(*positional, starts, y, dout, None, True, **launch))

    times: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in variants}
    for _ in range(args.rounds):
        for label, module, launch in variants:
            times[label].append(kernel_ms(lambda: run(module, launch), args.iters)[2])
    reference = run(variants[0][1], variants[0][2])
    print(f"{torch.cuda.get_device_name()}: batch {batch}, {dim} channels, {seqlen} steps, state {dstate}, bf16")
    for label, module, launch in variants:
        err = max(rel(x, r) for x, r in zip(run(module, launch), reference) if x is not None)
        kernels = {k: statistics.median(r[k] for r in times[label]) for k in times[label][0]}
        per_kernel = ", ".join(f"{k.removeprefix('_scan_').removesuffix('_kernel')} {v:.3f}"
                               for k, v in kernels.items())
        print(f"{label:<16} {sum(kernels.values()):.3f} ms | {per_kernel} | "
              f"max rel. diff vs {variants[0][0]} {err:.1e}")


if __name__ == "__main__":
    main()
