"""What ptxas makes of the lab's Triton kernels, on any machine (no GPU needed): registers, stack and spills a
thread, and counts of the instructions a latency-bound kernel waits on, from the cubin compiled for Hopper.

    python experiments/performance/kernel_resources.py                    # the scan's and the fused step's kernels
    python experiments/performance/kernel_resources.py --kernels _scan_bwd_kernel --sass --layouts

The launchers (the Triton scan's forward and backward at row E's training shape, the fused Mamba-1 decode step at
batch 128 for --rows) run on meta tensors with their kernels swapped for recorders, so each kernel is compiled with
the arguments, constexprs and options its launcher passes, and with Triton's specializations (integers equal to 1
as constants, integers and pointers divisible by 16 marked so). Use it before a device call: a kernel change that
raises the registers past an occupancy step, or adds spills or shuffles, shows here.

Everything here comes from the Triton this runs with, and Triton's versions lay tiles out differently: with 8
states along its last axis, the scan's backward tile got 16 lanes along the channels from Triton 3.8 and 8 from 3.6
(the GPU machine's), and their spills and shuffles differed accordingly. To read what the GPU machine compiles, run
it with that version beside this machine's:

    pip install --no-deps --target /tmp/triton-3.6.0 triton==3.6.0
    PYTHONPATH=/tmp/triton-3.6.0 python experiments/performance/kernel_resources.py --kernels _scan_bwd_kernel
"""
from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from components.model import HybridLM
from components.ops import mamba1_step_triton, selective_scan_triton
from components.ops.custom_ops import TRITON_SCAN_CHUNK
from components.presets import preset
from components.ssm_heads import Mamba1Heads, SSMState

# SASS opcodes counted per kernel: what one-warp walks and small decode kernels wait on or spend issue slots on.
COUNTED = {"STL": "spill stores", "LDL": "spill loads", "SHFL": "shuffles", "MUFU": "special functions",
           "BAR": "barriers", "LDS": "shared loads", "STS": "shared stores", "LDG": "global loads",
           "STG": "global stores", "CCTL": "prefetches"}
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
         torch.int64: "i64"}


@dataclass(frozen=True)
class Launch:
    """One kernel launch as its launcher made it."""
    label: str
    kernel: triton.runtime.JITFunction
    args: tuple
    kwargs: dict


@dataclass(frozen=True)
class KernelResources:
    label: str
    name: str
    registers: int
    stack: int
    warps: int
    counts: dict[str, int]
    sass: str
    layouts: str  # the TTGIR's layout definitions (which dims of a tile go to registers, lanes and warps)

    @property
    def warps_per_sm(self) -> int:
        """Warps a multiprocessor holds by registers alone, in whole programs: each of its 4 schedulers has 16K
        registers, allocated per warp in units of 256 (as Nsight Compute's register limit came out for these
        kernels: 12 one-warp programs of the backward at 168 registers, 2 eight-warp conv programs at 110)."""
        per_warp = math.ceil(self.registers * 32 / 256) * 256
        return min(64, 4 * (16384 // per_warp) // self.warps * self.warps)


@contextmanager
def recorded(module, launches: list[Launch], label: str) -> Iterator[None]:
    """Swap the module's Triton kernels for recorders of their launches."""
    kernels = {name: obj for name, obj in vars(module).items() if isinstance(obj, triton.runtime.JITFunction)}

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(Launch(label, self.kernel, args, kwargs))

    try:
        for name, kernel in kernels.items():
            setattr(module, name, Recorder(kernel))
        yield
    finally:
        for name, kernel in kernels.items():
            setattr(module, name, kernel)


def scan_launches(batch: int, dim: int, seqlen: int, dstate: int) -> list[Launch]:
    """The Triton scan's forward and backward launches, inputs laid out as Mamba1Heads passes them in training
    (as scan_kernel_bench.py makes them): u and z channel-last views of one projection, delta transposed (b, l, d),
    B and C (b, n, l); bf16, with float32 A, D and delta bias."""
    meta = dict(device="meta")
    proj = torch.empty(batch, seqlen, 2 * dim, dtype=torch.bfloat16, **meta)
    u, z = proj[..., :dim].transpose(1, 2), proj[..., dim:].transpose(1, 2)
    delta = torch.empty(batch, seqlen, dim, dtype=torch.bfloat16, **meta).transpose(1, 2)
    B, C = (torch.empty(batch, dstate, seqlen, dtype=torch.bfloat16, **meta) for _ in range(2))
    A, D, bias = torch.empty(dim, dstate, **meta), torch.empty(dim, **meta), torch.empty(dim, **meta)
    launches: list[Launch] = []
    label = f"scan b{batch} d{dim} l{seqlen} n{dstate}"
    with recorded(selective_scan_triton, launches, label):
        out, y, starts, _ = selective_scan_triton.scan_fwd(u, delta, A, B, C, D, z, bias, None, True,
                                                           chunk=TRITON_SCAN_CHUNK)
        selective_scan_triton.scan_bwd(u, delta, A, B, C, D, z, bias, starts, y, torch.empty_like(out), None, True,
                                       chunk=TRITON_SCAN_CHUNK)
    return launches


def step_launches(row: str, size: str, batch: int) -> list[Launch]:
    """The fused Mamba-1 decode step's launches for the first Mamba-1 heads of a row, bf16 with a float32 state."""
    with torch.device("meta"):
        model = HybridLM(preset(row, size)).to(torch.bfloat16)
    heads = next((m for m in model.modules() if isinstance(m, Mamba1Heads)), None)
    if heads is None:
        raise ValueError(f"row {row!r} has no Mamba-1 heads: the fused decode step is theirs")
    conv_shape, ssm_shape = heads.state_shapes(batch)
    state = SSMState(conv=torch.empty(conv_shape, dtype=torch.bfloat16, device="meta"),
                     ssm=torch.empty(ssm_shape, device="meta"))
    proj = torch.empty(batch, heads.proj_width, dtype=torch.bfloat16, device="meta")
    launches: list[Launch] = []
    with recorded(mamba1_step_triton, launches, f"step {row} b{batch} d{heads.d_inner}"):
        mamba1_step_triton.mamba1_step(*heads.fused_step_inputs(proj[:, :heads.d_inner], proj[:, heads.d_inner:],
                                                                state))
    return launches


def _specialized(value) -> tuple[str, bool]:
    """A runtime argument's Triton type, and whether Triton marks it divisible by 16 (a meta tensor's address is 0,
    as aligned as a CUDA allocation's)."""
    if isinstance(value, torch.Tensor):
        return "*" + TYPES[value.dtype], True
    if isinstance(value, bool):
        return "i1", False
    if isinstance(value, int):
        return ("i32" if -2 ** 31 <= value < 2 ** 31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"kernel_resources: no Triton type for a {type(value).__name__} argument")


def compile_launch(launch: Launch, arch: int) -> triton.compiler.CompiledKernel:
    kernel, names = launch.kernel, launch.kernel.arg_names
    values = dict(zip(names, launch.args)) | {k: v for k, v in launch.kwargs.items() if k in names}
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(names):
        value = values[name]
        if index in kernel.constexprs or value is None or (type(value) is int and value == 1):
            signature[name], constexprs[(index,)] = "constexpr", value
            continue
        signature[name], divisible = _specialized(value)
        if divisible:
            attrs[(index,)] = [["tt.divisibility", 16]]
    options = {k: v for k, v in launch.kwargs.items() if k not in names and v is not None}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _cuobjdump(*args: str) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return subprocess.run([tool, *args], capture_output=True, text=True, check=True).stdout


def resources(launch: Launch, arch: int) -> KernelResources:
    compiled = compile_launch(launch, arch)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage, sass = _cuobjdump("-res-usage", cubin.name), _cuobjdump("-sass", cubin.name)
    registers, stack = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK"))
    opcodes = re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9]+)", sass, flags=re.M)
    counts = {op: sum(1 for found in opcodes if found == op) for op in COUNTED}
    layouts = "\n".join(re.findall(r"^#\w+ = #ttg\.\w+<.*$", compiled.asm["ttgir"], flags=re.M))
    return KernelResources(launch.label, launch.kernel.__name__, registers, stack,
                           launch.kwargs.get("num_warps", 4), counts, sass, layouts)


