"""Single values read from a report's data by name: what the tables, the plots and policies look up.

Plain Python over the JSON-ready data (`Report.to_dict`), so that `modscope check` needs neither NumPy nor torch;
`Report.ablation` gives the same values as a labelled `AblationResult`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..metrics.drop import relative_drop


def _at(section: Mapping[str, Any], rows: str, cols: str, matrix: str, row: str, col: str) -> float | None:
    if row not in section[rows] or col not in section[cols]:
        return None
    return section[matrix][section[rows].index(row)][section[cols].index(col)]


def ablation_value(data: Mapping[str, Any], matrix: str, mask: str, task: str) -> float | None:
    """``task``'s metric with ``mask`` removed (``matrix="removed"``) or only it kept (``"kept"``); None if absent."""
    return _at(data["ablation"], "masks", "tasks", matrix, mask, task)


def full_value(data: Mapping[str, Any], task: str) -> float | None:
    """``task``'s metric with the full model; None if the report did not evaluate it."""
    ab = data["ablation"]
    return ab["full"][ab["tasks"].index(task)] if task in ab["tasks"] else None


def drop(data: Mapping[str, Any], task: str, removed: str) -> float | None:
    """The relative drop of ``task``'s metric when ``removed``'s mask is removed (`metrics.drop.relative_drop`)."""
    info = data["task_info"].get(task, {})
    return relative_drop(full_value(data, task), ablation_value(data, "removed", removed, task),
                         bool(info.get("higher_is_better", True)))


def pair_value(data: Mapping[str, Any], metric: str, a: str, b: str, layer: str | None = None,
               *, chance: bool = False) -> float | None:
    """The ``metric`` ("iou" or "iomin") of tasks ``a`` and ``b``, whole model or one layer, or its chance level."""
    section = data[metric]
    key = ("chance_" if chance else "") + ("total" if layer is None else "per_layer")
    matrix = section[key] if layer is None else section[key][layer]
    return _at({"tasks": section["tasks"], "m": matrix}, "tasks", "tasks", "m", a, b)


__all__ = ["ablation_value", "drop", "full_value", "pair_value"]
