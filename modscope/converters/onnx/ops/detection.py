"""Detection ops: NonMaxSuppression, RoiAlign.

NonMaxSuppression returns indices, so it is computed greedily on plain values with no gradient. RoiAlign samples
the feature map with bilinear interpolation written in torch ops, so gradients reach the features (and the box
coordinates); its arithmetic follows onnxruntime's kernel (out-of-range samples count as zero, ``max`` mode takes
the largest weighted corner value of each sample).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ....errors import InvalidParameterError, ShapeError
from .util import as_tensor
from ..registry import NodeContext, OpSet

ops = OpSet()

#: RoiAlign gathers (rois, oh, gh, ow, gw, C) sample values; rois are processed in chunks of about this many.
_CHUNK_ELEMENTS = 1 << 22


def _corners(boxes: torch.Tensor, center_point_box: int) -> torch.Tensor:
    """Boxes (..., 4) as (y_min, x_min, y_max, x_max)."""
    if center_point_box:
        xc, yc, w, h = boxes.unbind(-1)
        return torch.stack([yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2], dim=-1)
    y1, x1, y2, x2 = boxes.unbind(-1)
    return torch.stack([torch.minimum(y1, y2), torch.minimum(x1, x2), torch.maximum(y1, y2), torch.maximum(x1, x2)], -1)


def _overlaps(box: torch.Tensor, others: torch.Tensor, threshold: float) -> torch.Tensor:
    """(M,) bool: IoU of ``box`` (4,) with each of ``others`` (M, 4) exceeds ``threshold``.

    Empty boxes overlap nothing.
    """
    y1, x1, y2, x2 = others.unbind(-1)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (y2 - y1) * (x2 - x1)
    inter = (torch.minimum(y2, box[2]) - torch.maximum(y1, box[0])).clamp(min=0) * (
        torch.minimum(x2, box[3]) - torch.maximum(x1, box[1])
    ).clamp(min=0)
    union = area + areas - inter
    positive = (inter > 0) & (area > 0) & (areas > 0) & (union > 0)
    return positive & (inter / torch.where(union > 0, union, torch.ones_like(union)) > threshold)


def _greedy(scores: torch.Tensor, corners: torch.Tensor, limit: int, iou: float, min_score: float | None) -> list[int]:
    """Indices kept by greedy NMS: best score first (lower index first on ties), at most ``limit``.

    Each kept box removes the remaining candidates it overlaps, so the cost is O(kept x candidates).
    """
    order = torch.argsort(scores, descending=True, stable=True)
    if min_score is not None:
        order = order[scores[order] > min_score]
    kept: list[int] = []
    while order.numel() and len(kept) < limit:
        best, order = order[0], order[1:]
        kept.append(int(best))
        order = order[~_overlaps(corners[best], corners[order], iou)]
    return kept


def _optional_float(value: Any) -> float | None:
    return float(as_tensor(value).reshape(-1)[0]) if value is not None and as_tensor(value).numel() else None


@ops.register("NonMaxSuppression", since=10)
def non_max_suppression(
    ctx: NodeContext,
    boxes: Any,
    scores: Any,
    max_output_boxes_per_class: Any = None,
    iou_threshold: Any = None,
    score_threshold: Any = None,
) -> torch.Tensor:
    """Greedy per-class NMS; returns (num_selected, 3) int64 rows (batch, class, box).

    Boxes are (B, N, 4) as [y1, x1, y2, x2] (any diagonal corners) or, with ``center_point_box=1``,
    [x_center, y_center, width, height]; scores are (B, C, N). A box is suppressed by a kept box of the same
    class when their IoU exceeds ``iou_threshold``; boxes scoring at or below ``score_threshold`` are dropped.
    """
    boxes, scores = as_tensor(boxes).detach(), as_tensor(scores).detach()
    if (
        boxes.dim() != 3
        or scores.dim() != 3
        or boxes.shape[-1] != 4
        or boxes.shape[:2] != (scores.shape[0], scores.shape[2])
    ):
        raise ShapeError(
            f"NonMaxSuppression node '{ctx.name}': boxes {tuple(boxes.shape)} and scores {tuple(scores.shape)} "
            "must be (B, N, 4) and (B, C, N)."
        )
    limit = int(as_tensor(max_output_boxes_per_class).reshape(-1)[0]) if max_output_boxes_per_class is not None else 0
    if limit <= 0 or boxes.shape[1] == 0:
        return torch.zeros((0, 3), dtype=torch.int64, device=boxes.device)
    iou = _optional_float(iou_threshold) or 0.0
    min_score = _optional_float(score_threshold)
    corners = _corners(boxes, int(ctx.attr("center_point_box", 0)))
    rows = []
    for b in range(boxes.shape[0]):
        for c in range(scores.shape[1]):
            rows += [[b, c, i] for i in _greedy(scores[b, c], corners[b], limit, iou, min_score)]
    return torch.tensor(rows, dtype=torch.int64, device=boxes.device).reshape(-1, 3)


def _axis_samples(
    start: torch.Tensor, bin_size: torch.Tensor, grid: torch.Tensor, n_bins: int, n_grid: int, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample positions along one axis for every roi, bin and grid point: (low, high, w_low, w_high).

    All outputs are (R, n_bins, n_grid); samples more than one pixel past the edge get zero weights.
    """
    bins = torch.arange(n_bins, device=start.device, dtype=start.dtype).view(1, -1, 1)
    steps = torch.arange(n_grid, device=start.device, dtype=start.dtype).view(1, 1, -1)
    grid_f = grid.to(start.dtype).view(-1, 1, 1)
    pos = start.view(-1, 1, 1) + bins * bin_size.view(-1, 1, 1) + (steps + 0.5) * bin_size.view(-1, 1, 1) / grid_f
    inside = (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(pos), pos - low.to(pos.dtype))
    zero = torch.zeros_like(frac)
    w_low = torch.where(inside, 1 - frac, zero)
    w_high = torch.where(inside, frac, zero)
    return low, high, w_low, w_high


