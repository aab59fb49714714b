"""Element-wise math: arithmetic, unary math, comparisons, logic, bit operations, Where, Clip and casts.

Conventions shared by the handlers here:

- Broadcasting is numpy's, which torch follows. Opsets before 7 had ``broadcast``/``axis`` attributes that align
  the second operand at ``axis``; `_legacy_broadcast` reshapes it so numpy broadcasting gives the same result.
- Outputs keep the dtype ONNX specifies. torch implements few kernels for uint16/32/64, so integer handlers compute
  on a signed stand-in (`_widen`: uint16/32 as int64 values, uint64 as the int64 with the same bits) and convert
  back (`_narrow`). Wrapping arithmetic and bit operations are exact this way; comparisons of uint64 use an
  order-preserving key (`_order_key`). Division and modulo of uint64 values of 2**63 or more are not exact.
- Everything on float data is a differentiable torch op without python-level branching on values, so gradients
  reach float weights and the handlers run under ``torch.func.vmap``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import torch
from onnx import TensorProto

from ....errors import InvalidParameterError, UnsupportedOperatorError
from .util import as_tensor
from ..registry import NodeContext, OpSet
from ..tensors import ONNX_TO_TORCH

ops = OpSet()

Tensor = torch.Tensor

_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)

#: ONNX TensorProto.DataType -> torch dtype, for the types torch can hold (the converter's one table).
ONNX_TO_TORCH_DTYPE = ONNX_TO_TORCH

# float8 type -> (largest finite value, the halfway point above it, whether that tie rounds up and overflows).
# Round-to-nearest-even decides the tie: E4M3FN's largest value has an even mantissa, the others an odd one.
_FLOAT8_LIMITS = MappingProxyType({
    torch.float8_e4m3fn: (448.0, 464.0, False),
    torch.float8_e4m3fnuz: (240.0, 248.0, True),
    torch.float8_e5m2: (57344.0, 61440.0, True),
    torch.float8_e5m2fnuz: (57344.0, 61440.0, True),
})


def torch_dtype(ctx: NodeContext, onnx_type: int | str) -> torch.dtype:
    """The torch dtype for an ONNX ``TensorProto.DataType`` (an enum value, or its name as opset 1 wrote it).

    Args:
        ctx: the node, named in the error.
        onnx_type: e.g. ``TensorProto.FLOAT`` (1) or ``"FLOAT"``.

    Returns:
        The matching torch dtype.

    Raises:
        UnsupportedOperatorError: for types torch cannot hold (string, int4, float4, float8e8m0 ...).

    Example:
        >>> torch_dtype(ctx, TensorProto.INT64)  # doctest: +SKIP
        torch.int64
    """
    code = TensorProto.DataType.Value(onnx_type.upper()) if isinstance(onnx_type, str) else int(onnx_type)
    dtype = ONNX_TO_TORCH_DTYPE.get(code)
    if dtype is None:
        name = TensorProto.DataType.Name(code) if code in TensorProto.DataType.values() else str(code)
        raise UnsupportedOperatorError(
            ctx.op_type, ctx.domain, ctx.opset, ctx.name,
            hint=f"element type {name} has no torch equivalent; supply a handler with op_handlers= if you need it",
        )
    return dtype


# -- dtype helpers --------------------------------------------------------------------------------------------------
def _widen(x: Tensor) -> Tensor:
    """A signed stand-in for unsigned types torch lacks kernels for (see the module docstring)."""
    if x.dtype == torch.uint64:
        return x.view(torch.int64)
    if x.dtype in _UNSIGNED:
        return x.to(torch.int64)
    return x


def _narrow(y: Tensor, dtype: torch.dtype) -> Tensor:
    """Undo `_widen`: back to ``dtype``, keeping the low bits (wrap-around) for integers."""
    if y.dtype == dtype:
        return y
    if dtype == torch.uint64:
        return y.to(torch.int64).view(torch.uint64)
    return y.to(dtype)


def _order_key(x: Tensor) -> Tensor:
    """A tensor whose ordering matches ``x``'s, computable by torch (uint64: flip the sign bit)."""
    if x.dtype == torch.uint64:
        return x.view(torch.int64) ^ torch.iinfo(torch.int64).min
    return _widen(x)


