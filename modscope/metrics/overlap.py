"""Pairwise overlap of masks: IoU and IoMin, per layer and whole-model, with the overlap expected by chance.

For masks m_i, m_j of one layer: IoU = |m_i ∧ m_j| / |m_i ∨ m_j| and IoMin = |m_i ∧ m_j| / min(|m_i|, |m_j|)
(docs/method.md section 7). The whole-model value pools the counts of all masked weights. The chance level is the
value expected for independent random masks with the same per-layer densities p_i = |m_i|/n: the expected
intersection is n·p_i·p_j, so chance IoU = Σ n p_i p_j / Σ n (p_i + p_j − p_i p_j) and chance IoMin =
Σ n p_i p_j / min(Σ n p_i, Σ n p_j). An IoU well above chance means the two tasks share weights more than their
densities alone would make them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..masks.maskset import Mask, MaskSet
from ._counts import LayerCounts, layer_counts, safe_div, task_masks, total_counts
from .labelled import floats


@dataclass(frozen=True)
class OverlapResult:
    """A pairwise overlap metric.

    Attributes:
        metric: "iou" or "iomin".
        tasks: the task names, the order of the matrices' rows and columns.
        total: (K, K) whole-model values.
        per_layer: ``{layer: (K, K)}``.
        chance_total: (K, K) values expected for random masks of the same per-layer densities.
        chance_per_layer: ``{layer: (K, K)}``.
    """

    metric: str
    tasks: tuple[str, ...]
    total: np.ndarray
    per_layer: dict[str, np.ndarray]
    chance_total: np.ndarray
    chance_per_layer: dict[str, np.ndarray]

    def pair(self, a: str, b: str, layer: str | None = None) -> float:
        """The value for tasks ``a`` and ``b``, whole-model or in one layer."""
        i, j = self.tasks.index(a), self.tasks.index(b)
        return float((self.total if layer is None else self.per_layer[layer])[i, j])

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "tasks": list(self.tasks),
            "total": self.total.tolist(),
            "per_layer": {k: v.tolist() for k, v in self.per_layer.items()},
            "chance_total": self.chance_total.tolist(),
            "chance_per_layer": {k: v.tolist() for k, v in self.chance_per_layer.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OverlapResult:
        """The result of `to_dict` (a report's ``iou`` or ``iomin`` section)."""
        return cls(data.get("metric", "iou"), tuple(data["tasks"]), floats(data["total"]),
                   {k: floats(v) for k, v in data["per_layer"].items()}, floats(data["chance_total"]),
                   {k: floats(v) for k, v in data["chance_per_layer"].items()})


def _ratio(inter: np.ndarray, sizes: np.ndarray, metric: str) -> np.ndarray:
    if metric == "iou":
        return safe_div(inter, sizes[:, None] + sizes[None, :] - inter)
    return safe_div(inter, np.minimum(sizes[:, None], sizes[None, :]))


def _expected_inter(c: LayerCounts) -> np.ndarray:
    """Expected |m_i ∧ m_j| of independent random masks with the layer's densities: n·p_i·p_j."""
    return c.sizes[:, None] * c.sizes[None, :] / max(c.n, 1)


def _overlap(masks: MaskSet | dict[str, Mask], tasks: Sequence[str] | None, metric: Literal["iou", "iomin"]) -> OverlapResult:
    names, ms = task_masks(masks, tasks)
    per = layer_counts(ms)
    per_layer = {layer: _ratio(c.inter, c.sizes, metric) for layer, c in per.items()}
    chance_per_layer = {layer: _ratio(_expected_inter(c), c.sizes, metric) for layer, c in per.items()}
    tot = total_counts(per)
    total = _ratio(tot.inter, tot.sizes, metric)
    chance_total = _ratio(sum(_expected_inter(c) for c in per.values()), tot.sizes, metric)
    return OverlapResult(metric, tuple(names), total, per_layer, chance_total, chance_per_layer)


def iou(masks: MaskSet | dict[str, Mask], tasks: Sequence[str] | None = None) -> OverlapResult:
    """Pairwise intersection over union of the tasks' masks.

    Args:
        masks: a `MaskSet` (or ``{task: Mask}``).
        tasks: the tasks to compare, in order; all by default.

    Returns:
        An `OverlapResult`: symmetric (K, K) matrices, 1 on the diagonal for non-empty masks, 0 for disjoint masks.

    Example:
        >>> import torch, modscope
        >>> ms = modscope.MaskSet.from_masks({"a": {"w": torch.tensor([1, 1, 0, 0])}, "b": {"w": torch.tensor([0, 1, 1, 0])}})
        >>> modscope.metrics.iou(ms).pair("a", "b")
        0.3333333333333333
    """
    return _overlap(masks, tasks, "iou")


def iomin(masks: MaskSet | dict[str, Mask], tasks: Sequence[str] | None = None) -> OverlapResult:
    """Pairwise intersection over the smaller mask's size (1 when one mask contains the other).

    Example:
        >>> import torch, modscope
        >>> ms = modscope.MaskSet.from_masks({"a": {"w": torch.tensor([1, 1, 0, 0])}, "b": {"w": torch.tensor([0, 1, 0, 0])}})
        >>> modscope.metrics.iomin(ms).pair("a", "b")
        1.0
    """
    return _overlap(masks, tasks, "iomin")
