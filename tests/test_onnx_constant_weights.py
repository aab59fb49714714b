"""Weights kept in Constant nodes (paddle2onnx, OpenVINO exports) are found, masked and written back where they were.

The test files are made the way such files come about: a torch network exported with torch.onnx, then every float
initializer rewritten as a Constant node (the main graph), or the whole computation moved into an If branch whose
weights are Constant nodes (a sub-graph).
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from factories import seeded
from onnx import helper, numpy_helper
from onnx_rewrites import as_constants, in_if_branch
from torch import nn

import modscope
from modscope.converters.export import export_masked
from modscope.errors import ModscopeWarning

ort = pytest.importorskip("onnxruntime")
TOL = {"rtol": 1e-4, "atol": 1e-5}


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 6),
                         nn.ReLU(), nn.Linear(6, 3))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> onnx.ModelProto:
    folder = tmp_path_factory.mktemp("const")
    net = seeded(small_cnn).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    path = folder / "cnn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (_input(),), str(path), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "n"}})
    return onnx.load(path)


def _input() -> torch.Tensor:
    return torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(1))


def _ort(model: onnx.ModelProto | str, feeds: dict) -> np.ndarray:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _weights(model: modscope.Model) -> list[tuple[str, tuple, str]]:
    return sorted((w.source_name, w.shape, w.kind) for w in model.weights)


def test_constant_weights_are_the_weights_of_the_initializer_export(exported):
    reference = modscope.load(exported)
    constants = as_constants(exported)
    before = constants.SerializeToString()
    model = modscope.load(constants)
    assert constants.SerializeToString() == before, "the caller's ModelProto is not modified"
    assert _weights(model) == _weights(reference) and len(model.weights) >= 4
    assert sorted(model.source.details["weights_in_constants"]) == sorted(
        w.source_name for w in model.weights), "the Constant-node weights are reported as such"
    x = _input()
    np.testing.assert_allclose(model(x).detach().numpy(), _ort(constants, {"x": x.numpy()}), **TOL)


def test_constant_weights_in_an_if_branch(exported):
    model = modscope.load(in_if_branch(exported))
    weights = [w for w in model.weights if w.kind == "weight"]
    assert len(weights) == 2 * len([w for w in modscope.load(exported).weights if w.kind == "weight"])  # both branches
    x = _input()
    for flag in (True, False):
        expected = _ort(in_if_branch(exported), {"x": x.numpy(), "flag": np.array(flag)})
        np.testing.assert_allclose(model(x, torch.tensor(flag)).detach().numpy(), expected, **TOL)


def test_masks_train_and_the_ablated_file_keeps_its_constant_nodes(exported, tmp_path):
    source = tmp_path / "paddle_style.onnx"
    onnx.save(as_constants(exported), source)
    model = modscope.load(source)
    x = _input()
    y = torch.tensor([0, 1, 2, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModscopeWarning)  # no loop fallback
        masks = modscope.train_masks(model, [modscope.Task("t", x, y)],
                                     modscope.MaskConfig(n_steps=3, batch_size=4, seed=0), progress=False)
    gen = torch.Generator().manual_seed(0)
    keep = {w.name: torch.rand(w.shape, generator=gen) > 0.5 for w in model.weights if w.name in masks["t"]}
    out = export_masked(model, keep, tmp_path / "ablated.onnx")
    written = onnx.load(out)
    assert not [i for i in written.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert sum(n.op_type == "Constant" for n in written.graph.node) == sum(
        n.op_type == "Constant" for n in onnx.load(source).graph.node), "the file keeps its structure"
    params = model.parameters()
    zeroed = {n: torch.where(keep[n], p, torch.zeros(())) if n in keep else p for n, p in params.items()}
    expected = model.functional_call(zeroed, x).detach().numpy()
    np.testing.assert_allclose(_ort(str(out), {"x": x.numpy()}), expected, **TOL)
    assert not np.allclose(expected, model(x).detach().numpy()), "the ablation changed the outputs"
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in written.graph.node if n.op_type == "Constant"}
    w = next(w for w in model.weights if w.name in keep)
    np.testing.assert_array_equal(constants[w.source_name] == 0, ~keep[w.name].numpy() | (params[w.name].numpy() == 0))


def test_inspect_says_where_the_weights_are_and_which_tensors_are_not(exported, tmp_path):
    from cli_fixtures import in_process as console, read_json

    source = tmp_path / "paddle_style.onnx"
    onnx.save(as_constants(exported), source)
    storage = read_json(console("inspect", source, "--json").stdout)["storage"]
    assert set(storage["found_in"]) == {"Constant nodes"} and storage["coverage"] == 1.0
    branches = tmp_path / "branches.onnx"
    onnx.save(in_if_branch(exported), branches)
    assert set(read_json(console("inspect", branches, "--json").stdout)["storage"]["found_in"]) == {
        "sub-graph Constant nodes"}

    table = numpy_helper.from_array(np.ones((2, 3), np.float32), "table")  # compared with, never computed with
    w = numpy_helper.from_array(np.ones((3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Greater", ["h", "table"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.BOOL, [2, 3])], initializer=[w, table])
    mixed = tmp_path / "mixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), mixed)
    result = console("inspect", mixed)
    assert result.returncode == 0
    assert "Weights found in: 1 initializers; they hold 60.0% of the file's 15 float elements" in result.stdout
    assert "not a weight: table (2x3, initializer)" in result.stdout


def test_fit_on_a_file_without_weights_says_why(tmp_path):
    from cli_fixtures import in_process as console

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    np.savez(tmp_path / "t.npz", x=np.ones((8, 4), np.float32), y=np.ones((8, 4), np.float32))
    result = console("fit", path, "--task", f"a={tmp_path / 't.npz'}", "--loss", "mse", "--out", tmp_path / "run")
    assert result.returncode == 2
    assert "the model has no weights modscope can mask" in result.stderr and "include" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_cli_audits_a_constant_weight_file_end_to_end(exported, tmp_path):
    """The commands of docs/cli.md's Constant-node example: inspect, fit, report, export, then onnxruntime."""
    from cli_fixtures import in_process as console

    source = tmp_path / "ocr_cls.onnx"
    onnx.save(as_constants(exported), source)
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        np.savez(tmp_path / f"{name}.npz", x=rng.standard_normal((32, 2, 5, 5)).astype(np.float32),
                 y=rng.integers(0, 3, 32))
    inspected = console("inspect", source)
    assert inspected.returncode == 0 and "Weights found in: 6 Constant nodes; they hold 100.0% of the file's 690 " \
        "float elements" in inspected.stdout
    run = tmp_path / "runs" / "ocr"
    fit = console("fit", source, "--task", f"a={tmp_path / 'a.npz'}", "--task", f"b={tmp_path / 'b.npz'}", "--out", run,
                  "--n-steps", "20", "--batch-size", "16", "--quiet")
    assert fit.returncode == 0, fit.stderr
    assert console("report", run, "--html", tmp_path / "ocr.html").returncode == 0
    out = tmp_path / "ocr_without_a.onnx"
    assert console("export", run, "--remove", "a", "-o", out).returncode == 0
    assert [n.op_type for n in onnx.load(out).graph.node] == [n.op_type for n in onnx.load(source).graph.node]
    verified = console("inspect", out, "--verify")
    assert verified.returncode == 0 and "outputs agree" in verified.stdout
