"""The ONNX loader and graph interpreter: weights by usage, names, inputs, constants, files, errors, execution.

Graphs are built in memory with ``onnx.helper``; float results are compared with 1e-6 tolerances (the same
float32 operations run in the same order on both sides).
"""

from __future__ import annotations

import copy
import gc
import os
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import modscope
from modscope.converters.onnx.loader import load_onnx
from modscope.errors import (
    MissingFileError,
    InvalidParameterError,
    ModelLoadError,
    ModscopeError,
    OperatorError,
    ShapeError,
    UnsupportedOperatorError,
)

_RNG = np.random.default_rng(0)
TOL = {"rtol": 1e-6, "atol": 1e-6}


def _arr(*shape: int) -> np.ndarray:
    return _RNG.standard_normal(shape).astype(np.float32)


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, tuple[int, list]],
    outputs: list[str],
    inits: list[onnx.TensorProto] = (),
    opset: int = 17,
    graph_inputs_extra: list[onnx.ValueInfoProto] = (),
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()] + list(graph_inputs_extra),
        [helper.make_value_info(n, onnx.TypeProto()) for n in outputs],
        initializer=list(inits),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _mlp_proto() -> onnx.ModelProto:
    """x -> MatMul(fc1.weight) + fc1.bias -> Relu -> Gemm(fc2.weight, fc2.bias)."""
    nodes = [
        helper.make_node("MatMul", ["x", "fc1.weight"], ["h0"], name="/fc1/MatMul"),
        helper.make_node("Add", ["h0", "fc1.bias"], ["h1"], name="/fc1/Add"),
        helper.make_node("Relu", ["h1"], ["h2"], name="/relu/Relu"),
        helper.make_node("Gemm", ["h2", "fc2.weight", "fc2.bias"], ["y"], name="/fc2/Gemm", transB=1),
    ]
    inits = [
        _init("fc1.weight", _arr(4, 8)),
        _init("fc1.bias", _arr(8)),
        _init("fc2.weight", _arr(3, 8)),
        _init("fc2.bias", _arr(3)),
    ]
    return _model(nodes, {"x": (TensorProto.FLOAT, ["N", 4])}, ["y"], inits)


def _mlp_reference(proto: onnx.ModelProto, x: torch.Tensor) -> torch.Tensor:
    w = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in proto.graph.initializer}
    h = torch.relu(x @ w["fc1.weight"] + w["fc1.bias"])
    return h @ w["fc2.weight"].T + w["fc2.bias"]


# -- weights by usage -----------------------------------------------------------------------------------------------
def test_mlp_weights_kinds_layers_and_names():
    proto = _mlp_proto()
    model = modscope.load(proto)
    got = {w.source_name: (w.kind, w.layer) for w in model.weights}
    assert got == {
        "fc1.weight": ("weight", "fc1"),
        "fc1.bias": ("bias", "fc1"),
        "fc2.weight": ("weight", "fc2"),
        "fc2.bias": ("bias", "fc2"),
    }
    for w in model.weights:
        param = model.module.get_parameter(w.name)
        assert isinstance(param, torch.nn.Parameter) and param.requires_grad
        assert model.module.param_names[w.source_name] == w.name
    x = torch.from_numpy(_arr(5, 4))
    torch.testing.assert_close(model(x), _mlp_reference(proto, x), **TOL)


def test_conv_batchnorm_statistics_are_buffers():
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], name="/conv/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["y"], name="/bn/BN"),
    ]
    inits = [
        _init("conv.w", _arr(4, 2, 3, 3)),
        _init("conv.b", _arr(4)),
        _init("bn.scale", _arr(4)),
        _init("bn.bias", _arr(4)),
        _init("bn.mean", _arr(4)),
        _init("bn.var", np.abs(_arr(4)) + 0.5),
    ]
    model = modscope.load(_model(nodes, {"x": (TensorProto.FLOAT, [1, 2, 5, 5])}, ["y"], inits))
    got = {w.source_name: (w.kind, w.layer) for w in model.weights}
    assert got == {
        "conv.w": ("weight", "conv"),
        "conv.b": ("bias", "conv"),
        "bn.scale": ("norm", "bn"),
        "bn.bias": ("bias", "bn"),
    }
    buffers = {b for b, _ in model.module.consts.named_buffers()}
    assert {"bn_mean", "bn_var"} <= buffers


