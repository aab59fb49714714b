"""Bounded work on ONNX input: the per-tensor limit and how to set it, output sizes predicted before computing,
the constant-folding budget, dead nodes, and a topological sort that is linear in the graph."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from onnx.backend.test.case.node import collect_testcases

import modscope
from modscope.converters.onnx import compiler, make_table
from modscope.converters.onnx.limits import parse_bytes, resolve_max_tensor_bytes
from modscope.converters.onnx.loader import load_onnx
from modscope.converters.onnx.plan import order_nodes
from modscope.converters.onnx.registry import NodeContext, _norm_domain, decode_attribute
from modscope.converters.onnx.sizes import RULES, rule_size
from modscope.converters.onnx.tensors import numpy_to_torch
from modscope.errors import InvalidParameterError, ModelLoadError, ResourceLimitError

sys.path.insert(0, str(Path(__file__).parent))

import onnx_hostile as hostile  # noqa: E402


def _const_of_shape(shape: list[int]) -> onnx.ModelProto:
    """y = x + sum(ConstantOfShape(shape)): a constant node of prod(shape) float32 elements."""
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["z"], name="zeros")]
    return hostile._model(hostile._plus_x(nodes, "z"), [hostile._x()], [hostile._y()], [hostile._i64("shape", shape)])


def _expand_input(shape: list[int]) -> onnx.ModelProto:
    """y = x + sum(Expand(x, shape)): sized only when the model runs."""
    nodes = [helper.make_node("Expand", ["x", "shape"], ["e"], name="grow")]
    return hostile._model(hostile._plus_x(nodes, "e"), [hostile._x([1, 1])], [hostile._y()],
                          [hostile._i64("shape", shape)])


# -- the limit and how to set it -----------------------------------------------------------------------------------
def test_a_constant_node_over_the_limit_fails_the_load_naming_it():
    model = _const_of_shape([1024, 1024])  # 4 MiB
    assert load_onnx(model).module(torch.ones(1, 4)).shape == (1, 4)
    with pytest.raises(ResourceLimitError, match=r"node 'zeros' \(ConstantOfShape\).*1,048,576 elements \(4\.0 MiB\)"):
        load_onnx(model, max_tensor_bytes="1MiB")


def test_the_environment_variable_sets_the_limit(monkeypatch):
    monkeypatch.setenv("MODSCOPE_MAX_TENSOR_BYTES", "1MB")
    with pytest.raises(ResourceLimitError, match="limit of 976.6 KiB"):
        modscope.load(_const_of_shape([1024, 1024]))
    assert modscope.load(_const_of_shape([1024, 1024]), max_tensor_bytes=8 << 20).module(torch.ones(1, 4)).shape == (1, 4)
    monkeypatch.setenv("MODSCOPE_MAX_TENSOR_BYTES", "lots")
    with pytest.raises(InvalidParameterError, match="MODSCOPE_MAX_TENSOR_BYTES='lots' is not a size"):
        modscope.load(_const_of_shape([2]))


def test_a_forward_pass_over_the_limit_fails_naming_the_node():
    model = load_onnx(_expand_input([1024, 1024]), max_tensor_bytes=1 << 20)
    with pytest.raises(ResourceLimitError, match=r"node 'grow' \(Expand\) would make a tensor of 1,048,576 elements"):
        model.module(torch.ones(1, 1))
    fine = load_onnx(_expand_input([1024, 1024]))
    assert float(fine.module(torch.ones(1, 1))) == 1 + 1024 * 1024


@pytest.mark.parametrize(("text", "value"), [("123", 123), ("512MB", 512 * 10**6), ("1.5GiB", 3 << 29), ("2 kib", 2048)])
def test_sizes_are_parsed_with_units(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad", ["", "-1", "0", "12 parsecs", "1e9"])
def test_bad_sizes_are_refused(bad):
    with pytest.raises(InvalidParameterError):
        parse_bytes(bad)
    with pytest.raises(InvalidParameterError):
        resolve_max_tensor_bytes(-5)


# -- predicted sizes agree with what the operators make -----------------------------------------------------------
#: rules that give the exact size (the others give an upper bound).
_EXACT = {"Range", "Tile", "Expand", "ConstantOfShape", "Pad", "CenterCropPad", "OneHot", "HannWindow",
          "HammingWindow", "BlackmanWindow", "MelWeightMatrix", "Col2Im", "AffineGrid", "Constant"}


def _rule_cases():
    table = make_table(None)
    for case in collect_testcases():
        node = case.model.graph.node[0] if len(case.model.graph.node) == 1 else None
        if node is None or node.op_type not in RULES or _norm_domain(node.domain) != "":
            continue
        opset = {o.domain: o.version for o in case.model.opset_import}.get(node.domain, 1)
        handler = table.lookup("", node.op_type, opset)
        if handler is not None:
            yield pytest.param(case, node, opset, handler, id=case.name)


@pytest.mark.parametrize(("case", "node", "opset", "handler"), list(_rule_cases()))
def test_rules_size_the_conformance_cases(case, node, opset, handler):
    ctx = NodeContext(node=node, opset=opset, attrs={a.name: decode_attribute(a) for a in node.attribute},
                      run_graph=None)
    feeds = dict(zip([i.name for i in case.model.graph.input], case.data_sets[0][0]))
    args = [numpy_to_torch(np.array(feeds[name])) if name else None for name in node.input]
    try:
        real = handler(ctx, *args)
    except Exception as exc:  # noqa: BLE001 - cases modscope does not run are sized by no one
        pytest.skip(f"the handler does not run this case: {exc}")
    results = real if isinstance(real, tuple) else (real,)
    numel = sum(r.numel() for r in results)
    size = rule_size(ctx, args)
    assert size is not None
    if node.op_type in _EXACT:
        assert size.numel == numel
    else:
        assert numel <= size.numel <= max(4 * numel, 64)


# -- constant folding: dead nodes, the budget, intermediate results ---------------------------------------------------
def test_dead_nodes_are_neither_folded_nor_run():
    model = load_onnx(hostile.dead_bombs())
    ops = [step.ctx.node.op_type for step in model.module._main.steps]
    assert ops == ["Relu"]
    assert not list(model.module.consts.buffers(recurse=False)) or all(
        b.numel() <= 4 for b in model.module.consts.buffers())
    assert torch.equal(model.module(torch.tensor([[-1.0, 2, -3, 4]])), torch.tensor([[0.0, 2, 0, 4]]))


def test_folding_stops_at_its_budget_and_the_rest_runs_with_the_model(monkeypatch):
    monkeypatch.setattr(compiler, "FOLD_BUDGET_BYTES", 1 << 20)
    proto = hostile.fold_chain(n=10, numel=1 << 16)  # 256 KiB per Cos
    model = load_onnx(proto)
    kept = sum(b.numel() * b.element_size() for n, b in model.module.consts.named_buffers() if n.startswith("folded_"))
    assert kept <= 1 << 20
    assert sum(step.ctx.node.op_type == "Cos" for step in model.module._main.steps) >= 6
    expected = sum(_cos_iter(i) for i in range(11)) * (1 << 16)
    assert float(model.module(torch.zeros(1, 4))[0, 0]) == pytest.approx(expected, rel=1e-5)


def _cos_iter(i: int) -> float:
    value = 0.0
    for _ in range(i):
        value = math.cos(value)
    return value


def test_only_folded_values_something_reads_are_kept():
    nodes = [helper.make_node("Range", ["start", "limit", "delta"], ["r"]),
             helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["rf", "two"], ["r2"])]
    inits = [*hostile._scalars(start=0, limit=1000, delta=1), hostile._f32("two", [2.0])]
    model = load_onnx(hostile._model(hostile._plus_x(nodes, "r2"), [hostile._x()], [hostile._y()], inits))
    folded = [b for name, b in model.module.consts.named_buffers() if name.startswith("folded_")]
    assert [b.numel() for b in folded] == [1]  # the sum; not the range, its cast or its double
    assert float(model.module(torch.zeros(1, 4))[0, 0]) == 2 * sum(range(1000))


# -- the topological sort ------------------------------------------------------------------------------------------
def test_a_reversed_chain_of_3000_nodes_loads_in_well_under_a_second():
    proto = hostile.reversed_chain(3000)
    load_onnx(hostile.reversed_chain(10))  # warm the imports
    start = time.process_time()
    model = load_onnx(proto)
    assert time.process_time() - start < 1.0
    assert torch.equal(model.module(torch.tensor([[-1.0, 2, -3, 4]])), torch.tensor([[0.0, 2, 0, 4]]))


def test_the_sort_keeps_the_file_order_among_ready_nodes_and_names_cycles():
    a = helper.make_node("Relu", ["x"], ["a"], name="a")
    b = helper.make_node("Relu", ["x"], ["b"], name="b")
    c = helper.make_node("Add", ["a", "b"], ["c"], name="c")
    reads = lambda n: [i for i in n.input if i]  # noqa: E731
    assert [n.name for n in order_nodes([c, b, a], {"x"}, reads)] == ["b", "a", "c"]
    assert [n.name for n in order_nodes([a, b, c], {"x"}, reads)] == ["a", "b", "c"]
    loop1 = helper.make_node("Relu", ["q"], ["p"], name="p")
    loop2 = helper.make_node("Relu", ["p"], ["q"], name="q")
    with pytest.raises(ModelLoadError, match="form a cycle"):
        order_nodes([a, loop1, loop2], {"x"}, reads)
    with pytest.raises(ModelLoadError, match="reads 'nowhere', but nothing in the graph defines it"):
        order_nodes([helper.make_node("Relu", ["nowhere"], ["y"], name="y")], {"x"}, reads)


def test_random_inputs_respect_the_models_limit():
    from modscope.converters.verify import random_inputs

    proto = hostile._model([helper.make_node("Relu", ["x"], ["y"])], [hostile._x([256, 256])], [hostile._y()])
    assert random_inputs(proto)["x"].shape == (256, 256)
    with pytest.raises(ResourceLimitError, match=r"graph input 'x' is declared with shape \[256, 256\].*512\.0 KiB"):
        random_inputs(proto, max_tensor_bytes="100KiB")
    assert load_onnx(proto, max_tensor_bytes=1000).module.max_tensor_bytes == 1000
