"""Result tables as Markdown: the one writer behind the demo's, the sweeps' and the paper table's
results.md files (the console metrics table is pipeline/evaluation/devkit_metrics.py's)."""
from __future__ import annotations

from typing import Any, Iterable, Sequence


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """The lines of a Markdown table: the header, its rule, one line per row (cells as str())."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(c) for c in row]
        if len(cells) != len(header):
            raise ValueError(f"markdown_table: a row has {len(cells)} cells for {len(header)} columns: {cells}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines
