"""Which ONNX initializers are weights, of what kind, and which layer each belongs to.

ONNX files do not say which tensors were trained: an initializer may be a convolution kernel, a BatchNorm running
mean, an attention mask or a shape. modscope decides from how the graph *uses* each float initializer, following it
through data-movement nodes (Transpose, Reshape, Slice, Cast ...) to the node that computes with it:

==========================================  ============================================================
use                                         kind
==========================================  ============================================================
Conv/ConvTranspose/DeformConv W, Gemm A/B,  "weight"
MatMul and Einsum operands, RNN/GRU/LSTM
W/R/P, PRelu slope
Conv B, Gemm C, RNN B                       "bias"
Batch/Instance/Layer/Group/RMS norm scale   "norm" (their bias: "bias"; BatchNorm mean/var: buffers)
Gather data                                 "embedding"
Concat with activations                     "embedding" (a learned token, e.g. a class token)
Add/Sub                                     "bias" when at most one dimension is longer than 1, else
                                            "embedding" (a positional table)
Mul                                         "norm" when at most one dimension is longer than 1, else
                                            "weight"
==========================================  ============================================================

Add/Sub/Mul make a weight only of a tensor with more than one element, or of a one-element bias added straight
after a weight-carrying node (the bias of a one-output Linear). Rank-0 scalars, integer tensors and every other use
(shapes, axes, Resize scales, Clip bounds, Pow exponents ...) stay buffers.

Layers: a weight belongs to the node that computes with it (its *anchor*); a bias added after a weight-carrying
node joins that node's layer, so a MatMul and its Add share one. The layer is named after the common dotted prefix
of its initializers (``fc1.weight`` + ``fc1.bias`` -> ``fc1``), else after the anchor node's scope
(``/encoder/fc1/MatMul`` -> ``encoder/fc1``), else after the node or its first output.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import onnx

from ...model import WeightKind
from .ops.contrib import contrib_input_roles

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}

#: nodes that move data without computing with it: a weight is followed through their first input.
_PASS_THROUGH = {
    "Identity", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Expand", "Cast", "CastLike",
    "Tile", "Split",
}

_NORM_ROLES: dict[int, WeightKind] = {1: "norm", 2: "bias"}
_RNN_ROLES: dict[int, WeightKind] = {1: "weight", 2: "weight", 3: "bias", 7: "weight"}
_CONV_ROLES: dict[int, WeightKind] = {1: "weight", 2: "bias"}

#: (op_type -> input index -> kind) for operators whose inputs have a fixed meaning.
_INPUT_ROLES: dict[str, dict[int, WeightKind]] = {
    "Conv": _CONV_ROLES,
    "ConvTranspose": _CONV_ROLES,
    "DeformConv": {1: "weight", 3: "bias"},
    "Gemm": {0: "weight", 1: "weight", 2: "bias"},
    "MatMul": {0: "weight", 1: "weight"},
    "LSTM": _RNN_ROLES,
    "GRU": _RNN_ROLES,
    "RNN": _RNN_ROLES,
    "BatchNormalization": _NORM_ROLES,
    "InstanceNormalization": _NORM_ROLES,
    "LayerNormalization": _NORM_ROLES,
    "GroupNormalization": _NORM_ROLES,
    "RMSNormalization": {1: "norm"},
    "Gather": {0: "embedding"},
    "PRelu": {1: "weight"},
    "MatMulInteger": {1: "weight"},
    "ConvInteger": {1: "weight"},
    "QLinearMatMul": {3: "weight"},
    "QLinearConv": {3: "weight", 8: "bias"},
}

_ELEMENTWISE = {"Add", "Sub", "Mul"}


@dataclass(frozen=True)
class WeightRole:
    """How the graph uses one weight initializer.

    Attributes:
        kind: "weight", "bias", "norm" or "embedding".
        layer: the layer it belongs to (shared by a weight and its bias).
        node: the name (or first output) of the node that computes with it.
    """

    kind: WeightKind
    layer: str
    node: str


def find_weights(graph: onnx.GraphProto, *, quantized: Mapping[str, Any] | None = None) -> dict[str, WeightRole]:
    """The float initializers that act as weights, in the order the graph first uses them.

    Args:
        graph: the main graph; sub-graphs (If/Loop/Scan bodies) and their initializers are included.
        quantized: integer initializers that load as dequantized float weights (``quantized.py``), by name. A
            DequantizeLinear node passes such a weight through, so its role comes from how the dequantized value
            is used; QLinear and integer matmul/conv operators read it directly.

    Returns:
        initializer name -> `WeightRole`. Initializers not listed are buffers.

    Example:
        >>> from onnx import helper, numpy_helper
        >>> import numpy as np
        >>> w = numpy_helper.from_array(np.ones((3, 2), np.float32), "fc.weight")
        >>> b = numpy_helper.from_array(np.zeros(2, np.float32), "fc.bias")
        >>> nodes = [helper.make_node("MatMul", ["x", "fc.weight"], ["h"], name="/fc/MatMul"),
        ...          helper.make_node("Add", ["h", "fc.bias"], ["y"], name="/fc/Add")]
        >>> g = helper.make_graph(nodes, "g", [], [], initializer=[w, b])
        >>> {k: (r.kind, r.layer) for k, r in find_weights(g).items()}
        {'fc.weight': ('weight', 'fc'), 'fc.bias': ('bias', 'fc')}
    """
    quantized = quantized or {}
    inits = {t.name: t for t in all_initializers(graph) if t.data_type in _FLOAT_TYPES or t.name in quantized}
    origin: dict[str, str] = {name: name for name in inits}  # value -> the initializer it carries
    producer: dict[str, int] = {}
    anchor: dict[int, int] = {}  # weight-carrying node -> the node whose layer it belongs to
    found: dict[str, tuple[WeightKind, int]] = {}
    nodes = list(walk_nodes(graph))
    for index, node in enumerate(nodes):
        for out in node.output:
            producer[out] = index
        dequantizes = node.op_type == "DequantizeLinear" and node.input and node.input[0] in quantized
        if (node.op_type in _PASS_THROUGH or dequantizes) and node.input and node.input[0] in origin:
            for out in node.output:
                origin[out] = origin[node.input[0]]
            continue
        for slot, name in enumerate(node.input):
            init_name = origin.get(name)
            if init_name is None or init_name in found:
                continue
            role = _role(node, slot, inits[init_name], _anchor_before(node, slot, producer, anchor, nodes))
            if role is None:
                continue
            kind, owner = role
            owner = index if owner is None else owner
            anchor.setdefault(index, anchor.get(owner, owner))
            found[init_name] = (kind, anchor[index])
    return _name_layers(found, nodes)


def _role(
    node: onnx.NodeProto, slot: int, init: onnx.TensorProto, after: tuple[int, bool] | None
) -> tuple[WeightKind, int | None] | None:
    """(kind, anchor node or None for this node) when input ``slot`` of ``node`` uses ``init`` as a weight.

    ``after``: the layer of the weight-carrying node that computed the other operand, and whether that node is a
    linear one (MatMul, Gemm, Conv ...) rather than an element-wise one.
    """
    op = node.op_type if node.domain in ("", "ai.onnx") else ""
    roles = _INPUT_ROLES.get(op) or contrib_input_roles(node.domain, node.op_type)
    if roles is not None:
        kind = roles.get(slot)
        return (kind, None) if kind else None
    if op == "Einsum":
        return "weight", None
    numel = 1
    for d in init.dims:
        numel *= d
    long_dims = sum(d > 1 for d in init.dims)
    if op == "Concat" and numel > 1:
        return "embedding", None
    if op not in _ELEMENTWISE or not init.dims:
        return None
    if op in ("Add", "Sub") and (numel > 1 or after is not None and after[1]):
        return ("bias" if long_dims <= 1 else "embedding"), after[0] if after else None
    if op == "Mul" and numel > 1:
        return ("norm" if long_dims <= 1 else "weight"), None
    return None


def _anchor_before(
    node: onnx.NodeProto, slot: int, producer: dict[str, int], anchor: dict[int, int], nodes: list[onnx.NodeProto]
) -> tuple[int, bool] | None:
    """The layer of the weight-carrying node that computed the *other* operand of a two-input node, and whether
    that node is a linear one; None when no weight-carrying node did."""
    if len(node.input) != 2:
        return None
    value = node.input[1 - slot]
    for _ in range(4):  # a bias may follow a Reshape/Transpose of the weighted result
        index = producer.get(value)
        if index is None:
            return None
        if index in anchor:
            return anchor[index], nodes[index].op_type not in _ELEMENTWISE
        if nodes[index].op_type not in _PASS_THROUGH or not nodes[index].input:
            return None
        value = nodes[index].input[0]
    return None


def _name_layers(found: dict[str, tuple[WeightKind, int]], nodes: list[onnx.NodeProto]) -> dict[str, WeightRole]:
    members: dict[int, list[str]] = {}
    for name, (_, owner) in found.items():
        members.setdefault(owner, []).append(name)
    layer = {owner: _layer_name(nodes[owner], names) for owner, names in members.items()}
    return {
        name: WeightRole(kind, layer[owner], nodes[owner].name or nodes[owner].output[0])
        for name, (kind, owner) in found.items()
    }


def _layer_name(node: onnx.NodeProto, names: list[str]) -> str:
    prefixes = {name.rsplit(".", 1)[0] for name in names if "." in name.strip(".")}
    if len(prefixes) == 1:
        return prefixes.pop()
    scope = node.name.strip("/")
    if "/" in scope:
        return scope.rsplit("/", 1)[0]
    return scope or (node.output[0] if node.output else names[0])


def walk_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of its sub-graphs, each sub-graph right after the node that owns it."""
    for node in graph.node:
        yield node
        for sub in subgraphs(node):
            yield from walk_nodes(sub)


def all_initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for sub in subgraphs(node):
            yield from all_initializers(sub)


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs held in a node's attributes (If branches, Loop/Scan bodies)."""
    found = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            found.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            found.extend(attr.graphs)
    return found