def test_merged_running_statistics_keep_their_values_when_the_weight_is_masked():
    # exporters store equal tensors once: a fresh BatchNorm's running variance may be its scale
    nodes = [
        helper.make_node("Identity", ["bn.weight"], ["bn.running_var"]),
        helper.make_node("BatchNormalization", ["x", "bn.weight", "bn.bias", "bn.mean", "bn.running_var"], ["y"]),
    ]
    inits = [_init("bn.weight", np.full(3, 2.0, np.float32)), _init("bn.bias", _arr(3)), _init("bn.mean", _arr(3))]
    model = modscope.load(_model(nodes, {"x": (TensorProto.FLOAT, [2, 3, 4])}, ["y"], inits))
    x = torch.from_numpy(_arr(2, 3, 4))
    name = model.weight("bn.weight").name
    halved = model.functional_call({name: torch.ones(3)}, x)
    full = model(x)
    bias = model.module.get_parameter(model.weight("bn.bias").name).detach().view(1, 3, 1)
    # y = scale * (x - mean) / sqrt(var + eps) + bias: halving the scale halves (y - bias); var stays 2
    torch.testing.assert_close(halved - bias, (full - bias) / 2, rtol=1e-5, atol=1e-6)


def test_usage_decides_weights_and_buffers():
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"]),  # embedding
        helper.make_node("Add", ["e", "pos"], ["e2"]),  # positional table [1, T, D]
        helper.make_node("Mul", ["e2", "scalar"], ["e3"]),  # scalar: buffer
        helper.make_node("Add", ["e3", "mask"], ["e4"]),  # holds -inf: buffer
        helper.make_node("Transpose", ["ln_scale_t"], ["ln_scale"], perm=[0]),  # followed through
        helper.make_node("Mul", ["e4", "ln_scale"], ["e5"]),  # vector scale: norm
        helper.make_node("Add", ["e5", "ln_bias"], ["e6"]),  # vector bias after the scale: same layer
        helper.make_node("Reshape", ["e6", "shape"], ["y"]),  # int64 shape: buffer
    ]
    mask = np.zeros((1, 3, 4), np.float32)
    mask[0, 0, 0] = -np.inf
    inits = [
        _init("table", _arr(10, 4)),
        _init("pos", _arr(1, 3, 4)),
        _init("scalar", np.array(0.5, np.float32)),
        _init("mask", mask),
        _init("ln_scale_t", _arr(4)),
        _init("ln_bias", _arr(4)),
        _init("shape", np.array([-1, 4], np.int64)),
    ]
    model = modscope.load(_model(nodes, {"ids": (TensorProto.INT64, [2, 3])}, ["y"], inits))
    got = {w.source_name: w.kind for w in model.weights}
    assert got == {"table": "embedding", "pos": "embedding", "ln_scale_t": "norm", "ln_bias": "bias"}
    layers = {w.source_name: w.layer for w in model.weights}
    assert layers["ln_bias"] == layers["ln_scale_t"]
    out = model(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert out.shape == (6, 4) and torch.isinf(out).any()


def test_one_element_bias_after_a_linear_is_a_weight():
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="/head/MatMul"),
        helper.make_node("Add", ["h", "b"], ["y"], name="/head/Add"),
        helper.make_node("Add", ["y", "eps"], ["z"]),
    ]
    inits = [_init("w", _arr(4, 1)), _init("b", _arr(1)), _init("eps", np.array([1e-5], np.float32))]
    model = modscope.load(_model(nodes, {"x": (TensorProto.FLOAT, [2, 4])}, ["z"], inits))
    assert {w.source_name: (w.kind, w.layer) for w in model.weights} == {
        "w": ("weight", "head"),
        "b": ("bias", "head"),
    }


def test_unsafe_initializer_names_map_back():
    names = ["onnx::MatMul_12", "/enc/layer.0/w:0", "0.weight", "a b"]
    nodes, prev = [], "x"
    for i, name in enumerate(names):
        nodes.append(helper.make_node("MatMul", [prev, name], [f"h{i}"]))
        prev = f"h{i}"
    inits = [_init(n, _arr(3, 3)) for n in names]
    model = modscope.load(_model(nodes, {"x": (TensorProto.FLOAT, [1, 3])}, [prev], inits))
    assert [w.source_name for w in model.weights] == names
    torch_names = [w.name for w in model.weights]
    assert len(set(torch_names)) == 4
    assert all(n.startswith("params.") and n.split(".", 1)[1].isidentifier() for n in torch_names)
    for w in model.weights:
        expected = next(t for t in inits if t.name == w.source_name)
        np.testing.assert_array_equal(model.parameters()[w.name].numpy(), numpy_helper.to_array(expected))


