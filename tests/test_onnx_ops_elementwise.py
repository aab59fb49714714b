"""ONNX element-wise math, logic, bit, cast and activation handlers, checked on one-node graphs.

Each case builds a graph in memory, runs it through ``modscope.load`` and through onnxruntime's CPU provider, and
compares dtype, shape and values. Float32 results agree to 1e-5 relative (both sides compute in float32; the
transcendental functions differ by a few ulp), float16 to 1e-3. Integer and bool results must be identical.
Ops onnxruntime cannot run (opset < 7 attributes, SwiGLU) are checked against their formula instead.
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
from modscope.converters.onnx.ops import activation as ops_activation, elementwise as ops_elementwise
from modscope.errors import InvalidParameterError, UnsupportedOperatorError

ort = pytest.importorskip("onnxruntime")

_RNG = np.random.default_rng(0)


# -- graph building and running -------------------------------------------------------------------------------------
def _graph_model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, np.ndarray],
    outputs: list[str],
    opset: int,
    initializers: dict[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """A model whose input and initializer types come from the arrays; output types are inferred."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for n, a in inputs.items()],
        [helper.make_value_info(n, onnx.TypeProto()) for n in outputs],
        initializer=[onnx.numpy_helper.from_array(a, n) for n, a in (initializers or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def _node_model(op: str, inputs: dict[str, np.ndarray], opset: int, n_outputs: int = 1, **attrs: Any) -> onnx.ModelProto:
    outputs = [f"y{i}" for i in range(n_outputs)]
    return _graph_model([helper.make_node(op, list(inputs), outputs, **attrs)], inputs, outputs, opset)


def _run_modscope(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = modscope.load(model)(*(torch.from_numpy(a.copy()) for a in inputs.values()))
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _run_ort(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def _assert_same(ours: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(ours) == len(expected)
    for got, want in zip(ours, expected):
        assert got.dtype == want.dtype, (got.dtype, want.dtype)
        assert got.shape == want.shape, (got.shape, want.shape)
        if want.dtype.kind == "f":
            tol = 1e-3 if want.dtype == np.float16 else 1e-5
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol, equal_nan=True)
        else:
            np.testing.assert_array_equal(got, want)


# -- inputs ---------------------------------------------------------------------------------------------------------
def _f(*shape: int, low: float = -3.0, high: float = 3.0, dtype: Any = np.float32) -> np.ndarray:
    return _RNG.uniform(low, high, shape).astype(dtype)


def _i(*shape: int, low: int = -20, high: int = 20, dtype: Any = np.int32) -> np.ndarray:
    return _RNG.integers(low, high, shape).astype(dtype)


def _nonzero(x: np.ndarray) -> np.ndarray:
    return np.where(x == 0, 1, x).astype(x.dtype)


_BIG_U64 = np.array([0, 1, 2**63 - 1, 2**63, 2**64 - 1, 12345], dtype=np.uint64)
_HALVES = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, -3.7], dtype=np.float32)
_SPECIAL = np.array([np.nan, np.inf, -np.inf, 0.0, -1.0, 2.0], dtype=np.float32)

# (op, inputs, opset, attributes)
_CASES: list[tuple[str, dict[str, np.ndarray], int, dict[str, Any]]] = [
    # arithmetic, numpy broadcasting, integer and unsigned types
    ("Add", {"a": _f(2, 3, 4), "b": _f(4)}, 14, {}),
    ("Add", {"a": _i(3, 4, dtype=np.uint16, low=0, high=2**16), "b": _i(4, dtype=np.uint16, low=0, high=2**16)}, 14, {}),
    ("Sub", {"a": _i(3, 4), "b": _i(1, 4)}, 14, {}),
    ("Sub", {"a": _i(3, 4, dtype=np.uint8, low=0, high=256), "b": _i(3, 4, dtype=np.uint8, low=0, high=256)}, 14, {}),
    ("Mul", {"a": _i(3, 4, dtype=np.uint32, low=0, high=2**32), "b": _i(3, 4, dtype=np.uint32, low=0, high=2**32)},
     14, {}),
    ("Mul", {"a": _BIG_U64, "b": _BIG_U64[::-1].copy()}, 14, {}),
    ("Div", {"a": _i(4, 5), "b": _nonzero(_i(4, 5, low=-6, high=6))}, 14, {}),
    ("Div", {"a": _f(4, 5), "b": _f(5, low=0.5, high=2.0)}, 14, {}),
    ("Div", {"a": _i(6, dtype=np.uint64, low=0, high=1000), "b": _i(6, dtype=np.uint64, low=1, high=9)}, 14, {}),
    ("Mod", {"a": _i(4, 5), "b": _nonzero(_i(4, 5, low=-6, high=6))}, 13, {"fmod": 0}),
    ("Mod", {"a": _i(4, 5, dtype=np.int64), "b": _nonzero(_i(5, low=-6, high=6, dtype=np.int64))}, 13, {"fmod": 1}),
    ("Mod", {"a": _f(4, 5, low=-9, high=9), "b": _f(4, 5, low=0.5, high=3)}, 13, {"fmod": 1}),
    ("Pow", {"a": _f(3, 4, low=0.1, high=3), "b": _f(3, 4)}, 15, {}),
    ("Pow", {"a": _f(3, 4), "b": _i(4, low=0, high=4, dtype=np.int64)}, 15, {}),
    ("Pow", {"a": _i(4, low=1, high=5), "b": np.array([0.0, 1.0, 2.0, 3.0], np.float32)}, 15, {}),
    # unary math
    ("Neg", {"x": _i(3, 4, dtype=np.int8)}, 13, {}),
    ("Abs", {"x": _i(3, 4, dtype=np.int16)}, 13, {}),
    ("Abs", {"x": _f(3, 4)}, 13, {}),
    ("Sign", {"x": np.array([-2.0, 0.0, 3.5, -0.0], np.float32)}, 13, {}),
    ("Sign", {"x": _i(3, 4, dtype=np.int64)}, 13, {}),
    ("Reciprocal", {"x": _f(3, 4, low=0.5, high=3)}, 13, {}),
    ("Sqrt", {"x": _f(3, 4, low=0, high=9)}, 13, {}),
    ("Exp", {"x": _f(3, 4)}, 13, {}),
    ("Exp", {"x": _f(3, 4, dtype=np.float16)}, 13, {}),
    ("Log", {"x": _f(3, 4, low=0.1, high=9)}, 13, {}),
    ("Ceil", {"x": _f(3, 4)}, 13, {}),
    ("Floor", {"x": _f(3, 4)}, 13, {}),
    ("Round", {"x": _HALVES}, 22, {}),
    ("Erf", {"x": _f(3, 4)}, 13, {}),
    ("Sin", {"x": _f(3, 4)}, 22, {}),
    ("Cos", {"x": _f(3, 4)}, 22, {}),
    ("Tan", {"x": _f(3, 4, low=-1.4, high=1.4)}, 22, {}),
    ("Asin", {"x": _f(3, 4, low=-0.99, high=0.99)}, 22, {}),
    ("Acos", {"x": _f(3, 4, low=-0.99, high=0.99)}, 22, {}),
    ("Atan", {"x": _f(3, 4)}, 22, {}),
    ("Sinh", {"x": _f(3, 4)}, 22, {}),
    ("Cosh", {"x": _f(3, 4)}, 22, {}),
    ("Asinh", {"x": _f(3, 4)}, 22, {}),
    ("Acosh", {"x": _f(3, 4, low=1, high=5)}, 22, {}),
    ("Atanh", {"x": _f(3, 4, low=-0.99, high=0.99)}, 22, {}),
    # variadic
    ("Max", {"a": _f(2, 3, 4), "b": _f(3, 1), "c": _f(4)}, 13, {}),
    ("Max", {"a": _BIG_U64, "b": _BIG_U64[::-1].copy()}, 13, {}),
    ("Min", {"a": _i(3, 4, dtype=np.uint32, low=0, high=2**32), "b": _i(4, dtype=np.uint32, low=0, high=2**32)},
     13, {}),
    ("Min", {"a": _f(3, 4, dtype=np.float16)}, 13, {}),
    ("Mean", {"a": _f(3, 4), "b": _f(4), "c": _f(3, 1)}, 13, {}),
    ("Sum", {"a": _f(3, 4, dtype=np.float64), "b": _f(4, dtype=np.float64), "c": _f(3, 4, dtype=np.float64)}, 13, {}),
    # comparisons
    ("Equal", {"a": _i(3, 4, low=0, high=3, dtype=np.int64), "b": _i(4, low=0, high=3, dtype=np.int64)}, 19, {}),
    ("Equal", {"a": _RNG.random((3, 4)) > 0.5, "b": _RNG.random(4) > 0.5}, 19, {}),
    ("Less", {"a": _BIG_U64, "b": _BIG_U64[::-1].copy()}, 13, {}),
    ("LessOrEqual", {"a": _f(3, 4), "b": _f(4)}, 16, {}),
    ("Greater", {"a": _i(3, 4, dtype=np.uint32, low=0, high=2**32), "b": _i(4, dtype=np.uint32, low=0, high=2**32)},
     13, {}),
    ("GreaterOrEqual", {"a": _i(3, 4, dtype=np.int8), "b": _i(3, 4, dtype=np.int8)}, 16, {}),
    # logic
    ("And", {"a": _RNG.random((2, 3, 4)) > 0.5, "b": _RNG.random(4) > 0.5}, 7, {}),
    ("Or", {"a": _RNG.random((2, 3, 4)) > 0.5, "b": _RNG.random((3, 1)) > 0.5}, 7, {}),
    ("Xor", {"a": _RNG.random((3, 4)) > 0.5, "b": _RNG.random((3, 4)) > 0.5}, 7, {}),
    ("Not", {"x": _RNG.random((3, 4)) > 0.5}, 1, {}),
    # bits
    ("BitShift", {"x": _BIG_U64, "y": np.array([0, 1, 5, 63, 1, 7], np.uint64)}, 11, {"direction": "RIGHT"}),
    ("BitShift", {"x": _i(6, dtype=np.uint16, low=0, high=2**16), "y": _i(6, dtype=np.uint16, low=0, high=15)},
     11, {"direction": "LEFT"}),
    ("BitShift", {"x": _i(6, dtype=np.uint32, low=0, high=2**32), "y": _i(6, dtype=np.uint32, low=0, high=31)},
     11, {"direction": "RIGHT"}),
    ("BitwiseAnd", {"a": _i(3, 4, dtype=np.int16, low=-999, high=999), "b": _i(4, dtype=np.int16, low=-999, high=999)},
     18, {}),
    ("BitwiseOr", {"a": _i(3, 4, dtype=np.uint32, low=0, high=2**32), "b": _i(4, dtype=np.uint32, low=0, high=2**32)},
     18, {}),
    ("BitwiseXor", {"a": _BIG_U64, "b": _BIG_U64[::-1].copy()}, 18, {}),
    ("BitwiseNot", {"x": _i(3, 4, dtype=np.uint8, low=0, high=256)}, 18, {}),
    ("BitwiseNot", {"x": _BIG_U64}, 18, {}),
    # tests and selection
    ("IsNaN", {"x": _SPECIAL}, 20, {}),
    ("IsInf", {"x": _SPECIAL}, 20, {}),
    ("IsInf", {"x": _SPECIAL}, 20, {"detect_negative": 0}),
    ("IsInf", {"x": _SPECIAL}, 20, {"detect_positive": 0}),
    ("Where", {"c": _RNG.random((3, 4)) > 0.5, "x": _f(3, 4), "y": _f(4)}, 16, {}),
    ("Where", {"c": _RNG.random(4) > 0.5, "x": _i(3, 4, dtype=np.int64), "y": _i(3, 1, dtype=np.int64)}, 16, {}),
    ("Clip", {"x": _f(3, 4)}, 6, {"min": -1.0, "max": 0.5}),
    ("Clip", {"x": _f(3, 4)}, 6, {"max": 0.5}),
    ("Clip", {"x": _i(3, 4, dtype=np.int8), "lo": np.array(-5, np.int8), "hi": np.array(7, np.int8)}, 13, {}),
    ("Clip", {"x": _f(3, 4), "lo": np.array(1.0, np.float32), "hi": np.array(-1.0, np.float32)}, 13, {}),
    # casts
    ("Cast", {"x": _f(3, 4, low=-9, high=9)}, 21, {"to": TensorProto.INT32}),
    ("Cast", {"x": np.array([0.0, -0.0, 0.5, np.nan, -2.0], np.float32)}, 21, {"to": TensorProto.BOOL}),
    ("Cast", {"x": _i(3, 4, dtype=np.int64, low=-5000, high=5000)}, 21, {"to": TensorProto.FLOAT16}),
    ("Cast", {"x": _i(3, 4, dtype=np.int32, low=-1000, high=1000)}, 21, {"to": TensorProto.INT8}),
    ("Cast", {"x": _RNG.random((3, 4)) > 0.5}, 21, {"to": TensorProto.FLOAT}),
    ("Cast", {"x": _f(3, 4, low=0, high=4e9, dtype=np.float64)}, 21, {"to": TensorProto.UINT32}),
    ("Cast", {"x": _f(3, 4, dtype=np.float64)}, 6, {"to": TensorProto.FLOAT}),
    ("CastLike", {"x": _f(3, 4, low=-9, high=9), "like": np.zeros(0, np.int64)}, 21, {}),
    ("CastLike", {"x": _i(3, 4, dtype=np.uint16, low=0, high=2**16), "like": np.zeros(1, np.float16)}, 21, {}),
    ("BitCast", {"x": _f(3, 4)}, 26, {"to": TensorProto.INT32}),
    ("BitCast", {"x": _i(3, 4, dtype=np.int16)}, 26, {"to": TensorProto.FLOAT16}),
    # activations
    ("Relu", {"x": _f(3, 4)}, 14, {}),
    ("Relu", {"x": _i(3, 4, dtype=np.int8)}, 14, {}),
    ("LeakyRelu", {"x": _f(3, 4)}, 16, {"alpha": 0.3}),
    ("PRelu", {"x": _f(2, 3, 4), "slope": _f(3, 1, low=0, high=1)}, 16, {}),
    ("Elu", {"x": _f(3, 4)}, 22, {"alpha": 0.7}),
    ("Selu", {"x": _f(3, 4)}, 22, {}),
    ("Selu", {"x": _f(3, 4)}, 22, {"alpha": 2.0, "gamma": 3.0}),
    ("Celu", {"x": _f(3, 4)}, 12, {"alpha": 2.0}),
    ("Sigmoid", {"x": _f(3, 4, low=-20, high=20)}, 13, {}),
    ("HardSigmoid", {"x": _f(3, 4, low=-6, high=6)}, 22, {"alpha": 0.3, "beta": 0.4}),
    ("HardSwish", {"x": _f(3, 4, low=-6, high=6)}, 22, {}),
    ("Tanh", {"x": _f(3, 4)}, 13, {}),
    ("Softplus", {"x": _f(3, 4, low=-30, high=30)}, 22, {}),
    ("Softsign", {"x": _f(3, 4)}, 22, {}),
    ("Mish", {"x": _f(3, 4)}, 22, {}),
    ("Swish", {"x": _f(3, 4)}, 24, {"alpha": 1.5}),
    ("Gelu", {"x": _f(3, 4)}, 20, {}),
    ("Gelu", {"x": _f(3, 4)}, 20, {"approximate": "tanh"}),
    ("ThresholdedRelu", {"x": _f(3, 4)}, 22, {"alpha": 0.5}),
    ("Shrink", {"x": _f(3, 4)}, 9, {"bias": 0.5, "lambd": 1.0}),
    ("Shrink", {"x": _i(3, 4, dtype=np.int32)}, 9, {"bias": 1.0, "lambd": 3.0}),
    ("Softmax", {"x": _f(2, 3, 4)}, 13, {"axis": 1}),
    ("Softmax", {"x": _f(2, 3, 4)}, 11, {}),
    ("Softmax", {"x": _f(2, 3, 4)}, 11, {"axis": -1}),
    ("Softmax", {"x": _f(2, 3, 4, dtype=np.float16)}, 13, {}),
    ("LogSoftmax", {"x": _f(2, 3, 4)}, 13, {}),
    ("LogSoftmax", {"x": _f(2, 3, 4, dtype=np.float16)}, 13, {"axis": 1}),
    ("LogSoftmax", {"x": _f(2, 3, 4)}, 11, {"axis": 0}),
    ("Hardmax", {"x": np.array([[1, 3, 3], [2, 2, 0]], np.float32)}, 13, {"axis": 1}),
    ("Hardmax", {"x": _f(2, 3, 4)}, 11, {"axis": 1}),
]


def _case_id(case: tuple[str, dict[str, np.ndarray], int, dict[str, Any]]) -> str:
    op, inputs, opset, attrs = case
    dtypes = "-".join(sorted({a.dtype.name for a in inputs.values()}))
    extra = "-".join(f"{k}={v}" for k, v in attrs.items())
    return f"{op}-v{opset}-{dtypes}" + (f"-{extra}" if extra else "")


@pytest.mark.parametrize("case", _CASES, ids=[_case_id(c) for c in _CASES])
def test_matches_onnxruntime(case: tuple[str, dict[str, np.ndarray], int, dict[str, Any]]) -> None:
    op, inputs, opset, attrs = case
    model = _node_model(op, inputs, opset, **attrs)
    _assert_same(_run_modscope(model, inputs), _run_ort(model, inputs))


@pytest.mark.parametrize("opset", [7, 10, 12, 13])
def test_dropout_is_identity_with_a_mask_of_ones(opset: int) -> None:
    """The mask is compared with the spec only: onnxruntime 1.32 returns an all-False mask before opset 12."""
    inputs = {"x": _f(3, 4)}
    model = _node_model("Dropout", inputs, opset, n_outputs=2)
    output, mask = _run_modscope(model, inputs)
    _assert_same([output], _run_ort(model, inputs)[:1])
    assert mask.dtype == (np.float32 if opset < 10 else np.bool_) and mask.shape == (3, 4) and mask.all()


def test_opset_1_cast_names_the_type() -> None:
    x = _f(3, 4)
    (got,) = _run_modscope(_node_model("Cast", {"x": x}, 1, to="FLOAT16"), {"x": x})
    np.testing.assert_array_equal(got, x.astype(np.float16))


@pytest.mark.parametrize(
    "target", [TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2, TensorProto.BFLOAT16]
)
@pytest.mark.parametrize("saturate", [0, 1])
def test_cast_to_narrow_floats_and_back(target: int, saturate: int) -> None:
    """Compared with onnx's reference evaluator, which follows the spec's overflow table at the rounding ties
    (onnxruntime 1.32 turns 61440 into NaN instead of inf for E5M2 without saturation)."""
    x = np.array([0.0, -0.3, 1.7, 247.0, 248.0, 460.0, 464.0, 470.0, 6e4, 61440.0, -1e5, np.inf, -np.inf, np.nan],
                 np.float32)
    attrs = {"saturate": saturate} if target != TensorProto.BFLOAT16 else {}
    nodes = [
        helper.make_node("Cast", ["x"], ["narrow"], to=target, **attrs),
        helper.make_node("Cast", ["narrow"], ["y"], to=TensorProto.FLOAT),
    ]
    model = _graph_model(nodes, {"x": x}, ["y"], 21)
    _assert_same(_run_modscope(model, {"x": x}), ReferenceEvaluator(model).run(None, {"x": x}))


# -- formulas onnxruntime does not run -------------------------------------------------------------------------------
def test_legacy_broadcast_aligns_the_second_operand_at_axis() -> None:
    a, b = _f(2, 3, 4), _f(3)
    (got,) = _run_modscope(_node_model("Add", {"a": a, "b": b}, 6, broadcast=1, axis=1), {"a": a, "b": b})
    np.testing.assert_allclose(got, a + b[None, :, None], rtol=1e-6)


def test_legacy_prelu_slope_is_per_channel() -> None:
    x, slope = _f(2, 3, 4), _f(3, low=0, high=1)
    (got,) = _run_modscope(_node_model("PRelu", {"x": x, "slope": slope}, 6), {"x": x, "slope": slope})
    np.testing.assert_allclose(got, np.where(x >= 0, x, x * slope[None, :, None]), rtol=1e-6)


def test_swiglu_is_swish_gate_times_value() -> None:
    a, b = _f(3, 4), _f(3, 4)
    (got,) = _run_modscope(_node_model("SwiGLU", {"a": a, "b": b}, 28, alpha=1.5), {"a": a, "b": b})
    np.testing.assert_allclose(got, a / (1 + np.exp(-1.5 * a)) * b, rtol=1e-5, atol=1e-6)


def test_signed_bitshift_follows_the_opset_28_rules() -> None:
    x = np.array([-8, 4, -1, 64, -128, 5], np.int8)
    y = np.array([-1, -8, 20, 1, 1, 8], np.int8)
    (right,) = _run_modscope(_node_model("BitShift", {"x": x, "y": y}, 28, direction="RIGHT"), {"x": x, "y": y})
    (left,) = _run_modscope(_node_model("BitShift", {"x": x, "y": y}, 28, direction="LEFT"), {"x": x, "y": y})
    np.testing.assert_array_equal(right, np.array([-1, 0, -1, 32, -64, 0], np.int8))
    np.testing.assert_array_equal(left, np.array([0, 0, 0, -128, 0, 0], np.int8))


def test_bitcast_to_a_different_width_is_refused() -> None:
    x = _f(3)
    model = _node_model("Cast", {"x": x}, 21, to=TensorProto.FLOAT)
    model.graph.node[0].CopyFrom(helper.make_node("BitCast", ["x"], ["y0"], to=TensorProto.INT64))
    with pytest.raises(InvalidParameterError, match="width"):
        _run_modscope(model, {"x": x})


def test_cast_to_a_type_torch_lacks_names_it() -> None:
    x = _f(3)
    model = _node_model("Cast", {"x": x}, 21, to=TensorProto.FLOAT)
    model.graph.node[0].CopyFrom(helper.make_node("Cast", ["x"], ["y0"], to=TensorProto.INT4))
    with pytest.raises(UnsupportedOperatorError, match="INT4"):
        _run_modscope(model, {"x": x})


def test_every_registered_op_has_a_case() -> None:
    registered = {op for _, op, _, _ in ops_elementwise.ops.entries + ops_activation.ops.entries}
    covered = {c[0] for c in _CASES} | {"Dropout", "SwiGLU"}
    assert registered - covered == set()


# -- gradients ------------------------------------------------------------------------------------------------------
def _weighted_model() -> tuple[modscope.Model, np.ndarray]:
    """y = PRelu(x * w, slope): two float initializers that must become trainable weights."""
    x = _f(2, 3, 4)
    nodes = [helper.make_node("Mul", ["x", "w"], ["h"]), helper.make_node("PRelu", ["h", "slope"], ["y"])]
    inits = {"w": _f(4, low=0.5, high=2), "slope": _f(3, 1, low=0.1, high=0.5)}
    return modscope.load(_graph_model(nodes, {"x": x}, ["y"], 16, initializers=inits)), x


def test_gradients_reach_mul_and_prelu_initializers() -> None:
    model, x_np = _weighted_model()
    params = {w.source_name: model.module.get_parameter(w.name) for w in model.weights}
    assert set(params) == {"w", "slope"}
    x = torch.from_numpy(x_np)
    model(x).sum().backward()
    w, slope = params["w"].detach(), params["slope"].detach()
    h = x * w
    negative = (h < 0).to(x.dtype)
    expected_slope = (h * negative).sum(dim=(0, 2)).reshape(3, 1)
    expected_w = (x * torch.where(h >= 0, torch.ones_like(h), slope)).sum(dim=(0, 1))
    torch.testing.assert_close(params["slope"].grad, expected_slope, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(params["w"].grad, expected_w, rtol=1e-5, atol=1e-6)


def test_weighted_ops_run_under_vmap() -> None:
    model, x_np = _weighted_model()
    x = torch.from_numpy(x_np)
    names = {w.source_name: w.name for w in model.weights}
    slopes = torch.rand(5, 3, 1)
    batched = torch.func.vmap(lambda s: model.functional_call({names["slope"]: s}, x))(slopes)
    looped = torch.stack([model.functional_call({names["slope"]: s}, x) for s in slopes])
    torch.testing.assert_close(batched, looped)


@pytest.mark.parametrize(
    "op,attrs,opset",
    [
        ("Selu", {}, 22), ("Celu", {"alpha": 0.5}, 12), ("Elu", {}, 22), ("Softplus", {}, 22), ("Mish", {}, 22),
        ("Gelu", {"approximate": "tanh"}, 20), ("HardSigmoid", {}, 22), ("Softmax", {}, 11), ("LogSoftmax", {}, 13),
        ("Erf", {}, 13), ("Atan", {}, 22), ("Swish", {}, 24), ("Sqrt", {}, 13),
    ],
)
def test_gradients_are_exact_in_float64(op: str, attrs: dict[str, Any], opset: int) -> None:
    """gradcheck through a float64 initializer feeding the op (finite differences vs autograd)."""
    x = _f(3, 4, low=0.2, high=2.0, dtype=np.float64) if op == "Sqrt" else _f(3, 4, dtype=np.float64)
    nodes = [helper.make_node("Mul", ["x", "w"], ["h"]), helper.make_node(op, ["h"], ["y"], **attrs)]
    model = modscope.load(_graph_model(nodes, {"x": x}, ["y"], opset, initializers={"w": _f(4, low=0.5, high=1.5,
                                                                                         dtype=np.float64)}))
    (name,) = [w.name for w in model.weights]
    w0 = model.module.get_parameter(name).detach().clone().requires_grad_(True)
    xt = torch.from_numpy(x)
    assert torch.autograd.gradcheck(lambda w: model.functional_call({name: w}, xt), (w0,))


@pytest.mark.parametrize(
    "op,attrs,opset",
    [
        ("Softmax", {}, 11), ("Hardmax", {"axis": 0}, 11), ("LogSoftmax", {"axis": 0}, 13), ("Shrink", {}, 9),
        ("ThresholdedRelu", {}, 22), ("Clip", {"min": -0.5, "max": 0.5}, 6), ("Round", {}, 22), ("Sign", {}, 13),
        ("Celu", {}, 12), ("HardSwish", {}, 22), ("IsInf", {}, 20), ("Cast", {"to": TensorProto.FLOAT16}, 21),
    ],
)
def test_unary_ops_on_a_weighted_input_run_under_vmap(op: str, attrs: dict[str, Any], opset: int) -> None:
    """Masks are trained with vmap over stacked weights: every op fed by a weight must batch like a loop."""
    x = _f(3, 4)
    nodes = [helper.make_node("Mul", ["x", "w"], ["h"]), helper.make_node(op, ["h"], ["y"], **attrs)]
    model = modscope.load(_graph_model(nodes, {"x": x}, ["y"], opset, initializers={"w": _f(4)}))
    (name,) = [w.name for w in model.weights]
    xt, ws = torch.from_numpy(x), torch.randn(3, 4)
    batched = torch.func.vmap(lambda w: model.functional_call({name: w}, xt))(ws)
    looped = torch.stack([model.functional_call({name: w}, xt) for w in ws])
    torch.testing.assert_close(batched, looped)
