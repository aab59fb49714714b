"""Linear models and preprocessing of the ``ai.onnx.ml`` domain: Scaler, Normalizer, LinearClassifier,
LinearRegressor, as skl2onnx writes them for StandardScaler, Normalizer, LogisticRegression, LinearSVC, Ridge ...

Outputs are float32 as the ONNX-ML spec says, whatever the input's numeric type. The coefficients live in node
attributes, not initializers, so they are constants here (not maskable weights); the outputs are differentiable
with respect to the input. Where the spec leaves room, the conventions follow onnxruntime, the reference converted
models are checked against:

* a LinearClassifier with one row of coefficients and two class labels is binary: the score ``s`` of the second
  class gives the scores ``[1 - s, s]`` (after the logistic function when ``post_transform`` is LOGISTIC) and the
  second label where ``s > 0``;
* otherwise the label is the class of the largest raw score, and ``post_transform`` applies to all scores
  (SOFTMAX_ZERO leaves scores of exactly 0 at 0);
* Normalizer divides each row by its maximum (MAX), absolute sum (L1) or Euclidean norm (L2); an all-zero row
  stays zero.
"""

from __future__ import annotations

from typing import Any

import torch

from ....errors import InvalidParameterError, UnsupportedOperatorError
from .util import as_tensor
from ..registry import NodeContext, OpSet

ops = OpSet()

ML = "ai.onnx.ml"


def _rows(x: Any) -> torch.Tensor:
    """The input as float32 rows: (N, C); a 1-D input is one row."""
    x = as_tensor(x)
    x = x.to(torch.float32) if x.dtype != torch.float32 else x
    return x.unsqueeze(0) if x.dim() == 1 else x


def _floats(ctx: NodeContext, name: str, default: list[float] | None = None) -> torch.Tensor:
    value = ctx.attr(name, default)
    if value is None:
        raise InvalidParameterError(f"{ctx.op_type} node '{ctx.name}' has no '{name}' attribute; the model is invalid")
    return torch.as_tensor(value, dtype=torch.float32)


def _linear_scores(ctx: NodeContext, x: torch.Tensor) -> torch.Tensor:
    """x @ coefficients.T + intercepts: (N, number of coefficient rows)."""
    coefficients = _floats(ctx, "coefficients")
    intercepts = _floats(ctx, "intercepts", [])
    n_features = x.shape[-1]
    if coefficients.numel() % n_features:
        raise InvalidParameterError(
            f"{ctx.op_type} node '{ctx.name}' has {coefficients.numel()} coefficients, not a multiple of the "
            f"{n_features} input features; feed inputs with the feature count the model was trained on"
        )
    scores = x @ coefficients.reshape(-1, n_features).T
    return scores + intercepts if intercepts.numel() else scores


def _post_transform(kind: str, scores: torch.Tensor, ctx: NodeContext) -> torch.Tensor:
    if kind == "NONE":
        return scores
    if kind == "LOGISTIC":
        return torch.sigmoid(scores)
    if kind == "SOFTMAX":
        return torch.softmax(scores, dim=-1)
    if kind == "SOFTMAX_ZERO":
        zero = scores == 0
        exps = torch.where(zero, torch.zeros_like(scores), torch.exp(scores - scores.amax(dim=-1, keepdim=True)))
        return exps / exps.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
    if kind == "PROBIT":
        return torch.special.ndtri(scores)
    raise UnsupportedOperatorError(ctx.op_type, ML, ctx.opset, ctx.name, f"post_transform {kind!r} is not supported")


@ops.register("Scaler", domain=ML)
def scaler(ctx: NodeContext, x: Any) -> torch.Tensor:
    """(x - offset) * scale, per feature (a single offset or scale applies to every feature)."""
    x = as_tensor(x).to(torch.float32)
    return (x - _floats(ctx, "offset", [0.0])) * _floats(ctx, "scale", [1.0])


@ops.register("Normalizer", domain=ML)
def normalizer(ctx: NodeContext, x: Any) -> torch.Tensor:
    """Each row divided by its MAX, L1 or L2 norm (attribute ``norm``); all-zero rows stay zero."""
    original = as_tensor(x)
    rows = _rows(original)
    norm = ctx.attr("norm", "MAX")
    if norm == "MAX":
        denominator = rows.amax(dim=-1, keepdim=True)
    elif norm == "L1":
        denominator = rows.abs().sum(dim=-1, keepdim=True)
    elif norm == "L2":
        denominator = rows.pow(2).sum(dim=-1, keepdim=True).sqrt()
    else:
        raise UnsupportedOperatorError("Normalizer", ML, ctx.opset, ctx.name, f"norm {norm!r} is not MAX, L1 or L2")
    safe = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    out = torch.where(denominator == 0, torch.zeros_like(rows), rows / safe)
    return out.reshape(original.shape) if original.dim() == 1 else out


@ops.register("LinearRegressor", domain=ML)
def linear_regressor(ctx: NodeContext, x: Any) -> torch.Tensor:
    """x @ coefficients.T + intercepts: (N, targets), then ``post_transform``."""
    scores = _linear_scores(ctx, _rows(x))
    return _post_transform(ctx.attr("post_transform", "NONE"), scores, ctx)


@ops.register("LinearClassifier", domain=ML)
def linear_classifier(ctx: NodeContext, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels (N,) int64, scores (N, classes) float32); see the module docstring for the binary convention."""
    if ctx.attr("classlabels_ints") is None:
        raise UnsupportedOperatorError(
            "LinearClassifier",
            ML,
            ctx.opset,
            ctx.name,
            "string class labels cannot be torch tensors; export the classifier with integer labels",
        )
    labels = torch.as_tensor(ctx.attr("classlabels_ints"), dtype=torch.int64)
    raw = _linear_scores(ctx, _rows(x))
    kind = ctx.attr("post_transform", "NONE")
    if raw.shape[-1] == 1 and labels.numel() == 2:
        score = raw[:, 0]
        positive = torch.sigmoid(score) if kind == "LOGISTIC" else score
        scores = torch.stack([1 - positive, positive], dim=-1)
        return torch.where(score > 0, labels[1], labels[0]), scores
    if raw.shape[-1] != labels.numel():
        raise InvalidParameterError(
            f"LinearClassifier node '{ctx.name}' has {raw.shape[-1]} rows of coefficients for {labels.numel()} "
            "class labels; the model is invalid"
        )
    return labels[raw.argmax(dim=-1)], _post_transform(kind, raw, ctx)
