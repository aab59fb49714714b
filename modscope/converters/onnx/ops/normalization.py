"""Normalization: BatchNormalization, LayerNormalization, InstanceNormalization, GroupNormalization,
RMSNormalization, LRN, LpNormalization, MeanVarianceNormalization.

Inference-mode BatchNormalization is one ``F.batch_norm`` call and LayerNormalization one ``F.layer_norm`` call
where the scale has the normalized shape. Statistics are computed in float32 for half-precision inputs, as ONNX's
``stash_type`` (default 1 = float32) asks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ....errors import InvalidParameterError, ShapeError
from ..tensors import ONNX_TO_TORCH
from ..registry import NodeContext, OpSet

ops = OpSet()

#: the ``stash_type`` values allowed (float, float16, double, bfloat16); anything else computes in float32.
_STASH_TYPES = (1, 10, 11, 16)


def _stash_dtype(ctx: NodeContext, x: torch.Tensor) -> torch.dtype:
    """The dtype statistics are computed in: ``stash_type`` for half inputs, never less precise than ``x``."""
    code = int(ctx.attr("stash_type", 1))
    stash = ONNX_TO_TORCH[code] if code in _STASH_TYPES else torch.float32
    return x.dtype if x.dtype == torch.float64 or stash.itemsize <= x.dtype.itemsize else stash


def _channel_shape(x: torch.Tensor) -> list[int]:
    """Shape that broadcasts a per-channel vector against x (N, C, *spatial)."""
    return [1, -1] + [1] * (x.dim() - 2)


@ops.register("BatchNormalization")
def batch_normalization(
    ctx: NodeContext,
    x: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Batch normalization with the given statistics (inference), or batch statistics when ``training_mode=1``
    (or, before opset 14, when the node asks for the running statistics as extra outputs).

    Returns:
        Y, or (Y, running_mean, running_var[, saved_mean, saved_inv_std]) in training mode.
    """
    eps = float(ctx.attr("epsilon", 1e-5))
    if ctx.opset >= 14:
        training = bool(ctx.attr("training_mode", 0))
    else:
        training = any(ctx.node.output[1:]) and not ctx.attr("is_test", 0)
    if not training:
        if scale.dim() > 1:  # the pre-opset-9 spatial=0 form: per-activation statistics
            return (x - mean) / torch.sqrt(var + eps) * scale + bias
        return F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)
    return _batch_norm_training(ctx, x, scale, bias, mean, var, eps)


def _batch_norm_training(ctx, x, scale, bias, mean, var, eps) -> tuple[torch.Tensor, ...]:
    momentum = float(ctx.attr("momentum", 0.9))
    dims = [0] + list(range(2, x.dim()))
    stats_x = x.to(_stash_dtype(ctx, x))
    batch_mean = stats_x.mean(dims)
    batch_var = stats_x.var(dims, unbiased=False)
    shape = _channel_shape(x)
    inv_std = torch.rsqrt(batch_var + eps)
    y = ((stats_x - batch_mean.reshape(shape)) * inv_std.reshape(shape)).to(x.dtype)
    y = y * scale.reshape(shape) + bias.reshape(shape)
    running_mean = mean * momentum + batch_mean.to(mean.dtype) * (1 - momentum)
    running_var = var * momentum + batch_var.to(var.dtype) * (1 - momentum)
    if ctx.opset >= 14:
        return y, running_mean, running_var
    return y, running_mean, running_var, batch_mean.to(mean.dtype), inv_std.to(var.dtype)


def _standardize(x: torch.Tensor, dims: list[int], eps: float, dtype: torch.dtype):
    """(normalized x in ``dtype``, mean, inverse std) over ``dims`` (kept as size-1 axes)."""
    xs = x.to(dtype)
    mean = xs.mean(dims, keepdim=True)
    centered = xs - mean
    inv_std = torch.rsqrt((centered * centered).mean(dims, keepdim=True) + eps)
    return centered * inv_std, mean, inv_std


def _axis(ctx: NodeContext, x: torch.Tensor, default: int) -> int:
    axis = int(ctx.attr("axis", default))
    if not -x.dim() <= axis < x.dim():
        raise InvalidParameterError(
            f"{ctx.op_type} node '{ctx.name}' has axis {axis} for a rank-{x.dim()} input; use -rank <= axis < rank"
        )
    return axis % x.dim()


