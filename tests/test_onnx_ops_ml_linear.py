"""ai.onnx.ml linear models and preprocessing (Scaler, Normalizer, LinearRegressor, LinearClassifier) against
onnxruntime on one-node graphs. Float32 results agree to 1e-5 (a few float32 products and sums); labels exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

import modscope
from modscope.errors import UnsupportedOperatorError

ort = pytest.importorskip("onnxruntime")

X = np.array([[1.0, 2.0], [-1.0, -3.0], [0.5, -0.5], [4.0, 0.0], [0.0, 0.0]], np.float32)
COEF3 = [0.5, -0.25, 1.0, 1.0, -1.0, 0.3]


def _model(op: str, attrs: dict, n_outputs: int, x: np.ndarray):
    outputs = ["y", "z"][:n_outputs]
    node = helper.make_node(op, ["x"], outputs, domain="ai.onnx.ml", **attrs)
    types = [TensorProto.INT64, TensorProto.FLOAT] if n_outputs == 2 else [TensorProto.FLOAT]
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info(n, t, None) for n, t in zip(outputs, types)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)])


def _check(op: str, attrs: dict, n_outputs: int = 1, x: np.ndarray = X) -> list[torch.Tensor]:
    proto = _model(op, attrs, n_outputs, x)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x})
    out = modscope.load(proto)(torch.from_numpy(x))
    outs = list(out) if isinstance(out, tuple) else [out]
    for got, want in zip(outs, expected):
        assert got.dtype == torch.from_numpy(want).dtype and tuple(got.shape) == want.shape
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-5, atol=1e-6)
    return outs


@pytest.mark.parametrize("offset, scale", [([1.0, 2.0], [2.0, 0.5]), ([1.0], [2.0])])
def test_scaler(offset, scale):
    _check("Scaler", {"offset": offset, "scale": scale})


@pytest.mark.parametrize("norm", ["MAX", "L1", "L2"])
def test_normalizer_including_an_all_zero_row(norm):
    _check("Normalizer", {"norm": norm})


@pytest.mark.parametrize(
    "coefficients, intercepts, targets", [([0.5, -0.25], [0.1], 1), ([0.5, -0.25, 1, 1], [0.1, 0], 2)]
)
def test_linear_regressor(coefficients, intercepts, targets):
    _check("LinearRegressor", {"coefficients": coefficients, "intercepts": intercepts, "targets": targets})


@pytest.mark.parametrize("post_transform", ["NONE", "LOGISTIC"])
@pytest.mark.parametrize("coefficients", [[0.5, -0.25], [-0.5, 0.25]])
def test_binary_linear_classifier(post_transform, coefficients):
    attrs = {"coefficients": coefficients, "intercepts": [0.1], "classlabels_ints": [3, 7]}
    labels, _ = _check("LinearClassifier", {**attrs, "post_transform": post_transform}, 2)
    score = X @ np.array(coefficients, np.float32) + 0.1
    np.testing.assert_array_equal(labels.numpy(), np.where(score > 0, 7, 3))


@pytest.mark.parametrize("post_transform", ["NONE", "SOFTMAX", "LOGISTIC", "SOFTMAX_ZERO"])
def test_multiclass_linear_classifier(post_transform):
    attrs = {"coefficients": COEF3, "intercepts": [0.1, 0.0, -0.2], "classlabels_ints": [4, 5, 6]}
    _check("LinearClassifier", {**attrs, "post_transform": post_transform}, 2)


def test_classifier_scores_pass_gradients_to_the_input():
    proto = _model(
        "LinearClassifier",
        {
            "coefficients": COEF3,
            "intercepts": [0.1, 0, -0.2],
            "classlabels_ints": [0, 1, 2],
            "post_transform": "SOFTMAX",
        },
        2,
        X,
    )
    x = torch.from_numpy(X).requires_grad_()
    _, scores = modscope.load(proto)(x)
    scores[:, 1].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_string_labels_are_refused_with_a_reason():
    proto = _model(
        "LinearClassifier",
        {"coefficients": COEF3, "intercepts": [0, 0, 0], "classlabels_strings": ["a", "b", "c"]},
        2,
        X,
    )
    model = modscope.load(proto)
    with pytest.raises(UnsupportedOperatorError, match="string class labels"):
        model(torch.from_numpy(X))