# -- inputs, constants, run-time shapes -----------------------------------------------------------------------------
def test_initializers_listed_as_inputs_are_optional_and_overridable():
    proto = _mlp_proto()
    extra = [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in proto.graph.initializer]
    proto.graph.input.extend(extra)
    proto.ir_version = 3
    model = modscope.load(proto)
    assert model.module.input_names == ("x",)
    x = torch.from_numpy(_arr(2, 4))
    torch.testing.assert_close(model(x), _mlp_reference(proto, x), **TOL)
    zero_bias = model.module(x, **{"fc2.bias": torch.zeros(3)})
    torch.testing.assert_close(model(x) - zero_bias, model.parameters()[model.weight("fc2.bias").name].expand(2, 3))
    with pytest.raises(InvalidParameterError, match="not an input"):
        model.module(x, nope=torch.zeros(1))
    with pytest.raises(InvalidParameterError, match="takes 1 inputs"):
        model.module(x, x)


def test_constant_nodes_are_folded_and_shapes_are_computed_per_call():
    nodes = [
        helper.make_node("Constant", [], ["minus_one"], value=numpy_helper.from_array(np.array([-1], np.int64))),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array([0], np.int64))),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Concat", ["batch", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    model = modscope.load(_model(nodes, {"x": (TensorProto.FLOAT, ["N", 2, 3])}, ["y"]))
    ops = [s.ctx.node.op_type for s in model.module._main.steps]
    assert "Constant" not in ops and ops == ["Shape", "Gather", "Concat", "Reshape"]
    for batch in (1, 4):
        x = torch.randn(batch, 2, 3)
        torch.testing.assert_close(model(x), x.reshape(batch, 6))


def test_constant_arithmetic_is_computed_once():
    nodes = [
        helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0, np.float32))),
        helper.make_node("Mul", ["two", "c"], ["four"]),
        helper.make_node("Mul", ["x", "four"], ["y"]),
    ]
    inits = [_init("c", np.array(2.0, np.float32))]
    model = modscope.load(_model(nodes, {"x": (TensorProto.FLOAT, [3])}, ["y"], inits))
    assert [s.ctx.node.op_type for s in model.module._main.steps] == ["Mul"]
    torch.testing.assert_close(model(torch.ones(3)), torch.full((3,), 4.0))


def test_intermediate_values_are_freed():
    made: list[weakref.ref] = []

    def tracking_relu(ctx, x):
        out = torch.relu(x)
        made.append(weakref.ref(out))
        return out

    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["y"])]
    model = modscope.load(_model(nodes, {"x": (TensorProto.FLOAT, [4])}, ["y"]), op_handlers={"Relu": tracking_relu})
    with torch.no_grad():
        y = model(torch.randn(4))
    gc.collect()
    assert made and made[0]() is None  # the Relu result died as soon as Neg had read it
    assert y.shape == (4,)


def test_old_opset_models_load():
    nodes = [helper.make_node("Add", ["x", "b"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]
    model = modscope.load(_model(nodes, {"x": (TensorProto.FLOAT, [2, 3])}, ["y"], [_init("b", _arr(3))], opset=7))
    assert model.source.opset == 7
    x = torch.randn(2, 3)
    torch.testing.assert_close(model(x), torch.relu(x + model.parameters()[model.weights[0].name]))


# -- gradients, functional_call, vmap, copies ---------------------------------------------------------------------
def test_gradients_functional_call_and_vmap():
    model = modscope.load(_mlp_proto())
    x = torch.from_numpy(_arr(6, 4))
    model(x).pow(2).sum().backward()
    for w in model.weights:
        grad = model.module.get_parameter(w.name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    params = model.parameters()
    stacked = {k: torch.stack([v, 0.5 * v]) for k, v in params.items()}
    batched = torch.func.vmap(lambda p: model.functional_call(p, x))(stacked)
    for i in range(2):
        one = model.functional_call({k: v[i] for k, v in stacked.items()}, x)
        torch.testing.assert_close(batched[i], one, **TOL)
    torch.testing.assert_close(batched[0], model(x), **TOL)


def test_subgraph_reads_an_outer_weight_and_gets_its_gradient():
    then_graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["t"])], "then", [], [helper.make_value_info("t", onnx.TypeProto())]
    )
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e"])], "else", [], [helper.make_value_info("e", onnx.TypeProto())]
    )
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)]
    inputs = {"cond": (TensorProto.BOOL, []), "x": (TensorProto.FLOAT, [2, 2])}
    model = modscope.load(_model(nodes, inputs, ["y"], [_init("w", _arr(2, 2))]))
    assert [w.source_name for w in model.weights] == ["w"]
    x = torch.randn(2, 2)
    model(torch.tensor(True), x).sum().backward()
    assert model.module.get_parameter(model.weights[0].name).grad is not None
    torch.testing.assert_close(model(torch.tensor(False), x), -x)
    twin = copy.deepcopy(model.module)  # Model.module_on copies modules for other devices
    torch.testing.assert_close(twin(torch.tensor(True), x), model(torch.tensor(True), x))


