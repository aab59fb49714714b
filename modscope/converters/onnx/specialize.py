"""Fast paths for data-movement nodes whose parameters are known when the model loads.

Exported transformers spend most of their nodes on moving data: a small encoder layer has a dozen Reshape,
Transpose and Gather nodes for a handful of matrix products. The general handlers re-read and check their
parameters (a target shape, a permutation, an index) on every call. When those parameters are attributes or
constants, the step can instead call the single torch view operation with the parameters decoded once:

=============================================  ===========================================
node                                           step
=============================================  ===========================================
Transpose with a ``perm`` attribute            ``x.permute(perm)``
Reshape to a constant shape without zeros      ``x.reshape(shape)`` (a -1 is inferred alike)
Gather with a constant scalar index            ``x.select(axis, index)`` (negative counts from the end)
=============================================  ===========================================

Each computes exactly what the ONNX operator specifies, for every dtype, differentiably and under
``torch.func.vmap``; an invalid input fails inside torch and is reported with the node's name like any other
failure. Nodes whose operator the caller replaced (``op_handlers``) keep the caller's handler.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .plan import Entry


class Permute:
    """``x.permute(perm)``."""

    __slots__ = ("perm",)

    def __init__(self, perm: tuple[int, ...]):
        self.perm = perm

    def __call__(self, ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.permute(self.perm)


class ReshapeTo:
    """``x.reshape(shape)`` for a fixed target shape."""

    __slots__ = ("shape",)

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape

    def __call__(self, ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.shape)


class Select:
    """``x.select(axis, index)``: Gather with a scalar index."""

    __slots__ = ("axis", "index")

    def __init__(self, axis: int, index: int):
        self.axis, self.index = axis, index

    def __call__(self, ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.select(self.axis, self.index)


def specialize(entry: Entry, constants: Mapping[str, torch.Tensor], overridden: set[tuple[str, str]]) -> Entry:
    """``entry`` with a fast handler when its node is one of the table's cases, else ``entry`` unchanged.

    Args:
        entry: a node ready to be planned.
        constants: values fixed at load time (constant initializers and folded nodes; never weights).
        overridden: the (domain, op_type) pairs whose handlers the caller supplied.
    """
    node, ctx = entry.node, entry.ctx
    op = node.op_type
    if node.domain not in ("", "ai.onnx") or ("", op) in overridden or len(entry.outputs) != 1:
        return entry
    if op == "Transpose" and ctx.attr("perm") is not None and len(entry.inputs) == 1:
        return entry._replace(handler=Permute(tuple(ctx.attr("perm"))))
    if op == "Reshape" and len(entry.inputs) == 2:
        target = _int_constant(constants, entry.inputs[1], rank=1)
        if target is not None and 0 not in target:
            return entry._replace(inputs=entry.inputs[:1], handler=ReshapeTo(tuple(target)))
    if op == "Gather" and len(entry.inputs) == 2:
        index = _int_constant(constants, entry.inputs[1], rank=0)
        if index is not None:
            return entry._replace(inputs=entry.inputs[:1], handler=Select(ctx.attr("axis", 0), index))
    return entry


def _int_constant(constants: Mapping[str, torch.Tensor], name: str, *, rank: int) -> Any:
    value = constants.get(name)
    if value is None or value.dtype not in (torch.int64, torch.int32) or value.dim() != rank:
        return None
    return value.tolist()