def report(found: list[KernelResources], arch: int) -> str:
    head = f"{'kernel':<28}{'launch':<30}{'regs':>5}{'stack':>6}{'warps/SM':>9}" + "".join(
        f"{op:>6}" for op in COUNTED)
    rows = [f"{r.name:<28}{r.label:<30}{r.registers:>5}{r.stack:>6}{r.warps_per_sm:>9}" + "".join(
        f"{r.counts[op]:>6}" for op in COUNTED) for r in found]
    legend = "SASS instructions (static counts): " + ", ".join(f"{op} {what}" for op, what in COUNTED.items())
    return "\n".join([f"Triton {triton.__version__}, sm_{arch}a", head, *rows, legend])


def scan_shape(text: str) -> tuple[int, int, int, int]:
    parts = text.split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected BATCHxCHANNELSxSTEPSxSTATE of positive integers, got {text!r}")
    return tuple(int(p) for p in parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=["roadmap_e", "mamba"],
                        help="rows whose fused decode step is compiled (300m, batch 128)")
    parser.add_argument("--scan-shape", type=scan_shape, default="8x1024x2176x16",
                        help="batch x channels x steps x state of the scan (row E's training shape)")
    parser.add_argument("--kernels", default="", help="a regular expression: only kernels whose name matches")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for sm_90a (Hopper)")
    parser.add_argument("--sass", action="store_true", help="also print each kernel's SASS")
    parser.add_argument("--layouts", action="store_true", help="also print each kernel's tile layouts (TTGIR)")
    args = parser.parse_args()
    builders: list[Callable[[], list[Launch]]] = [
        lambda: scan_launches(*args.scan_shape)]
    builders += [lambda row=row: step_launches(row, "300m", 128) for row in args.rows]
    try:
        recorded_launches = [launch for build in builders for launch in build()]
    except ValueError as error:  # an unknown preset (ConfigError) or a row without Mamba-1 heads
        parser.error(str(error))
    launches = [launch for launch in recorded_launches if re.search(args.kernels, launch.kernel.__name__)]
    if not launches:
        names = sorted({launch.kernel.__name__ for launch in recorded_launches})
        parser.error(f"--kernels {args.kernels!r} matches none of the launched kernels: {', '.join(names)}")
    found = [resources(launch, args.arch) for launch in launches]
    print(report(found, args.arch))
    for r in found:
        if args.layouts:
            print(f"\n== {r.name} ({r.label}): layouts\n{r.layouts}")
        if args.sass:
            print(f"\n== {r.name} ({r.label}): SASS\n{r.sass}")


if __name__ == "__main__":
    main()
