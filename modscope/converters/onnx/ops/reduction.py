"""Reductions: Reduce*, ArgMax/ArgMin, CumSum, CumProd.

Each Reduce* op is an element-wise step, a reduction and a final step (ReduceL2 = square, sum, sqrt). The axes come
from the ``axes`` attribute up to the opset where they moved to an input (13 for ReduceSum, 18 for the others); no
axes means every axis, unless ``noop_with_empty_axes`` is set, in which case only the element-wise step runs (as in
ONNX's reference implementation). Reducing an empty set gives ONNX's identity values: 0 for sums, 1 for products,
-inf/+inf (or the integer extremes) for max/min, -inf for the log-sums. Results keep the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .util import as_int, as_ints, from_order_key, normalize_axes, normalize_axis, order_key, widen
from ..registry import NodeContext, OpSet

ops = OpSet()

Reducer = Callable[[torch.Tensor, list[int], bool], torch.Tensor]


def _reduce_axes(ctx: NodeContext, x: torch.Tensor, axes: Any) -> list[int]:
    """The axes to reduce; ``[]`` means no reduction (``noop_with_empty_axes``)."""
    moved_at = 13 if ctx.op_type == "ReduceSum" else 18
    chosen = as_ints(axes) if ctx.opset >= moved_at else ctx.attr("axes")
    if chosen:
        return normalize_axes(chosen, x.dim())
    return [] if ctx.attr("noop_with_empty_axes", 0) else list(range(x.dim()))


def _over(x: torch.Tensor, dims: list[int], keepdim: bool, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn`` (a reduction over the last axis) applied over ``dims`` at once: they are moved last and merged."""
    kept = [d for d in range(x.dim()) if d not in dims]
    merged = x.permute(kept + dims).reshape(*(x.shape[d] for d in kept), math.prod(x.shape[d] for d in dims))
    out = fn(merged)
    if keepdim:
        out = out.reshape([1 if d in dims else x.shape[d] for d in range(x.dim())])
    return out


def _sum(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    return x.sum(dim=dims, keepdim=keepdim) if dims else x


def _mean(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    if not dims:
        return x
    data = x if x.is_floating_point() else x.double()
    return data.mean(dim=dims, keepdim=keepdim)


def _prod(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    return _over(x, dims, keepdim, lambda t: t.prod(-1)) if dims else x


def _log_sum_exp(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    data = x if x.is_floating_point() else x.double()
    return torch.logsumexp(data, dim=dims, keepdim=keepdim) if dims else data


def _extreme(largest: bool) -> Reducer:
    """ReduceMax (``largest``) or ReduceMin, with the identity value on empty sets and any/all for booleans."""

    def reduce(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
        if not dims:
            return x
        if math.prod(x.shape[d] for d in dims) == 0:
            return _identity_fill(x, dims, keepdim, largest)
        if x.dtype == torch.bool:
            return _over(x, dims, keepdim, lambda t: t.any(-1) if largest else t.all(-1))
        data = order_key(x)
        out = data.amax(dim=dims, keepdim=keepdim) if largest else data.amin(dim=dims, keepdim=keepdim)
        return from_order_key(out, x.dtype)

    return reduce


def _identity_fill(x: torch.Tensor, dims: list[int], keepdim: bool, largest: bool) -> torch.Tensor:
    """The result of a max (``largest``) or min over an empty set: the dtype's lowest or highest value."""
    if x.dtype == torch.bool:
        value: Any = not largest
    elif x.is_floating_point():
        value = -math.inf if largest else math.inf
    else:
        info = torch.iinfo(x.dtype)
        value = info.min if largest else info.max
    shape = [1 if d in dims else x.shape[d] for d in range(x.dim()) if keepdim or d not in dims]
    return torch.full(shape, value, dtype=x.dtype)


def _composed(pre: Callable[[torch.Tensor], torch.Tensor], post: Callable[[torch.Tensor], torch.Tensor]) -> Reducer:
    """A sum reduction with an element-wise step before (``pre``) and after (``post``) it."""

    def reduce(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
        return post(_sum(pre(x), dims, keepdim))

    return reduce


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _as_float(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: fn(t if t.is_floating_point() else t.double())


_REDUCERS: dict[str, Reducer] = {
    "ReduceSum": _sum,
    "ReduceMean": _mean,
    "ReduceProd": _prod,
    "ReduceMax": _extreme(True),
    "ReduceMin": _extreme(False),
    "ReduceLogSumExp": _log_sum_exp,
    "ReduceSumSquare": _composed(torch.square, _identity),
    "ReduceL1": _composed(torch.abs, _identity),
    "ReduceL2": _composed(torch.square, _as_float(torch.sqrt)),
    "ReduceLogSum": _composed(_identity, _as_float(torch.log)),
}


@ops.register(*_REDUCERS)
def reduce(ctx: NodeContext, x: torch.Tensor, axes: Any = None) -> torch.Tensor:
    dims = _reduce_axes(ctx, x, axes)
    out = _REDUCERS[ctx.op_type](x, dims, bool(ctx.attr("keepdims", 1)))
    return out.to(x.dtype)


def _arg_extreme(ctx: NodeContext, x: torch.Tensor, fn: Callable[..., torch.Tensor]) -> torch.Tensor:
    axis = normalize_axis(ctx.attr("axis", 0), x.dim())
    keepdim = bool(ctx.attr("keepdims", 1))
    data = x.to(torch.uint8) if x.dtype == torch.bool else order_key(x)
    if ctx.attr("select_last_index", 0):
        return x.shape[axis] - 1 - fn(data.flip(axis), dim=axis, keepdim=keepdim)
    return fn(data, dim=axis, keepdim=keepdim)


@ops.register("ArgMax")
def arg_max(ctx: NodeContext, x: torch.Tensor) -> torch.Tensor:
    return _arg_extreme(ctx, x, torch.argmax)


@ops.register("ArgMin")
def arg_min(ctx: NodeContext, x: torch.Tensor) -> torch.Tensor:
    return _arg_extreme(ctx, x, torch.argmin)


def _cumulative(
    ctx: NodeContext, x: torch.Tensor, axis: Any, fn: Callable[..., torch.Tensor], start: int
) -> torch.Tensor:
    """CumSum/CumProd with ONNX's ``exclusive`` (shift in ``start``) and ``reverse`` attributes."""
    dim = normalize_axis(as_int(axis), x.dim())
    reverse = bool(ctx.attr("reverse", 0))
    data = widen(x)
    data = data.flip(dim) if reverse else data
    out = fn(data, dim)
    if ctx.attr("exclusive", 0) and x.shape[dim] > 0:
        head = torch.full_like(out.narrow(dim, 0, 1), start)
        out = torch.cat([head, out.narrow(dim, 0, x.shape[dim] - 1)], dim)
    return (out.flip(dim) if reverse else out).to(x.dtype)


@ops.register("CumSum")
def cum_sum(ctx: NodeContext, x: torch.Tensor, axis: Any) -> torch.Tensor:
    return _cumulative(ctx, x, axis, torch.cumsum, 0)


@ops.register("CumProd")
def cum_prod(ctx: NodeContext, x: torch.Tensor, axis: Any) -> torch.Tensor:
    return _cumulative(ctx, x, axis, torch.cumprod, 1)
