"""The roadmap report (experiments/roadmap/RESULTS.md) quotes tables that `python -m arch_lab.report` generated
into each study's tables.md. A quoted table must be the generated one, row for row: a hand copy once put one
table's rows under another's header."""
from __future__ import annotations

from pathlib import Path

import pytest

ROADMAP = Path(__file__).resolve().parents[1] / "experiments" / "roadmap"


def markdown_tables(text: str) -> list[list[str]]:
    """Each table as its lines, header first: runs of consecutive lines that start with '|'."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line.rstrip())
        elif current:
            tables.append(current)
            current = []
    return tables


def test_markdown_tables_are_split_at_the_lines_between_them() -> None:
    text = "intro\n| a | b |\n|---|---|\n| 1 | 2 |\n\n| c |\n|---|\n| 3 |"
    assert markdown_tables(text) == [["| a | b |", "|---|---|", "| 1 | 2 |"], ["| c |", "|---|", "| 3 |"]]


@pytest.mark.parametrize("study,section", [("gpu_small", 0), ("cpu_tiny", 1)])
def test_tables_quoted_in_the_roadmap_report_are_the_generated_ones(study: str, section: int) -> None:
    report = (ROADMAP / "RESULTS.md").read_text().split("\n## 2. Tiny CPU study")[section]
    generated: dict[str, list[list[str]]] = {}
    for table in markdown_tables((ROADMAP / study / "tables.md").read_text()):
        generated.setdefault(table[0], []).append(table)
    quoted = [table for table in markdown_tables(report) if table[0] in generated]
    assert quoted, f"no table of {study}/tables.md is quoted in RESULTS.md"
    for table in quoted:
        assert table in generated[table[0]], (
            f"RESULTS.md quotes a table headed {table[0][:80]!r} that differs from {study}/tables.md's: "
            "copy it again from the generated file")
