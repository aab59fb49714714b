"""A report as one self-contained HTML page: the tables, and the plots embedded as base64 PNG images.

The page loads nothing from the network (no scripts, fonts or style sheets), so it reads the same offline, attached
to a CI run, or mailed.
"""

from __future__ import annotations

import base64
from html import escape
from typing import Any

from ..texttable import cell
from .markdown import convergence_note, header_lines
from .plots import PLOT_NOTES, PLOTS, Plot
from .tables import SECTIONS, Table, build_tables

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;color:#1f2328;max-width:1150px;margin:2em auto;padding:0 1.2em;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #d0d7de;padding-bottom:.25em;margin-top:2em}h3{font-size:1em;margin:1.2em 0 .4em}
p.what{color:#57606a;margin-top:0}ul.meta{color:#57606a;padding-left:1.2em}
nav a{margin-right:1em}
table{border-collapse:collapse;font-size:.88em;margin:.4em 0 1em}
th,td{border:1px solid #d0d7de;padding:.25em .6em}th{background:#f6f8fa;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;display:block;margin:.6em 0}
details summary{cursor:pointer;color:#0969da}
div.scroll{overflow-x:auto;max-width:100%}
p.note{color:#57606a;font-size:.9em;margin-top:-.6em}
p.warn{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:.6em .9em}
"""


def _table_html(table: Table) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in table.headers)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="num">{escape(cell(v))}</td>' if isinstance(v, int | float) and not isinstance(v, bool)
            else f"<td>{escape(cell(v))}</td>" for v in row
        ) + "</tr>"
        for row in table.rows
    )
    note = f'<p class="note">{escape(table.note)}</p>' if table.note else ""
    return (f'<h3>{escape(table.title)}</h3>\n<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>{note}")


def _image(plot: Plot, note: str = "") -> str:
    """The PNG inline, its axes in words as alt text; ``note`` (how to read it) as its tooltip and as a caption."""
    title = f' title="{escape(note)}"' if note else ""
    caption = f'<p class="note">{escape(note)}</p>' if note else ""
    data = base64.b64encode(plot.png).decode("ascii")
    return f'<img alt="{escape(plot.description)}"{title} src="data:image/png;base64,{data}">{caption}'


def to_html(data: dict[str, Any], *, title: str = "modscope report", plots: bool = True) -> str:
    """The report as a self-contained HTML page.

    Args:
        data: the report's data (`Report.to_dict`).
        title: the page title.
        plots: embed the plots (needs matplotlib).

    Returns:
        The HTML text; each section is a ``<section id="KEY">`` (summary, sharing, overlap, ablation, clustering,
        density, curves).
    """
    tables = build_tables(data)
    sections, nav = [], []
    for key, heading, what in SECTIONS:
        mine = [t for t in tables if t.section == key]
        plot = PLOTS.get(key)
        png = plot(data) if plots and plot else None
        if not mine and png is None:
            continue
        nav.append(f'<a href="#{key}">{escape(heading)}</a>')
        parts = [f'<section id="{key}">', f"<h2>{escape(heading)}</h2>", f'<p class="what">{escape(what)}</p>']
        if png is not None:
            parts.append(_image(png, PLOT_NOTES.get(key, "")))
        for t in mine:
            rendered = _table_html(t)
            if len(t.rows) > 40:  # long tables (curves, per-layer pairs) fold away
                rendered = f"<details><summary>{escape(t.title)} ({len(t.rows)} rows)</summary>{rendered}</details>"
            parts.append(rendered)
        parts.append("</section>")
        sections.append("\n".join(parts))
    lines = header_lines(data)
    warn = ""
    if not (data.get("convergence") or {}).get("converged", True):
        note = convergence_note(data).removeprefix("NOT CONVERGED: ").replace("`", "")
        warn = f'<p class="warn" id="not-converged"><strong>Masks not converged:</strong> {escape(note)}.</p>'
        lines = [line for line in lines if not line.startswith("- convergence:")]
    meta = "".join(f"<li>{escape(line[2:]).replace('`', '')}</li>" for line in lines)
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_STYLE}</style></head>\n'
        f"<body><h1>{escape(title)}</h1><ul class=\"meta\">{meta}</ul>{warn}<nav>{' '.join(nav)}</nav>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
