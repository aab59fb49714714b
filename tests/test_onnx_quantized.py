"""Quantized ONNX models: integer weights load as maskable dequantized float parameters.

Three kinds of quantized graph are covered: a hand-built QDQ model (QuantizeLinear/DequantizeLinear around a Conv
with a per-channel int8 kernel and an int32 bias, and a MatMul with a uint8 weight whose zero point is not 0), an
MLP quantized with ``onnxruntime.quantization.quantize_dynamic`` (DynamicQuantizeLinear + MatMulInteger) and a
hand-built QLinearConv + QLinearMatMul model. Each is compared with onnxruntime, and ``export_masked`` with a random
mask must give onnxruntime outputs equal to ``torch.func.functional_call`` with the masked weights zeroed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import modscope
from modscope.converters.export import export_masked

ort = pytest.importorskip("onnxruntime")

F32 = TensorProto.FLOAT


def _model(nodes, inputs, outputs, initializers, opset: int = 13) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _qdq_model(rng: np.random.Generator) -> tuple[onnx.ModelProto, np.ndarray]:
    """x -> Q/DQ -> Conv(DQ(int8 kernel, per channel), DQ(int32 bias)) -> Relu -> Flatten -> MatMul(DQ(uint8)) + b."""
    x_scale, w_scale = np.float32(0.05), np.array([0.02, 0.01, 0.03], np.float32)
    inits = [
        numpy_helper.from_array(np.array(x_scale), "x_scale"),
        numpy_helper.from_array(np.array(3, np.int8), "x_zp"),
        numpy_helper.from_array(rng.integers(-127, 128, size=(3, 2, 3, 3)).astype(np.int8), "conv.w_q"),
        numpy_helper.from_array(w_scale, "conv.w_scale"),
        numpy_helper.from_array(np.zeros(3, np.int8), "conv.w_zp"),
        numpy_helper.from_array(rng.integers(-500, 500, size=3).astype(np.int32), "conv.b_q"),
        numpy_helper.from_array(x_scale * w_scale, "conv.b_scale"),
        numpy_helper.from_array(rng.integers(0, 256, size=(12, 4)).astype(np.uint8), "fc.w_q"),
        numpy_helper.from_array(np.array([0.01, 0.02, 0.015, 0.03], np.float32), "fc.w_scale"),
        numpy_helper.from_array(np.array([128, 120, 131, 127], np.uint8), "fc.w_zp"),
        numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "fc.bias"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["conv.w_q", "conv.w_scale", "conv.w_zp"], ["conv.w"], axis=0),
        helper.make_node("DequantizeLinear", ["conv.b_q", "conv.b_scale"], ["conv.b"], axis=0),
        helper.make_node("Conv", ["x_dq", "conv.w", "conv.b"], ["c"], name="/conv/Conv"),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("DequantizeLinear", ["fc.w_q", "fc.w_scale", "fc.w_zp"], ["fc.w"], axis=1),
        helper.make_node("MatMul", ["f", "fc.w"], ["m"], name="/fc/MatMul"),
        helper.make_node("Add", ["m", "fc.bias"], ["y"], name="/fc/Add"),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", F32, ["n", 2, 4, 4])],
        [helper.make_tensor_value_info("y", F32, ["n", 4])],
        inits,
    )
    return model, rng.normal(size=(3, 2, 4, 4)).astype(np.float32)


def _dynamic_mlp(rng: np.random.Generator, tmp_path: Path) -> tuple[onnx.ModelProto, np.ndarray]:
    """A two-layer MLP quantized by onnxruntime's quantize_dynamic (MatMulInteger with int8 weights)."""
    quantization = pytest.importorskip("onnxruntime.quantization")
    inits = [
        numpy_helper.from_array(rng.normal(size=(8, 16)).astype(np.float32), "fc1.weight"),
        numpy_helper.from_array(rng.normal(size=16).astype(np.float32), "fc1.bias"),
        numpy_helper.from_array(rng.normal(size=(16, 4)).astype(np.float32), "fc2.weight"),
        numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "fc2.bias"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "fc1.weight"], ["h0"], name="/fc1/MatMul"),
        helper.make_node("Add", ["h0", "fc1.bias"], ["h1"], name="/fc1/Add"),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "fc2.weight"], ["h3"], name="/fc2/MatMul"),
        helper.make_node("Add", ["h3", "fc2.bias"], ["y"], name="/fc2/Add"),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", F32, ["n", 8])],
        [helper.make_tensor_value_info("y", F32, ["n", 4])],
        inits,
        opset=17,
    )
    onnx.save(model, tmp_path / "mlp.onnx")
    quantization.quantize_dynamic(
        str(tmp_path / "mlp.onnx"), str(tmp_path / "mlp_q.onnx"), weight_type=quantization.QuantType.QInt8
    )
    return onnx.load(tmp_path / "mlp_q.onnx"), rng.normal(size=(5, 8)).astype(np.float32)


