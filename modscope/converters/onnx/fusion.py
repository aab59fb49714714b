"""Fusing node patterns into one torch call, for speed.

Exporters write a linear layer as ``MatMul(x, W)`` followed by ``Add(., b)``. Run as two steps, the product is
written out and read back to add the bias; ``torch.nn.functional.linear`` does both in one BLAS call (addmm), which
is what the native torch module does. The fused step computes the same function, is differentiable in ``x``, ``W``
and ``b`` alike, and works under ``torch.func.vmap`` with batched weights.

A pair is fused only when the product feeds nothing but the Add (not a graph output, not a sub-graph), ``W`` is a
2-D float weight or constant and ``b`` a 1-D one of matching length, so the result has exactly the shape and
values of the unfused pair. Callers skip fusion when the user replaced the MatMul or Add handler.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from .plan import Entry


def linear(ctx: object, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x @ weight + bias`` in one call (``weight``: (K, N), ``bias``: (N,))."""
    return F.linear(x, weight.mT, bias)


def fuse_linear(entries: Sequence[Entry], shapes: Mapping[str, tuple[int, ...]], *, keep: set[str]) -> list[Entry]:
    """``entries`` with each fusable MatMul + Add pair replaced by one `linear` entry.

    Args:
        entries: the nodes in execution order.
        shapes: the shapes of the float values known before the run (weights and constants), by name.
        keep: values that must stay visible (the graph's outputs).
    """
    uses = Counter(name for e in entries for name in (*e.inputs, *e.outer) if name)
    uses.update(keep)
    consumer = {name: i for i, e in enumerate(entries) for name in e.inputs if name}
    fused: list[Entry] = []
    absorbed: set[int] = set()
    for i, entry in enumerate(entries):
        if i in absorbed:
            continue
        target = _bias_add(entry, entries, consumer, uses, shapes)
        if target is None:
            fused.append(entry)
            continue
        add, bias = target
        absorbed.add(add)
        x, weight = entry.inputs
        fused.append(Entry(entry.node, [x, weight, bias], list(entries[add].outputs), linear, entry.ctx, frozenset()))
    return fused


def _bias_add(
    entry: Entry,
    entries: Sequence[Entry],
    consumer: dict[str, int],
    uses: Counter,
    shapes: Mapping[str, tuple[int, ...]],
) -> tuple[int, str] | None:
    """(index of the Add, name of the bias) when ``entry`` is a MatMul whose only reader adds a fitting bias."""
    if not _is_default(entry, "MatMul") or len(entry.inputs) != 2 or len(entry.outputs) != 1:
        return None
    weight_shape = shapes.get(entry.inputs[1])
    product = entry.outputs[0]
    if weight_shape is None or len(weight_shape) != 2 or uses[product] != 1 or product not in consumer:
        return None
    add_index = consumer[product]
    add = entries[add_index]
    if not _is_default(add, "Add") or len(add.inputs) != 2:
        return None
    bias = add.inputs[1] if add.inputs[0] == product else add.inputs[0]
    if bias == product or shapes.get(bias) != (weight_shape[1],):
        return None
    return add_index, bias


def _is_default(entry: Entry, op_type: str) -> bool:
    return entry.node.op_type == op_type and entry.node.domain in ("", "ai.onnx") and entry.handler is not linear
