"""A report as Markdown: the same sections and tables as the HTML page, without the plots."""

from __future__ import annotations

from typing import Any

from ..texttable import render_table
from .tables import SECTIONS, Table, build_tables


def markdown_table(table: Table) -> str:
    """A GitHub-flavoured pipe table (`render_table`)."""
    return render_table(table.headers, table.rows, style="markdown")


def header_lines(data: dict[str, Any]) -> list[str]:
    """What the report is about: the model, the tasks and the masked weights."""
    model = data.get("model") or {}
    masked = model.get("n_masked")
    total = model.get("n_weights")
    lines = [f"- model: `{model.get('path') or '(in memory)'}` ({model.get('format', '?')})",
             f"- tasks: {', '.join(data['tasks'])}"]
    if masked is not None and total:
        lines.append(f"- masked weights: {masked:,} of {total:,}")
    config = data.get("config") or {}
    if config:
        lines.append(f"- mask training: {config.get('n_steps')} steps, batch {config.get('batch_size')}, seed {config.get('seed')}")
    lines.append(f"- convergence: {convergence_note(data)}")
    return lines


def convergence_note(data: dict[str, Any]) -> str:
    """One sentence on whether the masks had converged (``data["convergence"]``), starting "NOT CONVERGED" if not."""
    conv = data.get("convergence")
    if not conv:
        return "not judged (no training curves)"
    from ..masks.convergence import ConvergenceCheck

    check = ConvergenceCheck.from_dict(conv)
    if not check.converged:
        return f"NOT CONVERGED: {check.message()}"
    if all(v is None for v in check.tail_fall.values()):
        return "not judged (too few points on the training curves)"
    return (f"converged (every task's density fell by less than {check.threshold:.0%} over the last "
            f"{check.tail_fraction:.0%} of the steps)")


def to_markdown(data: dict[str, Any], *, title: str = "modscope report", skip: tuple[str, ...] = ("curves",)) -> str:
    """The report as Markdown.

    Args:
        data: the report's data (`Report.to_dict`).
        title: the top heading.
        skip: table keys to leave out (the training curves are long; they are in the CSV and HTML outputs).
    """
    tables = [t for t in build_tables(data) if t.key not in skip]
    parts = [f"# {title}", "", *header_lines(data)]
    for key, heading, what in SECTIONS:
        mine = [t for t in tables if t.section == key]
        if not mine:
            continue
        parts += ["", f"## {heading}", "", what]
        for t in mine:
            parts += ["", f"### {t.title}", "", markdown_table(t)] + (["", f"_{t.note}_"] if t.note else [])
    return "\n".join(parts) + "\n"
