"""Reusing shape arithmetic between calls.

Exporters often compute shapes at run time: ``Shape(x)`` followed by Gather, Slice, Concat, Cast, Sqrt ... feeding
a Reshape or an attention scale. These values depend only on the shapes of the tensors that reach the ``Shape``
nodes and on constants, so while the input shapes stay the same they stay the same too. Each such node keeps its
last result: a ``Shape``/``Size`` node reuses it when its input has the same shape, any other node when its inputs
are the very same tensor objects, unmodified (checked through torch's version counters), as last time. Since the
nodes upstream hand back the same objects, a whole chain is skipped at the cost of a few comparisons.

Nothing here reads tensor values, so a node whose result depends on data (NonZero, a value-dependent Reshape) is
never reached from a ``Shape`` node alone and is never cached. Weights are never treated as constants, since an
optimizer may update them in place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .plan import Entry
from .registry import NONDETERMINISTIC_OPS

_ROOTS = {"Shape", "Size"}


class ShapeCached:
    """A handler wrapper that returns the previous result while the inputs are unchanged."""

    __slots__ = ("handler", "by_shape", "last")

    def __init__(self, handler: Callable[..., Any], *, by_shape: bool):
        self.handler = handler
        self.by_shape = by_shape
        self.last: tuple | None = None  # (key, result, versions of the result's tensors, inputs held)

    def __call__(self, ctx: Any, *args: Any) -> Any:
        if self.by_shape:
            key: tuple = tuple(args[0].shape)
        else:
            key = tuple((id(a), getattr(a, "_version", 0)) for a in args)
        last = self.last
        if last is not None and last[0] == key and _versions(last[1]) == last[2]:
            return last[1]
        result = self.handler(ctx, *args)
        outputs = result if isinstance(result, tuple) else (result,)
        if all(isinstance(t, torch.Tensor) and not t.requires_grad for t in outputs):
            # holding the (small, shape-derived) inputs keeps their ids from being reused by other tensors;
            # a Shape node's input is an activation and is not held
            self.last = (key, result, _versions(result), None if self.by_shape else args)
        return result


def _versions(result: Any) -> tuple:
    if isinstance(result, tuple):
        return tuple(t._version for t in result)
    return (result._version,)


def cache_shape_arithmetic(entries: Sequence[Entry], constants: set[str]) -> list[Entry]:
    """``entries`` with the handlers of shape-only nodes wrapped in `ShapeCached`.

    Args:
        entries: the nodes in execution order.
        constants: values that stay fixed between calls (constant buffers, not weights).
    """
    shape_only: set[str] = set()
    out: list[Entry] = []
    for entry in entries:
        op = entry.node.op_type if entry.node.domain in ("", "ai.onnx") else ""
        names = [n for n in entry.inputs if n]
        if entry.outer or op in NONDETERMINISTIC_OPS or not op:
            cached = False
        elif op in _ROOTS:
            cached = len(names) == 1
        else:
            cached = any(n in shape_only for n in names) and all(n in shape_only or n in constants for n in names)
        if cached:
            shape_only.update(n for n in entry.outputs if n)
            entry = entry._replace(handler=ShapeCached(entry.handler, by_shape=op in _ROOTS))
        out.append(entry)
    return out