def _qlinear_model(rng: np.random.Generator) -> tuple[onnx.ModelProto, np.ndarray]:
    """x -> QuantizeLinear -> QLinearConv(int8 kernel, int32 bias) -> Flatten -> QLinearMatMul -> DequantizeLinear."""
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "x_zp"),
        # 7-bit kernel values: onnxruntime's uint8 x int8 kernels saturate pairwise int16 sums of full-range values
        numpy_helper.from_array(rng.integers(-63, 64, size=(3, 2, 3, 3)).astype(np.int8), "conv.w_q"),
        numpy_helper.from_array(np.array([0.02, 0.01, 0.03], np.float32), "conv.w_scale"),
        numpy_helper.from_array(np.zeros(3, np.int8), "conv.w_zp"),
        numpy_helper.from_array(rng.integers(-500, 500, size=3).astype(np.int32), "conv.b_q"),
        numpy_helper.from_array(np.array(0.1, np.float32), "c_scale"),
        numpy_helper.from_array(np.array(100, np.uint8), "c_zp"),
        numpy_helper.from_array(rng.integers(0, 256, size=(12, 4)).astype(np.uint8), "fc.w_q"),
        numpy_helper.from_array(np.array(0.02, np.float32), "fc.w_scale"),
        numpy_helper.from_array(np.array(125, np.uint8), "fc.w_zp"),
        numpy_helper.from_array(np.array(0.5, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "y_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"]),
        helper.make_node(
            "QLinearConv",
            ["x_q", "x_scale", "x_zp", "conv.w_q", "conv.w_scale", "conv.w_zp", "c_scale", "c_zp", "conv.b_q"],
            ["c_q"],
            name="/conv/QLinearConv",
        ),
        helper.make_node("Flatten", ["c_q"], ["f_q"]),
        helper.make_node(
            "QLinearMatMul", ["f_q", "c_scale", "c_zp", "fc.w_q", "fc.w_scale", "fc.w_zp", "y_scale", "y_zp"],
            ["y_q"], name="/fc/QLinearMatMul",
        ),
        helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zp"], ["y"]),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", F32, ["n", 2, 4, 4])],
        [helper.make_tensor_value_info("y", F32, ["n", 4])],
        inits,
    )
    return model, rng.normal(size=(3, 2, 4, 4)).astype(np.float32)


Builder = Callable[[np.random.Generator, Path], tuple[onnx.ModelProto, np.ndarray]]
CASES: dict[str, tuple[Builder, dict[str, tuple[str, str]]]] = {
    "qdq": (
        lambda rng, _: _qdq_model(rng),
        {"conv.w_q": ("weight", "conv"), "conv.b_q": ("bias", "conv"), "fc.w_q": ("weight", "fc")},
    ),
    "dynamic": (_dynamic_mlp, {"fc1.weight_quantized": ("weight", "fc1"), "fc2.weight_quantized": ("weight", "fc2")}),
    "qlinear": (
        lambda rng, _: _qlinear_model(rng),
        {"conv.w_q": ("weight", "conv"), "conv.b_q": ("bias", "conv"), "fc.w_q": ("weight", "fc")},
    ),
}