# -- errors -------------------------------------------------------------------------------------------------------
def test_failing_handler_names_the_node_and_keeps_the_cause():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="/fc/MatMul")]
    model = modscope.load(_model(nodes, {"x": (TensorProto.FLOAT, [2, 4])}, ["y"], [_init("w", _arr(4, 3))]))
    with pytest.raises(OperatorError, match=r"'/fc/MatMul' \(MatMul\).*float32\[2, 5\]") as info:
        model(torch.randn(2, 5))
    assert isinstance(info.value, ModscopeError) and isinstance(info.value.__cause__, RuntimeError)
    assert info.value.op_type == "MatMul" and info.value.node == "/fc/MatMul"


def test_modscope_errors_from_handlers_pass_through():
    def strict(ctx, x):
        raise ShapeError("x must be 2-D")

    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    model = modscope.load(_model(nodes, {"x": (TensorProto.FLOAT, [2])}, ["y"]), op_handlers={"Relu": strict})
    with pytest.raises(ShapeError, match="2-D"):
        model(torch.randn(2))


def test_unknown_operators_are_all_named():
    nodes = [
        helper.make_node("FancyOp", ["x"], ["a"], domain="com.example"),
        helper.make_node("OtherOp", ["a"], ["y"]),
    ]
    proto = _model(nodes, {"x": (TensorProto.FLOAT, [2])}, ["y"])
    proto.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(UnsupportedOperatorError, match="com.example::FancyOp.*also uses OtherOp") as info:
        modscope.load(proto)
    assert info.value.op_type == "FancyOp" and info.value.domain == "com.example"
    model = modscope.load(proto, op_handlers={("com.example", "FancyOp"): lambda ctx, x: x * 2, "OtherOp": lambda ctx, x: x + 1})
    torch.testing.assert_close(model(torch.ones(2)), torch.full((2,), 3.0))


def test_value_nothing_defines_is_a_load_error():
    nodes = [helper.make_node("Add", ["x", "ghost"], ["y"], name="add")]
    with pytest.raises(ModelLoadError, match="'add' \\(Add\\) reads 'ghost'"):
        modscope.load(_model(nodes, {"x": (TensorProto.FLOAT, [2])}, ["y"]))


def test_nodes_out_of_order_are_sorted():
    nodes = [helper.make_node("Neg", ["a"], ["y"]), helper.make_node("Relu", ["x"], ["a"])]
    model = modscope.load(_model(nodes, {"x": (TensorProto.FLOAT, [3])}, ["y"]))
    x = torch.randn(3)
    torch.testing.assert_close(model(x), -torch.relu(x))


# -- files ----------------------------------------------------------------------------------------------------------
def _save(proto: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(proto.SerializeToString())
    return path


def test_file_loads_with_source_details(tmp_path):
    path = _save(_mlp_proto(), tmp_path / "mlp.onnx")
    model = modscope.load(path)
    assert model.source.format == "onnx" and model.source.path == str(path)
    assert len(model.source.checksum) == 64 and model.source.opset == 17
    x = torch.randn(2, 4)
    torch.testing.assert_close(model(x), load_onnx(_mlp_proto()).functional_call(model.parameters(), x))


def test_external_data_loads_from_the_model_folder(tmp_path):
    proto = _mlp_proto()
    saved = copy.deepcopy(proto)  # save_model moves the tensors of the proto it is given out to the file
    onnx.save_model(saved, tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    assert (tmp_path / "m.data").stat().st_size > 0
    model = modscope.load(tmp_path / "m.onnx")
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), _mlp_reference(proto, x), **TOL)


def _external_model(tmp_path: Path, location: str) -> Path:
    proto = _mlp_proto()
    tensor = proto.graph.initializer[0]
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.external_data.add(key="location", value=location)
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    return _save(proto, folder / "m.onnx")


@pytest.mark.parametrize(
    "location, message",
    [
        ("../secret.bin", "outside the model's folder"),
        ("/etc/hostname", "outside the model's folder"),
        ("missing.bin", "does not exist"),
        ("linked.bin", "outside the model's folder"),
    ],
)
def test_external_data_outside_the_folder_or_missing_is_refused(tmp_path, location, message):
    (tmp_path / "secret.bin").write_bytes(np.zeros(32, np.float32).tobytes())
    path = _external_model(tmp_path, location)
    if location == "linked.bin":
        os.symlink(tmp_path / "secret.bin", path.parent / "linked.bin")
    with pytest.raises(MissingFileError if location == "missing.bin" else ModelLoadError, match=message):
        modscope.load(path)


