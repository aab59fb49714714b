"""Ablation: every task's metric with every mask removed (its weights zeroed), and with only it kept.

This is the paper's specialization test (P_specialize): removing the weights of task A's mask should hurt A and spare
B. Values are reported raw, as the relative drop from the full model (`relative_drop`, the one definition of "drop"
in modscope), and (when a control mask is named) relative to the control mask, which is what the paper compares
against. The matrices are `Labelled`: masks on the rows, tasks on the columns. ``confusion_diff`` compares a classifier's confusion matrices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import InvalidParameterError
from ..evaluation import evaluate, predict
from ..masks.maskset import Mask, MaskSet
from ..model import Model
from ..tasks import Task
from ._counts import safe_div
from .drop import relative_drop
from .labelled import Labelled, floats


@dataclass(frozen=True, eq=False)
class AblationResult:
    """The ablation matrices of a run, labelled: rows are the masks removed (or kept), columns the tasks evaluated.

    Every matrix is a `Labelled` array: ``removed["add", "mul"]`` reads by name, ``removed[0, 1]``, ``.shape`` and
    NumPy arithmetic work as on a plain array, ``removed.to_dict()`` gives ``{mask: {task: value}}`` and
    ``removed.to_pandas()`` a DataFrame.

    Attributes:
        masks: the masks' task names (matrix rows); tasks: the evaluated tasks (columns).
        full: (T,) each task's metric with the full model.
        removed: (M, T) metric of task t with mask m's weights removed.
        kept: (M, T) metric of task t with only mask m's weights kept.
        higher_is_better: (T,) per task, whether its metric is better high (accuracy) or low (mse).
        drop: (M, T) the relative drop of task t when mask m is removed (`relative_drop`).
        relative_removed: removed / full (the fraction of the metric that is left; 1 - drop for accuracy).
        control: the control mask's name, if given; relative_to_control: removed / kept[control].
        per_layer: ``{layer: (M, T)}`` metric with the mask removed in that layer only (if asked for).
    """

    masks: tuple[str, ...]
    tasks: tuple[str, ...]
    full: Labelled
    removed: Labelled
    kept: Labelled
    control: str | None = None
    per_layer: dict[str, Labelled] | None = None
    higher_is_better: tuple[bool, ...] | None = None

    def __post_init__(self) -> None:
        # plain arrays (older callers) become labelled ones
        set_ = object.__setattr__
        set_(self, "full", Labelled(self.full, self.tasks))
        for key in ("removed", "kept"):
            set_(self, key, self._matrix(getattr(self, key)))
        if self.per_layer is not None:
            set_(self, "per_layer", {k: self._matrix(v) for k, v in self.per_layer.items()})
        if self.higher_is_better is None:
            set_(self, "higher_is_better", (True,) * len(self.tasks))

    def _matrix(self, values: Any) -> Labelled:
        return Labelled(values, self.masks, self.tasks)

    @property
    def drop(self) -> Labelled:
        hib = self.higher_is_better or ()
        return self._matrix([[relative_drop(float(f), float(r), h) for f, r, h in zip(self.full.values, row, hib)]
                             for row in self.removed.values])

    @property
    def relative_removed(self) -> Labelled:
        return self._matrix(safe_div(self.removed.values, self.full.values[None, :]))

    @property
    def relative_to_control(self) -> Labelled | None:
        if self.control is None:
            return None
        return self._matrix(safe_div(self.removed.values, self.kept.values[self.masks.index(self.control)][None, :]))

    def value(self, removed_mask: str, task: str) -> float:
        """Task ``task``'s metric with mask ``removed_mask`` removed."""
        return self.removed[removed_mask, task]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AblationResult) and self.to_dict() == other.to_dict()

    def to_dict(self) -> dict[str, Any]:
        rel_ctrl = self.relative_to_control
        return {
            "masks": list(self.masks),
            "tasks": list(self.tasks),
            "full": self.full.tolist(),
            "removed": self.removed.tolist(),
            "kept": self.kept.tolist(),
            "higher_is_better": list(self.higher_is_better or ()),
            "drop": self.drop.tolist(),
            "relative_removed": self.relative_removed.tolist(),
            "control": self.control,
            "relative_to_control": rel_ctrl.tolist() if rel_ctrl is not None else None,
            "per_layer": {k: v.tolist() for k, v in self.per_layer.items()} if self.per_layer else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], higher_is_better: Sequence[bool] | None = None) -> AblationResult:
        """The result of `to_dict` (a report's ``ablation`` section); derived values are recomputed.

        Args:
            data: the dict.
            higher_is_better: per task, for data written before it was stored (defaults to True).
        """
        hib = data.get("higher_is_better") or higher_is_better
        layers = data.get("per_layer")
        return cls(tuple(data["masks"]), tuple(data["tasks"]), floats(data["full"]), floats(data["removed"]),
                   floats(data["kept"]), data.get("control"),
                   {k: floats(v) for k, v in layers.items()} if layers else None,
                   tuple(bool(h) for h in hib) if hib is not None else None)


