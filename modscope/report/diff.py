"""Comparing two runs on the same tasks, e.g. a model before and after a fine-tune.

- mask drift: for each task, the IoU between its mask in run A and in run B (whole model and per layer), with the
  chance level for masks of those densities; 1 means the task uses exactly the same weights in both runs.
- the change in sharing (B − A) per task, in pairwise IoU, and in the ablation matrix (the metric of each task with
  each mask removed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import InvalidParameterError
from ..masks.maskset import MaskSet


def _change(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def diff_runs(masks_a: MaskSet, report_a: Mapping[str, Any], masks_b: MaskSet, report_b: Mapping[str, Any]) -> dict[str, Any]:
    """How run B differs from run A on the tasks they share.

    Args:
        masks_a, report_a: the masks and report data (`Report.to_dict`) of run A.
        masks_b, report_b: the same for run B. Both runs must mask the same weights (the same architecture).

    Returns:
        ``{"tasks", "same_model", "drift": {task: {...}}, "sharing": {task: {"a", "b", "change"}},
        "iou": {"A|B": {...}}, "ablation": {"masks", "tasks", "a", "b", "change"}}``.

    Raises:
        InvalidParameterError: the runs share no task, or mask different weights.
    """
    from .. import metrics

    tasks = [t for t in masks_a.tasks if t in masks_b.tasks]
    if not tasks:
        raise InvalidParameterError(f"the runs share no task (A: {list(masks_a.tasks)}, B: {list(masks_b.tasks)}); diff compares the same tasks")
    if [w.name for w in masks_a.weights] != [w.name for w in masks_b.weights]:
        raise InvalidParameterError("the runs mask different weights (another architecture or other include/exclude "
                                    "patterns); diff compares runs on versions of the same model")
    drift = {}
    for t in tasks:
        overlap = metrics.iou({"a": masks_a[t], "b": masks_b[t]})
        drift[t] = {"iou": overlap.pair("a", "b"), "chance": float(overlap.chance_total[0, 1]),
                    "per_layer": {layer: float(m[0, 1]) for layer, m in overlap.per_layer.items()},
                    "density_a": masks_a[t].density(), "density_b": masks_b[t].density()}
    sharing = {t: {"a": report_a["sharing"]["total"].get(t), "b": report_b["sharing"]["total"].get(t)} for t in tasks}
    for v in sharing.values():
        v["change"] = _change(v["a"], v["b"])
    return {
        "tasks": tasks,
        "same_model": masks_a.model_checksum == masks_b.model_checksum,
        "drift": drift,
        "sharing": sharing,
        "iou": _pair_changes(report_a["iou"], report_b["iou"], tasks),
        "ablation": _ablation_change(report_a["ablation"], report_b["ablation"], tasks),
    }


def _pair_changes(a: Mapping[str, Any], b: Mapping[str, Any], tasks: list[str]) -> dict[str, dict[str, float | None]]:
    out = {}
    for i, t in enumerate(tasks):
        for u in tasks[i + 1:]:
            va = a["total"][a["tasks"].index(t)][a["tasks"].index(u)]
            vb = b["total"][b["tasks"].index(t)][b["tasks"].index(u)]
            out[f"{t}|{u}"] = {"a": va, "b": vb, "change": _change(va, vb)}
    return out


def _ablation_change(a: Mapping[str, Any], b: Mapping[str, Any], tasks: list[str]) -> dict[str, Any]:
    def matrix(ab: Mapping[str, Any]) -> list[list[float | None]]:
        return [[ab["removed"][ab["masks"].index(m)][ab["tasks"].index(t)] if m in ab["masks"] and t in ab["tasks"] else None
                 for t in tasks] for m in tasks]

    ma, mb = matrix(a), matrix(b)
    return {"masks": tasks, "tasks": tasks, "a": ma, "b": mb,
            "change": [[_change(x, y) for x, y in zip(ra, rb)] for ra, rb in zip(ma, mb)]}
