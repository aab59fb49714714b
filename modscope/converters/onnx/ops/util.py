"""Small helpers the op family modules share: axis normalization, reading python ints from shape inputs, ONNX dtypes.

Shape-like inputs (axes, pads, starts, repeats ...) are never weights, so reading them with ``.tolist()`` is fine;
data tensors must not go through these helpers when they may be batched by ``torch.func.vmap``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnx
import torch

from ....errors import InvalidParameterError, ShapeError
from ..tensors import ONNX_TO_TORCH

#: what `torch_dtype` gives: the converter's table (`tensors.ONNX_TO_TORCH`) without the 8-bit float types, with the
#: unsigned types torch barely supports widened to a signed type that holds every value, as on load.
_WIDENED = {torch.uint16: torch.int32, torch.uint32: torch.int64}
_ONNX_TO_TORCH = {
    code: _WIDENED.get(dtype, dtype) for code, dtype in ONNX_TO_TORCH.items() if dtype.itemsize > 1 or not dtype.is_floating_point
}

#: dtypes for which many torch CPU kernels (flip, gather, amax, cumsum ...) are missing.
_SPARSE_SUPPORT = (torch.uint16, torch.uint32, torch.uint64)


def torch_dtype(onnx_type: int) -> torch.dtype:
    """The torch dtype for an ONNX ``TensorProto`` element type code.

    Args:
        onnx_type: an ONNX element type (``onnx.TensorProto.FLOAT`` ...).

    Returns:
        The matching torch dtype (uint16 and uint32 widened to a signed type that holds every value).

    Raises:
        InvalidParameterError: the type has no torch counterpart (strings, 4-bit and 8-bit float types).

    Example:
        >>> torch_dtype(onnx.TensorProto.INT64)
        torch.int64
    """
    try:
        return _ONNX_TO_TORCH[int(onnx_type)]
    except KeyError:
        known = int(onnx_type) in onnx.TensorProto.DataType.values()
        name = onnx.TensorProto.DataType.Name(int(onnx_type)) if known else str(onnx_type)
        raise InvalidParameterError(
            f"ONNX element type {name} has no torch counterpart; cast the model's tensors to a standard numeric type"
        ) from None


def normalize_axis(axis: int, rank: int) -> int:
    """``axis`` in ``[-rank, rank)`` mapped to ``[0, rank)``.

    Args:
        axis: an ONNX axis, possibly negative.
        rank: the rank of the tensor it indexes (use ``rank + k`` for ops that insert ``k`` axes).

    Returns:
        The non-negative axis.

    Raises:
        ShapeError: the axis is out of range.

    Example:
        >>> normalize_axis(-1, 3)
        2
    """
    axis = int(axis)
    if not -rank <= axis < rank:
        raise ShapeError(
            f"axis {axis} is out of range for a tensor of rank {rank}; use an axis in [{-rank}, {rank - 1}]"
        )
    return axis + rank if axis < 0 else axis


def normalize_axes(axes: Sequence[int], rank: int) -> list[int]:
    """Each axis of ``axes`` normalized with `normalize_axis`, in the given order.

    Raises:
        ShapeError: an axis is out of range or repeated.

    Example:
        >>> normalize_axes([0, -1], 3)
        [0, 2]
    """
    result = [normalize_axis(a, rank) for a in axes]
    if len(set(result)) != len(result):
        raise ShapeError(f"axes {list(axes)} name the same axis twice for a tensor of rank {rank}; list each axis once")
    return result


def as_ints(value: Any) -> list[int] | None:
    """A shape-like input or attribute (tensor, array, scalar, list, ``None``) as a list of python ints.

    Args:
        value: an int64/int32 tensor (any rank; flattened), a numpy array or scalar, a python int or list, or None.

    Returns:
        The values as ints, or None when ``value`` is None.

    Example:
        >>> as_ints(torch.tensor([2, -1]))
        [2, -1]
    """
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    flat = torch.as_tensor(value).reshape(-1).tolist()
    return [int(v) for v in flat]


def as_int(value: Any) -> int:
    """A scalar (or one-element) shape-like input as a python int."""
    ints = as_ints(value)
    if ints is None or len(ints) != 1:
        raise ShapeError(f"expected a single integer, got {ints}; pass a scalar or a one-element tensor")
    return ints[0]


def as_tensor(value: Any) -> torch.Tensor:
    """``value`` as a tensor (numpy arrays and scalars are converted; tensors pass through unchanged)."""
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


def widen(x: torch.Tensor) -> torch.Tensor:
    """``x`` as int64 when its unsigned dtype lacks torch kernels (uint16/32/64); otherwise ``x`` itself.

    The bits survive (uint64 values above 2**63 wrap to negatives and come back with ``.to(torch.uint64)``), so this
    suits ops that move values; ops that compare them use `order_key`.
    """
    return x.to(torch.int64) if x.dtype in _SPARSE_SUPPORT else x


def order_key(x: torch.Tensor) -> torch.Tensor:
    """A tensor torch can compare whose order matches ``x``'s (uint64: sign bit flipped); undo with `from_order_key`.

    Example:
        >>> big = torch.tensor([2**63, 1], dtype=torch.uint64)
        >>> bool(order_key(big)[0] > order_key(big)[1])
        True
    """
    if x.dtype == torch.uint64:
        return x.view(torch.int64) ^ torch.iinfo(torch.int64).min
    return widen(x)


def from_order_key(key: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Values of ``dtype`` back from their `order_key`."""
    if dtype == torch.uint64:
        return (key ^ torch.iinfo(torch.int64).min).view(torch.uint64)
    return key.to(dtype)


def take(x: torch.Tensor, axis: int, indices: torch.Tensor) -> torch.Tensor:
    """``x`` indexed by int64 ``indices`` along ``axis`` (like ``index_select``, but for every dtype, any index rank).

    The indexed axis is replaced by the dimensions of ``indices``; differentiable and usable under ``vmap``.

    Example:
        >>> take(torch.arange(6).reshape(2, 3), 1, torch.tensor([2, 0]))
        tensor([[2, 0],
                [5, 3]])
    """
    return x[(slice(None),) * axis + (indices,)]
