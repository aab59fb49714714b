"""PyTorch files in: state_dict + factory, safetensors, pickled modules and trust, .pt2 archives, TorchScript."""

from __future__ import annotations

import io
import os
import pickle
import zipfile

import pytest
import torch
from factories import (
    Doubler,
    Encoder,
    Net,
    SmallCNN,
    Unexportable,
    seeded,
    tiny_mlp,
    tiny_mlp_bn,
)
from safetensors.torch import save_file

import modscope
from modscope.converters.files import file_sha256
from modscope.converters.pytorch import load_exported_program
from modscope.errors import InvalidParameterError, ModelLoadError, UntrustedFileError

# float32 round-off from the different op order of a converted graph; weights are identical.
TOL = {"rtol": 1e-5, "atol": 1e-6}


class _Payload:
    """Unpickling this touches a marker file: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# -- state_dict + factory -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_with_factory_rebuilds_the_module(tmp_path, suffix):
    net = seeded(tiny_mlp_bn)
    path = tmp_path / f"weights{suffix}"
    torch.save(net.state_dict(), path) if suffix == ".pt" else save_file(net.state_dict(), path)

    model = modscope.load(path, factory="factories:tiny_mlp_bn")

    x = torch.randn(4, 3)
    torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)
    assert [w.source_name for w in model.weights] == [n for n, _ in net.named_parameters()]
    assert model.source.format == "state_dict"
    assert model.source.checksum == file_sha256(path)
    assert model.source.details["container"] == ("safetensors" if suffix == ".safetensors" else "torch")


def test_factory_may_be_a_callable(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(seeded(tiny_mlp).state_dict(), path)
    assert len(modscope.load(path, factory=tiny_mlp).weights) == 4


def test_state_dict_without_factory_explains_how_to_pass_one(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(seeded(tiny_mlp).state_dict(), path)
    with pytest.raises(ModelLoadError, match=r"state_dict: it holds weights but no architecture; pass factory=.*--factory"):
        modscope.load(path)


@pytest.mark.parametrize(
    "factory, error, words",
    [
        ("no_such_package.models:build", ModelLoadError, "cannot import factory module 'no_such_package.models'"),
        ("factories:nope", ModelLoadError, "has no attribute 'nope'"),
        ("factories:NOT_CALLABLE", ModelLoadError, "cannot be called"),
        ("factories:raising_factory", ModelLoadError, "raised RuntimeError: no GPU here"),
        ("factories:not_a_module", ModelLoadError, "returned a dict, not a torch.nn.Module"),
        ("factories.tiny_mlp", InvalidParameterError, "package.module:callable"),
    ],
)
def test_factory_errors_are_clear(tmp_path, factory, error, words):
    path = tmp_path / "w.pt"
    torch.save(seeded(tiny_mlp).state_dict(), path)
    with pytest.raises(error, match=words):
        modscope.load(path, factory=factory)


def test_key_mismatch_lists_missing_and_unexpected_keys(tmp_path):
    state = seeded(tiny_mlp).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["2.bias"]
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match=r"1 missing key\(s\) \(2\.bias\) and 1 unexpected key\(s\) \(extra\.weight\)"):
        modscope.load(path, factory="factories:tiny_mlp")


def test_shape_mismatch_names_the_tensor(tmp_path):
    state = seeded(tiny_mlp).state_dict()
    state["0.weight"] = torch.zeros(4, 5)
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match=r"0\.weight \(4, 5\) vs \(4, 3\)"):
        modscope.load(path, factory="factories:tiny_mlp")


def test_data_parallel_prefix_is_stripped_and_kept_as_source_name(tmp_path):
    net = seeded(tiny_mlp)
    path = tmp_path / "w.pt"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)
    model = modscope.load(path, factory="factories:tiny_mlp")
    assert [w.name for w in model.weights] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert [w.source_name for w in model.weights] == ["module.0.weight", "module.0.bias", "module.2.weight", "module.2.bias"]


def test_nested_training_checkpoint_is_understood(tmp_path):
    net = seeded(tiny_mlp)
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": net.state_dict(), "lr": 0.1}, path)
    model = modscope.load(path, factory="factories:tiny_mlp")
    x = torch.randn(2, 3)
    torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)


def test_checkpoint_without_tensors_says_what_it_holds(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(ModelLoadError, match=r"holds a dict, not a module or a state_dict.*epoch, lr"):
        modscope.load(path, factory="factories:tiny_mlp")


# -- pickles and trust --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zip_format", [True, False])
def test_pickled_module_needs_trust(tmp_path, zip_format):
    net = seeded(tiny_mlp)
    path = tmp_path / "whole.pt"
    torch.save(net, path, _use_new_zipfile_serialization=zip_format)

    with pytest.raises(UntrustedFileError) as info:
        modscope.load(path)
    message = str(info.value)
    assert "is a pickled Python object" in message
    assert "loading it runs code from the file; pass trust=True (CLI: --trust) only if you trust its source" in message
    assert "torch.nn.modules.container.Sequential" in message

    model = modscope.load(path, trust=True)
    x = torch.randn(3, 3)
    torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)
    assert model.source.format == "pickle"


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_untrusted_pickle_runs_no_code(tmp_path, writer):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save({"w": torch.zeros(2), "x": _Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_Payload(marker)))

    with pytest.raises(UntrustedFileError):
        modscope.load(path, factory="factories:tiny_mlp")
    assert not marker.exists()


def test_trusted_plain_pickle_is_unpickled(tmp_path):
    net = seeded(tiny_mlp)
    path = tmp_path / "net.pkl"
    path.write_bytes(pickle.dumps(net))
    model = modscope.load(path, trust=True)
    x = torch.randn(2, 3)
    torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)


def test_factory_with_a_whole_module_is_rejected(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(seeded(tiny_mlp), path)
    with pytest.raises(InvalidParameterError, match="holds a whole module"):
        modscope.load(path, trust=True, factory="factories:tiny_mlp")


# -- torch.export ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder_pt2(tmp_path_factory):
    net = seeded(Encoder)
    ids = torch.tensor([[0, 3, 5], [1, 2, 4]])
    path = tmp_path_factory.mktemp("pt2") / "encoder.pt2"
    program = torch.export.export(net, (ids,))
    torch.export.save(program, path)
    return net, ids, program, path


def test_pt2_round_trip_keeps_names_and_function(encoder_pt2):
    net, ids, program, path = encoder_pt2
    model = modscope.load(path)

    torch.testing.assert_close(model(ids), net(ids), rtol=0, atol=0)
    names = [n for n, _ in net.named_parameters()]
    assert [w.name for w in model.weights] == names
    assert [w.source_name for w in model.weights] == names
    assert set(names) <= set(program.state_dict)
    kinds = {w.name: w.kind for w in model.weights}
    assert kinds == {
        "emb.weight": "embedding",
        "norm.weight": "norm",
        "norm.bias": "bias",
        "body.0.weight": "weight",
        "body.0.bias": "bias",
        "head.weight": "weight",
        "head.bias": "bias",
    }
    assert model.weight("body.0.weight").layer == "body.0"
    assert model.source.format == "export" and model.source.checksum == file_sha256(path)


def test_pt2_weights_can_be_swapped_functionally(encoder_pt2):
    net, ids, _, path = encoder_pt2
    model = modscope.load(path)
    zeroed = {"head.weight": torch.zeros(2, 4)}
    out = model.functional_call(zeroed, ids)
    torch.testing.assert_close(out, net.head.bias.expand(2, 3, 2), rtol=0, atol=0)
    torch.testing.assert_close(model(ids), net(ids), rtol=0, atol=0)  # the module itself is unchanged


def test_in_memory_exported_program(encoder_pt2):
    net, ids, program, _ = encoder_pt2
    model = modscope.load(program)
    assert model.source.format == "export" and model.source.path is None
    torch.testing.assert_close(model(ids), net(ids), rtol=0, atol=0)
    with pytest.raises(InvalidParameterError, match="factory"):
        load_exported_program(program, factory="factories:tiny_mlp")


def test_pt2_with_pickled_python_objects_needs_trust(encoder_pt2, tmp_path):
    _, _, _, path = encoder_pt2
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt2"
    payload = io.BytesIO()
    torch.save((_Payload(marker),), payload)
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(evil, "w") as dst:
        for name in src.namelist():
            data = payload.getvalue() if name.endswith("sample_inputs/model.pt") else src.read(name)
            dst.writestr(name, data)
    with pytest.raises(UntrustedFileError, match="sample_inputs/model.pt holds pickled Python objects"):
        modscope.load(evil)
    assert not marker.exists()


# -- TorchScript ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_is_converted_through_onnx(tmp_path, how):
    net = seeded(Net)
    x = torch.randn(5, 3)
    path = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(net) if how == "script" else torch.jit.trace(net, x), path)

    model = modscope.load(path)

    torch.testing.assert_close(model(x), net(x), **TOL)
    torch.testing.assert_close(model(torch.ones(1, 3)), net(torch.ones(1, 3)), **TOL)  # any batch size
    assert model.source.format == "torchscript" and model.source.details["converted_via"] == "onnx"
    assert sorted(w.source_name for w in model.weights) == sorted(n for n, _ in net.named_parameters())
    assert model.weight("head.bias").kind == "bias" and model.weight("head.bias").layer == "head"


def test_torchscript_embedding_input_is_inferred(tmp_path):
    net = seeded(Encoder)
    path = tmp_path / "enc.pt"
    torch.jit.save(torch.jit.script(net), path)
    model = modscope.load(path)
    ids = torch.tensor([[0, 3, 5, 1]])
    torch.testing.assert_close(model(ids), net(ids), **TOL)
    assert model.weight("emb.weight").kind == "embedding" and model.weight("norm.weight").kind == "norm"


def test_torchscript_cnn_keeps_every_weight_distinct(tmp_path):
    # A fresh batch norm's weight equals its running_var: the exporter must not merge the two initializers.
    net = seeded(SmallCNN)
    path = tmp_path / "cnn.pt"
    torch.jit.save(torch.jit.script(net), path)
    model = modscope.load(path)  # the conv input (1, 3, H, W) is inferred from the weight
    x = torch.randn(2, 3, 9, 7)
    torch.testing.assert_close(model(x), net(x), **TOL)
    assert {w.source_name: w.kind for w in model.weights} == {
        "conv.weight": "weight", "conv.bias": "bias", "bn.weight": "norm", "bn.bias": "bias",
        "fc.weight": "weight", "fc.bias": "bias",
    }


def test_torchscript_input_that_cannot_be_inferred_asks_for_example_inputs(tmp_path):
    net = seeded(Doubler)
    path = tmp_path / "dbl.pt"
    torch.jit.save(torch.jit.script(net), path)
    with pytest.raises(ModelLoadError, match=r"aten::mul\); pass example_inputs="):
        modscope.load(path)
    model = modscope.load(path, example_inputs=torch.zeros(1, 3))
    x = torch.randn(4, 3)
    torch.testing.assert_close(model(x), net(x), **TOL)


def test_torchscript_that_cannot_be_exported_suggests_alternatives(tmp_path):
    path = tmp_path / "svd.pt"
    torch.jit.save(torch.jit.script(seeded(Unexportable)), path)
    with pytest.raises(ModelLoadError, match=r"cannot be converted.*linalg_svd.*torch\.export \(\.pt2\) or export it to ONNX"):
        modscope.load(path)


def test_torchscript_loader_runs_no_python_from_the_archive(tmp_path):
    good = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(seeded(Net)), good)
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for name in src.namelist():
            data = pickle.dumps(_Payload(marker), protocol=2) if name.endswith(("data.pkl", "constants.pkl")) else src.read(name)
            dst.writestr(name, data)
    with pytest.raises(ModelLoadError, match="cannot load TorchScript archive"):
        modscope.load(evil)
    assert not marker.exists()
    assert sorted(os.listdir(tmp_path)) == ["evil.pt", "net.pt"]  # nothing else was written either
