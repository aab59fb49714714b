"""ONNX sequences and optionals.

A sequence value is a python ``list`` of tensors and an optional value is either its element or ``None`` (empty),
as `OnnxGraphModule` passes them between nodes. Handlers never mutate a list they receive: each op that changes a
sequence returns a new list, so a sequence used by two nodes stays intact.
"""

from __future__ import annotations

from typing import Any

import torch

from ....errors import DataError, InvalidParameterError, ShapeError
from .shape import split_sizes, split_tensor
from .util import as_int, as_ints, as_tensor, normalize_axis
from ..registry import NodeContext, OpSet

ops = OpSet()


def _sequence(ctx: NodeContext, value: Any) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise InvalidParameterError(f"{ctx.op_type} needs a sequence (python list), got {type(value).__name__}")
    return list(value)


def _position(position: Any, length: int, *, allow_end: bool) -> int:
    """A sequence position in ``[-length, length)`` (or up to ``length`` inclusive when ``allow_end``) made >= 0."""
    pos = as_int(position)
    upper = length if allow_end else length - 1
    if not -length <= pos <= upper:
        raise ShapeError(f"sequence position {pos} is out of range for a sequence of length {length}")
    return pos + length if pos < 0 else pos


@ops.register("SequenceConstruct", since=11)
def sequence_construct(ctx: NodeContext, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(tensors)


@ops.register("SequenceEmpty", since=11)
def sequence_empty(ctx: NodeContext) -> list[torch.Tensor]:
    return []


@ops.register("SequenceAt", since=11)
def sequence_at(ctx: NodeContext, sequence: list[Any], position: Any) -> Any:
    items = _sequence(ctx, sequence)
    return items[_position(position, len(items), allow_end=False)]


@ops.register("SequenceInsert", since=11)
def sequence_insert(ctx: NodeContext, sequence: list[Any], tensor: Any, position: Any = None) -> list[Any]:
    items = _sequence(ctx, sequence)
    items.insert(len(items) if position is None else _position(position, len(items), allow_end=True), tensor)
    return items


@ops.register("SequenceErase", since=11)
def sequence_erase(ctx: NodeContext, sequence: list[Any], position: Any = None) -> list[Any]:
    items = _sequence(ctx, sequence)
    del items[-1 if position is None else _position(position, len(items), allow_end=False)]
    return items


@ops.register("SequenceLength", since=11)
def sequence_length(ctx: NodeContext, sequence: list[Any]) -> torch.Tensor:
    return torch.tensor(len(_sequence(ctx, sequence)), dtype=torch.int64)


@ops.register("SplitToSequence", since=11)
def split_to_sequence(ctx: NodeContext, x: torch.Tensor, split: Any = None) -> list[torch.Tensor]:
    axis = normalize_axis(ctx.attr("axis", 0), x.dim())
    length = x.shape[axis]
    if split is None:
        pieces = split_tensor(x, axis, [1] * length)
        return [p.squeeze(axis) for p in pieces] if not ctx.attr("keepdims", 1) else list(pieces)
    if as_tensor(split).dim() == 0:
        chunk = as_int(split)
        if chunk <= 0:
            raise InvalidParameterError(f"SplitToSequence split must be positive, got {chunk}")
        return list(split_tensor(x, axis, split_sizes(length, -(-length // chunk))))
    return list(split_tensor(x, axis, as_ints(split)))


@ops.register("ConcatFromSequence", since=11)
def concat_from_sequence(ctx: NodeContext, sequence: list[Any]) -> torch.Tensor:
    items = [as_tensor(t) for t in _sequence(ctx, sequence)]
    if not items:
        raise ShapeError("ConcatFromSequence got an empty sequence; it needs at least one tensor")
    if ctx.attr("new_axis", 0):
        return torch.stack(items, dim=normalize_axis(ctx.attr("axis"), items[0].dim() + 1))
    return torch.cat(items, dim=normalize_axis(ctx.attr("axis"), items[0].dim()))


@ops.register("SequenceMap", since=17)
def sequence_map(ctx: NodeContext, sequence: list[Any], *others: Any) -> tuple[list[Any], ...]:
    items = _sequence(ctx, sequence)
    for other in others:
        if isinstance(other, (list, tuple)) and len(other) != len(items):
            raise ShapeError(f"SequenceMap sequences have different lengths ({len(items)} and {len(other)})")
    body = ctx.attr("body")
    outputs: list[list[Any]] = [[] for _ in body.output]
    for i, item in enumerate(items):
        args = [item] + [o[i] if isinstance(o, (list, tuple)) else o for o in others]
        for collected, value in zip(outputs, ctx.run_graph(body, args, ctx.env)):
            collected.append(value)
    return tuple(outputs)


@ops.register("Optional", since=15)
def optional(ctx: NodeContext, value: Any = None) -> Any:
    return value


@ops.register("OptionalHasElement", since=15)
def optional_has_element(ctx: NodeContext, value: Any = None) -> torch.Tensor:
    return torch.tensor(value is not None)


@ops.register("OptionalGetElement", since=15)
def optional_get_element(ctx: NodeContext, value: Any = None) -> Any:
    if value is None:
        raise DataError("OptionalGetElement got an empty optional; guard it with OptionalHasElement and an If node")
    return value
