"""experiments/performance/ncu_source_lines.py on a source page in Nsight Compute's CSV layout (as `ncu -i report
--page source --csv --print-source cuda,sass` writes it): a source line's row sums the SASS rows under it, so the
samples are counted once, by line and by instruction."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "performance" / "ncu_source_lines.py"
HEADER = ('"Line No","Source","Address","Source","Warp Stall Sampling (All Samples)",'
          '"Warp Stall Sampling (Not-issued Samples)","stall_long_sb","stall_wait","stall_long_sb (Not Issued)"')
PAGE = "\n".join([
    '"File Path","/site-packages/arch/kernels.py"',
    '"Function Name","_step_kernel"',
    HEADER,
    '"12","h = tl.load(states)","-","-","30","20","25","5","25"',
    '"","","0x10","      LDG.E.128 R4, desc[UR4][R2.64]","4","4","4","0","4"',
    '"","","0x20","@P0   STS.128 [R1], R4","26","16","21","5","21"',
    '"","","...","...","-","-","-","-","-"',
    '"13","y = tl.exp(h)","-","-","10","0","0","10","0"',
    '"","","0x30","      MUFU.EX2 R5, R4","10","0","0","10","0"',
    '"14","unsampled = 0","-","-","-","-","-","-","-"',
])


def run(page: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--top", "2"], input=page, capture_output=True, text=True)


def test_samples_are_counted_once_by_line_and_by_instruction() -> None:
    result = run(PAGE)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "== _step_kernel: 40 warp-stall samples"  # 30 + 10, not the SASS rows again
    assert lines[1].split()[:2] == ["30", "kernels.py:12"]
    assert lines[1].endswith("| long_sb 25, wait 5")  # the not-issued columns are left out
    assert lines[2].split()[:2] == ["10", "kernels.py:13"]
    assert lines[3] == "   by instruction: STS.128 26, MUFU.EX2 10, LDG.E.128 4"  # past the predicate @P0


def test_a_page_without_source_rows_is_an_error() -> None:
    result = run('"Function Name","_step_kernel"\n')
    assert result.returncode != 0
    assert "no source rows" in result.stderr and "SourceCounters" in result.stderr
