"""Comparing two runs on the same tasks, e.g. a model before and after a fine-tune.

- mask drift: for each task, the IoU between its mask in run A and in run B (whole model and per layer), with the
  chance level for masks of those densities; 1 means the task uses exactly the same weights in both runs.
- the change in sharing (B − A) per task, in pairwise IoU, and in the ablation matrix (the metric of each task with
  each mask removed).

Only the tasks present in both runs are compared. Tasks present in one run only are listed apart (``only_a``,
``only_b``), and sharing is then recomputed from the masks on the common tasks alone: a task's sharing in a run with
an extra task would otherwise change only because that task is missing from the other run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import InvalidParameterError
from ..masks.maskset import MaskSet
from .values import ablation_value, pair_value


def _change(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def diff_runs(masks_a: MaskSet, report_a: Mapping[str, Any], masks_b: MaskSet, report_b: Mapping[str, Any]) -> dict[str, Any]:
    """How run B differs from run A on the tasks they share.

    Args:
        masks_a, report_a: the masks and report data (`Report.to_dict`) of run A.
        masks_b, report_b: the same for run B. Both runs must mask the same weights (the same architecture).

    Returns:
        ``{"tasks", "only_a", "only_b", "same_model", "drift": {task: {...}},
        "sharing": {task: {"a", "b", "change"}}, "sharing_basis", "iou": {"A|B": {...}},
        "ablation": {"masks", "tasks", "a", "b", "change"}}``. ``tasks`` are the common tasks; ``only_a``/``only_b``
        the tasks of one run only, left out of every comparison; ``sharing_basis`` is ``"reports"`` when both runs
        have the same tasks and ``"common tasks"`` when sharing was recomputed on the common tasks.

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
    only_a = [t for t in masks_a.tasks if t not in tasks]
    only_b = [t for t in masks_b.tasks if t not in tasks]
    if only_a or only_b:  # a task's sharing depends on the other tasks: compare it on the common ones only
        shared_a = metrics.sharing(masks_a.subset(tasks)).total if len(tasks) > 1 else {}
        shared_b = metrics.sharing(masks_b.subset(tasks)).total if len(tasks) > 1 else {}
    else:
        shared_a, shared_b = report_a["sharing"]["total"], report_b["sharing"]["total"]
    sharing = {t: {"a": shared_a.get(t), "b": shared_b.get(t)} for t in tasks}
    for v in sharing.values():
        v["change"] = _change(v["a"], v["b"])
    return {
        "tasks": tasks,
        "only_a": only_a,
        "only_b": only_b,
        "sharing_basis": "common tasks" if only_a or only_b else "reports",
        "same_model": masks_a.model_checksum == masks_b.model_checksum,
        "drift": drift,
        "sharing": sharing,
        "iou": _pair_changes(report_a, report_b, tasks),
        "ablation": _ablation_change(report_a, report_b, tasks),
    }


def _pair_changes(a: Mapping[str, Any], b: Mapping[str, Any], tasks: list[str]) -> dict[str, dict[str, float | None]]:
    out = {}
    for i, t in enumerate(tasks):
        for u in tasks[i + 1:]:
            va, vb = pair_value(a, "iou", t, u), pair_value(b, "iou", t, u)
            out[f"{t}|{u}"] = {"a": va, "b": vb, "change": _change(va, vb)}
    return out


def _ablation_change(a: Mapping[str, Any], b: Mapping[str, Any], tasks: list[str]) -> dict[str, Any]:
    def matrix(report: Mapping[str, Any]) -> list[list[float | None]]:
        return [[ablation_value(report, "removed", m, t) for t in tasks] for m in tasks]

    ma, mb = matrix(a), matrix(b)
    return {"masks": tasks, "tasks": tasks, "a": ma, "b": mb,
            "change": [[_change(x, y) for x, y in zip(ra, rb)] for ra, rb in zip(ma, mb)]}