def _same_dtype(fn: Callable[..., Tensor], *xs: Tensor) -> Tensor:
    """``fn`` on the widened inputs, converted back to the first input's dtype."""
    return _narrow(fn(*(_widen(x) for x in xs)), xs[0].dtype)


def _legacy_broadcast(ctx: NodeContext, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Opset < 7: with ``broadcast=1`` and ``axis``, ``b`` aligns with ``a`` starting at ``axis``."""
    if ctx.opset < 7 and ctx.attr("broadcast", 0) and "axis" in ctx.attrs and b.dim() > 0:
        axis = ctx.attrs["axis"] % max(a.dim(), 1)
        b = b.reshape(tuple(b.shape) + (1,) * (a.dim() - axis - b.dim()))
    return a, b


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[..., Tensor]:
    """A handler applying ``fn`` after the legacy broadcast; ``fn`` sees the raw inputs."""

    def handler(ctx: NodeContext, a: Tensor, b: Tensor) -> Tensor:
        return fn(*_legacy_broadcast(ctx, as_tensor(a), as_tensor(b)))

    handler.__doc__ = f"Element-wise {fn.__name__.strip('_')} with numpy broadcasting."
    return handler


# -- arithmetic -----------------------------------------------------------------------------------------------------
def _add(a: Tensor, b: Tensor) -> Tensor:
    return _same_dtype(torch.add, a, b)


def _sub(a: Tensor, b: Tensor) -> Tensor:
    return _same_dtype(torch.sub, a, b)


def _mul(a: Tensor, b: Tensor) -> Tensor:
    return _same_dtype(torch.mul, a, b)


def _div(a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point() or a.is_complex():
        return a / b
    return _same_dtype(functools.partial(torch.div, rounding_mode="trunc"), a, b)  # C-style, as ONNX specifies


def _pow(a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point():
        return torch.pow(a, b.to(a.dtype))
    wide = _widen(a)
    if b.is_floating_point():  # integer base, float exponent: computed in double, truncated to the base's type
        return _narrow(torch.pow(wide.double(), b.double()).to(wide.dtype), a.dtype)
    return _narrow(torch.pow(wide, _widen(b).to(wide.dtype)), a.dtype)


def _and(a: Tensor, b: Tensor) -> Tensor:
    return torch.logical_and(a, b)


def _or(a: Tensor, b: Tensor) -> Tensor:
    return torch.logical_or(a, b)


def _xor(a: Tensor, b: Tensor) -> Tensor:
    return torch.logical_xor(a, b)


def _comparison(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    @functools.wraps(fn)
    def compare(a: Tensor, b: Tensor) -> Tensor:
        return fn(_order_key(a), _order_key(b))

    return compare


for _op_type, _fn in (
    ("Add", _add), ("Sub", _sub), ("Mul", _mul), ("Div", _div), ("Pow", _pow),
    ("And", _and), ("Or", _or), ("Xor", _xor),
    ("Equal", _comparison(torch.eq)), ("Less", _comparison(torch.lt)), ("Greater", _comparison(torch.gt)),
    ("LessOrEqual", _comparison(torch.le)), ("GreaterOrEqual", _comparison(torch.ge)),
):
    ops.register(_op_type)(_binary(_fn))


@ops.register("Mod", since=10)
def mod(ctx: NodeContext, a: Tensor, b: Tensor) -> Tensor:
    """Remainder; ``fmod=0`` takes the divisor's sign (floor division), ``fmod=1`` the dividend's (C fmod)."""
    fn = torch.fmod if ctx.attr("fmod", 0) else torch.remainder
    return _same_dtype(fn, a, b)


# -- unary math -----------------------------------------------------------------------------------------------------
def _unary(fn: Callable[[Tensor], Tensor]) -> Callable[..., Tensor]:
    def handler(ctx: NodeContext, x: Tensor) -> Tensor:
        return _same_dtype(fn, x)

    handler.__doc__ = f"Element-wise ``torch.{getattr(fn, '__name__', 'op')}``."
    return handler


def _abs(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.uint8, torch.bool) else torch.abs(x)


for _op_type, _fn in (
    ("Neg", torch.neg), ("Abs", _abs), ("Reciprocal", torch.reciprocal), ("Sqrt", torch.sqrt), ("Exp", torch.exp),
    ("Log", torch.log), ("Ceil", torch.ceil), ("Floor", torch.floor), ("Round", torch.round), ("Sign", torch.sign),
    ("Erf", torch.erf), ("Sin", torch.sin), ("Cos", torch.cos), ("Tan", torch.tan), ("Asin", torch.asin),
    ("Acos", torch.acos), ("Atan", torch.atan), ("Sinh", torch.sinh), ("Cosh", torch.cosh), ("Asinh", torch.asinh),
    ("Acosh", torch.acosh), ("Atanh", torch.atanh), ("BitwiseNot", torch.bitwise_not),
):
    ops.register(_op_type)(_unary(_fn))


@ops.register("Not")
def not_(ctx: NodeContext, x: Tensor) -> Tensor:
    """Logical negation of a bool tensor."""
    return torch.logical_not(x)


@ops.register("IsNaN", since=9)
def isnan(ctx: NodeContext, x: Tensor) -> Tensor:
    """True where ``x`` is NaN."""
    return torch.isnan(x)


@ops.register("IsInf", since=10)
def isinf(ctx: NodeContext, x: Tensor) -> Tensor:
    """True where ``x`` is infinite, restricted by ``detect_positive``/``detect_negative`` (both 1 by default)."""
    positive = torch.isposinf(x) if ctx.attr("detect_positive", 1) else torch.zeros_like(x, dtype=torch.bool)
    negative = torch.isneginf(x) if ctx.attr("detect_negative", 1) else torch.zeros_like(x, dtype=torch.bool)
    return positive | negative


# -- variadic -------------------------------------------------------------------------------------------------------
def _maximum(a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point():
        return torch.maximum(a, b)  # propagates NaN, splits the gradient at ties
    return torch.where(_order_key(a) >= _order_key(b), a, b)


def _minimum(a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point():
        return torch.minimum(a, b)
    return torch.where(_order_key(a) <= _order_key(b), a, b)


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[..., Tensor]:
    def handler(ctx: NodeContext, *xs: Tensor) -> Tensor:
        return functools.reduce(fn, xs)

    handler.__doc__ = f"Element-wise {fn.__name__.strip('_')} over any number of broadcast inputs."
    return handler


ops.register("Max")(_variadic(_maximum))
ops.register("Min")(_variadic(_minimum))
ops.register("Sum")(_variadic(_add))


@ops.register("Mean")
def mean(ctx: NodeContext, *xs: Tensor) -> Tensor:
    """Element-wise mean over any number of broadcast inputs."""
    return functools.reduce(torch.add, xs) / len(xs)


# -- bit operations -------------------------------------------------------------------------------------------------
def _bitwise(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[..., Tensor]:
    def handler(ctx: NodeContext, a: Tensor, b: Tensor) -> Tensor:
        return _same_dtype(fn, a, b)

    handler.__doc__ = f"Element-wise ``torch.{fn.__name__}`` on integers (two's complement bits)."
    return handler


ops.register("BitwiseAnd", since=18)(_bitwise(torch.bitwise_and))
ops.register("BitwiseOr", since=18)(_bitwise(torch.bitwise_or))
ops.register("BitwiseXor", since=18)(_bitwise(torch.bitwise_xor))
del _op_type, _fn


@ops.register("BitShift", since=11)
def bitshift(ctx: NodeContext, x: Tensor, y: Tensor) -> Tensor:
    """Shift ``x`` by ``y`` bits (``direction`` LEFT or RIGHT; right shifts of signed types extend the sign).

    Shift amounts that are negative or at least the bit width give what the sign extension alone gives: -1 for a
    right shift of a negative value, 0 otherwise.
    """
    bits = torch.iinfo(x.dtype).bits
    wide = _widen(x)
    amount = _widen(y).to(torch.int64)
    valid = (amount >= 0) & (amount < bits)
    amount = amount.clamp(0, bits - 1)
    right = str(ctx.attr("direction", "")).upper() == "RIGHT"
    if not right:
        shifted = wide << amount
    elif x.dtype == torch.uint64:  # arithmetic shift of the int64 view, then clear the copied sign bits
        kept = ~(torch.full_like(amount, -1) << (bits - amount).clamp(max=bits - 1))
        shifted = torch.where(amount == 0, wide, (wide >> amount) & kept)
    else:
        shifted = wide >> amount
    fill = (wide < 0) & right if x.dtype.is_signed else torch.zeros_like(valid)
    out = torch.where(valid, shifted, torch.where(fill, -1, 0))
    return _narrow(out, x.dtype)


# -- selection ------------------------------------------------------------------------------------------------------
@ops.register("Where", since=9)
def where(ctx: NodeContext, condition: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """``x`` where ``condition`` holds, else ``y``, broadcasting all three."""
    return torch.where(as_tensor(condition).to(torch.bool), as_tensor(x), as_tensor(y))


def _clip(x: Tensor, low: Tensor | float | None, high: Tensor | float | None) -> Tensor:
    if low is None and high is None:
        return x
    wide = _widen(x)

    def bound(value: Tensor | float | None) -> Tensor | float | None:
        return _widen(value).to(wide.dtype) if isinstance(value, Tensor) else value

    return _narrow(torch.clamp(wide, bound(low), bound(high)), x.dtype)


@ops.register("Clip", since=1)
def clip_attrs(ctx: NodeContext, x: Tensor) -> Tensor:
    """Clamp to [``min``, ``max``] given as attributes (opset < 11; unbounded by default)."""
    return _clip(x, ctx.attr("min"), ctx.attr("max"))


@ops.register("Clip", since=11)
def clip(ctx: NodeContext, x: Tensor, low: Any = None, high: Any = None) -> Tensor:
    """Clamp to [``min``, ``max``] given as optional scalar inputs; where min > max every value becomes max."""
    low = None if low is None else as_tensor(low)
    high = None if high is None else as_tensor(high)
    return _clip(x, low, high)


# -- casts ----------------------------------------------------------------------------------------------------------
def _cast(x: Tensor, dtype: torch.dtype, saturate: bool) -> Tensor:
    """``x`` converted to ``dtype``, with ONNX's float8 overflow rules: saturate to the largest finite value, or
    overflow to NaN (to ±inf for E5M2, the one float8 type with infinities)."""
    limits = _FLOAT8_LIMITS.get(dtype)
    if limits is None:
        return x.to(dtype)
    largest, halfway, tie_overflows = limits
    x = x if x.is_floating_point() else x.to(torch.float32)
    if saturate:
        return x.clamp(-largest, largest).to(dtype)
    overflows = (x.abs() >= halfway) if tie_overflows else (x.abs() > halfway)
    overflow = torch.full_like(x, float("inf") if dtype == torch.float8_e5m2 else float("nan"))
    return torch.where(overflows, torch.copysign(overflow, x), x).to(dtype)


@ops.register("Cast")
def cast(ctx: NodeContext, x: Tensor) -> Tensor:
    """Convert to the ``to`` type; floats to integers truncate toward zero, anything nonzero becomes True."""
    return _cast(x, torch_dtype(ctx, ctx.attrs["to"]), bool(ctx.attr("saturate", 1)))


@ops.register("CastLike", since=15)
def cast_like(ctx: NodeContext, x: Tensor, like: Tensor) -> Tensor:
    """Convert to the element type of ``like``."""
    return _cast(x, like.dtype, bool(ctx.attr("saturate", 1)))


@ops.register("BitCast", since=26)
def bitcast(ctx: NodeContext, x: Tensor) -> Tensor:
    """Reinterpret the bits of ``x`` as the ``to`` type, which must have the same width."""
    dtype = torch_dtype(ctx, ctx.attrs["to"])
    if dtype.itemsize != x.dtype.itemsize:
        raise InvalidParameterError(
            f"BitCast node '{ctx.name}' casts {x.dtype} to {dtype} of a different width; BitCast needs equal widths"
        )
    return x.view(dtype)
