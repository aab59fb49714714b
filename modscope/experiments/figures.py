"""Small self-contained SVG charts for the experiments' HTML pages (no plotting library needed)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Point:
    """One marker: position, a value for its colour (0..1), and a tooltip/label."""

    x: float
    y: float
    colour: float
    label: str
    highlight: bool = False


def scatter_svg(points: Sequence[Point], *, x_label: str, y_label: str, colour_label: str,
                width: int = 640, height: int = 400) -> str:
    """An SVG scatter plot with axes, ticks, a colour scale (blue → red) and a tooltip per point.

    Example:
        >>> svg = scatter_svg([Point(0.1, 0.9, 0.5, "a")], x_label="density", y_label="accuracy", colour_label="shared")
        >>> svg.startswith("<svg") and "density" in svg
        True
    """
    left, right, top, bottom = 60, 120, 20, 50
    xs = [p.x for p in points] or [0.0, 1.0]
    ys = [p.y for p in points] or [0.0, 1.0]
    x0, x1 = _range(xs)
    y0, y1 = _range(ys)

    def sx(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * (width - left - right)

    def sy(v: float) -> float:
        return height - bottom - (v - y0) / (y1 - y0) * (height - top - bottom)

    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
              'font-size="12">'),
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#333"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#333"/>']
    for v in _ticks(x0, x1):
        parts.append(f'<text x="{sx(v):.1f}" y="{height - bottom + 16}" text-anchor="middle">{v:g}</text>')
    for v in _ticks(y0, y1):
        parts.append(f'<text x="{left - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">{html.escape(x_label)}</text>')
    parts.append(f'<text transform="translate(16 {(top + height - bottom) / 2}) rotate(-90)" text-anchor="middle">'
                 f'{html.escape(y_label)}</text>')
    for p in points:
        ring = ' stroke="#000" stroke-width="2"' if p.highlight else ""
        parts.append(f'<circle cx="{sx(p.x):.1f}" cy="{sy(p.y):.1f}" r="{7 if p.highlight else 5}" '
                     f'fill="{_colour(p.colour)}"{ring}><title>{html.escape(p.label)}</title></circle>')
    # colour scale
    scale_x = width - right + 30
    for i in range(11):
        parts.append(f'<rect x="{scale_x}" y="{top + (10 - i) * 16}" width="14" height="16" fill="{_colour(i / 10)}"/>')
    parts.append(f'<text x="{scale_x + 18}" y="{top + 12}">100%</text><text x="{scale_x + 18}" y="{top + 172}">0%</text>')
    parts.append(f'<text x="{scale_x}" y="{top + 194}">{html.escape(colour_label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _range(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for mult in (1, 2, 5, 10):
        if (hi - lo) / (step * mult) <= n:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step) + 1)]


def _colour(v: float) -> str:
    v = min(max(v, 0.0), 1.0)
    return f"rgb({int(40 + 200 * v)},{int(90 + 40 * (1 - abs(2 * v - 1)))},{int(240 - 200 * v)})"