@ops.register("RoiAlign", since=10)
def roi_align(ctx: NodeContext, x: Any, rois: Any, batch_indices: Any) -> torch.Tensor:
    """Bilinear RoI pooling of X (N, C, H, W) over rois (R, 4) = [x1, y1, x2, y2]; returns (R, C, oh, ow).

    ``coordinate_transformation_mode`` 'half_pixel' (default from opset 16) shifts coordinates by -0.5;
    'output_half_pixel' (opset 10 behaviour) does not and makes every roi at least 1x1.
    """
    x, rois, batch_indices = as_tensor(x), as_tensor(rois), as_tensor(batch_indices).long()
    if x.dim() != 4 or rois.dim() != 2 or rois.shape[1] != 4:
        raise ShapeError(
            f"RoiAlign node '{ctx.name}': X must be (N, C, H, W) and rois (R, 4); got "
            f"{tuple(x.shape)} and {tuple(rois.shape)}."
        )
    mode = ctx.attr("mode", "avg")
    if mode not in ("avg", "max"):
        raise InvalidParameterError(f"RoiAlign node '{ctx.name}' has mode '{mode}'; use 'avg' or 'max'.")
    default_ctm = "half_pixel" if ctx.opset >= 16 else "output_half_pixel"
    half_pixel = ctx.attr("coordinate_transformation_mode", default_ctm) == "half_pixel"
    out_h, out_w = int(ctx.attr("output_height", 1)), int(ctx.attr("output_width", 1))
    ratio = int(ctx.attr("sampling_ratio", 0))
    _, channels, height, width = x.shape
    n_rois = rois.shape[0]
    if n_rois == 0:
        return x.new_zeros(0, channels, out_h, out_w)

    boxes = rois.to(x.dtype) * float(ctx.attr("spatial_scale", 1.0)) - (0.5 if half_pixel else 0.0)
    start_w, start_h = boxes[:, 0], boxes[:, 1]
    roi_w, roi_h = boxes[:, 2] - start_w, boxes[:, 3] - start_h
    if not half_pixel:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / out_h, roi_w / out_w
    if ratio > 0:
        grid_h = torch.full((n_rois,), ratio, dtype=torch.int64, device=x.device)
        grid_w, n_gh, n_gw = grid_h, ratio, ratio
    else:  # adaptive: ceil(roi size / output size) samples per bin, per roi
        grid_h, grid_w = torch.ceil(roi_h / out_h).long(), torch.ceil(roi_w / out_w).long()
        n_gh, n_gw = max(int(grid_h.max()), 1), max(int(grid_w.max()), 1)
    ys = _axis_samples(start_h, bin_h, grid_h, out_h, n_gh, height)
    xs = _axis_samples(start_w, bin_w, grid_w, out_w, n_gw, width)
    table = x.permute(0, 2, 3, 1).reshape(-1, channels)  # features as rows (N*H*W, C)
    base = batch_indices * (height * width)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, out_h * n_gh * out_w * n_gw * channels))
    pooled = [
        _pool(
            table,
            base[i : i + chunk],
            [a[i : i + chunk] for a in ys],
            [a[i : i + chunk] for a in xs],
            grid_h[i : i + chunk],
            grid_w[i : i + chunk],
            width,
            mode,
        )
        for i in range(0, n_rois, chunk)
    ]
    return torch.cat(pooled).permute(0, 3, 1, 2).contiguous()


