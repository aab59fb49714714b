"""The paper's mask sharing: how much of each task's mask other tasks' masks also use.

For task i and layer k (docs/method.md section 7): shared_i,k = |m_i,k ∧ (∨_{j≠i} m_j,k)| / max(|m_i,k|, 1). The
whole-model value is the paper's "total shared": Σ_k |m_i,k ∧ others_k| / Σ_k |m_i,k|, e.g. the fraction of the
addition mask's weights that the multiplication mask also uses. The chance level is the value expected if the other
masks were independent random masks with their per-layer densities: 1 − Π_{j≠i} (1 − p_j,k) per layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..masks.maskset import Mask, MaskSet
from ._counts import stacked_by_layer, task_masks


@dataclass(frozen=True)
class SharingResult:
    """Attributes:
    tasks: the task names.
    total: ``{task: shared fraction}`` over the whole model.
    per_layer: ``{layer: {task: shared fraction}}``.
    chance_total, chance_per_layer: the same for random masks of equal per-layer densities.
    counts: ``{layer: {task: |m_i|}}``; union: ``{layer: |∨_j m_j|}``.
    """

    tasks: tuple[str, ...]
    total: dict[str, float]
    per_layer: dict[str, dict[str, float]]
    chance_total: dict[str, float]
    chance_per_layer: dict[str, dict[str, float]]
    counts: dict[str, dict[str, int]]
    union: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "total": self.total,
            "per_layer": self.per_layer,
            "chance_total": self.chance_total,
            "chance_per_layer": self.chance_per_layer,
            "counts": self.counts,
            "union": self.union,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SharingResult:
        """The result of `to_dict` (a report's ``sharing`` section)."""
        return cls(tuple(data["tasks"]), dict(data["total"]), {k: dict(v) for k, v in data["per_layer"].items()},
                   dict(data["chance_total"]), {k: dict(v) for k, v in data["chance_per_layer"].items()},
                   {k: dict(v) for k, v in (data.get("counts") or {}).items()}, dict(data.get("union") or {}))


def sharing(masks: MaskSet | dict[str, Mask], tasks: Sequence[str] | None = None) -> SharingResult:
    """The fraction of each task's mask that any other task's mask also uses, per layer and whole-model.

    Args:
        masks: a `MaskSet` (or ``{task: Mask}``) with at least two tasks for a meaningful result.
        tasks: the tasks to compare; all by default.

    Returns:
        A `SharingResult`.

    Example:
        >>> import torch, modscope
        >>> ms = modscope.MaskSet.from_masks({"add": {"w": torch.tensor([1, 1, 1, 0])}, "mul": {"w": torch.tensor([1, 0, 0, 1])}})
        >>> round(modscope.metrics.sharing(ms).total["add"], 3)
        0.333
    """
    names, ms = task_masks(masks, tasks)
    per_layer: dict[str, dict[str, float]] = {}
    chance_per_layer: dict[str, dict[str, float]] = {}
    counts: dict[str, dict[str, int]] = {}
    union: dict[str, int] = {}
    shared_sum = {t: 0.0 for t in names}
    size_sum = {t: 0.0 for t in names}
    chance_sum = {t: 0.0 for t in names}
    for layer, stack in stacked_by_layer(ms).items():
        sizes = stack.sum(1).to(torch.float64)
        density = sizes / max(stack.shape[1], 1)
        per_layer[layer], chance_per_layer[layer], counts[layer] = {}, {}, {}
        union[layer] = int(stack.any(0).sum())
        for i, t in enumerate(names):
            others = torch.cat([stack[:i], stack[i + 1 :]])
            shared = float((stack[i] & others.any(0)).sum()) if len(others) else 0.0
            chance = 1.0 - float(torch.prod(1 - torch.cat([density[:i], density[i + 1 :]])))
            size = float(sizes[i])
            per_layer[layer][t] = shared / max(size, 1.0)
            chance_per_layer[layer][t] = chance
            counts[layer][t] = int(size)
            shared_sum[t] += shared
            size_sum[t] += size
            chance_sum[t] += chance * size
    total = {t: shared_sum[t] / size_sum[t] if size_sum[t] else 0.0 for t in names}
    chance_total = {t: chance_sum[t] / size_sum[t] if size_sum[t] else 0.0 for t in names}
    return SharingResult(tuple(names), total, per_layer, chance_total, chance_per_layer, counts, union)
