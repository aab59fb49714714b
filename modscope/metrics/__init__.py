"""The paper's measurements of subnetworks, as pure functions returning frozen result dataclasses.

- `sharing`: fraction of each task's mask also used by other masks (the paper's "total shared").
- `iou`, `iomin`: pairwise overlap, per layer and whole-model, with the chance level for equal densities.
- `ablation`: every task's metric with every mask removed / kept, labelled (`Labelled`); `relative_drop` is the one
  definition of the ablation "drop"; `confusion_diff` for classifiers.
- `cluster`: modules from hierarchical (scipy) and spectral (scikit-learn) clustering on IoU.
- `stability`: IoU between masks of the same task trained with different seeds.

The names load on first use, so that ``modscope.metrics.drop`` (plain Python) is read without torch.
"""

from __future__ import annotations

import sys
import types
from importlib import import_module
from typing import Any

#: public name -> the module that defines it.
_WHERE = {
    "AblationResult": "ablation", "ConfusionResult": "ablation", "ablation": "ablation", "confusion_diff": "ablation",
    "confusion_matrix": "ablation", "ClusterResult": "clustering", "cluster": "clustering",
    "OverlapResult": "overlap", "iomin": "overlap", "iou": "overlap", "SharingResult": "sharing", "sharing": "sharing",
    "StabilityResult": "stability", "stability": "stability", "Labelled": "labelled", "relative_drop": "drop",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'modscope.metrics' has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


class _Metrics(types.ModuleType):
    """The package, whose functions ``ablation``, ``sharing`` and ``stability`` share their names with the modules
    that define them: importing such a module must not replace the function on the package."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in _WHERE:
            self.__dict__.pop(name, None)  # the function loads through __getattr__
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Metrics


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = ["AblationResult", "ClusterResult", "ConfusionResult", "Labelled", "OverlapResult", "SharingResult",
           "StabilityResult", "ablation", "cluster", "confusion_diff", "confusion_matrix", "iomin", "iou",
           "relative_drop", "sharing", "stability"]
