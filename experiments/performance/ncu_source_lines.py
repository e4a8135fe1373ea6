"""Where each kernel's warps stall, by source line: reads Nsight Compute's source page as CSV on stdin,

    ncu -i report.ncu-rep --page source --csv --print-source cuda,sass | python3 ncu_source_lines.py [--top 14]

and prints, per kernel, the source lines with the most warp-stall samples and each line's main stall reasons, then
the kinds of instruction those samples sit on. In the CSV each source line's row sums the SASS rows under it.
gpu_session.sh's ncu phases write it beside their section output; the report needs SourceCounters.
"""
from __future__ import annotations

import argparse
import collections
import csv
import sys
from dataclasses import dataclass, field
from typing import Iterable, TextIO

SAMPLES = "Warp Stall Sampling (All Samples)"


def count(value: str) -> int:
    return int(value) if value.isdigit() else 0  # ncu writes "-" where a line has no samples


def opcode(sass: str) -> str:
    words = sass.split()
    return words[1] if words[0].startswith("@") and len(words) > 1 else words[0]  # past a predicate


@dataclass
class LineStalls:
    samples: int = 0
    reasons: collections.Counter = field(default_factory=collections.Counter)


def read(rows: Iterable[list[str]]) -> tuple[dict, dict]:
    """Per kernel: the stalls of each (file, line, source), and the samples of each SASS opcode."""
    lines: dict = collections.defaultdict(lambda: collections.defaultdict(LineStalls))
    opcodes: dict = collections.defaultdict(collections.Counter)
    kernel = file = None
    header: list[str] = []
    for row in rows:
        if not row:
            continue
        if row[0] == "File Path":
            file = row[1].rsplit("/", 1)[-1]
        elif row[0] == "Function Name":
            kernel = row[1]
        elif row[0] == "Line No":
            header = row
        elif header and len(row) == len(header):
            samples = count(row[header.index(SAMPLES)])
            if row[0]:  # a source line: columns 0-1; its SASS rows follow, with columns 2-3
                stalls = lines[kernel][(file, row[0], row[1].strip())]
                stalls.samples += samples
                for name, value in zip(header, row):
                    if name.startswith("stall_") and "Not Issued" not in name:
                        stalls.reasons[name[len("stall_"):]] += count(value)
            elif row[3].strip() not in ("", "..."):
                opcodes[kernel][opcode(row[3].strip())] += samples
    return lines, opcodes


def report(lines: dict, opcodes: dict, top: int, out: TextIO) -> None:
    for kernel, by_line in lines.items():
        print(f"== {kernel}: {sum(s.samples for s in by_line.values())} warp-stall samples", file=out)
        for (file, line, source), stalls in sorted(by_line.items(), key=lambda item: -item[1].samples)[:top]:
            reasons = ", ".join(f"{name} {n}" for name, n in stalls.reasons.most_common(5) if n)
            print(f"{stalls.samples:7d}  {file}:{line}  {source[:90]}  | {reasons}", file=out)
        common = ", ".join(f"{op} {n}" for op, n in opcodes[kernel].most_common(10))
        print(f"   by instruction: {common}", file=out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=int, default=14, help="source lines shown per kernel")
    args = parser.parse_args()
    lines, opcodes = read(csv.reader(sys.stdin))
    if not lines:
        sys.exit("ncu_source_lines: no source rows on stdin (was the report taken with --section SourceCounters?)")
    report(lines, opcodes, args.top, sys.stdout)


if __name__ == "__main__":
    main()