def _load(name: str, tmp_path: Path) -> tuple[modscope.Model, onnx.ModelProto, Path, np.ndarray]:
    builder, _ = CASES[name]
    proto, x = builder(np.random.default_rng(0), tmp_path)
    path = tmp_path / f"{name}.onnx"
    onnx.save(proto, path)
    return modscope.load(path), proto, path, x


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    """onnxruntime's output without graph optimizations: its optimizer rewrites a DQ -> Conv pattern into a
    differently rounded quantized kernel (0.16 off on the QDQ model), so the plain graph is the reference."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("name", list(CASES))
def test_quantized_model_matches_onnxruntime_and_lists_integer_weights(name: str, tmp_path: Path) -> None:
    model, proto, path, x = _load(name, tmp_path)
    with torch.no_grad():
        got = model.module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, _ort(path, x), rtol=1e-5, atol=1e-5)
    quantized = {w.source_name: (w.kind, w.layer) for w in model.weights if w.source_name in CASES[name][1]}
    assert quantized == CASES[name][1]
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for w in model.weights:
        param = model.module.get_parameter(w.name)
        assert param.is_floating_point() and w.shape == inits[w.source_name].shape


def test_dequantized_parameter_holds_the_dequantized_values(tmp_path: Path) -> None:
    model, proto, _, _ = _load("qdq", tmp_path)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    expected = (inits["fc.w_q"].astype(np.float32) - inits["fc.w_zp"]) * inits["fc.w_scale"]
    np.testing.assert_array_equal(model.module.get_parameter(model.weight("fc.w_q").name).detach().numpy(), expected)


@pytest.mark.parametrize("name", ["qdq", "dynamic"])
def test_gradients_reach_the_dequantized_weights(name: str, tmp_path: Path) -> None:
    model, _, _, x = _load(name, tmp_path)
    model.module(torch.from_numpy(x)).square().sum().backward()
    for source in CASES[name][1]:
        grad = model.module.get_parameter(model.weight(source).name).grad
        assert grad is not None and bool(grad.abs().sum() > 0), source


@pytest.mark.parametrize("name", list(CASES))
def test_export_masked_writes_zero_points_that_match_functional_call(name: str, tmp_path: Path) -> None:
    model, proto, _, x = _load(name, tmp_path)
    gen = torch.Generator().manual_seed(1)
    keep = {source: torch.rand(model.weight(source).shape, generator=gen) > 0.4 for source in CASES[name][1]}
    out = export_masked(model, keep, tmp_path / "masked.onnx")
    params = {
        model.weight(s).name: torch.where(k, model.module.get_parameter(model.weight(s).name), 0.0)
        for s, k in keep.items()
    }
    with torch.no_grad():
        expected = torch.func.functional_call(model.module, params, (torch.from_numpy(x),)).numpy()
    np.testing.assert_allclose(_ort(out, x), expected, rtol=1e-5, atol=1e-5)
    before = {t.name: t for t in proto.graph.initializer}
    after = {t.name: t for t in onnx.load(out).graph.initializer}
    for init_name, tensor in after.items():
        if init_name not in keep:
            assert tensor.SerializeToString() == before[init_name].SerializeToString(), init_name
    reloaded = modscope.load(out)
    for source, mask in keep.items():
        values = reloaded.module.get_parameter(reloaded.weight(source).name).detach()
        assert bool((values[~mask] == 0).all()) and after[source].data_type == before[source].data_type


def test_integer_initializer_shared_by_different_dequantizations_stays_a_buffer() -> None:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.integers(-127, 128, size=(4, 3)).astype(np.int8), "w_q"),
        numpy_helper.from_array(np.array(0.02, np.float32), "s1"),
        numpy_helper.from_array(np.array(0.05, np.float32), "s2"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "s1"], ["w1"]),
        helper.make_node("DequantizeLinear", ["w_q", "s2"], ["w2"]),
        helper.make_node("MatMul", ["x", "w1"], ["a"]),
        helper.make_node("MatMul", ["x", "w2"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    proto = _model(
        nodes, [helper.make_tensor_value_info("x", F32, [2, 4])], [helper.make_tensor_value_info("y", F32, None)], inits
    )
    model = modscope.load(proto)
    assert all(w.source_name != "w_q" for w in model.weights)
    x = rng.normal(size=(2, 4)).astype(np.float32)
    expected = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    with torch.no_grad():
        np.testing.assert_allclose(model.module(torch.from_numpy(x)).numpy(), expected[0], rtol=1e-5, atol=1e-6)
