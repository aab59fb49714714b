"""ONNX files rewritten the way some exporters write them: weights in Constant nodes, or inside an If branch."""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper


def as_constants(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Every float initializer of ``proto`` as a Constant node named after it, in front of the graph (Paddle style)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    inits = [i for i in out.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    consts = [helper.make_node("Constant", [], [i.name], value=i, name=f"const_{i.name}") for i in inits]
    kept = [i for i in out.graph.initializer if i.data_type != onnx.TensorProto.FLOAT]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    nodes = consts + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    onnx.checker.check_model(out)
    return out


def in_if_branch(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The Constant-weight graph moved into both branches of an If on a boolean input ``flag``."""
    flat = as_constants(proto)
    g = flat.graph

    def branch(name: str, scale: float) -> onnx.GraphProto:
        nodes = []
        for node in g.node:  # the else branch computes with other weights: the branches must not be confused
            node = onnx.NodeProto.FromString(node.SerializeToString())
            if node.op_type == "Constant" and node.attribute[0].t.data_type == onnx.TensorProto.FLOAT:
                value = numpy_helper.to_array(node.attribute[0].t)
                node.attribute[0].t.CopyFrom(numpy_helper.from_array((value * scale).astype(value.dtype)))
            nodes.append(node)
        return helper.make_graph(nodes, name, [], list(g.output), initializer=list(g.initializer))

    node = helper.make_node("If", ["flag"], [o.name for o in g.output], then_branch=branch("then", 1.0),
                            else_branch=branch("else", 0.5))
    flag = helper.make_tensor_value_info("flag", onnx.TensorProto.BOOL, [])
    graph = helper.make_graph([node], "g", [*g.input, flag], list(g.output))
    out = helper.make_model(graph, opset_imports=list(flat.opset_import))
    out.ir_version = flat.ir_version
    onnx.checker.check_model(out)
    return out
