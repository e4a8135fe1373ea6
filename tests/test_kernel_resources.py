"""experiments/performance/kernel_resources.py on a CPU machine: it records the launches the Triton launchers make
(on meta tensors), compiles those kernels for Hopper and reads registers and SASS counts from the cubins. It runs in
a subprocess without TRITON_INTERPRET (conftest.py sets it here), which would turn the kernels into interpreted
functions that do not compile."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "performance" / "kernel_resources.py"
NUMBERS = 13  # regs, stack, warps/SM and ten SASS counts end every row


def run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)


def test_kernels_compile_from_their_launchers_arguments() -> None:
    result = run("--rows", "roadmap_e", "--kernels", "^(_scan_fwd_kernel|_state_update_kernel)$", "--layouts")
    assert result.returncode == 0, result.stderr
    summary, *layouts = result.stdout.split("\n\n")
    version, header, *rows, legend = summary.splitlines()
    assert version == f"Triton {triton.__version__}, sm_90a"  # layouts and registers depend on Triton's version
    assert legend.startswith("SASS instructions (static counts):")
    # Each kernel's tile layouts follow the table: the scan's state tile is 3-D, laid out over one warp.
    assert [block.splitlines()[0] for block in layouts] == [
        "== _scan_fwd_kernel (scan b8 d1024 l2176 n16): layouts",
        "== _state_update_kernel (step roadmap_e b128 d1024): layouts"]
    assert re.search(r"^#blocked\d* = #ttg.blocked<\{sizePerThread = \[\d+, \d+, \d+\].*warpsPerCTA = \[1, 1, 1\]",
                     layouts[0], flags=re.M)
    names = header.split()[-NUMBERS:]
    table = {row.split()[0]: (row, dict(zip(names, map(int, row.split()[-NUMBERS:])))) for row in rows}
    assert set(table) == {"_scan_fwd_kernel", "_state_update_kernel"}

    label, scan = table["_scan_fwd_kernel"]
    assert "scan b8 d1024 l2176 n16" in label  # row E's training shape
    assert 0 < scan["regs"] <= 255 and scan["STL"] == scan["LDL"] == 0
    # One L1 prefetch per walked input (u, delta, B, C, z): the GPU build keeps the inline PTX the interpreter skips.
    assert scan["CCTL"] == 5
    assert scan["warps/SM"] == 4 * (16384 // (math.ceil(scan["regs"] * 32 / 256) * 256))  # one-warp programs

    label, step = table["_state_update_kernel"]
    assert "step roadmap_e b128 d1024" in label  # E's Mamba-1 heads at 300M, decode batch 128
    assert step["MUFU"] > 0 and step["STL"] == 0


def test_a_filter_matching_no_kernel_names_the_launched_ones() -> None:
    result = run("--rows", "--kernels", "no_such_kernel")
    assert result.returncode == 2
    assert ("--kernels 'no_such_kernel' matches none of the launched kernels: _scan_bwd_kernel, _scan_combine_kernel, "
            "_scan_fwd_kernel, _scan_local_adjoint_kernel, _scan_local_states_kernel") in result.stderr