def ablation(
    model: Model | torch.nn.Module,
    masks: MaskSet,
    tasks: Sequence[Task],
    *,
    control: str | None = None,
    per_layer: bool = False,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
) -> AblationResult:
    """The metric of every task with every mask removed, and with only it kept.

    Args:
        model: the frozen model the masks were trained on.
        masks: the masks; every one of them is removed in turn.
        tasks: the tasks to evaluate (their data should be held-out data where there is any).
        control: the name of a control mask (trained on the full task) to report values relative to.
        per_layer: also remove each mask in one layer at a time.
        batch_size, device: as in `evaluate`.

    Returns:
        An `AblationResult`.

    Example:
        >>> import torch, modscope
        >>> net = torch.nn.Linear(2, 2, bias=False)
        >>> _ = torch.nn.init.eye_(net.weight)  # classifies perfectly; with the weights removed it says 0: half right
        >>> task = modscope.Task("t", torch.eye(2), torch.tensor([0, 1]))
        >>> ms = modscope.MaskSet.from_masks({"t": {"weight": torch.ones(2, 2, dtype=torch.bool)}})
        >>> result = modscope.metrics.ablation(net, ms, [task])
        >>> result.removed.shape, result.removed["t", "t"], result.drop.to_dict()
        ((1, 1), 0.5, {'t': {'t': 0.5}})
    """
    if control is not None and control not in masks:
        raise InvalidParameterError(f"control mask {control!r} is not in the MaskSet; it has {list(masks)}")
    run = dict(batch_size=batch_size, device=device)
    full = np.array([evaluate(model, t, **run) for t in tasks])
    removed = np.array([[evaluate(model, t, masks[m], invert=True, **run) for t in tasks] for m in masks])
    kept = np.array([[evaluate(model, t, masks[m], **run) for t in tasks] for m in masks])
    layers = None
    if per_layer:
        layers = {}
        for layer in sorted(set(masks.layers.values())):
            layers[layer] = np.array(
                [[evaluate(model, t, _only_layer(masks[m], layer), invert=True, **run) for t in tasks] for m in masks]
            )
    return AblationResult(tuple(masks), tuple(t.name for t in tasks), full, removed, kept, control, layers,
                          tuple(bool(t.higher_is_better) for t in tasks))


def _only_layer(mask: Mask, layer: str) -> Mask:
    """The mask restricted to one layer: its weights elsewhere are all kept-by-removal (i.e. not removed)."""
    return Mask({n: t if mask.layers[n] == layer else torch.zeros_like(t) for n, t in mask.items()}, mask.layers)


@dataclass(frozen=True)
class ConfusionResult:
    """Attributes:
    reference: (C, C) confusion matrix C[true, pred] normalized per true class, for the reference.
    confusion: the same with the mask applied.
    diff: confusion − reference.
    drop: (C,) relative drop of each class's accuracy in % (−diff[c,c] / reference[c,c] · 100).
    """

    reference: np.ndarray
    confusion: np.ndarray
    diff: np.ndarray
    drop: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k).tolist() for k in ("reference", "confusion", "diff", "drop")}


def confusion_matrix(outputs: torch.Tensor, targets: torch.Tensor, n_classes: int) -> np.ndarray:
    """C[true, pred] normalized per true class (rows of absent classes stay 0)."""
    pred = outputs.argmax(-1).flatten()
    true = targets.flatten().long()
    counts = torch.bincount(true * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    counts = counts.to(torch.float64).numpy()
    return safe_div(counts, counts.sum(1, keepdims=True))


def confusion_diff(
    model: Model | torch.nn.Module,
    task: Task,
    mask: Mask,
    reference: Mask | None = None,
    *,
    invert: bool = True,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
) -> ConfusionResult:
    """How a classifier's confusion matrix changes when a mask is applied.

    Args:
        model, task: a classification task (logits with classes on the last axis, integer targets).
        mask: the mask to apply; removed when ``invert`` (the default), kept otherwise.
        reference: the mask of the reference (kept), e.g. the control mask; the full model when omitted.

    Returns:
        A `ConfusionResult` with the per-class relative drop.
    """
    ref_out = predict(model, task, reference, batch_size=batch_size, device=device)
    out = predict(model, task, mask, invert, batch_size=batch_size, device=device)
    n_classes = ref_out.shape[-1]
    ref = confusion_matrix(ref_out, task.targets, n_classes)
    conf = confusion_matrix(out, task.targets, n_classes)
    diff = conf - ref
    drop = -safe_div(np.diag(diff), np.diag(ref)) * 100
    return ConfusionResult(ref, conf, diff, drop)
