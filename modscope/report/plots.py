"""The report's plots, drawn with matplotlib's object API (no pyplot state) and returned as PNG bytes with a text
description of their axes (`Plot`), which the HTML page uses as alt text.

matplotlib is an optional dependency (``pip install modscope[report]``); it is imported when a plot is drawn.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ModscopeError
from ..install import install_hint
from .tables import layer_module
from .values import drop

_DPI = 100


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Any, Any]:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ModscopeError(f"plots need matplotlib; install it with `{install_hint('report')}`") from exc
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


@dataclass(frozen=True)
class Plot:
    """A drawn plot: the PNG, and what its axes say in words (the page's alt text, read from the figure itself)."""

    png: bytes
    description: str


def _describe(fig: Any) -> str:
    """Each plot panel's title, axis titles and tick labels, as one line of text (colour bars left out)."""
    parts = []
    for ax in fig.axes:
        if getattr(ax, "_colorbar", None) is not None:
            continue
        ticks = [t.get_text().replace("\n", " ") for t in ax.get_xticklabels()]
        parts.append(f"{ax.get_title() or 'plot'}: x axis '{ax.get_xlabel()}' ({', '.join(ticks)}), "
                     f"y axis '{ax.get_ylabel()}'")
    return "; ".join(parts)


def _png(fig: Any) -> Plot:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return Plot(buf.getvalue(), _describe(fig))


def short(label: str, n: int = 28) -> str:
    """A label cut in the middle to at most ``n`` characters."""
    return label if len(label) <= n else label[: n // 2 - 1] + "…" + label[-(n // 2 - 1):]


def _bar_width(n_groups: int, n_bars: int) -> float:
    return min(16.0, max(8.0, 3.0 + 0.3 * n_groups * max(n_bars, 2)))


def _slanted(labels: list[str], n: int = 6) -> bool:
    """Whether x tick labels need slanting: several of them, or long ones."""
    return len(labels) > n or max((len(label) for label in labels), default=0) > 8


def _slant(ax: Any) -> None:
    for label in ax.get_xticklabels():
        label.set_rotation(30)
        label.set_horizontalalignment("right")


def layer_tick(data: dict[str, Any], layer: str) -> str:
    """A layer's tick label: its name in the model over what it is ("0" over "Linear 32×9")."""
    module = layer_module(data, layer)
    return f"{short(layer)}\n{short(module)}" if module else short(layer)


_LAYER_AXIS = "layer (name in the model, module and weight shape)"


def _grouped_bars(ax: Any, groups: list[str], series: dict[str, list[float]], markers: dict[str, list[float]] | None = None,
                  *, ticks: list[str] | None = None) -> None:
    """Bars per group (x) and series (colour); optional black ticks per bar (e.g. the chance level)."""
    x = np.arange(len(groups))
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos, [v if v is not None else np.nan for v in values], width, label=name)
        if markers and name in markers:
            ax.scatter(pos, markers[name], marker="_", s=200 * width, color="black", zorder=3,
                       label="chance" if i == 0 else None)
    ax.set_xticks(x, ticks or [short(g) for g in groups])
    if _slanted(groups, 4):
        _slant(ax)
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def plot_sharing(data: dict[str, Any]) -> Plot:
    """Shared fraction per layer and task, with the chance level as black ticks."""
    sh, tasks = data["sharing"], data["tasks"]
    layers = list(sh["per_layer"])
    fig, (ax,) = _figure(_bar_width(len(layers), len(tasks)), 3.8)
    _grouped_bars(ax, layers, {t: [sh["per_layer"][lay][t] for lay in layers] for t in tasks},
                  {t: [sh["chance_per_layer"][lay][t] for lay in layers] for t in tasks},
                  ticks=[layer_tick(data, lay) for lay in layers])
    ax.set_xlabel(_LAYER_AXIS)
    ax.set_ylabel("shared fraction of the mask")
    ax.set_title("Sharing per layer")
    return _png(fig)


def plot_density(data: dict[str, Any]) -> Plot:
    """Density of each task's mask per layer."""
    tasks, layers = data["tasks"], list(data["layers"])
    fig, (ax,) = _figure(_bar_width(len(layers), len(tasks)), 3.8)
    _grouped_bars(ax, layers, {t: [data["density_per_layer"][t].get(lay) for lay in layers] for t in tasks},
                  ticks=[layer_tick(data, lay) for lay in layers])
    ax.set_xlabel(_LAYER_AXIS)
    ax.set_ylabel("fraction of weights kept")
    ax.set_title("Mask density per layer")
    return _png(fig)


def _heatmap(ax: Any, matrix: np.ndarray, rows: list[str], cols: list[str], title: str, *, cmap: str,
             vmin: float, vmax: float, xlabel: str, ylabel: str, colorbar: str, notes: np.ndarray | None = None,
             blank_diagonal: bool = False) -> None:
    """A labelled matrix; ``notes`` (e.g. the chance level) under each value; ``blank_diagonal`` greys out a task
    against itself, where a value (IoU 1) and its chance level say nothing."""
    if blank_diagonal:
        matrix = matrix.copy()
        np.fill_diagonal(matrix, np.nan)
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_facecolor("#eeeeee")
    ax.set_xticks(range(len(cols)), [short(c, 24) for c in cols])
    ax.set_yticks(range(len(rows)), [short(r, 32) for r in rows])
    if _slanted(cols, 3):
        _slant(ax)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if matrix.size <= 144:
        for (i, j), v in np.ndenumerate(matrix):
            if blank_diagonal and i == j:
                text = "same task"
            elif np.isnan(v):
                text = "-"
            else:
                text = f"{v:.2f}" + (f"\n(chance {notes[i, j]:.2f})" if notes is not None else "")
            light = not np.isnan(v) and (v - vmin) / max(vmax - vmin, 1e-9) > 0.6
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if light else ("#57606a" if np.isnan(v) else "black"))
    ax.figure.colorbar(image, ax=ax, shrink=0.8, label=colorbar)


