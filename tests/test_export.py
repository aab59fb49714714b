"""Models out (`modscope.converters.export.export_masked`): edited ONNX copies and state_dicts."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from factories import export_onnx, seeded, tiny_mlp, tiny_mlp_bn
from onnx import helper, numpy_helper
from safetensors.torch import load_file

import modscope
from modscope.converters import export as export_mod
from modscope.converters.export import export_masked
from modscope.errors import (
    MissingFileError,
    InvalidParameterError,
    ModelLoadError,
    ModscopeError,
    ShapeError,
)

# onnxruntime's Gemm and torch's addmm sum in different orders: float32 round-off only.
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _random_keep(model, seed=0, names=None):
    g = torch.Generator().manual_seed(seed)
    chosen = [w for w in model.weights if names is None or w.source_name in names]
    return {w.name: torch.rand(w.shape, generator=g) > 0.5 for w in chosen}


def _run_ort(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


def _zeroed(model, keep):
    params = model.parameters()
    return {n: torch.where(keep[n], p, torch.zeros(())) if n in keep else p for n, p in params.items()}


@pytest.fixture
def mlp_onnx(tmp_path):
    net = seeded(tiny_mlp)
    return net, export_onnx(net, tmp_path / "mlp.onnx")


def test_ablated_onnx_in_onnxruntime_matches_torch_with_zeroed_weights(mlp_onnx, tmp_path):
    net, path = mlp_onnx
    model = modscope.load(path)
    keep = _random_keep(model)
    out = export_masked(model, keep, tmp_path / "ablated.onnx")

    x = torch.randn(6, 3)
    ablated = _run_ort(out, x)
    zeroed = _zeroed(model, keep)
    torch.testing.assert_close(ablated, model.functional_call(zeroed, x), **TOL)
    by_source = {w.source_name: zeroed[w.name] for w in model.weights}  # the original torch module, same weights
    torch.testing.assert_close(ablated, torch.func.functional_call(net, by_source, (x,)), **TOL)
    assert not torch.allclose(ablated, net(x))  # the ablation changed something


def test_only_the_chosen_initializers_change(mlp_onnx, tmp_path):
    _, path = mlp_onnx
    model = modscope.load(path)
    keep = _random_keep(model, names={"0.weight"})
    out = export_masked(model, keep, tmp_path / "ablated.onnx")

    before, after = onnx.load(str(path)), onnx.load(str(out))
    old = {i.name: i for i in before.graph.initializer}
    for init in after.graph.initializer:
        if init.name != "0.weight":
            assert init.SerializeToString() == old[init.name].SerializeToString()
    edited = next(i for i in after.graph.initializer if i.name == "0.weight")
    assert (edited.data_type, list(edited.dims), edited.HasField("raw_data")) == (
        old["0.weight"].data_type, list(old["0.weight"].dims), old["0.weight"].HasField("raw_data"))
    mask = keep[model.weight("0.weight").name].numpy()
    expected = np.where(mask, numpy_helper.to_array(old["0.weight"]), 0)
    np.testing.assert_array_equal(numpy_helper.to_array(edited), expected)
    for proto in (before, after):
        del proto.graph.initializer[:]
    assert before.SerializeToString() == after.SerializeToString()


def test_all_true_masks_leave_the_file_as_it_was(mlp_onnx, tmp_path):
    _, path = mlp_onnx
    model = modscope.load(path)
    keep = {w.name: torch.ones(w.shape, dtype=torch.bool) for w in model.weights}
    out = export_masked(model, keep, tmp_path / "same.onnx")
    assert onnx.load(str(out)).SerializeToString() == onnx.load(str(path)).SerializeToString()


def test_typed_field_storage_is_kept(tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(3, 2) + 1
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor("W", onnx.TensorProto.FLOAT, [3, 2], w.flatten().tolist(), raw=False)],
    )
    path = tmp_path / "typed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    model = modscope.load(path)
    keep = {"W": torch.tensor([[True, False], [False, True], [True, True]])}

    out = export_masked(model, keep, tmp_path / "out.onnx")

    init = onnx.load(str(out)).graph.initializer[0]
    assert not init.HasField("raw_data") and len(init.float_data) == 6
    np.testing.assert_array_equal(numpy_helper.to_array(init), np.where(keep["W"].numpy(), w, 0))


def _external_copy(path, folder, location):
    proto = onnx.load(str(path))
    folder.mkdir(exist_ok=True)
    target = folder / "ext.onnx"
    onnx.save_model(proto, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return target


def _locations(path):
    proto = onnx.load(str(path), load_external_data=False)
    return {i.name: {e.key: e.value for e in i.external_data}.get("location") for i in proto.graph.initializer}


@pytest.mark.parametrize(
    "case, out_name, original_location, expected",
    [
        # same folder: untouched tensors keep pointing at the original data file
        ("same_dir", "ablated.onnx", "weights.bin", {"0.weight": "ablated.onnx.data", "0.bias": "weights.bin"}),
        # another folder: everything the output needs is next to it
        ("other_dir", "ablated.onnx", "weights.bin", {"0.weight": "ablated.onnx.data", "0.bias": "ablated.onnx.data"}),
        # the output's data file name is the original's: untouched tensors move into the new file
        ("collision", "ablated.onnx", "ablated.onnx.data", {"0.weight": "ablated.onnx.data", "0.bias": "ablated.onnx.data"}),
    ],
)
def test_external_data_model(mlp_onnx, tmp_path, case, out_name, original_location, expected):
    net, path = mlp_onnx
    src = _external_copy(path, tmp_path / "src", original_location)
    original_bytes = (src.parent / original_location).read_bytes()
    model = modscope.load(src)
    keep = _random_keep(model, names={"0.weight"})
    out_dir = tmp_path / "out" if case == "other_dir" else src.parent
    out_dir.mkdir(exist_ok=True)

    out = export_masked(model, keep, out_dir / out_name)

    locations = _locations(out)
    assert {k: locations[k] for k in expected} == expected
    x = torch.randn(4, 3)
    torch.testing.assert_close(_run_ort(out, x), model.functional_call(_zeroed(model, keep), x), **TOL)
    untouched = numpy_helper.to_array(
        next(i for i in onnx.load(str(out), load_external_data=False).graph.initializer if i.name == "2.weight"),
        str(out_dir))
    np.testing.assert_array_equal(untouched, net[2].weight.detach().numpy())
    if case == "same_dir":
        assert (src.parent / original_location).read_bytes() == original_bytes
    assert not [f for f in os.listdir(out_dir) if f.endswith(".tmp")]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_state_dict_export_loads_strictly(tmp_path, suffix):
    net = seeded(tiny_mlp_bn)
    model = modscope.load(net)
    keep = _random_keep(model, names={"0.weight", "3.weight"})
    out = export_masked(model, keep, tmp_path / f"ablated{suffix}")

    state = load_file(out) if suffix == ".safetensors" else torch.load(out, weights_only=True)
    fresh = tiny_mlp_bn()
    fresh.load_state_dict(state, strict=True)
    torch.testing.assert_close(fresh[0].weight, torch.where(keep["0.weight"], net[0].weight, 0.0), rtol=0, atol=0)
    torch.testing.assert_close(fresh[0].bias, net[0].bias, rtol=0, atol=0)
    torch.testing.assert_close(fresh[1].running_var, net[1].running_var, rtol=0, atol=0)
    assert torch.equal(net[0].weight, model.module[0].weight)  # the user's module is not touched


def test_state_dict_export_uses_source_names(tmp_path, mlp_onnx):
    _, path = mlp_onnx
    onnx_model = modscope.load(path)
    state = load_file(export_masked(onnx_model, _random_keep(onnx_model), tmp_path / "w.safetensors"))
    assert sorted(state) == ["0.bias", "0.weight", "2.bias", "2.weight"]

    prefixed = tmp_path / "dp.pt"
    torch.save({f"module.{k}": v for k, v in seeded(tiny_mlp).state_dict().items()}, prefixed)
    sd_model = modscope.load(prefixed, factory="factories:tiny_mlp")
    state = torch.load(export_masked(sd_model, {}, tmp_path / "dp_out.pt"), weights_only=True)
    assert sorted(state) == ["module.0.bias", "module.0.weight", "module.2.bias", "module.2.weight"]


def test_keep_names_may_be_source_names(mlp_onnx, tmp_path):
    _, path = mlp_onnx
    model = modscope.load(path)
    mask = torch.zeros(4, 3, dtype=torch.bool)
    out = export_masked(model, {"0.weight": mask}, tmp_path / "zero.onnx")
    init = next(i for i in onnx.load(str(out)).graph.initializer if i.name == "0.weight")
    assert not numpy_helper.to_array(init).any()


@pytest.mark.parametrize(
    "keep, out_name, error, words",
    [
        ({"nope": torch.ones(1, dtype=torch.bool)}, "o.onnx", InvalidParameterError, "no weight named 'nope'"),
        ({"0.weight": torch.ones(4, 3)}, "o.onnx", InvalidParameterError, "must be boolean"),
        ({"0.weight": torch.ones(3, 4, dtype=torch.bool)}, "o.onnx", ShapeError, r"shape \(3, 4\), the weight has \(4, 3\)"),
        ({}, "missing/o.onnx", MissingFileError, "does not exist"),
    ],
)
def test_bad_arguments(mlp_onnx, tmp_path, keep, out_name, error, words):
    model = modscope.load(mlp_onnx[1])
    with pytest.raises(error, match=words):
        export_masked(model, keep, tmp_path / out_name)


def test_onnx_output_needs_an_onnx_source(tmp_path, mlp_onnx):
    model = modscope.load(seeded(tiny_mlp))
    with pytest.raises(InvalidParameterError, match=r"came from 'torch' in memory; pass source="):
        export_masked(model, {}, tmp_path / "o.onnx")
    with pytest.raises(InvalidParameterError, match="source= applies only to ONNX output"):
        export_masked(model, {}, tmp_path / "o.pt", source=mlp_onnx[1])


def test_changed_source_is_detected(mlp_onnx, tmp_path):
    _, path = mlp_onnx
    model = modscope.load(path)
    export_onnx(seeded(tiny_mlp, seed=1), path)
    with pytest.raises(ModelLoadError, match="changed since the model was loaded"):
        export_masked(model, {}, tmp_path / "o.onnx")


def test_failed_check_leaves_no_output_and_no_temporary_files(mlp_onnx, tmp_path, monkeypatch):
    _, path = mlp_onnx
    src = _external_copy(path, tmp_path / "src", "weights.bin")
    model = modscope.load(src)
    out = src.parent / "ablated.onnx"
    out.write_bytes(b"previous export")

    def fail(*args):
        raise ModscopeError("does not run in onnxruntime")

    monkeypatch.setattr(export_mod, "_check_runs", fail)
    with pytest.raises(ModscopeError):
        export_masked(model, _random_keep(model), out)
    assert out.read_bytes() == b"previous export"
    assert sorted(os.listdir(src.parent)) == ["ablated.onnx", "ext.onnx", "weights.bin"]
