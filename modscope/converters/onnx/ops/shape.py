"""Shape manipulation: Reshape, Flatten, Transpose, (Un)Squeeze, Concat, Split, Expand, Tile, Shape, Size, Range ...

Every handler moves data with torch views, ``reshape``/``permute``/``cat``/indexing, so gradients flow to
float inputs and the ops run under ``torch.func.vmap`` (``x.shape`` is the per-sample shape there). Shape-like
inputs (target shapes, axes, repeats) are read as python ints. `pad_tensor` serves Pad and CenterCropPad.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ....errors import InvalidParameterError, ShapeError
from .util import as_int, as_ints, normalize_axes, normalize_axis, take, torch_dtype
from ..registry import NodeContext, OpSet

ops = OpSet()


def _axes_input_or_attr(ctx: NodeContext, axes: Any, moved_at: int) -> list[int] | None:
    """``axes`` from the input (opset >= ``moved_at``) or the ``axes`` attribute (older opsets)."""
    if ctx.opset >= moved_at:
        return as_ints(axes)
    value = ctx.attr("axes")
    return list(value) if value is not None else None


def _reshape_target(shape: torch.Size, target: list[int], allowzero: bool) -> list[int]:
    """ONNX Reshape's target: 0 copies the input dimension (unless ``allowzero``), one -1 is inferred."""
    out = [shape[i] if d == 0 and not allowzero else d for i, d in enumerate(target)]
    if out.count(-1) > 1:
        raise ShapeError(f"Reshape target {target} has more than one -1; at most one dimension can be inferred")
    numel = math.prod(shape)
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        if known == 0 or numel % known:
            raise ShapeError(f"cannot reshape a tensor of shape {tuple(shape)} to {target}; the sizes do not divide")
        out[out.index(-1)] = numel // known
    if math.prod(out) != numel:
        raise ShapeError(f"cannot reshape a tensor of shape {tuple(shape)} ({numel} elements) to {target}")
    return out


@ops.register("Reshape")
def reshape(ctx: NodeContext, x: torch.Tensor, shape: Any = None) -> torch.Tensor:
    target = as_ints(shape) if shape is not None else list(ctx.attr("shape", []))
    return x.reshape(_reshape_target(x.shape, target, bool(ctx.attr("allowzero", 0))))


