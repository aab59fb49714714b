"""Linear algebra and convolution: MatMul, Gemm, Einsum, Det, Conv, ConvTranspose (DeformConv and Col2Im live in
`deform_col2im` and are merged into this family's `ops`).

Conv, ConvTranspose and Gemm map to one torch call in the common case (symmetric padding, 1-D/2-D/3-D), so a
converted CNN runs at native speed, stays differentiable in its weights and batches under ``torch.func.vmap``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ....errors import InvalidParameterError
from . import deform_col2im
from .window_geometry import (
    Pads,
    functional,
    pad_spatial,
    resolve_pads,
    same_pads,
    symmetric,
    window_from_attrs,
)
from ..registry import NodeContext, OpSet

ops = OpSet(entries=list(deform_col2im.ops.entries))

_CONV = (F.conv1d, F.conv2d, F.conv3d)
_CONV_T = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


@ops.register("MatMul")
def matmul(ctx: NodeContext, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """numpy-style matrix product (1-D operands are promoted and the added axis removed)."""
    return torch.matmul(a, b)


@ops.register("Gemm")
def gemm(ctx: NodeContext, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """``alpha * A' @ B' + beta * C`` with C broadcast to (M, N); before opset 11 C is mandatory in ONNX, an
    absent C is read as zero here (a superset of the standard)."""
    alpha, beta = float(ctx.attr("alpha", 1.0)), float(ctx.attr("beta", 1.0))
    trans_a, trans_b = ctx.attr("transA", 0), ctx.attr("transB", 0)
    if alpha == 1.0 and not trans_a and trans_b and a.dim() == 2 and (c is None or (beta == 1.0 and c.dim() <= 1)):
        # the exporters' usual fully-connected layer: one fused call (the bias broadcasts over rows).
        if c is not None and c.numel() not in (1, b.shape[0]):
            raise InvalidParameterError(
                f"Gemm node '{ctx.name}' has C of shape {tuple(c.shape)}; it must broadcast to (M, N)"
            )
        bias = None if c is None else c.expand(b.shape[0])
        return F.linear(a, b, bias)
    a = a.transpose(-1, -2) if trans_a else a
    b = b.transpose(-1, -2) if trans_b else b
    if c is None or beta == 0.0:
        out = a @ b
        return out * alpha if alpha != 1.0 else out
    if a.is_floating_point():
        return torch.addmm(c, a, b, beta=beta, alpha=alpha)
    return _scaled(a @ b, alpha) + _scaled(c, beta)


def _scaled(x: torch.Tensor, factor: float) -> torch.Tensor:
    if factor == 1.0:
        return x
    return x * (int(factor) if not x.is_floating_point() and float(factor).is_integer() else factor)


@ops.register("Einsum")
def einsum(ctx: NodeContext, *operands: torch.Tensor) -> torch.Tensor:
    """Einstein summation; ONNX's equation syntax (with '...' and optional '->') is torch's."""
    equation = ctx.attr("equation", "").replace(" ", "")
    return torch.einsum(equation, *operands)


@ops.register("Det")
def det(ctx: NodeContext, x: torch.Tensor) -> torch.Tensor:
    """Determinant of the trailing square matrices."""
    return torch.linalg.det(x)


@ops.register("Conv")
def conv(ctx: NodeContext, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """N-d convolution with groups, dilations, strides and explicit/automatic (SAME_*/VALID) padding.

    Symmetric padding goes to the torch call; asymmetric padding is applied with ``F.pad`` first.
    """
    n = x.dim() - 2
    fn = functional(ctx, n, _CONV)
    window = window_from_attrs(ctx, w.shape[2:])
    pads = resolve_pads(ctx, x.shape[2:], window)
    group = int(ctx.attr("group", 1))
    if symmetric(pads):
        padding = tuple(p[0] for p in pads)
    else:
        x, padding = pad_spatial(x, pads), 0
    return fn(x, w, b, window.strides, padding, window.dilations, group)


@ops.register("ConvTranspose")
def conv_transpose(ctx: NodeContext, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Transposed convolution with output_padding, output_shape and auto_pad.

    The common case (symmetric pads, output_padding smaller than stride or dilation) is one torch call; otherwise
    the full transposed convolution is cropped or zero-extended to the ONNX output size and the bias added after.
    """
    n = x.dim() - 2
    fn = functional(ctx, n, _CONV_T)
    window = window_from_attrs(ctx, w.shape[2:])
    group = int(ctx.attr("group", 1))
    out_pad = list(ctx.attr("output_padding", None) or [0] * n)
    pads = _conv_transpose_pads(ctx, x.shape[2:], window, out_pad)
    fits = all(op < max(s, d) for op, s, d in zip(out_pad, window.strides, window.dilations))
    if symmetric(pads) and fits:
        return fn(x, w, b, window.strides, tuple(p[0] for p in pads), tuple(out_pad), group, window.dilations)
    full = fn(x, w, None, window.strides, 0, 0, group, window.dilations)
    out = pad_spatial(full, [(-begin, op - end) for (begin, end), op in zip(pads, out_pad)])
    if b is not None:
        out = out + b.reshape(-1, *([1] * n))
    return out


def _conv_transpose_pads(ctx: NodeContext, in_sizes: torch.Size, window, out_pad: list[int]) -> Pads:
    """(begin, end) crop per axis from ``pads``, ``output_shape`` or ``auto_pad`` (ONNX ConvTranspose rules)."""
    n = len(in_sizes)
    auto_pad = ctx.attr("auto_pad", "NOTSET") or "NOTSET"
    output_shape = ctx.attr("output_shape", None)
    if output_shape is not None:
        output_shape = list(output_shape)[-n:]
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        output_shape = [size * s for size, s in zip(in_sizes, window.strides)]
    if output_shape is None:
        return resolve_pads(ctx, in_sizes, window)
    pads = []
    for i, size in enumerate(in_sizes):
        total = window.strides[i] * (size - 1) + out_pad[i] + window.extent(i) - output_shape[i]
        # ONNX puts the odd unit at the start unless auto_pad is SAME_UPPER.
        pads.append(same_pads(total, "SAME_UPPER" if auto_pad == "SAME_UPPER" else "SAME_LOWER"))
    return pads
