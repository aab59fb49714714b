"""Which weights of a model get masks (the paper's filter, docs/method.md section 4)."""

from __future__ import annotations

from fnmatch import fnmatch

from ..errors import InvalidParameterError, warn_nonfinite_weights
from ..model import Model, WeightInfo
from .config import MaskConfig


def _matches(w: WeightInfo, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch(w.name, p) or fnmatch(w.source_name, p) for p in patterns)


def select_weights(model: Model, config: MaskConfig) -> list[WeightInfo]:
    """The weights of ``model`` that ``config`` masks, in model order.

    Biases, embeddings and normalization scales are masked only if the config's flags say so; ``include`` narrows
    the choice to matching names, ``exclude`` removes matching names.

    Raises:
        InvalidParameterError: nothing is left to mask.
    """
    allowed = {"weight": True, "bias": config.mask_biases, "embedding": config.mask_embeddings, "norm": config.mask_norms}
    chosen = [
        w
        for w in model.weights
        if allowed[w.kind]
        and (not config.include or _matches(w, config.include))
        and not (config.exclude and _matches(w, config.exclude))
    ]
    _warn_nonfinite(model, chosen)
    if not model.weights:
        raise InvalidParameterError(
            f"the model has no weights modscope can mask ({_no_weights_reason(model)}); "
            "`modscope inspect MODEL` shows what the file holds"
        )
    if not chosen:
        raise InvalidParameterError(
            "no weight is left to mask with this MaskConfig (check include/exclude patterns and the mask_biases/"
            f"mask_embeddings/mask_norms flags); the model's weights are {[w.name for w in model.weights][:8]}"
        )
    return chosen


def _no_weights_reason(model: Model) -> str:
    if model.source.format == "onnx":
        return ("no float tensor in the file is used as a weight: no initializer or Constant node feeds a Conv, Gemm, "
                "MatMul, recurrent, normalization or embedding input")
    return "it has no float parameters"


def _warn_nonfinite(model: Model, chosen: list[WeightInfo]) -> None:
    """Name the masked weights that hold NaN or Inf: no mask can make them meaningful (0 * Inf is NaN)."""
    import torch

    params = model.parameters()
    warn_nonfinite_weights([w.name for w in chosen if w.name in params and not bool(torch.isfinite(params[w.name]).all())],
                           stacklevel=4)


def frozen_weights(weights: list[WeightInfo], config: MaskConfig) -> set[str]:
    """Names of the masked weights whose logits are not trained (``config.freeze``)."""
    return {w.name for w in weights if config.freeze and _matches(w, config.freeze)}
