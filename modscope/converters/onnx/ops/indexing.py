"""Indexing: Gather*, Scatter*, TensorScatter, Slice, Compress, NonZero, TopK, Unique, ReverseSequence, Trilu.

Data moves through torch indexing (``x[..., idx]``, ``gather``, ``scatter``), so gradients reach
float data and updates, and the handlers run under ``torch.func.vmap`` when the data is batched. Index tensors may
be negative (counted from the end, as ONNX allows); they are wrapped once with `_wrap`. Slice bounds, k and
sequence lengths are shape-like and read as python ints.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ....errors import InvalidParameterError, ShapeError
from .util import (
    as_int,
    as_ints,
    as_tensor,
    from_order_key,
    normalize_axes,
    normalize_axis,
    order_key,
    take,
    widen,
)
from ..registry import NodeContext, OpSet

ops = OpSet()

#: ONNX scatter reductions -> torch ``scatter_reduce`` names.
_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _wrap(indices: Any, size: int | torch.Tensor) -> torch.Tensor:
    """Integer ``indices`` as int64 with negative entries counted from the end of a ``size``-long axis."""
    idx = as_tensor(indices).long()
    return torch.where(idx < 0, idx + size, idx)


def _scatter(data: torch.Tensor, dim: int, index: torch.Tensor, updates: torch.Tensor, reduction: str) -> torch.Tensor:
    """Out-of-place ``data.scatter`` with an ONNX ``reduction`` (none, add, mul, max, min)."""
    wide, updates = widen(data), widen(updates.to(data.dtype))
    if reduction == "none":
        return wide.scatter(dim, index, updates).to(data.dtype)
    if reduction not in _REDUCE:
        raise InvalidParameterError(f"scatter reduction must be none, add, mul, max or min, got {reduction!r}")
    return wide.scatter_reduce(dim, index, updates, _REDUCE[reduction], include_self=True).to(data.dtype)


@ops.register("Gather")
def gather(ctx: NodeContext, x: torch.Tensor, indices: Any) -> torch.Tensor:
    axis = normalize_axis(ctx.attr("axis", 0), x.dim())
    return take(x, axis, _wrap(indices, x.shape[axis]))


@ops.register("GatherElements")
def gather_elements(ctx: NodeContext, x: torch.Tensor, indices: Any) -> torch.Tensor:
    axis = normalize_axis(ctx.attr("axis", 0), x.dim())
    return torch.gather(widen(x), axis, _wrap(indices, x.shape[axis])).to(x.dtype)


@ops.register("GatherND")
def gather_nd(ctx: NodeContext, x: torch.Tensor, indices: Any) -> torch.Tensor:
    idx = as_tensor(indices).long()
    b, k = ctx.attr("batch_dims", 0), idx.shape[-1]
    if k > x.dim() - b:
        raise ShapeError(f"GatherND index depth {k} exceeds the {x.dim() - b} non-batch dimensions of the data")
    n_batch, n_idx = math.prod(x.shape[:b]), math.prod(idx.shape[b:-1])
    data = x.reshape(n_batch, *x.shape[b:])
    ind = idx.reshape(n_batch, n_idx, k)
    coords = [_wrap(ind[..., j], data.shape[1 + j]) for j in range(k)]
    out = data[(torch.arange(n_batch)[:, None], *coords)]
    return out.reshape(*x.shape[:b], *idx.shape[b:-1], *x.shape[b + k :])


@ops.register("Scatter", "ScatterElements")
def scatter_elements(ctx: NodeContext, x: torch.Tensor, indices: Any, updates: torch.Tensor) -> torch.Tensor:
    axis = normalize_axis(ctx.attr("axis", 0), x.dim())
    return _scatter(x, axis, _wrap(indices, x.shape[axis]), updates, ctx.attr("reduction", "none"))


@ops.register("ScatterND")
def scatter_nd(ctx: NodeContext, x: torch.Tensor, indices: Any, updates: torch.Tensor) -> torch.Tensor:
    idx = as_tensor(indices).long()
    k = idx.shape[-1]
    lead, rest = x.shape[:k], x.shape[k:]
    strides = [math.prod(lead[j + 1 :]) for j in range(k)]
    flat = sum((_wrap(idx[..., j], lead[j]) * strides[j] for j in range(k)), torch.zeros((), dtype=torch.int64))
    flat = flat.reshape(-1)
    n_rest = math.prod(rest)
    data = x.reshape(math.prod(lead), n_rest)
    upd = updates.reshape(flat.numel(), n_rest)
    index = flat[:, None].expand(flat.numel(), n_rest)
    return _scatter(data, 0, index, upd, ctx.attr("reduction", "none")).reshape(x.shape)


@ops.register("TensorScatter", since=24)
def tensor_scatter(
    ctx: NodeContext, cache: torch.Tensor, update: torch.Tensor, write_indices: Any = None
) -> torch.Tensor:
    axis = normalize_axis(ctx.attr("axis", -2), cache.dim())
    if axis == 0:
        raise ShapeError("TensorScatter axis must not be the batch axis 0; pick the sequence axis")
    length, n_new, batch = cache.shape[axis], update.shape[axis], cache.shape[0]
    starts = torch.zeros(batch, dtype=torch.int64) if write_indices is None else as_tensor(write_indices).long()
    shape = [1] * cache.dim()
    shape[0], shape[axis] = batch, n_new
    pos = starts.reshape(batch, 1) + torch.arange(n_new)
    if ctx.attr("mode", "linear") == "circular":
        pos = pos.remainder(length)
    index = pos.reshape(shape).expand(update.shape)
    return _scatter(cache, axis, index, update, "none")


def slice_axis(x: torch.Tensor, axis: int, start: int, end: int, step: int = 1) -> torch.Tensor:
    """``x[start:end:step]`` along ``axis`` with ONNX Slice rules (negative bounds, clamping, negative steps).

    Args:
        x: the data.
        axis: a non-negative axis of ``x``.
        start, end, step: as in ONNX Slice; out-of-range bounds are clamped.

    Returns:
        The slice (a view for positive steps); differentiable with respect to ``x``.

    Raises:
        InvalidParameterError: ``step`` is 0.
    """
    if step == 0:
        raise InvalidParameterError("Slice step is 0; use a positive or negative step")
    n = x.shape[axis]
    start, end = start + n if start < 0 else start, end + n if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), n), min(max(end, 0), n)
        return x[(slice(None),) * axis + (slice(start, end, step),)]
    start, end = min(max(start, 0), n - 1), min(max(end, -1), n - 1)
    return take(x, axis, torch.arange(start, end, step, dtype=torch.int64))


@ops.register("Slice")
def slice_(
    ctx: NodeContext, x: torch.Tensor, starts: Any = None, ends: Any = None, axes: Any = None, steps: Any = None
) -> torch.Tensor:
    if ctx.opset < 10:
        starts, ends, axes, steps = ctx.attr("starts"), ctx.attr("ends"), ctx.attr("axes"), None
    starts, ends = as_ints(starts), as_ints(ends)
    chosen = normalize_axes(as_ints(axes), x.dim()) if axes is not None else list(range(len(starts)))
    strides = as_ints(steps) if steps is not None else [1] * len(starts)
    if not len(starts) == len(ends) == len(chosen) == len(strides):
        raise ShapeError(f"Slice starts/ends/axes/steps have different lengths: {starts}, {ends}, {chosen}, {strides}")
    for axis, start, end, step in zip(chosen, starts, ends, strides):
        x = slice_axis(x, axis, start, end, step)
    return x


@ops.register("Compress")
def compress(ctx: NodeContext, x: torch.Tensor, condition: Any) -> torch.Tensor:
    axis = ctx.attr("axis")
    if axis is None:
        x, axis = x.reshape(-1), 0
    axis = normalize_axis(axis, x.dim())
    keep = as_tensor(condition).bool().reshape(-1)[: x.shape[axis]]
    return take(x, axis, torch.nonzero(keep).reshape(-1))


@ops.register("NonZero")
def non_zero(ctx: NodeContext, x: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(widen(x)).T.contiguous()


@ops.register("TopK")
def top_k(ctx: NodeContext, x: torch.Tensor, k: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    count = as_int(k) if ctx.opset >= 10 else int(ctx.attr("k"))
    axis = normalize_axis(ctx.attr("axis", -1), x.dim())
    if not 0 <= count <= x.shape[axis]:
        raise ShapeError(f"TopK k={count} is outside [0, {x.shape[axis]}] for axis {axis} of shape {tuple(x.shape)}")
    # a stable sort keeps equal values in index order, as ONNX requires
    values, order = torch.sort(x, dim=axis, descending=bool(ctx.attr("largest", 1)), stable=True)
    return values.narrow(axis, 0, count), order.narrow(axis, 0, count)


@ops.register("Unique")
def unique(ctx: NodeContext, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    axis = ctx.attr("axis")
    if axis is None:
        data, dim = order_key(x).reshape(-1), 0
        values, inverse, counts = torch.unique(data, sorted=True, return_inverse=True, return_counts=True)
    else:
        data, dim = order_key(x), normalize_axis(axis, x.dim())
        values, inverse, counts = torch.unique(data, sorted=True, return_inverse=True, return_counts=True, dim=dim)
    inverse = inverse.reshape(-1)
    positions = torch.arange(inverse.numel())
    first = torch.full((counts.numel(),), inverse.numel(), dtype=torch.int64)
    first = first.scatter_reduce(0, inverse, positions, "amin")
    if not ctx.attr("sorted", 1):  # order of first occurrence
        order = torch.argsort(first)
        values, first, counts = take(values, dim, order), first[order], counts[order]
        inverse = torch.argsort(order)[inverse]
    return from_order_key(values, x.dtype), first, inverse, counts


@ops.register("ReverseSequence")
def reverse_sequence(ctx: NodeContext, x: torch.Tensor, sequence_lens: Any) -> torch.Tensor:
    time_axis = normalize_axis(ctx.attr("time_axis", 0), x.dim())
    batch_axis = normalize_axis(ctx.attr("batch_axis", 1), x.dim())
    steps, lens = torch.arange(x.shape[time_axis])[:, None], as_tensor(sequence_lens).long()[None, :]
    source = torch.where(steps < lens, lens - 1 - steps, steps)  # (time, batch)
    if time_axis > batch_axis:
        source = source.T
    shape = [1] * x.dim()
    shape[time_axis], shape[batch_axis] = x.shape[time_axis], x.shape[batch_axis]
    return torch.gather(widen(x), time_axis, source.reshape(shape).expand(x.shape)).to(x.dtype)


@ops.register("Trilu", since=14)
def trilu(ctx: NodeContext, x: torch.Tensor, k: Any = None) -> torch.Tensor:
    diagonal = as_int(k) if k is not None else 0
    fn = torch.triu if ctx.attr("upper", 1) else torch.tril
    return fn(widen(x), diagonal).to(x.dtype)