@ops.register("Flatten")
def flatten(ctx: NodeContext, x: torch.Tensor) -> torch.Tensor:
    axis = ctx.attr("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    if not 0 <= axis <= x.dim():
        raise ShapeError(f"Flatten axis {ctx.attr('axis')} is out of range for rank {x.dim()}; use [-r, r]")
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@ops.register("Transpose")
def transpose(ctx: NodeContext, x: torch.Tensor) -> torch.Tensor:
    perm = ctx.attr("perm")
    perm = list(range(x.dim()))[::-1] if perm is None else normalize_axes(perm, x.dim())
    return x.permute(perm)


@ops.register("Squeeze")
def squeeze(ctx: NodeContext, x: torch.Tensor, axes: Any = None) -> torch.Tensor:
    chosen = _axes_input_or_attr(ctx, axes, 13)
    if not chosen:  # absent or empty: every size-1 dimension, as onnxruntime does
        chosen = [i for i, d in enumerate(x.shape) if d == 1]
    chosen = normalize_axes(chosen, x.dim())
    if any(x.shape[a] != 1 for a in chosen):
        raise ShapeError(f"Squeeze axes {chosen} include a dimension of size != 1 in shape {tuple(x.shape)}")
    return x.reshape([d for i, d in enumerate(x.shape) if i not in chosen])


@ops.register("Unsqueeze")
def unsqueeze(ctx: NodeContext, x: torch.Tensor, axes: Any = None) -> torch.Tensor:
    chosen = _axes_input_or_attr(ctx, axes, 13) or []
    rank = x.dim() + len(chosen)
    inserted = set(normalize_axes(chosen, rank))
    dims = iter(x.shape)
    return x.reshape([1 if i in inserted else next(dims) for i in range(rank)])


@ops.register("Concat")
def concat(ctx: NodeContext, *inputs: torch.Tensor) -> torch.Tensor:
    parts = [t for t in inputs if t is not None]
    axis = normalize_axis(ctx.attr("axis", 0), parts[0].dim())
    return torch.cat(parts, dim=axis)


def split_sizes(dim: int, n_parts: int) -> list[int]:
    """Sizes of ``n_parts`` chunks of a ``dim``-long axis: equal, ceil-sized, the last one smaller (Split-18)."""
    if n_parts < 1:
        raise InvalidParameterError(f"cannot split an axis into {n_parts} parts; ask for at least one output")
    chunk = -(-dim // n_parts)
    return [max(0, min(chunk, dim - i * chunk)) for i in range(n_parts)]


def split_tensor(x: torch.Tensor, axis: int, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    """``x`` split along ``axis`` (already normalized) into pieces of ``sizes``."""
    if sum(sizes) != x.shape[axis]:
        raise ShapeError(f"split sizes {sizes} do not add up to the axis length {x.shape[axis]}")
    return tuple(torch.split(x, sizes, dim=axis))


@ops.register("Split")
def split(ctx: NodeContext, x: torch.Tensor, split_input: Any = None) -> tuple[torch.Tensor, ...]:
    axis = normalize_axis(ctx.attr("axis", 0), x.dim())
    sizes = as_ints(split_input) if split_input is not None else ctx.attr("split")
    if not sizes:
        sizes = split_sizes(x.shape[axis], ctx.attr("num_outputs", ctx.n_outputs))
    return split_tensor(x, axis, list(sizes))


@ops.register("Expand")
def expand(ctx: NodeContext, x: torch.Tensor, shape: Any) -> torch.Tensor:
    target = as_ints(shape)
    try:
        out_shape = torch.broadcast_shapes(tuple(x.shape), tuple(target))
    except RuntimeError as exc:
        raise ShapeError(f"Expand cannot broadcast shape {tuple(x.shape)} to {target}: {exc}") from None
    return x.expand(out_shape)


@ops.register("Tile")
def tile(ctx: NodeContext, x: torch.Tensor, repeats: Any, axis: Any = None) -> torch.Tensor:
    if ctx.opset < 6:  # Tile-1: a scalar count along one axis
        reps = [1] * x.dim()
        reps[normalize_axis(as_int(axis), x.dim())] = as_int(repeats)
    else:
        reps = as_ints(repeats)
    if len(reps) != x.dim():
        raise ShapeError(f"Tile repeats {reps} must have one entry per dimension of a rank-{x.dim()} input")
    return x.repeat(reps)


@ops.register("Shape")
def shape(ctx: NodeContext, x: torch.Tensor) -> torch.Tensor:
    dims = list(x.shape)[ctx.attr("start", 0) : ctx.attr("end", x.dim())]
    return torch.tensor(dims, dtype=torch.int64)


@ops.register("Size")
def size(ctx: NodeContext, x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(math.prod(x.shape), dtype=torch.int64)


@ops.register("ConstantOfShape")
def constant_of_shape(ctx: NodeContext, shape: Any) -> torch.Tensor:
    value = ctx.attr("value")
    fill = torch.zeros((), dtype=torch.float32) if value is None else value.reshape(())
    return fill.expand(as_ints(shape)).clone()


@ops.register("Range")
def range_(ctx: NodeContext, start: Any, limit: Any, delta: Any) -> torch.Tensor:
    dtype = torch.as_tensor(start).dtype
    s, lim, d = (torch.as_tensor(v).item() for v in (start, limit, delta))
    if d == 0:
        raise InvalidParameterError("Range delta is 0; use a non-zero step")
    if dtype.is_floating_point:
        n = max(math.ceil((lim - s) / d), 0)
        return (torch.arange(n, dtype=torch.float64) * d + s).to(dtype)
    n = max(-((s - lim) // d), 0)
    return torch.arange(n, dtype=torch.int64).mul(d).add(s).to(dtype)


@ops.register("EyeLike")
def eye_like(ctx: NodeContext, x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ShapeError(f"EyeLike needs a 2-D input, got shape {tuple(x.shape)}")
    dtype = torch_dtype(ctx.attr("dtype")) if ctx.attr("dtype") is not None else x.dtype
    rows, cols = torch.arange(x.shape[0]), torch.arange(x.shape[1])
    return (cols[None, :] - rows[:, None] == ctx.attr("k", 0)).to(dtype)


def _blocks(ctx: NodeContext, x: torch.Tensor) -> tuple[int, str, tuple[int, ...]]:
    if x.dim() != 4:
        raise ShapeError(f"{ctx.op_type} needs a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    mode = ctx.attr("mode", "DCR")
    if mode not in ("DCR", "CRD"):
        raise InvalidParameterError(f"{ctx.op_type} mode must be 'DCR' or 'CRD', got {mode!r}")
    return int(ctx.attr("blocksize")), mode, tuple(x.shape)


@ops.register("DepthToSpace")
def depth_to_space(ctx: NodeContext, x: torch.Tensor) -> torch.Tensor:
    b, mode, (n, c, h, w) = _blocks(ctx, x)
    if mode == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


@ops.register("SpaceToDepth")
def space_to_depth(ctx: NodeContext, x: torch.Tensor) -> torch.Tensor:
    b, mode, (n, c, h, w) = _blocks(ctx, x)
    y = x.reshape(n, c, h // b, b, w // b, b)
    y = y.permute(0, 3, 5, 1, 2, 4) if mode == "DCR" else y.permute(0, 1, 3, 5, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


# -- padding ----------------------------------------------------------------------------------------------------------
def _pad_indices(n: int, begin: int, end: int, mode: str) -> torch.Tensor:
    """Source positions along one axis for ``edge``/``reflect``/``wrap`` padding of an ``n``-long axis."""
    idx = torch.arange(-begin, n + end)
    if mode == "edge":
        return idx.clamp(0, n - 1)
    if mode == "wrap":
        return idx.remainder(n)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = idx.remainder(period)
    return torch.where(idx >= n, period - idx, idx)


def pad_tensor(
    x: torch.Tensor, begins: list[int], ends: list[int], mode: str = "constant", value: Any = 0
) -> torch.Tensor:
    """``x`` padded by ``begins[i]``/``ends[i]`` on each axis ``i`` (negative amounts crop), ONNX Pad semantics.

    Args:
        x: the data, any dtype.
        begins, ends: one amount per axis of ``x``.
        mode: ``constant``, ``reflect``, ``edge`` or ``wrap``.
        value: the fill value of ``constant`` mode.

    Returns:
        The padded tensor; differentiable with respect to ``x``.

    Raises:
        InvalidParameterError: unknown mode, or a non-constant mode on an empty axis.
    """
    if mode == "constant":
        flat = [p for i in reversed(range(x.dim())) for p in (begins[i], ends[i])]
        if not any(flat):
            return x
        fill = value.item() if isinstance(value, torch.Tensor) else value
        return torch.nn.functional.pad(x, flat, mode="constant", value=fill)
    if mode not in ("reflect", "edge", "wrap"):
        raise InvalidParameterError(f"Pad mode must be constant, reflect, edge or wrap, got {mode!r}")
    for axis, (b, e) in enumerate(zip(begins, ends)):
        if b < 0 or e < 0:
            start = max(-b, 0)
            x = x.narrow(axis, start, x.shape[axis] - start - max(-e, 0))
            b, e = max(b, 0), max(e, 0)
        if b or e:
            if x.shape[axis] == 0:
                raise InvalidParameterError(f"Pad mode {mode!r} cannot pad an empty axis {axis}; use constant mode")
            x = take(x, axis, _pad_indices(x.shape[axis], b, e, mode))
    return x


@ops.register("Pad")
def pad(ctx: NodeContext, x: torch.Tensor, pads: Any = None, value: Any = None, axes: Any = None) -> torch.Tensor:
    if ctx.opset < 11:
        amounts = list(ctx.attr("pads", ctx.attr("paddings", [])))
        value = ctx.attr("value", 0.0)
    else:
        amounts = as_ints(pads)
        value = 0 if value is None else value
    rank = x.dim()
    chosen = normalize_axes(as_ints(axes), rank) if axes is not None else list(range(rank))
    if len(amounts) != 2 * len(chosen):
        raise ShapeError(f"Pad needs 2 amounts per padded axis ({2 * len(chosen)}), got {len(amounts)}")
    begins, ends = [0] * rank, [0] * rank
    for i, a in enumerate(chosen):
        begins[a], ends[a] = amounts[i], amounts[i + len(chosen)]
    return pad_tensor(x, begins, ends, ctx.attr("mode", "constant"), value)


@ops.register("CenterCropPad")
def center_crop_pad(ctx: NodeContext, x: torch.Tensor, shape: Any) -> torch.Tensor:
    target = as_ints(shape)
    axes = ctx.attr("axes")
    chosen = normalize_axes(axes, x.dim()) if axes is not None else list(range(x.dim()))
    if len(target) != len(chosen):
        raise ShapeError(f"CenterCropPad shape {target} needs one entry per axis {chosen}")
    begins, ends = [0] * x.dim(), [0] * x.dim()
    for a, size_ in zip(chosen, target):
        diff = size_ - x.shape[a]  # > 0 pads, < 0 crops; the odd element goes to the end
        begins[a] = diff // 2 if diff >= 0 else -((-diff) // 2)
        ends[a] = diff - begins[a]
    return pad_tensor(x, begins, ends)
