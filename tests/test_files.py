"""Format detection (`modscope.converters.files`): every kind by content, wrong suffixes, broken files, options."""

from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from factories import Net, export_onnx, seeded, tiny_mlp
from safetensors.torch import save_file

import modscope
from modscope.converters.files import detect_format
from modscope.errors import InvalidParameterError, MissingFileError, ModelLoadError, ModscopeError, UnreadableFileError


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One file of every supported kind, written once for the module."""
    d = tmp_path_factory.mktemp("kinds")
    net = seeded(tiny_mlp)
    x = torch.randn(2, 3)
    paths = {
        "onnx": export_onnx(net, d / "model.onnx"),
        "export": d / "model.pt2",
        "torchscript": d / "model.ts",
        "state_dict": d / "sd.pt",
        "whole": d / "whole.pt",
        "safetensors": d / "sd.safetensors",
        "legacy": d / "legacy.pt",
    }
    torch.export.save(torch.export.export(net, (x,)), paths["export"])
    torch.jit.save(torch.jit.script(seeded(Net)), paths["torchscript"])
    torch.save(net.state_dict(), paths["state_dict"])
    torch.save(net, paths["whole"])
    save_file(net.state_dict(), paths["safetensors"])
    torch.save(net.state_dict(), paths["legacy"], _use_new_zipfile_serialization=False)
    return paths


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("onnx", "onnx"),
        ("export", "export"),
        ("torchscript", "torchscript"),
        ("state_dict", "torch_zip"),
        ("whole", "torch_zip"),
        ("safetensors", "safetensors"),
        ("legacy", "pickle"),
    ],
)
def test_detects_each_format(files, kind, expected):
    assert detect_format(files[kind]) == expected


def test_detection_ignores_the_suffix(files, tmp_path):
    onnx_as_bin = tmp_path / "weights.bin"
    onnx_as_bin.write_bytes(files["onnx"].read_bytes())
    pt2_as_onnx = tmp_path / "model.onnx"
    pt2_as_onnx.write_bytes(files["export"].read_bytes())
    assert detect_format(onnx_as_bin) == "onnx"
    assert detect_format(pt2_as_onnx) == "export"
    assert modscope.load(onnx_as_bin).source.format == "onnx"


def test_plain_pickle_is_detected_as_pickle(tmp_path):
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    assert detect_format(path) == "pickle"


def _truncate(src, dst, fraction=0.5):
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda d, f: _write(d / "empty.onnx", b""), "empty"),
        (lambda d, f: _truncate(f["onnx"], d / "cut.onnx"), "truncated or corrupt"),
        (lambda d, f: _truncate(f["onnx"], d / "cut.bin", 0.7), "truncated or corrupt"),
        (lambda d, f: _truncate(f["state_dict"], d / "cut.pt"), "truncated or corrupt"),
        (lambda d, f: _truncate(f["export"], d / "cut.pt2"), "truncated or corrupt"),
        (lambda d, f: _truncate(f["safetensors"], d / "cut.safetensors", 0.8), "truncated safetensors"),
        (lambda d, f: _truncate(f["legacy"], d / "cut_legacy.pt"), "truncated or corrupt"),
        (lambda d, f: _write(d / "notes.onnx", b"these are my notes, not a model\n" * 4), "truncated or corrupt"),
        (lambda d, f: _write(d / "notes.txt", b"these are my notes, not a model\n" * 4), "not a model file"),
        (lambda d, f: _write(d / "image.onnx", b"\x89PNG\r\n\x1a\n" + bytes(64)), "PNG image"),
        (lambda d, f: _write(d / "noise.bin", np.random.default_rng(0).bytes(4096)), "not a model file"),
        (lambda d, f: _zip(d / "other.zip"), "not a PyTorch"),
    ],
)
def test_broken_files_raise_one_clear_sentence(files, tmp_path, make, words):
    path = make(tmp_path, files)
    with pytest.raises(ModelLoadError) as info:
        modscope.load(path)
    message = str(info.value)
    assert words in message
    assert str(path.name) in message
    assert "\n" not in message


def test_non_model_protobuf_is_not_taken_for_onnx(tmp_path):
    # A serialized TensorProto is valid protobuf that parses as a ModelProto with no graph.
    tensor = onnx.numpy_helper.from_array(np.arange(64, dtype=np.float32), "t")
    path = _write(tmp_path / "tensor.pb", tensor.SerializeToString())
    with pytest.raises(ModelLoadError, match="not a model file"):
        detect_format(path)


def test_protobuf_without_graph_is_not_taken_for_onnx(tmp_path):
    header_only = onnx.ModelProto(ir_version=9, producer_name="x")
    path = _write(tmp_path / "nograph.onnx", header_only.SerializeToString())
    with pytest.raises(ModelLoadError, match="protobuf data without a graph"):
        detect_format(path)


def test_safetensors_with_bad_header_is_corrupt(tmp_path):
    header = b"{not json at all}"
    path = _write(tmp_path / "bad.safetensors", struct.pack("<Q", len(header)) + header)
    with pytest.raises(ModelLoadError, match="corrupt safetensors"):
        detect_format(path)


def test_unknown_option_is_named(files):
    with pytest.raises(InvalidParameterError, match=r"factory.*ONNX files.*accepted: .*op_handlers"):
        modscope.load(files["onnx"], factory="factories:tiny_mlp")
    with pytest.raises(InvalidParameterError, match="colour"):
        modscope.load(files["export"], colour="red")


def test_none_and_false_options_count_as_not_given(files):
    model = modscope.load(files["onnx"], factory=None, trust=False)
    assert model.source.format == "onnx"


def test_each_format_loads_to_the_same_function(files):
    net = seeded(tiny_mlp)
    x = torch.randn(2, 3)  # the .pt2 was exported with a static batch of 2
    expected = net(x)
    for kind, options in [
        ("onnx", {}),
        ("export", {}),
        ("state_dict", {"factory": "factories:tiny_mlp"}),
        ("safetensors", {"factory": "factories:tiny_mlp"}),
        ("legacy", {"factory": "factories:tiny_mlp"}),
        ("whole", {"trust": True}),
    ]:
        model = modscope.load(files[kind], **options)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6, msg=kind)  # float32 round-off only


def _write(path, data):
    path.write_bytes(data)
    return path


def _zip(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    return path


# -- one error class per failure kind, whichever loader meets it ----------------------------------------------------
def _readers(tmp_path: Path) -> dict[str, Any]:
    from modscope.converters.onnx.loader import load_onnx
    from modscope.policy import load_policy
    from modscope.runs import RunFolder
    from modscope.taskdata import read_arrays

    return {
        "model": modscope.load,
        "onnx": load_onnx,
        "masks": modscope.MaskSet.load,
        "task data": read_arrays,
        "policy": load_policy,
        "run folder": RunFolder.open,
    }


@pytest.mark.parametrize("kind", ["model", "onnx", "masks", "task data", "policy", "run folder"])
def test_a_missing_file_is_the_same_error_from_every_loader(tmp_path, kind):
    read = _readers(tmp_path)[kind]
    with pytest.raises(MissingFileError, match="does not exist") as info:
        read(tmp_path / "gone.bin")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ModscopeError)
    assert str(tmp_path / "gone.bin") in str(info.value)


@pytest.mark.parametrize("kind", ["model", "onnx", "masks", "task data", "policy"])
def test_a_folder_where_a_file_belongs_is_the_same_error_from_every_loader(tmp_path, kind):
    read = _readers(tmp_path)[kind]
    folder = tmp_path / "a_folder"
    folder.mkdir()
    with pytest.raises(UnreadableFileError, match="folder") as info:
        read(folder)
    assert isinstance(info.value, OSError) and not isinstance(info.value, FileNotFoundError)
