"""Where an ONNX file keeps its weights: initializers, ``Constant`` nodes, and the bodies of If/Loop/Scan.

Weights kept in ``Constant`` nodes become initializers, so that they are found, masked and written back.

Some exporters (paddle2onnx, OpenVINO's converter, graph optimizers that fold everything) keep every weight as a
``Constant`` node and no initializer. modscope finds weights among initializers (``roles.py``), so before that the
float Constant nodes holding more than one element are moved into the initializers of the graph they belong to (the
main graph or an If/Loop/Scan body), under the name of the Constant's output: the graph computes the same values,
``WeightInfo.source_name`` is that name, and the writer (``converters/export.py``) puts ablated values back into the
Constant node of the original file.

This is the semantics of onnx-ir's ``LiftConstantsToInitializersPass``; it is done here on the protobuf itself,
because that pass needs a full round trip of the model through onnx-ir's in-memory form (every tensor re-encoded,
other fields normalised), while this touches only the Constant nodes it moves.

Sub-graphs may reuse a name that another scope also gives an initializer (the two branches of an If each holding a
``weight``): every weight place gets a key unique in the whole model (`weight_places`), the loader renames the later
ones in its private copy (`make_names_unique`), and the writer finds the same places by the same keys.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import onnx

from .roles import subgraphs

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def constant_weight(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor of a Constant node that can be a weight (a float ``value`` with two or more elements), else None."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    if attr.name != "value" or attr.type != onnx.AttributeProto.TENSOR or attr.t.data_type not in _FLOAT_TYPES:
        return None
    return attr.t if math.prod(attr.t.dims) >= 2 else None


def graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every sub-graph in it (If/Loop/Scan bodies, at any depth)."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from graphs(sub)


def needs_rewrite(graph: onnx.GraphProto) -> bool:
    """Whether the loader must rewrite its copy of ``graph``: a weight kept in a Constant node, or a name that two
    scopes give an initializer (`lift_constant_weights`, `make_names_unique`)."""
    return any(not is_initializer or key != name for key, _, name, _, is_initializer in _keyed_places(graph))


def lift_constant_weights(graph: onnx.GraphProto) -> list[str]:
    """Move the weight-like Constant nodes of ``graph`` and its sub-graphs into initializers, in place.

    A Constant whose output is also a graph output stays (an output must be computed by a node).

    Returns:
        The names of the new initializers (the Constants' output names), in graph order.

    Example:
        >>> import numpy as np
        >>> from onnx import helper, numpy_helper
        >>> w = helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(np.ones((2, 2), np.float32)))
        >>> g = helper.make_graph([w, helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [], [])
        >>> lift_constant_weights(g), [n.op_type for n in g.node], [i.name for i in g.initializer]
        (['w'], ['MatMul'], ['w'])
    """
    lifted = []
    for g in list(graphs(graph)):
        outputs = {o.name for o in g.output}
        keep = []
        for node in g.node:
            tensor = constant_weight(node)
            if tensor is None or node.output[0] in outputs:
                keep.append(node)
                continue
            init = g.initializer.add()
            init.CopyFrom(tensor)
            init.name = node.output[0]
            lifted.append(init.name)
        if len(keep) != len(g.node):
            del g.node[:]
            g.node.extend(keep)
    return lifted


def _keyed_places(graph: onnx.GraphProto) -> Iterator[tuple[str, onnx.GraphProto, str, onnx.TensorProto, bool]]:
    """(key, graph, name in the file, tensor, whether an initializer) of every initializer and weight-like Constant,
    graph by graph, initializers first (the order the loader's lifting leaves them in). The key is the name, or
    ``name@N`` for the N-th later place with a name an earlier one already has."""
    taken: set[str] = set()
    for g in graphs(graph):
        found = [(init.name, init, True) for init in g.initializer]
        found += [(node.output[0], t, False) for node in g.node if (t := constant_weight(node)) is not None]
        for name, tensor, is_initializer in found:
            key = _unique(name, taken)
            taken.add(key)
            yield key, g, name, tensor, is_initializer


def weight_places(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Every tensor a weight may be loaded from, by its key (`_keyed_places`). Editing a tensor edits the proto."""
    return {key: tensor for key, _, _, tensor, _ in _keyed_places(graph)}


def make_names_unique(graph: onnx.GraphProto) -> dict[str, str]:
    """Rename, in place, initializers whose name another scope already uses (to their `weight_places` key), and the
    reads of them in their own graph and its sub-graphs. Returns {new name: name in the file}."""
    renamed = {}
    for key, g, name, tensor, is_initializer in list(_keyed_places(graph)):
        if key != name and is_initializer:
            tensor.name = key
            _rename_reads(g, name, key)
            renamed[key] = name
    return renamed


def _unique(name: str, taken: set[str]) -> str:
    key, n = name, 1
    while key in taken:
        key, n = f"{name}@{n}", n + 1
    return key


def _rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    for g in graphs(graph):
        for node in g.node:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new


@dataclass(frozen=True)
class Place:
    """Where one tensor that may be a weight is stored in the file.

    Attributes:
        key: its name in the model (`weight_places`' key; a weight's ``source_name``).
        where: "initializer" or "Constant node".
        in_subgraph: whether it belongs to an If/Loop/Scan body.
        shape: its dims. float: whether its elements are floating point.
    """

    key: str
    where: str
    in_subgraph: bool
    shape: tuple[int, ...]
    float: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def describe_places(graph: onnx.GraphProto) -> list[Place]:
    """Every initializer and weight-like Constant of the model with where it is stored (no tensor data is read)."""
    return [Place(key, "initializer" if is_initializer else "Constant node", g is not graph, tuple(tensor.dims),
                  tensor.data_type in _FLOAT_TYPES) for key, g, _, tensor, is_initializer in _keyed_places(graph)]