@ops.register("LayerNormalization", since=17)
def layer_normalization(
    ctx: NodeContext, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Layer normalization over axes ``[axis, rank)``; optional outputs Mean and InvStdDev (stash precision)."""
    axis = _axis(ctx, x, -1)
    eps = float(ctx.attr("epsilon", 1e-5))
    normalized_shape = tuple(x.shape[axis:])
    dtype = _stash_dtype(ctx, x)
    if (
        ctx.n_outputs == 1
        and dtype == x.dtype
        and tuple(scale.shape) == normalized_shape
        and (bias is None or tuple(bias.shape) == normalized_shape)
    ):
        return F.layer_norm(x, normalized_shape, scale, bias, eps)
    normalized, mean, inv_std = _standardize(x, list(range(axis, x.dim())), eps, dtype)
    y = normalized.to(x.dtype) * scale
    if bias is not None:
        y = y + bias
    if ctx.n_outputs == 1:
        return y
    return y, mean, inv_std


@ops.register("RMSNormalization", since=23)
def rms_normalization(ctx: NodeContext, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + epsilon) * scale`` over axes ``[axis, rank)``."""
    axis = _axis(ctx, x, -1)
    eps = float(ctx.attr("epsilon", 1e-5))
    xs = x.to(_stash_dtype(ctx, x))
    rms = torch.rsqrt(xs.pow(2).mean(list(range(axis, x.dim())), keepdim=True) + eps)
    return (xs * rms).to(x.dtype) * scale


@ops.register("InstanceNormalization")
def instance_normalization(ctx: NodeContext, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-channel normalization over the spatial axes (``F.group_norm`` with one channel per group)."""
    eps = float(ctx.attr("epsilon", 1e-5))
    return F.group_norm(x, x.shape[1], scale, bias, eps)


@ops.register("GroupNormalization", since=18)
def group_normalization(ctx: NodeContext, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Group normalization; opset 18 has one scale/bias per group, opset 21 one per channel."""
    eps = float(ctx.attr("epsilon", 1e-5))
    groups = int(ctx.attr("num_groups"))
    channels = x.shape[1]
    if groups <= 0 or channels % groups:
        raise InvalidParameterError(
            f"GroupNormalization node '{ctx.name}' has num_groups={groups}; it must divide the {channels} channels"
        )
    if scale.numel() == groups and groups != channels:  # opset-18 layout: expand per group to per channel
        scale = scale.repeat_interleave(channels // groups)
        bias = bias.repeat_interleave(channels // groups)
    if scale.numel() != channels:
        raise ShapeError(
            f"GroupNormalization node '{ctx.name}' has scale of {scale.numel()} values; expected {channels} "
            f"(one per channel) or {groups} (one per group, opset 18)"
        )
    dtype = _stash_dtype(ctx, x)
    y = F.group_norm(x.to(dtype), groups, None, None, eps).to(x.dtype)
    shape = _channel_shape(x)
    return y * scale.reshape(shape) + bias.reshape(shape)


@ops.register("LRN")
def lrn(ctx: NodeContext, x: torch.Tensor) -> torch.Tensor:
    """Local response normalization across channels: the window spans floor((size-1)/2) channels before and
    ceil((size-1)/2) after (torch's ``local_response_norm`` centres even windows the other way)."""
    size = int(ctx.attr("size"))
    alpha, beta, k = float(ctx.attr("alpha", 1e-4)), float(ctx.attr("beta", 0.75)), float(ctx.attr("bias", 1.0))
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    squares = (x * x).reshape(x.shape[0], 1, x.shape[1], -1)
    squares = F.pad(squares, (0, 0, before, after))
    mean_sq = F.avg_pool2d(squares, (size, 1), stride=1).reshape(x.shape)
    return x / (k + alpha * mean_sq).pow(beta)


@ops.register("LpNormalization")
def lp_normalization(ctx: NodeContext, x: torch.Tensor) -> torch.Tensor:
    """``x / ||x||_p`` along ``axis`` (p is 1 or 2); an all-zero slice stays zero."""
    axis = _axis(ctx, x, -1)
    p = int(ctx.attr("p", 2))
    if p not in (1, 2):
        raise InvalidParameterError(f"LpNormalization node '{ctx.name}' has p={p}; ONNX allows only 1 or 2")
    norm = torch.linalg.vector_norm(x, p, dim=axis, keepdim=True)
    return torch.where(norm == 0, torch.zeros_like(x), x / torch.where(norm == 0, torch.ones_like(norm), norm))


@ops.register("MeanVarianceNormalization")
def mean_variance_normalization(ctx: NodeContext, x: torch.Tensor) -> torch.Tensor:
    """``(x - E[x]) / (sqrt(E[x^2] - E[x]^2) + 1e-9)`` over ``axes`` (default [0, 2, 3])."""
    axes = [a % x.dim() for a in (ctx.attr("axes", None) or [0, 2, 3])]
    mean = x.mean(axes, keepdim=True)
    variance = (x * x).mean(axes, keepdim=True) - mean * mean
    return (x - mean) / (torch.sqrt(variance) + 1e-9)
