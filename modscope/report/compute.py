"""The measurements of a report: every metric of `modscope.metrics` on one run, as plain JSON-ready data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..masks.maskset import MaskSet
from ..model import Model
from ..tasks import Task


def model_summary(model: Model, masks: MaskSet) -> dict[str, Any]:
    """Where the model came from and how many of its weights were masked."""
    src = model.source
    return {
        "format": src.format,
        "path": src.path,
        "checksum": src.checksum,
        "opset": src.opset,
        "n_weights": sum(w.numel for w in model.weights),
        "n_masked": sum(w.numel for w in masks.weights),
    }


def layer_sizes(masks: MaskSet) -> dict[str, int]:
    """``{layer: number of masked weights}`` in model order."""
    sizes: dict[str, int] = {}
    for w in masks.weights:
        sizes[w.layer] = sizes.get(w.layer, 0) + w.numel
    return sizes


def layer_modules(model: Model, masks: MaskSet) -> dict[str, str]:
    """``{layer: what it is}``, e.g. ``{"0": "Linear 32×9"}``: the module's class (when the layer is a submodule of
    the model) and the shape of its main weight, so that a reader can tell layers named "0", "2", "4" apart."""
    shapes: dict[str, tuple[int, ...]] = {}
    for w in masks.weights:
        if w.layer not in shapes or (w.kind == "weight" and len(w.shape) > len(shapes[w.layer])):
            shapes[w.layer] = tuple(w.shape)
    out = {}
    for layer, shape in shapes.items():
        try:
            kind = type(model.module.get_submodule(layer)).__name__ if layer else ""
        except (AttributeError, TypeError):  # not a submodule path (e.g. an ONNX initializer's name)
            kind = ""
        out[layer] = " ".join(p for p in (kind, "×".join(map(str, shape)) or "scalar") if p)
    return out


def task_info(tasks: Sequence[Task]) -> dict[str, dict[str, Any]]:
    """Per task: its metric, whether higher is better, its loss and how many examples it was measured on."""
    return {
        t.name: {
            "metric": t.metric_name,
            "higher_is_better": bool(t.higher_is_better),
            "loss": t.loss if isinstance(t.loss, str) else getattr(t.loss, "__name__", "custom"),
            "n_examples": len(t),
        }
        for t in tasks
    }


def compute(masks: MaskSet, model: Model, tasks: Sequence[Task], *, n_clusters: int = 2,
            device: str | None = None) -> dict[str, Any]:
    """All metrics of a run.

    Args:
        masks: the trained masks.
        model: the model they were trained on (for the ablation matrix).
        tasks: the tasks to evaluate, one per mask, in the masks' order (held-out data where there is any).
        n_clusters: modules to cut the clustering tree into (clustering runs when there are >= 2 tasks).
        device: where to evaluate; cuda when present by default.

    Returns:
        A dict with ``tasks``, ``task_info``, ``model``, ``config``, ``layers``, ``layer_modules``, ``density``, ``density_per_layer``,
        ``sharing``, ``iou``, ``iomin``, ``ablation``, ``clustering`` (None for one task), ``curves`` and ``convergence`` (`ConvergenceCheck.to_dict`).
    """
    from .. import metrics
    from ..masks.convergence import check_convergence

    names = list(masks.tasks)
    return {
        "tasks": names,
        "task_info": task_info(tasks),
        "model": model_summary(model, masks),
        "config": masks.config.to_dict() if masks.config else None,
        "layers": layer_sizes(masks),
        "layer_modules": layer_modules(model, masks),
        "density": masks.density(),
        "density_per_layer": masks.density_per_layer(),
        "sharing": metrics.sharing(masks).to_dict(),
        "iou": metrics.iou(masks).to_dict(),
        "iomin": metrics.iomin(masks).to_dict(),
        "ablation": metrics.ablation(model, masks, tasks, device=device).to_dict(),
        "clustering": metrics.cluster(masks, n_clusters=n_clusters).to_dict() if len(names) >= 2 else None,
        "curves": masks.curves,
        "convergence": check_convergence(masks.curves).to_dict(),
    }
