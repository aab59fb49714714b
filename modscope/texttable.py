"""The one table renderer: aligned plain text (terminal output, experiment tables) or a Markdown pipe table.

Cells are formatted by `cell` (floats with 3 decimals, None as a dash, booleans as yes/no) unless the caller gives
another formatter; numeric columns are right-aligned in both styles. A leaf module: it imports nothing of modscope.

Example:
    >>> print(render_table(["task", "IoU"], [["add", 0.25], ["mul", None]]))
    task    IoU
    ----  -----
    add   0.250
    mul       -
    >>> print(render_table(["task", "IoU"], [["add", 0.25]], style="markdown"))
    | task | IoU |
    |---|---:|
    | add | 0.250 |
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal


def cell(value: Any) -> str:
    """A value as table text: floats with 3 decimals, None as a dash, booleans as yes/no."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _numeric(rows: Sequence[Sequence[Any]], i: int) -> bool:
    return bool(rows) and all(isinstance(r[i], int | float) or r[i] is None for r in rows)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, style: Literal["text", "markdown"] = "text",
                 fmt: Callable[[Any], str] = cell, align_numbers: bool = True) -> str:
    """A table as text.

    Args:
        headers: the column names.
        rows: the cells, raw (formatted by ``fmt``).
        style: "text" for aligned columns under a dashed rule, "markdown" for a GitHub-flavoured pipe table.
        fmt: how a cell becomes text (default `cell`).
        align_numbers: right-align the columns whose cells are all numbers (or None).
    """
    numeric = [align_numbers and _numeric(rows, i) for i in range(len(headers))]
    if style == "markdown":
        def md(values: Sequence[str]) -> str:
            return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

        rule = "|" + "|".join("---:" if n else "---" for n in numeric) + "|"
        return "\n".join([md(list(headers)), rule, *(md([fmt(v) for v in r]) for r in rows)])
    cells = [[str(h) for h in headers]] + [[fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(r, widths, numeric)).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *(line(r) for r in cells[1:])])


__all__ = ["cell", "render_table"]