def _pool(
    table: torch.Tensor,
    base: torch.Tensor,
    ys: list[torch.Tensor],
    xs: list[torch.Tensor],
    grid_h: torch.Tensor,
    grid_w: torch.Tensor,
    width: int,
    mode: str,
) -> torch.Tensor:
    """Pool a chunk of rois from the feature rows ``table``; returns (R, oh, ow, C)."""
    (y_low, y_high, wy_low, wy_high), (x_low, x_high, wx_low, wx_high) = ys, xs
    n_rois, out_h, n_gh = y_low.shape
    out_w, n_gw = x_low.shape[1:]
    base = base.view(-1, 1, 1, 1, 1)

    def corner(yi: torch.Tensor, xi: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor) -> torch.Tensor:
        rows = base + (yi * width).view(n_rois, out_h, n_gh, 1, 1) + xi.view(n_rois, 1, 1, out_w, n_gw)
        weight = wy.view(n_rois, out_h, n_gh, 1, 1) * wx.view(n_rois, 1, 1, out_w, n_gw)
        return table[rows] * weight.unsqueeze(-1)  # (R, oh, gh, ow, gw, C)

    parts = [
        corner(y_low, x_low, wy_low, wx_low),
        corner(y_low, x_high, wy_low, wx_high),
        corner(y_high, x_low, wy_high, wx_low),
        corner(y_high, x_high, wy_high, wx_high),
    ]
    used = (torch.arange(n_gh, device=table.device).view(1, 1, -1, 1, 1) < grid_h.view(-1, 1, 1, 1, 1)) & (
        torch.arange(n_gw, device=table.device).view(1, 1, 1, 1, -1) < grid_w.view(-1, 1, 1, 1, 1)
    )
    used = used.unsqueeze(-1)
    if mode == "avg":
        total = torch.where(used, sum(parts), torch.zeros_like(parts[0])).sum(dim=(2, 4))
        return total / (grid_h * grid_w).clamp(min=1).to(table.dtype).view(-1, 1, 1, 1)
    best = torch.stack(parts).amax(dim=0)
    pooled = torch.where(used, best, torch.full_like(best, -math.inf)).amax(dim=(2, 4))
    empty = (grid_h * grid_w == 0).view(-1, 1, 1, 1)  # a roi with no samples pools to zero
    return torch.where(empty, torch.zeros_like(pooled), pooled)
