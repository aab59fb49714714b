"""ONNX shape, indexing, reduction, sequence and constant handlers, checked on one-node graphs.

Each case builds a graph in memory, runs it through ``modscope.load`` and through onnxruntime's CPU provider (or
ONNX's reference evaluator for opsets onnxruntime lacks), and compares dtype, shape and values. These ops only move
or combine values, so float32 results agree to 1e-6 (reductions to 1e-5: the summation order differs); integer and
bool results must be identical.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import modscope
from modscope.converters.onnx.ops import indexing as ops_indexing, misc as ops_misc, reduction as ops_reduction, sequence as ops_sequence, shape as ops_shape
from modscope.errors import DataError, ShapeError

ort = pytest.importorskip("onnxruntime")

_RNG = np.random.default_rng(0)


def _f(*shape: int) -> np.ndarray:
    return _RNG.standard_normal(shape).astype(np.float32)


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


# -- graph building and running -------------------------------------------------------------------------------------
def _model(nodes: list[onnx.NodeProto], inputs: dict[str, Any], outputs: list[str], opset: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for n, a in inputs.items()
        ],
        [helper.make_value_info(n, onnx.TypeProto()) for n in outputs],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model)


def _node_model(op: str, inputs: dict[str, Any], opset: int, n_outputs: int = 1, **attrs: Any) -> onnx.ModelProto:
    outputs = [f"y{i}" for i in range(n_outputs)]
    names = [n if inputs.get(n) is not None else "" for n in inputs]
    present = {n: a for n, a in inputs.items() if a is not None}
    return _model([helper.make_node(op, names, outputs, **attrs)], present, outputs, opset)


def _run_modscope(model: onnx.ModelProto, inputs: dict[str, Any]) -> list[np.ndarray]:
    with torch.no_grad():
        out = modscope.load(model)(*(torch.from_numpy(np.array(a)) for a in inputs.values() if a is not None))
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _run_reference(model: onnx.ModelProto, inputs: dict[str, Any]) -> list[np.ndarray]:
    feeds = {n: a for n, a in inputs.items() if a is not None}
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - an opset onnxruntime does not implement: use ONNX's own evaluator
        return [np.asarray(r) for r in ReferenceEvaluator(model).run(None, feeds)]
    return session.run(None, feeds)


def _assert_same(ours: list[np.ndarray], expected: list[np.ndarray], tol: float = 1e-6) -> None:
    assert len(ours) == len(expected)
    for got, want in zip(ours, expected):
        assert got.dtype == want.dtype, (got.dtype, want.dtype)
        assert got.shape == want.shape, (got.shape, want.shape)
        if want.dtype.kind == "f":
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
        else:
            np.testing.assert_array_equal(got, want)


# (op, inputs (None = omitted optional input), opset, n_outputs, attributes)
_Case = tuple[str, dict[str, Any], int, int, dict[str, Any]]
_X = _f(2, 3, 4)
_BIG_U64 = np.array([5, 2**63, 0, 2**64 - 1, 2**63, 7], dtype=np.uint64)  # order breaks if read as int64
_CASES: list[_Case] = [
    ("Reshape", {"x": _X, "s": _i64(0, -1, 2)}, 13, 1, {}),
    ("Reshape", {"x": _f(0, 3), "s": _i64(3, 0)}, 14, 1, {"allowzero": 1}),
    ("Flatten", {"x": _X}, 13, 1, {"axis": -1}),
    ("Flatten", {"x": _X}, 13, 1, {"axis": 0}),
    ("Transpose", {"x": _X}, 13, 1, {"perm": [1, 2, 0]}),
    ("Transpose", {"x": _X}, 13, 1, {}),
    ("Squeeze", {"x": _f(1, 3, 1)}, 11, 1, {"axes": [-1]}),
    ("Squeeze", {"x": _f(1, 3, 1), "a": _i64(0)}, 13, 1, {}),
    ("Squeeze", {"x": _f(1, 3, 1)}, 13, 1, {}),
    ("Unsqueeze", {"x": _f(3, 4)}, 11, 1, {"axes": [0, -1]}),
    ("Unsqueeze", {"x": _f(3, 4), "a": _i64(3, 1)}, 13, 1, {}),
    ("Concat", {"a": _f(2, 3), "b": _f(2, 1), "c": _f(2, 0)}, 13, 1, {"axis": -1}),
    ("Split", {"x": _f(6, 2)}, 11, 3, {"axis": 0, "split": [1, 2, 3]}),
    ("Split", {"x": _f(2, 6), "s": _i64(4, 2)}, 13, 2, {"axis": 1}),
    ("Split", {"x": _f(7)}, 18, 3, {"num_outputs": 3}),
    ("Expand", {"x": _f(3, 1), "s": _i64(2, 1, 4)}, 13, 1, {}),
    ("Tile", {"x": _f(2, 3), "r": _i64(2, 3)}, 13, 1, {}),
    ("Pad", {"x": _f(3, 4), "p": _i64(1, -1, 2, 2), "v": np.array(1.5, np.float32)}, 13, 1, {}),
    ("Pad", {"x": _f(3, 4), "p": _i64(2, 2, 1, 3)}, 13, 1, {"mode": "reflect"}),
    ("Pad", {"x": _f(3, 4), "p": _i64(2, -1, 0, 3)}, 13, 1, {"mode": "edge"}),
    ("Pad", {"x": _f(3, 4), "p": _i64(2, 5, 1, 1)}, 19, 1, {"mode": "wrap"}),
    ("Pad", {"x": _f(3, 4), "p": _i64(1, 2), "v": None, "a": _i64(-1)}, 18, 1, {}),
    ("Pad", {"x": _f(3, 4)}, 10, 1, {"pads": [0, 1, 1, 0], "value": 2.0}),
    ("Shape", {"x": _X}, 15, 1, {"start": 1, "end": -1}),
    ("Size", {"x": _X}, 13, 1, {}),
    ("ConstantOfShape", {"s": _i64(2, 3)}, 13, 1, {"value": helper.make_tensor("v", TensorProto.INT32, [1], [7])}),
    (
        "Range",
        {"a": np.array(1.0, np.float32), "b": np.array(-2.0, np.float32), "d": np.array(-0.7, np.float32)},
        13,
        1,
        {},
    ),
    ("Range", {"a": np.array(10, np.int64), "b": np.array(3, np.int64), "d": np.array(-3, np.int64)}, 13, 1, {}),
    ("EyeLike", {"x": _f(3, 5)}, 13, 1, {"k": 2, "dtype": TensorProto.INT32}),
    ("Trilu", {"x": _f(2, 3, 4), "k": np.array(-1, np.int64)}, 14, 1, {"upper": 0}),
    ("Trilu", {"x": _f(3, 4)}, 14, 1, {}),
    ("DepthToSpace", {"x": _f(1, 8, 2, 3)}, 13, 1, {"blocksize": 2}),
    ("DepthToSpace", {"x": _f(1, 8, 2, 3)}, 13, 1, {"blocksize": 2, "mode": "CRD"}),
    ("SpaceToDepth", {"x": _f(1, 2, 4, 6)}, 13, 1, {"blocksize": 2}),
    ("SpaceToDepth", {"x": _f(1, 2, 4, 6)}, 28, 1, {"blocksize": 2, "mode": "CRD"}),
    ("CenterCropPad", {"x": _f(5, 4, 3), "s": _i64(2, 7)}, 18, 1, {"axes": [0, -1]}),
    ("Gather", {"x": _X, "i": np.array([[0, -1], [2, 1]], np.int64)}, 13, 1, {"axis": 1}),
    ("Gather", {"x": _X, "i": np.array(-1, np.int32)}, 13, 1, {"axis": 2}),
    ("GatherElements", {"x": _f(3, 4), "i": np.array([[0, -1], [2, 1], [3, 3]], np.int64)}, 13, 1, {"axis": 1}),
    ("GatherND", {"x": _X, "i": np.array([[[1, -1]], [[0, 2]]], np.int64)}, 13, 1, {"batch_dims": 1}),
    ("GatherND", {"x": _X, "i": np.array([[1], [0]], np.int64)}, 13, 1, {}),
    ("ScatterElements", {"x": _f(3, 4), "i": np.array([[1, -1, 1]], np.int64), "u": _f(1, 3)}, 13, 1, {"axis": 1}),
    (
        "ScatterElements",
        {"x": _f(3, 4), "i": np.array([[1, 1, 1]], np.int64), "u": _f(1, 3)},
        18,
        1,
        {"axis": 1, "reduction": "add"},
    ),
    (
        "ScatterElements",
        {"x": _f(3, 4), "i": np.array([[1, 1, 0]], np.int64), "u": _f(1, 3)},
        18,
        1,
        {"axis": 0, "reduction": "max"},
    ),
    ("ScatterND", {"x": _X, "i": np.array([[1, -1], [0, 0]], np.int64), "u": _f(2, 4)}, 13, 1, {}),
    ("ScatterND", {"x": _X, "i": np.array([[1], [1]], np.int64), "u": _f(2, 3, 4)}, 18, 1, {"reduction": "mul"}),
    ("ScatterND", {"x": _X, "i": np.array([[0, 1, 2], [0, 1, 2]], np.int64), "u": _f(2)}, 18, 1, {"reduction": "min"}),
    ("Slice", {"x": _X}, 9, 1, {"starts": [1, -3], "ends": [100, -1], "axes": [0, 2]}),
    ("Slice", {"x": _X, "s": _i64(-1, 10), "e": _i64(-100, 0), "a": _i64(2, 1), "t": _i64(-2, -1)}, 13, 1, {}),
    ("Slice", {"x": _X, "s": _i64(0), "e": _i64(4), "a": _i64(-1), "t": _i64(3)}, 13, 1, {}),
    ("Compress", {"x": _X, "c": np.array([True, False, True])}, 11, 1, {"axis": 1}),
    ("Compress", {"x": _f(2, 3), "c": np.array([False, True, True, False, True])}, 11, 1, {}),
    ("NonZero", {"x": np.array([[1, 0, 3], [0, 0, 5]], np.int32)}, 13, 1, {}),
    ("TopK", {"x": np.array([[3, 1, 3, 2], [0, 5, 5, 5]], np.float32), "k": _i64(3)}, 11, 2, {}),
    ("TopK", {"x": np.array([[3, 1, 3, 2], [0, 5, 5, 5]], np.int64), "k": _i64(2)}, 11, 2, {"largest": 0, "axis": 0}),
    ("TopK", {"x": _BIG_U64, "k": _i64(4)}, 11, 2, {}),
    ("Unique", {"x": np.array([2, 1, 1, 3, 4, 3], np.int64)}, 11, 4, {"sorted": 0}),
    ("Unique", {"x": _BIG_U64}, 11, 4, {}),
    ("Unique", {"x": np.array([[1, 0, 0], [1, 0, 0], [2, 3, 4]], np.float32)}, 11, 4, {"axis": -2}),
    ("ReverseSequence", {"x": _f(4, 3, 2), "l": _i64(4, 1, 3)}, 10, 1, {}),
    ("ReverseSequence", {"x": _f(3, 4), "l": _i64(2, 4, 1)}, 10, 1, {"batch_axis": 0, "time_axis": 1}),
    ("ReduceSum", {"x": _X}, 11, 1, {"axes": [0, -1], "keepdims": 0}),
    ("ReduceSum", {"x": _X, "a": _i64(1)}, 13, 1, {}),
    ("ReduceSum", {"x": _X, "a": np.zeros(0, np.int64)}, 13, 1, {"noop_with_empty_axes": 1}),
    ("ReduceSum", {"x": np.arange(6, dtype=np.int32).reshape(2, 3)}, 13, 1, {"keepdims": 0}),
    ("ReduceMean", {"x": _X}, 13, 1, {"axes": [1]}),
    ("ReduceMean", {"x": _X, "a": _i64(-1, 0)}, 18, 1, {"keepdims": 0}),
    ("ReduceMax", {"x": _X, "a": _i64(1)}, 18, 1, {}),
    ("ReduceMax", {"x": _f(2, 0, 3), "a": _i64(1)}, 18, 1, {"keepdims": 0}),
    ("ReduceMin", {"x": np.array([[4, -2], [7, 9]], np.int32)}, 13, 1, {"axes": [1]}),
    ("ReduceProd", {"x": _f(2, 0)}, 13, 1, {"axes": [1]}),
    ("ReduceProd", {"x": _X}, 13, 1, {"axes": [0, 2]}),
    ("ReduceL1", {"x": _X, "a": _i64(2)}, 18, 1, {}),
    ("ReduceL2", {"x": _X}, 13, 1, {"axes": [0, 1]}),
    ("ReduceLogSum", {"x": np.abs(_X) + 0.1}, 13, 1, {"axes": [2]}),
    ("ReduceLogSumExp", {"x": _X, "a": _i64(-1)}, 18, 1, {"keepdims": 0}),
    ("ReduceLogSumExp", {"x": _f(0, 2)}, 13, 1, {"axes": [0]}),
    ("ReduceSumSquare", {"x": _X}, 13, 1, {"keepdims": 0}),
    ("ArgMax", {"x": np.array([[1, 5, 5], [7, 7, 0]], np.float32)}, 13, 1, {"axis": 1, "select_last_index": 1}),
    ("ArgMax", {"x": np.array([[1, 5, 5], [7, 7, 0]], np.int32)}, 13, 1, {"axis": -1, "keepdims": 0}),
    ("ReduceMax", {"x": _BIG_U64.reshape(2, 3)}, 13, 1, {"axes": [1]}),
    ("ArgMax", {"x": _BIG_U64}, 13, 1, {}),
    ("ArgMin", {"x": np.array([[1, 5, 1], [7, 0, 0]], np.float32)}, 13, 1, {"axis": 0, "select_last_index": 1}),
    ("CumSum", {"x": _f(3, 4), "a": np.array(1, np.int32)}, 14, 1, {"exclusive": 1, "reverse": 1}),
    ("CumSum", {"x": np.arange(6, dtype=np.int32).reshape(2, 3), "a": np.array(-2, np.int64)}, 14, 1, {}),
    ("CumProd", {"x": _f(3, 4), "a": np.array(1, np.int64)}, 26, 1, {"exclusive": 1}),
]


def _case_id(case: _Case) -> str:
    op, _, opset, _, attrs = case
    return f"{op}-{opset}-" + "-".join(f"{k}={v}" for k, v in attrs.items() if not isinstance(v, onnx.TensorProto))


@pytest.mark.parametrize("case", _CASES, ids=[_case_id(c) for c in _CASES])
def test_matches_the_reference(case: _Case) -> None:
    op, inputs, opset, n_outputs, attrs = case
    model = _node_model(op, inputs, opset, n_outputs, **attrs)
    _assert_same(_run_modscope(model, inputs), _run_reference(model, inputs), tol=1e-5)


def test_every_registered_op_has_a_case() -> None:
    registered = {op for m in (ops_shape, ops_indexing, ops_reduction) for _, op, _, _ in m.ops.entries}
    covered = {c[0] for c in _CASES} | {"Scatter", "TensorScatter"}  # both covered by the tests below
    assert registered <= covered, registered - covered


def test_legacy_scatter_and_tensor_scatter_match_the_reference() -> None:
    x, idx, upd = _f(3, 4), np.array([[2, 0]], np.int64), _f(1, 2)
    model = _node_model("Scatter", {"x": x, "i": idx, "u": upd}, 10, axis=1)
    _assert_same(
        _run_modscope(model, {"x": x, "i": idx, "u": upd}), _run_reference(model, {"x": x, "i": idx, "u": upd})
    )
    cache, new, where = _f(2, 3, 5, 4), _f(2, 3, 2, 4), _i64(4, 1)
    inputs = {"c": cache, "u": new, "w": where}
    model = _node_model("TensorScatter", inputs, 24, mode="circular")
    expected = [np.asarray(r) for r in ReferenceEvaluator(model).run(None, inputs)]
    _assert_same(_run_modscope(model, inputs), expected)


# -- sequences, optionals, constants --------------------------------------------------------------------------------
def test_sequence_ops_round_trip() -> None:
    x = _f(5, 3)
    nodes = [
        helper.make_node("SplitToSequence", ["x", "split"], ["seq"], axis=0),
        helper.make_node("SequenceErase", ["seq", "minus1"], ["seq2"]),
        helper.make_node("SequenceInsert", ["seq2", "x", "zero"], ["seq3"]),
        helper.make_node("SequenceAt", ["seq3", "minus1"], ["last"]),
        helper.make_node("SequenceLength", ["seq3"], ["n"]),
        helper.make_node("ConcatFromSequence", ["seq3"], ["cat"], axis=0),
        helper.make_node("SplitToSequence", ["x"], ["rows"], axis=0, keepdims=0),
        helper.make_node("ConcatFromSequence", ["rows"], ["stacked"], axis=-1, new_axis=1),
    ]
    consts = {"split": _i64(2, 2, 1), "minus1": np.array(-1, np.int64), "zero": np.array(0, np.int64)}
    init = [onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 3])],
        [helper.make_value_info(n, onnx.TypeProto()) for n in ("last", "n", "cat", "stacked")],
        initializer=init,
    )
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    _assert_same(_run_modscope(model, {"x": x}), _run_reference(model, {"x": x}))


def test_sequence_map_runs_its_body_per_element_with_shared_tensors() -> None:
    body = helper.make_graph(
        [helper.make_node("Mul", ["a", "b"], ["c"])],
        "body",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None]) for n in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [None])],
    )
    nodes = [
        helper.make_node("SplitToSequence", ["x"], ["seq"], axis=0, keepdims=0),
        helper.make_node("SequenceMap", ["seq", "w"], ["mapped"], body=body),
        helper.make_node("ConcatFromSequence", ["mapped"], ["y"], axis=0, new_axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    inputs = {"x": _f(3, 2), "w": _f(2)}
    _assert_same(_run_modscope(model, inputs), _run_reference(model, inputs))


def test_split_to_sequence_with_a_scalar_split_gives_a_short_last_piece() -> None:
    model = _node_model("SplitToSequence", {"x": _f(7, 2), "s": np.array(3, np.int64)}, 13, axis=0)
    pieces = modscope.load(model)(torch.zeros(7, 2), torch.tensor(3))
    assert [tuple(p.shape) for p in pieces] == [(3, 2), (3, 2), (1, 2)]


def test_optionals_report_and_return_their_element() -> None:
    nodes = [
        helper.make_node("Optional", ["x"], ["opt"]),
        helper.make_node("OptionalHasElement", ["opt"], ["has"]),
        helper.make_node("OptionalGetElement", ["opt"], ["y"]),
        helper.make_node("Optional", [], ["none"], type=helper.make_tensor_type_proto(TensorProto.FLOAT, [2])),
        helper.make_node("OptionalHasElement", ["none"], ["has_none"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_value_info(n, onnx.TypeProto()) for n in ("has", "y", "has_none")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    has, y, has_none = modscope.load(model)(torch.tensor([1.0, 2.0]))
    assert bool(has) and not bool(has_none)
    torch.testing.assert_close(y, torch.tensor([1.0, 2.0]), rtol=0, atol=0)


def test_optional_get_element_of_an_empty_optional_raises() -> None:
    node = helper.make_node("OptionalGetElement", ["o"], ["y"])
    with pytest.raises(DataError, match="empty optional"):
        ops_sequence.optional_get_element(_ctx(node, 18), None)


@pytest.mark.parametrize(
    ("attr", "value", "expected"),
    [
        ("value_float", 2.5, torch.tensor(2.5)),
        ("value_floats", [1.0, 2.0], torch.tensor([1.0, 2.0])),
        ("value_int", 3, torch.tensor(3)),
        ("value_ints", [4, 5], torch.tensor([4, 5])),
        (
            "sparse_value",
            helper.make_sparse_tensor(
                helper.make_tensor("v", TensorProto.FLOAT, [2], [1.0, 2.0]),
                helper.make_tensor("i", TensorProto.INT64, [2, 2], [0, 1, 1, 2]),
                [2, 3],
            ),
            torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]),
        ),
    ],
)
def test_constant_variants(attr: str, value: Any, expected: torch.Tensor) -> None:
    got = ops_misc.constant(_ctx(helper.make_node("Constant", [], ["y"], **{attr: value}), 13))
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _ctx(node: onnx.NodeProto, opset: int) -> Any:
    from modscope.converters.onnx.registry import NodeContext, decode_attribute

    attrs = {a.name: decode_attribute(a) for a in node.attribute}
    return NodeContext(node=node, opset=opset, attrs=attrs, run_graph=lambda *a: [])


def test_bad_axes_and_shapes_raise_shape_errors() -> None:
    x = _f(2, 3)
    with pytest.raises(ShapeError, match="out of range"):
        _run_modscope(_node_model("Concat", {"a": x, "b": x}, 13, axis=2), {"a": x, "b": x})
    with pytest.raises(ShapeError, match="cannot reshape"):
        _run_modscope(_node_model("Reshape", {"x": x, "s": _i64(4, -1)}, 13), {"x": x, "s": _i64(4, -1)})


# -- gradients and vmap ---------------------------------------------------------------------------------------------
def _weighted_model() -> modscope.Model:
    """y = Concat(Slice(Gather(W, idx), ...), x): every op moves entries of the float initializer W (4, 3)."""
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    nodes = [
        helper.make_node("Gather", ["W", "idx"], ["g"], axis=0),
        helper.make_node("Slice", ["g", "starts", "ends", "axes", "steps"], ["s"]),
        helper.make_node("Concat", ["s", "x"], ["y"], axis=0),
    ]
    init = {"W": w, "idx": _i64(3, -4, 1), "starts": _i64(-1), "ends": _i64(-100), "axes": _i64(1), "steps": _i64(-2)}
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 2])],
        initializer=[onnx.numpy_helper.from_array(v, k) for k, v in init.items()],
    )
    return modscope.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))


def test_gradient_reaches_the_gathered_sliced_initializer() -> None:
    model = _weighted_model()
    (name,) = [w.name for w in model.weights]
    weight = model.parameters()[name].clone().requires_grad_(True)
    y = model.functional_call({name: weight}, torch.zeros(1, 2))
    # rows 3, 0, 1 of W, columns 2 and 0 (step -2 from the last one)
    torch.testing.assert_close(y[:3].detach(), weight.detach()[[3, 0, 1]][:, [2, 0]], rtol=0, atol=0)
    (y * torch.arange(8.0).reshape(4, 2)).sum().backward()
    expected = torch.zeros(4, 3)
    expected[3, [2, 0]] = torch.tensor([0.0, 1.0])
    expected[0, [2, 0]] = torch.tensor([2.0, 3.0])
    expected[1, [2, 0]] = torch.tensor([4.0, 5.0])
    torch.testing.assert_close(weight.grad, expected, rtol=0, atol=0)


def test_weighted_graph_runs_under_vmap_over_weights() -> None:
    model = _weighted_model()
    (name,) = [w.name for w in model.weights]
    stacked = torch.randn(5, 4, 3)
    x = torch.randn(1, 2)
    batched = torch.func.vmap(lambda w: model.functional_call({name: w}, x))(stacked)
    looped = torch.stack([model.functional_call({name: w}, x) for w in stacked])
    torch.testing.assert_close(batched, looped, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("op", "extra", "attrs", "opset"),
    [
        ("ReduceMax", {"a": _i64(1)}, {}, 18),
        ("ReduceLogSumExp", {"a": _i64(0)}, {"keepdims": 0}, 18),
        ("Pad", {"p": _i64(1, 2, 2, 1)}, {"mode": "reflect"}, 13),
        ("CumSum", {"a": np.array(1, np.int64)}, {"exclusive": 1}, 14),
        ("TopK", {"k": _i64(2)}, {}, 11),
        ("ReverseSequence", {"l": _i64(3, 1, 2)}, {"batch_axis": 1, "time_axis": 0}, 10),
        ("Transpose", {}, {"perm": [1, 0]}, 13),
    ],
)
def test_data_ops_are_differentiable_and_vmap_friendly(
    op: str, extra: dict[str, Any], attrs: dict[str, Any], opset: int
) -> None:
    inputs = {"x": _f(3, 3), **extra}
    model = modscope.load(_node_model(op, inputs, opset, 2 if op == "TopK" else 1, **attrs))
    consts = [torch.from_numpy(np.array(v)) for v in extra.values()]

    def first(x: torch.Tensor) -> torch.Tensor:
        out = model(x, *consts)
        return out[0] if isinstance(out, tuple) else out

    x = torch.randn(4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(first)(x), torch.stack([first(v) for v in x]), rtol=0, atol=0)
    assert torch.autograd.gradcheck(first, (x[0].clone().requires_grad_(True),))
