"""Every output file follows the umask: masks and exported models are no longer 0600 while the rest is 0644."""

import os
import stat

import pytest
import torch
from factories import export_onnx, seeded, tiny_mlp

import modscope
from modscope.converters.export import export_masked
from modscope.masks.maskset import Mask


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_mask_file_follows_umask(tmp_path, umask):
    ms = modscope.MaskSet.from_masks({"a": {"w": torch.tensor([1, 1, 0])}, "b": {"w": torch.tensor([0, 1, 1])}})
    path = ms.save(tmp_path / "masks.safetensors")
    assert _mode(path) == 0o666 & ~umask


@pytest.mark.parametrize("name", ["out.onnx", "out.safetensors", "out.pt"])
def test_exported_model_follows_umask(tmp_path, umask, name):
    net = seeded(tiny_mlp)
    model = modscope.load(export_onnx(net, tmp_path / "mlp.onnx")) if name.endswith(".onnx") else modscope.load(net)
    keep = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.parameters().items()}
    out = export_masked(model, keep, tmp_path / name)
    assert _mode(out) == 0o666 & ~umask


def test_mask_repr_names_what_it_counts():
    m = Mask({"w": torch.tensor([1, 1, 0, 0]), "v": torch.tensor([1, 0])})
    assert repr(m) == "Mask(tensors=2, kept=3 of 6 weights)"
    ms = modscope.MaskSet.from_masks({"a": {"w": torch.tensor([1, 1, 0, 0])}})
    assert "weight_tensors=1" in repr(ms) and "kept fraction: a=0.500" in repr(ms)
