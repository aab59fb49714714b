"""Constants and identity-like nodes."""

from __future__ import annotations

import math
from typing import Any

import onnx
import torch
from onnx import numpy_helper

from ....errors import ModelLoadError
from ..registry import NodeContext, OpSet, tensor_from_proto

ops = OpSet()

#: Constant's scalar/list attributes -> the dtype of the tensor they make.
_LITERALS = {
    "value_float": torch.float32,
    "value_floats": torch.float32,
    "value_int": torch.int64,
    "value_ints": torch.int64,
}


def sparse_to_dense(proto: onnx.SparseTensorProto) -> torch.Tensor:
    """A SparseTensorProto as a dense tensor (absent entries are zero).

    Args:
        proto: ``values`` (NNZ,) with ``indices`` either (NNZ,) linear positions or (NNZ, rank) coordinates.

    Returns:
        The dense tensor of shape ``proto.dims`` and the values' dtype.

    Raises:
        ModelLoadError: the indices do not fit the declared shape.
    """
    values = tensor_from_proto(proto.values).reshape(-1)
    indices = torch.from_numpy(numpy_helper.to_array(proto.indices).astype("int64"))
    dims = list(proto.dims)
    if indices.dim() == 2:  # coordinates -> linear positions, row-major
        strides = torch.tensor([math.prod(dims[i + 1 :]) for i in range(len(dims))], dtype=torch.int64)
        indices = (indices * strides).sum(-1)
    dense = torch.zeros(math.prod(dims), dtype=values.dtype)
    if indices.numel() != values.numel() or (
        indices.numel() and not 0 <= int(indices.min()) <= int(indices.max()) < dense.numel()
    ):
        raise ModelLoadError(f"sparse constant with shape {dims} has indices that do not match its values or shape")
    dense[indices.reshape(-1)] = values
    return dense.reshape(dims)


@ops.register("Constant")
def constant(ctx: NodeContext) -> Any:
    """The node's value: a tensor, a dense copy of a sparse tensor, or strings passed through unchanged.

    String values (``value_string(s)``, string tensors) have no torch type; they are returned as python/numpy
    objects so that a graph which only passes them along still loads.
    """
    if "value" in ctx.attrs:
        value = ctx.attrs["value"]
        return value.clone() if isinstance(value, torch.Tensor) else value
    if "sparse_value" in ctx.attrs:
        return sparse_to_dense(ctx.attrs["sparse_value"])
    for key, dtype in _LITERALS.items():
        if key in ctx.attrs:
            return torch.tensor(ctx.attrs[key], dtype=dtype)
    for key in ("value_string", "value_strings"):
        if key in ctx.attrs:
            return ctx.attrs[key]
    raise ModelLoadError(f"Constant node '{ctx.name}' has no value attribute; give it one of value, value_float(s) ...")


@ops.register("Identity")
def identity(ctx: NodeContext, x: Any) -> Any:
    return x
