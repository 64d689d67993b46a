"""Plain text for messages and the CLI: tables (rendered by ``rich``) and short lists.

Tables are plain text (no colour, no box drawing): a header row, a row of dashes, then one line per row, columns
separated by spaces, so they read the same in a terminal, a log file or a test that splits lines. Written for a
terminal they fit its width, long cells wrapping inside their column; anywhere else nothing is wrapped or cut.
"""

from __future__ import annotations

import io
import shutil
import sys
from collections.abc import Sequence
from typing import Any

#: rich's Box spec (8 lines of 4 characters): no edges, spaces between columns, dashes under the header only.
_PLAIN_BOX = "    \n    \n -  \n    \n    \n    \n    \n    \n"


def terminal_width() -> int | None:
    """The width to fit tables to: the terminal's (``COLUMNS`` when set) when stdout is one, else None."""
    isatty = getattr(sys.stdout, "isatty", None)
    if isatty is None or not isatty():
        return None
    return shutil.get_terminal_size().columns


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], width: int | None = None) -> str:
    """``rows`` under ``headers`` as text, each cell ``str()`` of its value (None: empty).

    ``width`` is the most characters a line may take: cells wrap within their column to fit (long words are
    folded). By default it is the terminal's width when stdout is a terminal, and unlimited otherwise, so that
    redirected output stays one line per row and complete.
    """
    from rich.box import Box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    cells = [["" if c is None else str(c) for c in row] for row in rows]
    table = Table(box=Box(_PLAIN_BOX, ascii=True), show_edge=False, pad_edge=False, padding=(0, 1, 0, 0),
                  header_style=None, highlight=False)
    for header in headers:
        table.add_column(Text(str(header)), overflow="fold")
    for row in cells:
        table.add_row(*(Text(c) for c in row))  # Text, not str: "[x]" in a cell is not rich markup
    if width is None:
        width = terminal_width()
    if width is None:  # wide enough for every cell on one line
        longest = [max((len(line) for c in [str(h), *(r[i] for r in cells)] for line in c.splitlines()), default=0)
                   for i, h in enumerate(headers)]
        width = sum(longest) + 2 * len(headers) + 1
    console = Console(file=io.StringIO(), width=max(width, 20), color_system=None, force_terminal=False,
                      highlight=False, emoji=False, markup=False, soft_wrap=False)
    console.print(table)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines())


def shorten(items: Sequence[str], limit: int = 8) -> str:
    """The first ``limit`` items, comma-separated, with `` ...`` when some were left out: a message names enough
    examples to act on without printing thousands of tensor names."""
    return ", ".join(items[:limit]) + (" ..." if len(items) > limit else "")
