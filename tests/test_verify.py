"""Parity checks against onnxruntime (`modscope.converters.verify`)."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import onnx
import pytest
import torch
from factories import TwoHeads, export_onnx, seeded, tiny_mlp
from onnx import helper

import modscope
from modscope.converters import verify as verify_mod
from modscope.converters.verify import random_inputs, verify
from modscope.errors import InvalidParameterError, ModscopeError, ModscopeWarning


@pytest.fixture
def mlp(tmp_path):
    return export_onnx(seeded(tiny_mlp), tmp_path / "mlp.onnx")


def test_converted_model_agrees_with_onnxruntime(mlp):
    result = verify(modscope.load(mlp))
    assert result.ok
    assert result.provider == "CPUExecutionProvider"
    (out,) = result.outputs
    assert out.shape == (2, 2) and out.ok
    assert out.max_abs_diff < 1e-5 and out.max_rel_diff < 1e-3


def test_a_different_model_is_caught(mlp, tmp_path):
    other = export_onnx(seeded(tiny_mlp, seed=1), tmp_path / "other.onnx")
    result = verify(modscope.load(mlp), source=other)
    assert not result.ok
    assert result.outputs[0].max_abs_diff > 1e-2 and not result.outputs[0].ok


def test_shape_mismatch_is_reported_and_serialisable(mlp, tmp_path):
    wider = export_onnx(seeded(lambda: torch.nn.Sequential(torch.nn.Linear(3, 5))), tmp_path / "wider.onnx")
    result = verify(modscope.load(mlp), source=wider)
    assert not result.ok and "shape (2, 2) vs reference (2, 5)" in result.outputs[0].note
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["outputs"][0]["max_abs_diff"] is None and data["ok"] is False


def test_every_output_is_compared(tmp_path):
    path = export_onnx(seeded(TwoHeads), tmp_path / "two.onnx", output_names=["a", "b"])
    result = verify(modscope.load(path))
    assert [o.name for o in result.outputs] == ["a", "b"]
    assert [o.shape for o in result.outputs] == [(2, 2), (2, 4)]
    assert result.ok


def test_given_inputs_are_used(mlp):
    model = modscope.load(mlp)
    x = np.full((7, 3), 100.0, dtype=np.float32)
    assert verify(model, inputs={"x": x}).outputs[0].shape == (7, 2)
    assert verify(model, inputs=[torch.from_numpy(x)]).outputs[0].shape == (7, 2)
    with pytest.raises(InvalidParameterError, match=r"the model has no input 'y'; its inputs are \['x'\]"):
        verify(model, inputs={"y": x})
    with pytest.raises(InvalidParameterError, match="2 arrays but the graph has 1 inputs"):
        verify(model, inputs=[x, x])


def test_other_formats_compare_against_a_given_onnx_file(mlp):
    net = seeded(tiny_mlp)
    assert verify(modscope.load(net), source=mlp).ok
    with pytest.raises(InvalidParameterError, match=r"loaded from 'torch' in memory.*pass source="):
        verify(modscope.load(net))


def test_missing_onnxruntime_says_how_to_install_it(mlp, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    from modscope.install import install_hint

    with pytest.raises(ModscopeError, match=re.escape(install_hint("verify"))):
        verify(modscope.load(mlp))


def test_conflicting_onnxruntime_builds_are_reported(mlp, monkeypatch):
    monkeypatch.setattr(verify_mod, "onnxruntime_distributions", lambda: ["onnxruntime", "onnxruntime-gpu"])
    with pytest.warns(ModscopeWarning, match="onnxruntime and onnxruntime-gpu are installed together.*pip uninstall"):
        verify(modscope.load(mlp))


def test_installed_distributions_are_found():
    assert "onnxruntime" in verify_mod.onnxruntime_distributions()


def test_random_inputs_follow_the_graph_types():
    graph = helper.make_graph(
        [helper.make_node("Identity", ["ids"], ["out"])],
        "g",
        [
            helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["batch", 5]),
            helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("flag", onnx.TensorProto.BOOL, [3]),
        ],
        [helper.make_tensor_value_info("out", onnx.TensorProto.INT64, ["batch", 5])],
        [helper.make_tensor("w", onnx.TensorProto.FLOAT, [2], [1.0, 2.0])],
    )
    inputs = random_inputs(helper.make_model(graph), seed=3)
    assert sorted(inputs) == ["flag", "ids"]  # initializers that are also inputs are not fed
    assert inputs["ids"].shape == (2, 5) and inputs["ids"].dtype == np.int64
    assert set(np.unique(inputs["ids"])) <= {0, 1}
    assert inputs["flag"].dtype == np.bool_
    again = random_inputs(helper.make_model(graph), seed=3)
    np.testing.assert_array_equal(again["ids"], inputs["ids"])


def _pooling_net(tmp_path) -> str:
    """A CNN whose pooling needs more than a few pixels, exported with symbolic batch and spatial dimensions."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.MaxPool2d(4), torch.nn.Conv2d(4, 4, 3),
                              torch.nn.MaxPool2d(4), torch.nn.Flatten(1), torch.nn.LazyLinear(2))
    net(torch.zeros(1, 3, 64, 64))
    path = tmp_path / "pool.onnx"
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.zeros(1, 3, 64, 64),), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}})
    return str(path)


def test_symbolic_dimensions_get_workable_sizes(tmp_path):
    proto = onnx.load(_pooling_net(tmp_path))
    assert random_inputs(proto)["x"].shape == (2, 3, 64, 64)  # batch 2, image dimensions large enough to pool
    assert random_inputs(proto, shapes={"x": (1, 3, 80, 80)})["x"].shape == (1, 3, 80, 80)
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", "seq"])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", "seq"])
    g = helper.make_graph([helper.make_node("Add", ["x", "y"], ["z"])], "g", [x, y], [x])
    made = random_inputs(helper.make_model(g))
    assert made["x"].shape == made["y"].shape == (2, 8), "one size per symbol, whichever input names it"
    with pytest.raises(InvalidParameterError, match="no input 'q'"):
        random_inputs(helper.make_model(g), shapes={"q": (1,)})


def test_cli_verify_takes_input_shapes_and_files(tmp_path):
    from cli_fixtures import in_process as console, read_json

    path = _pooling_net(tmp_path)
    ok = console("inspect", path, "--verify", "--json")
    assert ok.returncode == 0 and read_json(ok.stdout)["verify"]["ok"]
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((1, 3, 70, 70)).astype(np.float32))
    assert console("inspect", path, "--verify", "--input", f"x={tmp_path / 'x.npy'}").returncode == 0
    too_small = console("inspect", path, "--verify", "--input", "x=1x3x8x8")
    assert too_small.returncode == 2 and "Traceback" not in too_small.stderr
    assert len(too_small.stderr.strip().splitlines()) == 1 and "failed on inputs" in too_small.stderr
    bad = console("inspect", path, "--verify", "--input", "x=big")
    assert bad.returncode == 2 and "is not a shape" in bad.stderr


def test_onnxruntime_failure_is_one_sentence(mlp, monkeypatch):
    model = modscope.load(mlp)

    class Broken:
        __version__ = "0"

        @staticmethod
        def InferenceSession(*args, **kwargs):  # noqa: N802 - onnxruntime's name
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Load model failed\nstack trace ...")

    monkeypatch.setattr(verify_mod, "import_onnxruntime", lambda: Broken)
    with pytest.raises(ModscopeError, match=r"onnxruntime cannot load the file \(\[ONNXRuntimeError\] : 1 : FAIL : "
                                            r"Load model failed\)"):
        verify(model)
