"""Quantization: QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear, MatMulInteger, ConvInteger, QLinear ops.

Linear quantization maps a real value ``r`` to an integer ``q = saturate(round(r / scale) + zero_point)`` (round
half to even) and back with ``r = (q - zero_point) * scale``. Scales and zero points are per tensor (a scalar),
per axis (a 1-D tensor along ``axis``) or, from opset 21, blocked (same rank as the data, each entry repeated
``block_size`` times along ``axis``).

Integer products (MatMulInteger, ConvInteger and the accumulators of the QLinear ops) are computed in float64,
which holds every int32 accumulator exactly, on CPU and GPU alike. Dequantized values are ordinary float tensors,
so gradients flow through DequantizeLinear into the scales (which may be learned weights) and through
DynamicQuantizeLinear's scale into its input; quantized outputs are integers and carry no gradient.

A float weight operand of MatMulInteger, ConvInteger, QLinearMatMul or QLinearConv is a quantized weight that
modscope loaded as a parameter (``quantized.py``): already centred on its zero point (and, for the QLinear ops,
multiplied by its scale). MatMulInteger and ConvInteger then return the float64 accumulator, so gradients reach
the weight; the QLinear ops re-quantize it (``round(w / scale)``, exact for unmasked and masked values alike).

Supported integer types: uint8, int8, uint16, int16 (int32 data for DequantizeLinear). The 2-, 4-bit and float8
types have no torch arithmetic and are refused with an `UnsupportedOperatorError`.
"""

from __future__ import annotations

from typing import Any

import onnx
import torch

from ....errors import ShapeError, UnsupportedOperatorError
from .linalg import conv
from .util import as_tensor, normalize_axis
from ..tensors import ONNX_TO_TORCH
from ..registry import NodeContext, OpSet

ops = OpSet()

#: ONNX output_dtype codes the quantizers produce, and their torch dtypes.
_QUANT_TYPES = {
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT16: torch.uint16,
    onnx.TensorProto.INT16: torch.int16,
}


def _unsupported(ctx: NodeContext, what: str) -> UnsupportedOperatorError:
    return UnsupportedOperatorError(
        ctx.op_type, ctx.domain, ctx.opset, ctx.name, hint=f"{what} is not supported; use 8- or 16-bit integer types"
    )


def _broadcast_param(
    ctx: NodeContext, param: torch.Tensor, x: torch.Tensor, axis: int, block_size: int
) -> torch.Tensor:
    """A scale or zero point shaped to broadcast against ``x`` (per tensor, per axis or blocked)."""
    if param.numel() == 1 and param.dim() <= 1:
        return param.reshape(())
    axis = normalize_axis(axis, x.dim())
    if block_size > 0:
        if param.dim() != x.dim():
            raise ShapeError(
                f"{ctx.op_type} node '{ctx.name}': blocked scale of shape {tuple(param.shape)} must have the rank "
                f"of the data {tuple(x.shape)}."
            )
        return param.repeat_interleave(block_size, dim=axis).narrow(axis, 0, x.shape[axis])
    if param.dim() != 1 or param.shape[0] != x.shape[axis]:
        raise ShapeError(
            f"{ctx.op_type} node '{ctx.name}': per-axis scale of shape {tuple(param.shape)} does not match axis "
            f"{axis} of the data {tuple(x.shape)}."
        )
    shape = [1] * x.dim()
    shape[axis] = -1
    return param.reshape(shape)


