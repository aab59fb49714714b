import pytest
import torch

import modscope
from modscope.errors import InvalidParameterError, MissingFileError, ModelLoadError
from modscope.masks.maskset import Mask


def test_mask_algebra_and_counts():
    a = Mask({"w": torch.tensor([1, 1, 0, 0]), "v": torch.tensor([1, 0])}, {"w": "L1", "v": "L2"})
    b = Mask({"w": torch.tensor([1, 0, 1, 0]), "v": torch.tensor([0, 0])}, {"w": "L1", "v": "L2"})
    assert (a & b).count() == 1 and (a | b).count() == 4 and (a ^ b).count() == 3 and (~a).count() == 3
    assert a.per_layer() == {"L1": (2, 4), "L2": (1, 2)}
    assert a.density() == pytest.approx(0.5)
    assert a.select("L2").count() == 1 and a.select("L2", exclude=True).count() == 2
    with pytest.raises(InvalidParameterError):
        a & Mask({"w": torch.tensor([1, 1, 0, 0])})


def test_maskset_save_load_round_trip(tmp_path, toy_modular):
    net, tasks = toy_modular
    cfg = modscope.MaskConfig(n_steps=20, batch_size=16, seed=5)
    masks = modscope.train_masks(net, list(tasks.values()), cfg, progress=False)
    path = masks.save(tmp_path / "m.safetensors")
    loaded = modscope.MaskSet.load(path)
    assert loaded.tasks == masks.tasks and loaded.config == cfg and loaded.model_checksum == masks.model_checksum
    assert loaded.weights == masks.weights and loaded.curves == masks.curves
    for t in masks.tasks:
        assert loaded[t] == masks[t]
        assert all(torch.equal(loaded.logits[t][n], masks.logits[t][n]) for n in masks.logits[t])
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file is left behind"


def test_maskset_set_operations():
    ms = modscope.MaskSet.from_masks({"a": {"w": torch.tensor([1, 1, 0])}, "b": {"w": torch.tensor([0, 1, 1])}})
    assert (~ms)["a"].count() == 1
    assert (ms & ~ms)["b"].count() == 0 and (ms | ~ms)["b"].count() == 3
    assert ms.density() == {"a": pytest.approx(2 / 3), "b": pytest.approx(2 / 3)}


def test_maskset_is_a_mapping_of_tasks():
    ab = modscope.MaskSet.from_masks({"a": {"w": torch.tensor([1, 1, 0])}, "b": {"w": torch.tensor([0, 1, 1])}})
    a = modscope.MaskSet.from_masks({"a": {"w": torch.tensor([1, 0, 0])}})
    assert "a" in ab and "x" not in ab and ab.get("x") is None and ab.get("a") is ab["a"]
    with pytest.raises(KeyError, match="no mask for task 'x'"):
        ab["x"]
    with pytest.raises(InvalidParameterError):  # still the error callers of older versions catch
        ab["x"]
    # the common tasks, whichever run comes first
    assert modscope.metrics.stability([ab, a]).tasks == modscope.metrics.stability([a, ab]).tasks == ("a",)


def test_loading_a_bad_mask_file(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist"):
        modscope.MaskSet.load(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="not a modscope mask file"):
        modscope.MaskSet.load(bad)