def plot_overlap(data: dict[str, Any]) -> Plot:
    """IoU and IoMin matrices, each pair of tasks with its chance level; the diagonal (a task with itself) blank."""
    names = data["iou"]["tasks"]
    size = min(12.0, 2.0 + 1.1 * len(names))
    fig, axes = _figure(2 * size + 1, size, ncols=2)
    for ax, key, title in zip(axes, ("iou", "iomin"), ("IoU", "IoMin")):
        _heatmap(ax, np.asarray(data[key]["total"], dtype=float), names, names, f"{title} of each pair of masks",
                 cmap="Blues", vmin=0, vmax=1, xlabel="task", ylabel="task", colorbar=title,
                 notes=np.asarray(data[key]["chance_total"], dtype=float), blank_diagonal=True)
    return _png(fig)


def plot_ablation(data: dict[str, Any]) -> Plot:
    """Relative drop of every task (columns) with every mask removed (rows)."""
    ab = data["ablation"]
    tasks = ab["tasks"]
    drops = np.array([[np.nan if (d := drop(data, t, m)) is None else d for t in tasks] for m in ab["masks"]], dtype=float)
    size = min(12.0, 2.5 + 1.1 * len(tasks))
    fig, (ax,) = _figure(size + 1.5, 0.8 + 0.9 * max(len(ab["masks"]), 2))
    top = max(1.0, float(np.nanmax(drops)) if np.isfinite(drops).any() else 1.0)
    _heatmap(ax, drops, list(ab["masks"]), tasks, "Relative drop of each task", cmap="Reds",
             vmin=min(0.0, float(np.nanmin(drops)) if np.isfinite(drops).any() else 0.0), vmax=top,
             xlabel="task evaluated", ylabel="mask removed", colorbar="relative drop")
    return _png(fig)


def plot_dendrogram(data: dict[str, Any]) -> Plot | None:
    """The hierarchical clustering tree on 1 - IoU; None when the report has no clustering."""
    cl = data.get("clustering")
    if not cl:
        return None
    from scipy.cluster.hierarchy import dendrogram

    fig, (ax,) = _figure(min(14.0, 3.0 + 0.6 * len(cl["tasks"])), 3.6)
    labels = [short(t, 24) for t in cl["tasks"]]
    dendrogram(np.asarray(cl["linkage"], dtype=float), labels=labels, ax=ax, color_threshold=None)
    if _slanted(labels):
        _slant(ax)
    ax.set_xlabel("task")
    ax.set_ylabel("distance: 1 - IoU")
    ax.set_title("Dendrogram of the masks")
    return _png(fig)


def plot_curves(data: dict[str, Any]) -> Plot | None:
    """Mask training loss and density against the step; None when no curves were recorded."""
    curves = {t: c for t, c in (data.get("curves") or {}).items() if c.get("step")}
    if not curves:
        return None
    fig, axes = _figure(11, 3.6, ncols=2)
    for t, c in curves.items():
        axes[0].plot(c["step"], c["loss"], label=t)
        axes[1].plot(c["step"], c["density"], label=t)
    for ax, ylabel in zip(axes, ("task loss", "mask density")):
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[1].set_ylim(0, 1.05)
    return _png(fig)


#: section key -> how to read its plot (the image's tooltip and a caption under it).
PLOT_NOTES: dict[str, str] = {
    "sharing": "Bars: the shared fraction of each task's mask per layer; black ticks: the fraction expected by chance "
               "(also in the table below).",
    "overlap": "Each cell: the overlap of two tasks' masks and, under it, the overlap expected by chance for random "
               "masks of the same densities (the tables below list both). The diagonal, a task with itself, is left blank.",
    "ablation": "Each cell: how much the task of the column loses when the mask of the row is removed, relative to "
                "the full model (1 = all of it, 0 = nothing, negative = it improved).",
}

#: section key -> plot function (the order inside a section is the order here).
PLOTS: dict[str, Callable[[dict[str, Any]], Plot | None]] = {
    "sharing": plot_sharing,
    "overlap": plot_overlap,
    "ablation": plot_ablation,
    "clustering": plot_dendrogram,
    "density": plot_density,
    "curves": plot_curves,
}
