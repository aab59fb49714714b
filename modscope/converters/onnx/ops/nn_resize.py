"""Resize (opsets 10 to 19) and Upsample, as separable 1-D resampling along each resized axis.

For every output position along an axis, the coordinate transform gives a source coordinate ``x``; the output is
a weighted sum of a few input samples around ``x`` (nearest: one; linear: 2; cubic: 4; more with ``antialias``,
whose kernel is stretched by ``1 / scale`` when downsampling). The taps and weights are computed once per axis
from sizes alone (python numbers, so ``torch.func.vmap`` and autograd see only an ``index_select`` and a weighted
sum on the data). Edge taps are clamped to the border unless ``exclude_outside`` drops and renormalizes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ....errors import InvalidParameterError, ShapeError
from .util import normalize_axes
from ..registry import NodeContext, OpSet

ops = OpSet()

_COORDINATE_MODES = (
    "half_pixel",
    "half_pixel_symmetric",
    "pytorch_half_pixel",
    "align_corners",
    "asymmetric",
    "tf_crop_and_resize",
)


@dataclass(frozen=True)
class _Options:
    mode: str  # nearest | linear | cubic
    coordinate_mode: str
    nearest_mode: str  # round_prefer_floor | round_prefer_ceil | floor | ceil | simple (opset 10 / Upsample)
    cubic_a: float = -0.75
    exclude_outside: bool = False
    extrapolation_value: float = 0.0
    antialias: bool = False


def _source_coordinates(
    opts: _Options, in_size: int, out_size: int, scale: float, roi: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Source coordinate of every output position and, for tf_crop_and_resize, the extrapolated ones.

    Computed in float32 like onnxruntime, so that ties of the nearest rounding fall the same way (ONNX's numpy
    reference computes in float64). pytorch_half_pixel maps a one-sample output to 0, as the ONNX text and
    onnxruntime do. For align_corners and tf_crop_and_resize, ``length_resized`` is the length
    the scale implies, ``scale * in_size``, as in ONNX's reference and conformance cases; onnxruntime uses the
    integer output size instead, which differs only when a scale does not give a whole output size.
    """
    f32 = torch.float32
    y = torch.arange(out_size, dtype=f32)
    s = torch.tensor(scale, dtype=f32)
    length = float(s) * in_size  # may be fractional; a scale derived from sizes gives out_size up to rounding
    if math.isclose(length, out_size, rel_tol=1e-6):
        length = out_size
    mode = opts.coordinate_mode
    if mode == "asymmetric":
        x = y / s
    elif mode == "half_pixel":
        x = (y + 0.5) / s - 0.5
    elif mode == "pytorch_half_pixel":
        x = torch.zeros_like(y) if out_size == 1 else (y + 0.5) / s - 0.5
    elif mode == "half_pixel_symmetric":
        adjustment = torch.tensor(out_size, dtype=f32) / (s * in_size)
        x = ((in_size / 2) * (1 - adjustment) + (y + 0.5) / s) - 0.5  # onnxruntime's order of float32 ops
    elif mode == "align_corners":
        x = torch.zeros_like(y) if length == 1 else y * (in_size - 1) / (length - 1)
    else:
        start, end = (torch.tensor(v, dtype=f32) for v in roi)
        if length == 1:
            x = torch.full_like(y, float(0.5 * (start + end) * (in_size - 1)))
        else:
            x = start * (in_size - 1) + y * (end - start) * (in_size - 1) / (length - 1)
        return x.double(), (x < 0) | (x > in_size - 1)
    return x.double(), None


def _nearest_index(opts: _Options, x: torch.Tensor, scale: float) -> torch.Tensor:
    rounding = opts.nearest_mode
    if rounding == "simple":  # onnxruntime's rule for Upsample and Resize-10
        rounding = "ceil" if scale < 1 else "floor"
    if rounding == "round_prefer_floor":
        return torch.ceil(x - 0.5)
    if rounding == "round_prefer_ceil":
        return torch.floor(x + 0.5)
    if rounding == "floor":
        return torch.floor(x)
    if rounding == "ceil":
        return torch.ceil(x)
    raise InvalidParameterError(
        f"Resize nearest_mode '{rounding}' is unknown; use round_prefer_floor, round_prefer_ceil, floor or ceil"
    )


