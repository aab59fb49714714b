"""Stability: do masks trained on the same task with different seeds select the same weights?

The paper's check (CIFAR mask stability): the pooled IoU Σ|m_a ∧ m_b| / Σ|m_a ∨ m_b| between two masks trained on the
same data with different seeds, averaged over pairs. A value near the chance level means the masks are not
reproducible and their overlaps with other tasks should not be read as structure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

from ..errors import InvalidParameterError
from ..masks.maskset import MaskSet
from .overlap import iou


@dataclass(frozen=True)
class StabilityResult:
    """Attributes:
    tasks: the tasks present in every run.
    mean, std: ``{task: value}`` of the pairwise whole-model IoU over runs.
    chance: ``{task: mean chance IoU}`` for masks of the same densities.
    per_layer: ``{layer: {task: mean IoU}}``.
    pairs: ``{task: [IoU of each pair of runs]}``.
    """

    tasks: tuple[str, ...]
    mean: dict[str, float]
    std: dict[str, float]
    chance: dict[str, float]
    per_layer: dict[str, dict[str, float]]
    pairs: dict[str, list[float]]

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "mean": self.mean, "std": self.std, "chance": self.chance,
                "per_layer": self.per_layer, "pairs": self.pairs}


def stability(runs: Sequence[MaskSet], tasks: Sequence[str] | None = None) -> StabilityResult:
    """Pairwise IoU between the masks of each task across runs with different seeds.

    Args:
        runs: two or more MaskSets of the same model and tasks.
        tasks: the tasks to compare; those common to all runs by default.

    Example:
        >>> import torch, modscope
        >>> r1 = modscope.MaskSet.from_masks({"t": {"w": torch.tensor([1, 1, 0, 0])}})
        >>> r2 = modscope.MaskSet.from_masks({"t": {"w": torch.tensor([1, 0, 0, 0])}})
        >>> modscope.metrics.stability([r1, r2]).mean["t"]
        0.5
    """
    if len(runs) < 2:
        raise InvalidParameterError("stability needs the masks of at least two runs (seeds)")
    common = [t for t in runs[0].tasks if all(t in r for r in runs[1:])]
    names = list(tasks) if tasks is not None else common
    missing = [t for t in names if t not in common]
    if missing or not names:
        raise InvalidParameterError(f"tasks {missing or names} are not in every run; the common tasks are {common}")
    mean, std, chance, pairs = {}, {}, {}, {}
    per_layer: dict[str, dict[str, float]] = {}
    for t in names:
        values, chances, layer_values = [], [], {}
        for a, b in combinations(range(len(runs)), 2):
            result = iou({"a": runs[a][t], "b": runs[b][t]})
            values.append(result.pair("a", "b"))
            chances.append(float(result.chance_total[0, 1]))
            for layer, matrix in result.per_layer.items():
                layer_values.setdefault(layer, []).append(float(matrix[0, 1]))
        mean[t], std[t], chance[t], pairs[t] = float(np.mean(values)), float(np.std(values)), float(np.mean(chances)), values
        for layer, vs in layer_values.items():
            per_layer.setdefault(layer, {})[t] = float(np.mean(vs))
    return StabilityResult(tuple(names), mean, std, chance, per_layer, pairs)
