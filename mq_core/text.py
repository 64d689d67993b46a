"""Plain text for messages and the CLI: tables (no extra dependency; wraps nothing, pads columns) and short lists."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def shorten(items: Sequence[str], limit: int = 8) -> str:
    """The first ``limit`` items, comma-separated, with `` ...`` when some were left out: a message names enough
    examples to act on without printing thousands of tensor names."""
    return ", ".join(items[:limit]) + (" ..." if len(items) > limit else "")
