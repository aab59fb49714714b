"""Per-layer counts shared by the overlap metrics: sizes of masks and of their pairwise intersections."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InvalidParameterError
from ..masks.maskset import Mask, MaskSet


@dataclass(frozen=True)
class LayerCounts:
    """For one layer: n weights, sizes (K,) and pairwise intersections (K, K) of K masks."""

    n: int
    sizes: np.ndarray
    inter: np.ndarray


def task_masks(masks: MaskSet | dict[str, Mask], tasks: Sequence[str] | None) -> tuple[list[str], list[Mask]]:
    names = list(tasks) if tasks is not None else list(masks)
    if not names:
        raise InvalidParameterError("no masks to compare; pass a MaskSet with at least one task")
    missing = [t for t in names if t not in masks]
    if missing:
        raise InvalidParameterError(f"no mask for tasks {missing}; the masks are {list(masks)}")
    return names, [masks[t] for t in names]


def stacked_by_layer(masks: list[Mask]) -> dict[str, torch.Tensor]:
    """``{layer: (K, n) bool}`` with each mask's weights of that layer flattened and concatenated."""
    first = masks[0]
    for m in masks[1:]:
        if set(m) != set(first):
            raise InvalidParameterError("the masks cover different weights; compare masks of the same model and filter")
    by_layer: dict[str, list[str]] = {}
    for name in first:
        by_layer.setdefault(first.layers[name], []).append(name)
    return {
        layer: torch.stack([torch.cat([m[n].flatten() for n in names]) for m in masks])
        for layer, names in by_layer.items()
    }


def layer_counts(masks: list[Mask]) -> dict[str, LayerCounts]:
    out = {}
    for layer, stack in stacked_by_layer(masks).items():
        f = stack.to(torch.float64)
        out[layer] = LayerCounts(stack.shape[1], f.sum(1).numpy(), (f @ f.T).numpy())
    return out


def total_counts(per_layer: dict[str, LayerCounts]) -> LayerCounts:
    counts = list(per_layer.values())
    return LayerCounts(sum(c.n for c in counts), sum(c.sizes for c in counts), sum(c.inter for c in counts))


def safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den is 0."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)
