"""modscope: find which weights of a trained network implement which function.

The public API (stable; scripts and CI jobs rely on these names)::

    import modscope
    model = modscope.load("model.onnx")                 # or an nn.Module, a .pt2, an onnx.ModelProto
    task = modscope.Task("add", x, y, loss="ce")
    masks = modscope.train_masks(model, [task], modscope.MaskConfig(n_steps=2000, seed=0))
    modscope.evaluate(model, task, mask=masks["add"], invert=True)
    modscope.metrics.iou(masks)

Heavy modules (torch, onnx) are imported on first use so that ``modscope --help`` stays fast.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("modscope")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

_LAZY = {
    "load": ("modscope.converters", "load"),
    "Model": ("modscope.model", "Model"),
    "WeightInfo": ("modscope.model", "WeightInfo"),
    "Task": ("modscope.tasks", "Task"),
    "MaskConfig": ("modscope.masks.config", "MaskConfig"),
    "train_masks": ("modscope.masks.trainer", "train_masks"),
    "MaskSet": ("modscope.masks.maskset", "MaskSet"),
    "Mask": ("modscope.masks.maskset", "Mask"),
    "evaluate": ("modscope.evaluation", "evaluate"),
    "Report": ("modscope.report", "Report"),
    "metrics": ("modscope.metrics", None),
    "converters": ("modscope.converters", None),
    "ModscopeError": ("modscope.errors", "ModscopeError"),
}

__all__ = sorted(_LAZY) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from . import converters, metrics  # noqa: F401 - re-exported lazily
    from .converters import load  # noqa: F401 - re-exported lazily
    from .errors import ModscopeError  # noqa: F401 - re-exported lazily
    from .evaluation import evaluate  # noqa: F401 - re-exported lazily
    from .masks.config import MaskConfig  # noqa: F401 - re-exported lazily
    from .masks.maskset import Mask, MaskSet  # noqa: F401 - re-exported lazily
    from .masks.trainer import train_masks  # noqa: F401 - re-exported lazily
    from .model import Model, WeightInfo  # noqa: F401 - re-exported lazily
    from .report import Report  # noqa: F401 - re-exported lazily
    from .tasks import Task  # noqa: F401 - re-exported lazily


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'modscope' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