def _cubic_kernel(t: torch.Tensor, a: float) -> torch.Tensor:
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return torch.where(t <= 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def _taps(opts: _Options, x: torch.Tensor, in_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, weights), each (out, n_taps), of the samples that make each output position."""
    if opts.mode == "nearest":
        index = _nearest_index(opts, x, scale).long().clamp(0, in_size - 1)
        return index.unsqueeze(1), torch.ones(len(x), 1, dtype=torch.float64)
    radius = 1 if opts.mode == "linear" else 2
    stretch = min(scale, 1.0) if opts.antialias else 1.0
    start = math.floor(-radius / stretch) + 1
    n_taps = 2 - 2 * start
    # the tap left of x: floor(x), or x - 1 when x is a whole number (so the fraction lies in (0, 1]).
    base = torch.ceil(x) - 1
    offsets = torch.arange(start, start + n_taps, dtype=torch.float64)
    distance = (offsets.unsqueeze(0) - (x - base).unsqueeze(1)) * stretch
    if opts.mode == "linear":
        weights = (1 - distance.abs()).clamp(min=0)
    else:
        weights = _cubic_kernel(distance, opts.cubic_a)
    weights = weights / weights.sum(1, keepdim=True)
    index = (base.unsqueeze(1) + offsets.unsqueeze(0)).long()
    if opts.exclude_outside:
        weights = torch.where((index < 0) | (index >= in_size), 0.0, weights)
        total = weights.sum(1, keepdim=True)
        weights = weights / torch.where(total == 0, 1.0, total)
    return index.clamp(0, in_size - 1), weights


def _resize_axis(
    x: torch.Tensor, axis: int, out_size: int, scale: float, roi: tuple[float, float], opts: _Options
) -> torch.Tensor:
    in_size = x.shape[axis]
    if out_size == 0:
        shape = list(x.shape)
        shape[axis] = 0
        return x.new_zeros(shape)
    coords, outside = _source_coordinates(opts, in_size, out_size, scale, roi)
    index, weights = _taps(opts, coords, in_size, scale)
    n_taps = index.shape[1]
    gathered = x.index_select(axis, index.reshape(-1).to(x.device))
    if n_taps == 1:
        y = gathered
    else:
        shape = list(x.shape)
        shape[axis : axis + 1] = [out_size, n_taps]
        w_shape = [1] * len(shape)
        w_shape[axis : axis + 2] = [out_size, n_taps]
        dtype = x.dtype if x.is_floating_point() else torch.float64
        w = weights.to(dtype=dtype, device=x.device).reshape(w_shape)
        y = (gathered.reshape(shape).to(dtype) * w).sum(axis + 1)
    if outside is not None and bool(outside.any()):
        m_shape = [1] * y.dim()
        m_shape[axis] = out_size
        fill = torch.tensor(opts.extrapolation_value, dtype=y.dtype, device=y.device)
        y = torch.where(outside.to(y.device).reshape(m_shape), fill, y)
    return y


def resample(
    x: torch.Tensor,
    out_sizes: list[int],
    scales: list[float],
    opts: _Options,
    roi: list[tuple[float, float]] | None = None,
) -> torch.Tensor:
    """Resize the axes of x whose size, scale or (tf_crop_and_resize) roi asks for it; lists cover all axes.

    When no axis changes size the input is returned as it is, whatever the scales; with antialias, so is every
    axis that keeps its size (both as onnxruntime does).
    """
    full = [(0.0, 1.0)] * x.dim()
    roi = roi or full
    if list(x.shape) == list(out_sizes) and roi == full:
        return x
    y = x
    for axis in range(x.dim()):
        same = out_sizes[axis] == x.shape[axis] and roi[axis] == (0.0, 1.0)
        if same and (opts.antialias or math.isclose(scales[axis], 1.0)):
            continue
        y = _resize_axis(y, axis, out_sizes[axis], scales[axis], roi[axis], opts)
    if not x.is_floating_point() and y.dtype != x.dtype:
        info = torch.iinfo(x.dtype) if x.dtype != torch.bool else None
        y = torch.round(y)
        y = y.clamp(info.min, info.max) if info else y
        y = y.to(x.dtype)
    return y


def _scaled_size(size: int, scale: float) -> int:
    """``floor(size * scale)`` in float32 arithmetic, as onnxruntime computes it."""
    return math.floor(np.float32(size) * np.float32(scale))


def _present(t: torch.Tensor | None) -> bool:
    return t is not None and t.numel() > 0


def _floats(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.reshape(-1).tolist()]


def _targets(ctx: NodeContext, x: torch.Tensor, scales, sizes, axes: list[int]) -> tuple[list[int], list[float]]:
    """Output size and scale of every axis, from ``scales`` or ``sizes`` (with keep_aspect_ratio_policy)."""
    rank = x.dim()
    in_sizes = list(x.shape)
    out_sizes, factors = list(in_sizes), [1.0] * rank
    if _present(scales):
        values = _floats(scales)
        if len(values) != len(axes):
            raise ShapeError(f"Resize node '{ctx.name}' has {len(values)} scales for {len(axes)} axes")
        for axis, s in zip(axes, values):
            factors[axis] = s
            out_sizes[axis] = _scaled_size(in_sizes[axis], s) if s > 0 else 0
        return out_sizes, factors
    if not _present(sizes):
        raise InvalidParameterError(f"Resize node '{ctx.name}' has neither scales nor sizes; give one of them")
    values = [int(v) for v in sizes.reshape(-1).tolist()]
    if len(values) != len(axes):
        raise ShapeError(f"Resize node '{ctx.name}' has {len(values)} sizes for {len(axes)} axes")
    ratios = [values[i] / in_sizes[a] for i, a in enumerate(axes)]
    policy = ctx.attr("keep_aspect_ratio_policy", "stretch")
    if policy == "stretch":
        for axis, size, ratio in zip(axes, values, ratios):
            out_sizes[axis], factors[axis] = size, ratio
        return out_sizes, factors
    if policy not in ("not_larger", "not_smaller"):
        raise InvalidParameterError(
            f"Resize node '{ctx.name}' has keep_aspect_ratio_policy '{policy}'; use stretch, not_larger or not_smaller"
        )
    common = min(ratios) if policy == "not_larger" else max(ratios)
    for axis in axes:
        factors[axis] = common
        out_sizes[axis] = int(common * in_sizes[axis] + 0.5)
    return out_sizes, factors


def _options(ctx: NodeContext, *, legacy: bool) -> _Options:
    mode = ctx.attr("mode", "nearest")
    mode = {"bilinear": "linear", "trilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
    if mode not in ("nearest", "linear", "cubic"):
        raise InvalidParameterError(f"{ctx.op_type} node '{ctx.name}' has mode '{mode}'; use nearest, linear or cubic")
    if legacy:
        return _Options(mode, "asymmetric", "simple")
    coordinate_mode = ctx.attr("coordinate_transformation_mode", "half_pixel")
    if coordinate_mode not in _COORDINATE_MODES:
        raise InvalidParameterError(
            f"Resize node '{ctx.name}' has coordinate_transformation_mode '{coordinate_mode}'; use one of "
            f"{', '.join(_COORDINATE_MODES)}"
        )
    return _Options(
        mode,
        coordinate_mode,
        ctx.attr("nearest_mode", "round_prefer_floor"),
        float(ctx.attr("cubic_coeff_a", -0.75)),
        bool(ctx.attr("exclude_outside", 0)),
        float(ctx.attr("extrapolation_value", 0.0)),
        bool(ctx.attr("antialias", 0)) and mode != "nearest",
    )


@ops.register("Resize", since=10)
def resize_10(ctx: NodeContext, x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Resize-10: ``scales`` only, asymmetric coordinates, onnxruntime's nearest rounding (floor up, ceil down)."""
    return _legacy_resample(ctx, x, scales)


@ops.register("Resize", since=11)
def resize(
    ctx: NodeContext,
    x: torch.Tensor,
    roi: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
    sizes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Resize-11 to 19: every mode, coordinate transform, nearest rounding, cubic coefficient, antialias, axes and
    keep_aspect_ratio_policy; ``scales`` or ``sizes`` gives the output size (``floor(in * scale)`` for scales)."""
    rank = x.dim()
    axes = normalize_axes(ctx.attr("axes", None) or list(range(rank)), rank)
    out_sizes, factors = _targets(ctx, x, scales, sizes, axes)
    opts = _options(ctx, legacy=False)
    axis_roi = None
    if opts.coordinate_mode == "tf_crop_and_resize":
        if not _present(roi):
            raise InvalidParameterError(f"Resize node '{ctx.name}' uses tf_crop_and_resize but has no roi input")
        values = _floats(roi)
        axis_roi = [(0.0, 1.0)] * rank
        for i, axis in enumerate(axes):
            axis_roi[axis] = (values[i], values[i + len(axes)])
    return resample(x, out_sizes, factors, opts, axis_roi)


def _legacy_resample(ctx: NodeContext, x: torch.Tensor, scales) -> torch.Tensor:
    if scales is None:
        scales = ctx.attr("scales", None)
        if scales is None:
            raise InvalidParameterError(f"{ctx.op_type} node '{ctx.name}' has no scales; give the scales input")
        scales = torch.tensor(scales, dtype=torch.float64)
    values = _floats(scales)
    if len(values) != x.dim():
        raise ShapeError(f"{ctx.op_type} node '{ctx.name}' has {len(values)} scales for a rank-{x.dim()} input")
    out_sizes = [_scaled_size(size, s) for size, s in zip(x.shape, values)]
    return resample(x, out_sizes, values, _options(ctx, legacy=True))


@ops.register("Upsample", since=7)
def upsample(ctx: NodeContext, x: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """Upsample (opset 7: ``scales`` attribute; opset 9: input): nearest or linear with asymmetric coordinates."""
    return _legacy_resample(ctx, x, scales)
