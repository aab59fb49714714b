"""Pooling: MaxPool (with Indices), AveragePool, LpPool, GlobalAveragePool, GlobalMaxPool, GlobalLpPool, MaxUnpool.

The usual case (symmetric padding of at most half the window) is one ``F.max_pool*d``/``F.avg_pool*d`` call.
Anything else (asymmetric or large pads, dilated average pools, ceil-mode windows that hang over the end) pads the
input explicitly: with the dtype's lowest value for MaxPool, and for the sum pools (AveragePool, LpPool) a
single-channel convolution with a ones kernel, divided by the count of the window cells that ONNX includes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ....errors import ShapeError
from .window_geometry import (
    Pads,
    Window,
    explicit_pads,
    functional,
    pad_spatial,
    pooled_size,
    resolve_pads,
    symmetric,
    window_from_attrs,
)
from ..registry import NodeContext, OpSet

ops = OpSet()

_MAX_POOL = (F.max_pool1d, F.max_pool2d, F.max_pool3d)
_AVG_POOL = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
_CONV = (F.conv1d, F.conv2d, F.conv3d)


def _geometry(ctx: NodeContext, x: torch.Tensor, ceil_mode: bool) -> tuple[Window, Pads, Pads, list[int]]:
    """(window, ONNX pads, pads that make a floor-mode pool give the ONNX output size, output sizes)."""
    sizes = list(x.shape[2:])
    window = window_from_attrs(ctx, ctx.attr("kernel_shape", None) or [])
    if len(window.kernel) != len(sizes):
        raise ShapeError(
            f"{ctx.op_type} node '{ctx.name}' has kernel_shape {list(window.kernel)} for an input with "
            f"{len(sizes)} spatial axes; give one kernel size per spatial axis"
        )
    pads = resolve_pads(ctx, sizes, window)
    out = [pooled_size(size, pads[i], window, i, ceil_mode) for i, size in enumerate(sizes)]
    effective = [
        (pads[i][0], (out[i] - 1) * window.strides[i] + window.extent(i) - sizes[i] - pads[i][0])
        for i in range(len(sizes))
    ]
    return window, pads, effective, out


def _torch_padding(window: Window, pads: Pads) -> tuple[int, ...] | None:
    """Padding torch's pooling accepts for ``pads`` (symmetric, at most half the window), else None."""
    if symmetric(pads) and all(p[0] <= window.extent(i) // 2 for i, p in enumerate(pads)):
        return tuple(p[0] for p in pads)
    return None


def _lowest(dtype: torch.dtype) -> float:
    return float("-inf") if dtype.is_floating_point else torch.iinfo(dtype).min


@ops.register("MaxPool")
def max_pool(ctx: NodeContext, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Max pooling with dilations, ceil_mode and auto_pad; the optional Indices output flattens positions over
    the whole input tensor, row-major (``storage_order=0``) or column-major within each plane (``1``)."""
    ceil_mode = bool(ctx.attr("ceil_mode", 0))
    window, pads, effective, _ = _geometry(ctx, x, ceil_mode)
    fn = functional(ctx, x.dim() - 2, _MAX_POOL)
    want_indices = ctx.n_outputs > 1 and bool(ctx.node.output[1])
    padding = _torch_padding(window, pads)
    if padding is not None:
        result = fn(x, window.kernel, window.strides, padding, window.dilations, ceil_mode, want_indices)
        padded_sizes, offsets = list(x.shape[2:]), [0] * len(padding)
    else:
        xp = pad_spatial(x, effective, _lowest(x.dtype))
        result = fn(xp, window.kernel, window.strides, 0, window.dilations, False, want_indices)
        padded_sizes, offsets = list(xp.shape[2:]), [p[0] for p in effective]
    if not want_indices:
        return result
    y, indices = result
    return y, _onnx_indices(indices, padded_sizes, offsets, list(x.shape), int(ctx.attr("storage_order", 0)))


def _onnx_indices(
    indices: torch.Tensor, padded_sizes: list[int], offsets: list[int], shape: list[int], storage_order: int
) -> torch.Tensor:
    """torch's per-plane indices into the (padded) input -> ONNX's indices into the whole unpadded input."""
    coords, rest = [], indices
    for size in reversed(padded_sizes):
        coords.append(rest % size)
        rest = rest // size
    coords = [c - off for c, off in zip(reversed(coords), offsets)]
    sizes = shape[2:]
    flat = torch.zeros_like(indices)
    if storage_order:
        scale = 1
        for c, size in zip(coords, sizes):
            flat, scale = flat + c * scale, scale * size
    else:
        for c, size in zip(coords, sizes):
            flat = flat * size + c
    plane = math.prod(sizes)
    n, channels = shape[0], shape[1]
    base = torch.arange(n * channels, device=indices.device).reshape(n, channels, *([1] * len(sizes))) * plane
    return flat + base


def _window_sums(ctx: NodeContext, x: torch.Tensor, window: Window, effective: Pads) -> torch.Tensor:
    """Sum of every window of x (N, C, *S) after zero padding by ``effective``: (N, C, *out)."""
    n_spatial = x.dim() - 2
    conv = functional(ctx, n_spatial, _CONV)
    planes = pad_spatial(x, effective).reshape(-1, 1, *[s + b + e for s, (b, e) in zip(x.shape[2:], effective)])
    ones = torch.ones(1, 1, *window.kernel, dtype=x.dtype, device=x.device)
    sums = conv(planes, ones, None, window.strides, 0, window.dilations)
    return sums.reshape(*x.shape[:2], *sums.shape[2:])


def _window_counts(ctx: NodeContext, x: torch.Tensor, window: Window, pads: Pads, effective: Pads, include_pad: bool):
    """How many cells of each window ONNX divides by: input cells, plus explicit pad cells if ``include_pad``.

    The cells a ceil-mode window hangs over beyond the explicit padding never count.
    """
    sizes = list(x.shape[2:])
    ones = torch.ones(1, 1, *sizes, dtype=x.dtype, device=x.device)
    if include_pad:
        ones = pad_spatial(ones, pads, 1.0)
        effective = [(0, e - p[1]) for p, (_, e) in zip(pads, effective)]
    return _window_sums(ctx, ones, window, effective)


@ops.register("AveragePool")
def average_pool(ctx: NodeContext, x: torch.Tensor) -> torch.Tensor:
    """Average pooling with count_include_pad, ceil_mode, auto_pad and (opset 19) dilations."""
    ceil_mode = bool(ctx.attr("ceil_mode", 0))
    include_pad = bool(ctx.attr("count_include_pad", 0))
    window, pads, effective, _ = _geometry(ctx, x, ceil_mode)
    padding = _torch_padding(window, pads)
    if padding is not None and all(d == 1 for d in window.dilations):
        fn = functional(ctx, x.dim() - 2, _AVG_POOL)
        return fn(x, window.kernel, window.strides, padding, ceil_mode, include_pad)
    sums = _window_sums(ctx, x, window, effective)
    return sums / _window_counts(ctx, x, window, pads, effective, include_pad)


@ops.register("LpPool")
def lp_pool(ctx: NodeContext, x: torch.Tensor) -> torch.Tensor:
    """``(sum |x|^p)^(1/p)`` over each window (p defaults to 2), zero padding."""
    p = float(ctx.attr("p", 2))
    window, _, effective, _ = _geometry(ctx, x, bool(ctx.attr("ceil_mode", 0)))
    return _window_sums(ctx, x.abs().pow(p), window, effective).pow(1.0 / p)


def _spatial_dims(x: torch.Tensor) -> list[int]:
    return list(range(2, x.dim()))


@ops.register("GlobalAveragePool")
def global_average_pool(ctx: NodeContext, x: torch.Tensor) -> torch.Tensor:
    """Mean over all spatial axes, kept as size-1 axes."""
    return x.mean(_spatial_dims(x), keepdim=True)


@ops.register("GlobalMaxPool")
def global_max_pool(ctx: NodeContext, x: torch.Tensor) -> torch.Tensor:
    """Maximum over all spatial axes, kept as size-1 axes."""
    return x.amax(_spatial_dims(x), keepdim=True)


@ops.register("GlobalLpPool")
def global_lp_pool(ctx: NodeContext, x: torch.Tensor) -> torch.Tensor:
    """p-norm over all spatial axes (p defaults to 2), kept as size-1 axes."""
    p = float(ctx.attr("p", 2))
    return torch.linalg.vector_norm(x, p, dim=_spatial_dims(x), keepdim=True)


@ops.register("MaxUnpool")
def max_unpool(
    ctx: NodeContext, x: torch.Tensor, indices: torch.Tensor, output_shape: torch.Tensor | None = None
) -> torch.Tensor:
    """Scatter x into zeros at MaxPool's ``indices``, which are flat positions in the output tensor (N, C, *out).

    ``out`` is ``output_shape`` when given, else ``(in - 1) * stride + kernel - pad_begin - pad_end``. This follows
    the ONNX text and onnxruntime; the conformance case ``test_maxunpool_export_with_output_shape`` instead
    expects indices laid out for the default size, which would misplace the values of a real MaxPool ->
    MaxUnpool pair whose input size the default formula does not reproduce.
    """
    sizes = list(x.shape[2:])
    if output_shape is not None:
        out_sizes = [int(v) for v in output_shape.tolist()][-len(sizes) :]
    else:
        window = window_from_attrs(ctx, ctx.attr("kernel_shape", None) or [])
        pads = explicit_pads(ctx, len(sizes))
        out_sizes = [
            (size - 1) * window.strides[i] + window.kernel[i] - pads[i][0] - pads[i][1] for i, size in enumerate(sizes)
        ]
    out = x.new_zeros(x.shape[0] * x.shape[1] * math.prod(out_sizes))
    out = out.scatter(0, indices.reshape(-1).long(), x.reshape(-1))
    return out.reshape(*x.shape[:2], *out_sizes)
