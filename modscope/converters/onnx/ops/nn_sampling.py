"""GridSample and AffineGrid: spatial transformer sampling, mapped to ``F.grid_sample`` and ``F.affine_grid``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ....errors import InvalidParameterError, UnsupportedOperatorError
from .util import as_ints
from ..registry import NodeContext, OpSet

ops = OpSet()

_MODES = {"linear": "bilinear", "bilinear": "bilinear", "nearest": "nearest", "cubic": "bicubic", "bicubic": "bicubic"}
_PADDING = ("zeros", "border", "reflection")


@ops.register("GridSample", since=16)
def grid_sample(ctx: NodeContext, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Sample x (N, C, *S) at the normalized coordinates grid (N, *out, n) (x first, values in [-1, 1])."""
    mode = _MODES.get(ctx.attr("mode", "linear" if ctx.opset >= 20 else "bilinear"))
    padding = ctx.attr("padding_mode", "zeros")
    if mode is None or padding not in _PADDING:
        raise InvalidParameterError(
            f"GridSample node '{ctx.name}' has mode '{ctx.attr('mode')}' / padding_mode '{padding}'; use "
            f"linear|nearest|cubic and zeros|border|reflection"
        )
    if x.dim() not in (4, 5) or (x.dim() == 5 and mode == "bicubic"):
        raise UnsupportedOperatorError(
            ctx.op_type,
            ctx.domain,
            ctx.opset,
            ctx.name,
            hint=f"2-D sampling (any mode) and 3-D sampling (linear, nearest) are supported, not {x.dim() - 2}-D {mode}",
        )
    return F.grid_sample(
        x, grid.to(x.dtype), mode=mode, padding_mode=padding, align_corners=bool(ctx.attr("align_corners", 0))
    )


@ops.register("AffineGrid", since=20)
def affine_grid(ctx: NodeContext, theta: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Sampling grid (N, *S, n) of the affine maps theta (N, n, n+1) for an output of shape ``size``."""
    shape = as_ints(size)
    return F.affine_grid(theta, shape, align_corners=bool(ctx.attr("align_corners", 0)))