def _saturate_round(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """round-half-to-even ``value`` clamped to ``dtype``'s range, as ``dtype``."""
    info = torch.iinfo(dtype)
    return torch.round(value).clamp(info.min, info.max).to(dtype)


def _quantize(
    value: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    q = torch.round(value / scale)
    if zero_point is not None:
        q = q + zero_point.to(q.dtype)
    return _saturate_round(q, dtype)


def _quant_dtype(ctx: NodeContext, zero_point: torch.Tensor | None) -> torch.dtype:
    """The output dtype of a quantizer: the zero point's, else ``output_dtype``, else uint8."""
    if zero_point is not None:
        if zero_point.is_floating_point():
            raise _unsupported(ctx, "float8 quantization")
        # int32 is no valid quantized type: it is a uint16 zero point widened on load.
        return torch.uint16 if zero_point.dtype == torch.int32 else zero_point.dtype
    code = int(ctx.attr("output_dtype", 0))
    if code == 0:
        return torch.uint8
    if code not in _QUANT_TYPES:
        raise _unsupported(ctx, f"output_dtype {onnx.TensorProto.DataType.Name(code)}")
    return _QUANT_TYPES[code]


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float32, or float64 when any operand is float64 or int32 (whose values float32 cannot hold)."""
    wide = any(t is not None and t.dtype in (torch.float64, torch.int32, torch.int64) for t in tensors)
    return torch.float64 if wide else torch.float32


@ops.register("QuantizeLinear", since=10)
def quantize_linear(ctx: NodeContext, x: Any, y_scale: Any, y_zero_point: Any = None) -> torch.Tensor:
    """y = saturate(round(x / y_scale) + y_zero_point), per tensor, per axis or blocked."""
    x, y_scale = as_tensor(x), as_tensor(y_scale)
    y_zero_point = as_tensor(y_zero_point) if y_zero_point is not None else None
    dtype = _quant_dtype(ctx, y_zero_point)
    axis, block = int(ctx.attr("axis", 1)), int(ctx.attr("block_size", 0))
    work = _compute_dtype(x, y_scale)
    scale = _broadcast_param(ctx, y_scale, x, axis, block).to(work)
    zp = _broadcast_param(ctx, y_zero_point, x, axis, block) if y_zero_point is not None else None
    return _quantize(x.to(work), scale, zp, dtype)


@ops.register("DequantizeLinear", since=10)
def dequantize_linear(ctx: NodeContext, x: Any, x_scale: Any, x_zero_point: Any = None) -> torch.Tensor:
    """y = (x - x_zero_point) * x_scale, differentiable in ``x_scale``."""
    x, x_scale = as_tensor(x), as_tensor(x_scale)
    if x.is_floating_point():
        raise _unsupported(ctx, "float8 dequantization")
    axis, block = int(ctx.attr("axis", 1)), int(ctx.attr("block_size", 0))
    scale = _broadcast_param(ctx, x_scale, x, axis, block)
    work = _compute_dtype(x, scale)
    centred = x.to(work)
    if x_zero_point is not None:
        centred = centred - _broadcast_param(ctx, as_tensor(x_zero_point), x, axis, block).to(work)
    out_code = int(ctx.attr("output_dtype", 0))
    out_dtype = _float_dtype(ctx, out_code) if out_code else scale.dtype
    return (centred * scale.to(work)).to(out_dtype)


def _float_dtype(ctx: NodeContext, code: int) -> torch.dtype:
    dtype = ONNX_TO_TORCH.get(code)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise _unsupported(ctx, f"output_dtype {onnx.TensorProto.DataType.Name(code)}")
    return dtype


@ops.register("DynamicQuantizeLinear", since=11)
def dynamic_quantize_linear(ctx: NodeContext, x: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 quantization with scale and zero point from the data range (which always includes 0).

    Returns (y, y_scale, y_zero_point); ``y_scale`` is differentiable in ``x``.
    """
    x = as_tensor(x)
    low = torch.clamp(x.min(), max=0.0)
    high = torch.clamp(x.max(), min=0.0)
    scale = (high - low) / 255.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero input quantizes to zeros
    zero_point = _saturate_round(torch.clamp(-low / safe, 0.0, 255.0), torch.uint8)
    return _quantize(x, safe, zero_point, torch.uint8), scale, zero_point


def _centred(q: torch.Tensor, zero_point: Any, zp_shape: list[int] | None = None) -> torch.Tensor:
    """``q - zero_point`` in float64 (exact for every 8/16-bit value); ``zp_shape`` reshapes a 1-D zero point."""
    out = q.to(torch.float64)
    if zero_point is None:
        return out
    zp = as_tensor(zero_point).to(torch.float64)
    if zp.numel() > 1 and zp_shape is not None:
        zp = zp.reshape(zp_shape)
    return out - zp


def _weight(
    w: torch.Tensor, zero_point: Any, zp_shape: list[int] | None = None, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """A weight operand centred on its zero point, in float64.

    A float ``w`` is a dequantized parameter (already centred): with a ``scale`` it is re-quantized, without one
    it is used as it is (differentiably).
    """
    if not w.is_floating_point():
        return _centred(w, zero_point, zp_shape)
    if scale is None:
        return w.to(torch.float64)
    s = scale.to(torch.float64)
    if s.numel() > 1 and zp_shape is not None:
        s = s.reshape(zp_shape)
    return torch.round(w.to(torch.float64) / s)


def _row_param(p: torch.Tensor) -> torch.Tensor:
    """A per-row parameter of a matmul's left operand (shape (M,)) shaped to broadcast as (M, 1)."""
    return p.reshape(-1, 1) if p.dim() == 1 and p.numel() > 1 else p


@ops.register("MatMulInteger", since=10)
def matmul_integer(
    ctx: NodeContext, a: Any, b: Any, a_zero_point: Any = None, b_zero_point: Any = None
) -> torch.Tensor:
    """int32 (a - a_zero_point) @ (b - b_zero_point); a's zero point per row or scalar, b's per column or scalar."""
    a, b = as_tensor(a), as_tensor(b)
    acc = torch.matmul(_centred(a, a_zero_point, [-1, 1]), _weight(b, b_zero_point))
    return acc if b.is_floating_point() else acc.round().to(torch.int32)


@ops.register("ConvInteger", since=10)
def conv_integer(ctx: NodeContext, x: Any, w: Any, x_zero_point: Any = None, w_zero_point: Any = None) -> torch.Tensor:
    """int32 convolution of (x - x_zero_point) with (w - w_zero_point); padding contributes zero."""
    x, w = as_tensor(x), as_tensor(w)
    per_channel = [-1] + [1] * (w.dim() - 1)
    acc = conv(ctx, _centred(x, x_zero_point), _weight(w, w_zero_point, per_channel))
    return acc if w.is_floating_point() else acc.round().to(torch.int32)


def _requantize(ctx: NodeContext, acc: torch.Tensor, multiplier: torch.Tensor, y_zero_point: Any) -> torch.Tensor:
    """An exact integer accumulator scaled by ``multiplier`` into the output's quantized domain, saturated.

    The multiplier (input scales / output scale) is applied in its own float type, as onnxruntime does.
    """
    zp = as_tensor(y_zero_point)
    q = torch.round(acc.to(multiplier.dtype) * multiplier) + zp.to(multiplier.dtype)
    return _saturate_round(q, _quant_dtype(ctx, zp))


def _multiplier_dtype(y_scale: torch.Tensor) -> torch.dtype:
    return torch.float64 if y_scale.dtype == torch.float64 else torch.float32


@ops.register("QLinearMatMul", since=10)
def qlinear_matmul(
    ctx: NodeContext,
    a: Any,
    a_scale: Any,
    a_zero_point: Any,
    b: Any,
    b_scale: Any,
    b_zero_point: Any,
    y_scale: Any,
    y_zero_point: Any,
) -> torch.Tensor:
    """Quantized matmul: round((a - a_zp) @ (b - b_zp) * a_scale * b_scale / y_scale) + y_zp, saturated."""
    a, b = as_tensor(a), as_tensor(b)
    a_scale, b_scale, y_scale = as_tensor(a_scale), as_tensor(b_scale), as_tensor(y_scale)
    acc = torch.matmul(_centred(a, a_zero_point, [-1, 1]), _weight(b, b_zero_point, scale=b_scale))
    work = _multiplier_dtype(y_scale)
    multiplier = _row_param(a_scale).to(work) * b_scale.to(work) / y_scale.to(work)
    return _requantize(ctx, acc, multiplier, y_zero_point)


@ops.register("QLinearConv", since=10)
def qlinear_conv(
    ctx: NodeContext,
    x: Any,
    x_scale: Any,
    x_zero_point: Any,
    w: Any,
    w_scale: Any,
    w_zero_point: Any,
    y_scale: Any,
    y_zero_point: Any,
    bias: Any = None,
) -> torch.Tensor:
    """Quantized convolution; ``w_scale``/``w_zero_point`` may be per output channel, ``bias`` is int32."""
    x, w = as_tensor(x), as_tensor(w)
    x_scale, w_scale, y_scale = as_tensor(x_scale), as_tensor(w_scale), as_tensor(y_scale)
    per_channel = [-1] + [1] * (w.dim() - 1)
    acc = conv(ctx, _centred(x, x_zero_point), _weight(w, w_zero_point, per_channel, w_scale))
    channel_shape = [1, -1] + [1] * (x.dim() - 2)
    if bias is not None:
        acc = acc + as_tensor(bias).to(torch.float64).reshape(channel_shape)
    work = _multiplier_dtype(y_scale)
    w_scale = w_scale.to(work).reshape(channel_shape) if w_scale.numel() > 1 else w_scale.to(work).reshape(())
    multiplier = x_scale.to(work).reshape(()) * w_scale / y_scale.to(work).reshape(())
    return _requantize(ctx, acc, multiplier, y_zero_point)