def test_truncated_external_data_is_refused(tmp_path):
    path = _external_model(tmp_path, "short.bin")
    (path.parent / "short.bin").write_bytes(b"\0" * 12)
    with pytest.raises(ModelLoadError, match="holds 12 bytes"):
        modscope.load(path)


def test_in_memory_model_with_external_data_says_how_to_load_it(tmp_path):
    path = _external_model(tmp_path, "w.bin")
    proto = onnx.load(path, load_external_data=False)
    with pytest.raises(ModelLoadError, match="load it from its file path"):
        modscope.load(proto)


def test_broken_files_raise_one_readable_error(tmp_path):
    good = _mlp_proto().SerializeToString()
    cases = {
        "empty.onnx": b"",
        "truncated.onnx": good[: len(good) // 2],
        "image.onnx": b"\x89PNG\r\n\x1a\n" + bytes(range(256)),
        "notes.onnx": b"this is a text file, not a model\n" * 4,
        "random.onnx": _RNG.integers(0, 256, 500, dtype=np.uint8).tobytes(),
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        for loader in (modscope.load, load_onnx):
            with pytest.raises(ModelLoadError) as info:
                loader(path)
            message = str(info.value)
            assert str(path) in message or path.name in message, (name, message)
            assert "\n" not in message and len(message) < 300, (name, message)


def test_missing_file(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist"):
        load_onnx(tmp_path / "nope.onnx")


# -- compile-time speed-ups keep the semantics ----------------------------------------------------------------------
def _ops_run(model: modscope.Model) -> list[str]:
    return [s.ctx.node.op_type for s in model.module._main.steps]


def test_matmul_and_bias_add_fuse_only_when_the_product_is_not_needed_elsewhere():
    model = modscope.load(_mlp_proto())
    assert _ops_run(model) == ["MatMul", "Relu", "Gemm"]  # MatMul + Add run as one linear step
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Add", ["b", "h"], ["y"]),
        helper.make_node("Neg", ["h"], ["z"]),  # the product is read twice: no fusion
    ]
    inits = [_init("w", _arr(4, 3)), _init("b", _arr(3))]
    model = modscope.load(_model(nodes, {"x": (TensorProto.FLOAT, [2, 4])}, ["y", "z"], inits))
    assert _ops_run(model) == ["MatMul", "Add", "Neg"]
    x = torch.randn(2, 4)
    w, b = (model.parameters()[model.weight(n).name] for n in ("w", "b"))
    y, z = model(x)
    torch.testing.assert_close(y, x @ w + b, **TOL)
    torch.testing.assert_close(z, -(x @ w), **TOL)


def test_fast_paths_match_the_operators_and_yield_to_caller_handlers():
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[2, 0, 1]),
        helper.make_node("Reshape", ["t", "shape"], ["r"]),
        helper.make_node("Gather", ["r", "last"], ["y"], axis=1),
    ]
    inits = [_init("shape", np.array([4, -1, 2], np.int64)), _init("last", np.array(-1, np.int64))]
    proto = _model(nodes, {"x": (TensorProto.FLOAT, [2, 3, 4])}, ["y"], inits)
    x = torch.randn(2, 3, 4)
    expected = x.permute(2, 0, 1).reshape(4, -1, 2)[:, -1]
    torch.testing.assert_close(modscope.load(proto)(x), expected)
    calls = []

    def my_transpose(ctx, value):
        calls.append(ctx.name)
        return value.permute(2, 0, 1)

    torch.testing.assert_close(modscope.load(proto, op_handlers={"Transpose": my_transpose})(x), expected)
    assert len(calls) == 1


def test_shape_arithmetic_is_reused_while_shapes_stay_the_same():
    counted = []

    def counting_cast(ctx, value):
        counted.append(1)
        return value.to(torch.float32)

    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
        helper.make_node("Sqrt", ["sf"], ["root"]),
        helper.make_node("Mul", ["x", "root"], ["y"]),
    ]
    model = modscope.load(_model(nodes, {"x": (TensorProto.FLOAT, [3])}, ["y"]), op_handlers={"Cast": counting_cast})
    x = torch.ones(3)
    for _ in range(3):
        torch.testing.assert_close(model(x), torch.full((3,), 3.0**0.5))
    assert len(counted) == 1
    torch.testing.assert_close(model(torch.ones(4)), torch.full((4,), 2.0))
    assert len(counted) == 2
