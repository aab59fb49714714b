"""Gradients through dynamically quantized activations, so that masks before a quantized layer still learn.

``onnxruntime.quantization.quantize_dynamic`` puts a DynamicQuantizeLinear node in front of every quantized
matrix product: ``x -> (uint8 y, scale, zero point) -> MatMulInteger / ConvInteger / QAttention /
MatMulIntegerToFloat``. A uint8 tensor carries no gradient, so every weight before such a node would receive none
from the task loss (only a trace through the scale), and mask training would remove it for the regulariser's sake.

Where every reader of ``y`` is one of those integer products (reading it as their quantized input), `straighten`
gives the node a handler that returns ``y`` as float64 holding the same integers, with the gradient of
``x / scale + zero_point`` (the straight-through estimator; the scale is held constant); the products compute the
same exact integer sums from it. Anywhere else (a graph output, a Cast, a DequantizeLinear, a sub-graph) ``y`` stays uint8.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from .ops.contrib import MS_DOMAIN
from .ops.quantization import dynamic_quantize_linear
from .plan import Entry

#: (domain, op_type) -> the input index at which the product reads its quantized activation.
_INTEGER_PRODUCTS = {
    ("", "MatMulInteger"): 0,
    ("", "ConvInteger"): 0,
    (MS_DOMAIN, "MatMulIntegerToFloat"): 0,
    (MS_DOMAIN, "QAttention"): 0,
}


def straight_through_quantize(ctx: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DynamicQuantizeLinear whose ``y`` is float64 (same integer values) with a straight-through gradient.

    The scale is detached, so that ``(y - zero_point) * scale`` has the gradient of ``x`` itself.
    """
    with torch.no_grad():
        y, scale, zero_point = dynamic_quantize_linear(ctx, x.detach())
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    surrogate = x.to(torch.float64) / safe.to(torch.float64) + zero_point.to(torch.float64)
    return surrogate + (y.to(torch.float64) - surrogate).detach(), scale, zero_point


def straighten(entries: Sequence[Entry], keep: set[str], overridden: set[tuple[str, str]]) -> list[Entry]:
    """``entries`` with each DynamicQuantizeLinear whose ``y`` only integer products read given
    `straight_through_quantize`.

    Args:
        entries: one graph's nodes in execution order.
        keep: values read from outside these entries (the graph's outputs).
        overridden: the (domain, op_type) pairs whose handlers the caller supplied (left alone).
    """
    if ("", "DynamicQuantizeLinear") in overridden:
        return list(entries)
    readers: dict[str, list[bool]] = defaultdict(list)
    for e in entries:
        domain = "" if e.node.domain in ("", "ai.onnx") else e.node.domain
        slot = _INTEGER_PRODUCTS.get((domain, e.node.op_type))
        for index, name in enumerate(e.inputs):
            readers[name].append(slot == index and (domain, e.node.op_type) not in overridden)
        for name in e.outer:
            readers[name].append(False)
    result = []
    for e in entries:
        plain = e.node.op_type == "DynamicQuantizeLinear" and e.node.domain in ("", "ai.onnx")
        y = e.outputs[0] if plain and e.outputs else ""
        if y and y not in keep and readers.get(y) and all(readers[y]):
            e = e._replace(handler=straight_through_quantize)
        result.append(e)
    return result
