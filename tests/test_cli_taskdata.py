"""Task data files for `modscope fit`: .npz, .pt and .safetensors with x (or x0, x1, ...) and y."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from modscope.errors import DataError, InvalidParameterError
from modscope.taskdata import check_fits, load_task


def test_the_three_formats_give_the_same_task(tmp_path: Path) -> None:
    x = np.random.randn(6, 3)  # float64, as numpy makes it
    y = np.array([0, 1, 0, 1, 1, 0])
    np.savez(tmp_path / "t.npz", x=x, y=y)
    torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, tmp_path / "t.pt")
    save_file({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, str(tmp_path / "t.safetensors"))
    tasks = [load_task("t", tmp_path / f"t.{ext}") for ext in ("npz", "pt", "safetensors")]
    for task in tasks:
        assert task.inputs[0].dtype == torch.float32 and len(task) == 6
        assert torch.equal(task.inputs[0], tasks[0].inputs[0]) and torch.equal(task.targets, torch.from_numpy(y))


def test_format_comes_from_the_content(tmp_path: Path) -> None:
    np.savez(tmp_path / "t.npz", x=np.zeros((2, 3), np.float32), y=np.zeros(2, np.int64))
    (tmp_path / "t.npz").rename(tmp_path / "data.bin")
    assert len(load_task("t", tmp_path / "data.bin")) == 2


def test_several_inputs_in_order(tmp_path: Path) -> None:
    np.savez(tmp_path / "t.npz", x1=np.ones((4, 2), np.float32), x0=np.zeros((4, 5), np.int64), y=np.zeros(4, np.int64))
    task = load_task("t", tmp_path / "t.npz", loss="ce", output=1)
    assert [tuple(t.shape) for t in task.inputs] == [(4, 5), (4, 2)]
    assert task.inputs[0].dtype == torch.int64 and task.output == 1


@pytest.mark.parametrize(("arrays", "message"), [
    ({"x": np.zeros((2, 3)), "x0": np.zeros((2, 3)), "y": np.zeros(2)}, "both 'x' and"),
    ({"x0": np.zeros((2, 3)), "x2": np.zeros((2, 3)), "y": np.zeros(2)}, "without gaps"),
    ({"y": np.zeros(2)}, "no inputs"),  # any key other than y is an input (named inputs)
    ({"x": np.array(["a", "b"]), "y": np.zeros(2)}, "numbers only"),
])
def test_malformed_archives(arrays: dict, message: str, tmp_path: Path) -> None:
    np.savez(tmp_path / "t.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_task("t", tmp_path / "t.npz")


def test_pt_files_are_read_without_unpickling_objects(tmp_path: Path) -> None:
    from fractions import Fraction

    torch.save({"x": torch.zeros(2, 3), "y": torch.zeros(2), "note": Fraction(1, 3)}, tmp_path / "t.pt")
    with pytest.raises(DataError, match="does not unpickle"):
        load_task("t", tmp_path / "t.pt")
    with open(tmp_path / "list.pt", "wb") as f:
        pickle.dump([1, 2], f, protocol=2)
    with pytest.raises(DataError):
        load_task("t", tmp_path / "list.pt")


def test_unknown_and_empty_files(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("x,y\n1,2\n")
    with pytest.raises(DataError, match="not an .npz"):
        load_task("t", tmp_path / "t.csv")
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_task("t", tmp_path / "empty.npz")


@pytest.mark.filterwarnings("ignore:Using a target size")
def test_check_fits_names_the_problem() -> None:
    import modscope

    model = modscope.load(torch.nn.Linear(3, 2))
    check_fits(model, modscope.Task("ok", torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(modscope.errors.ShapeError, match="cannot run on its inputs"):
        check_fits(model, modscope.Task("wide", torch.zeros(4, 5), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(DataError, match="up to class 5"):
        check_fits(model, modscope.Task("classes", torch.zeros(4, 3), torch.full((4,), 5)))
    with pytest.raises(DataError, match="do not fit the model's output"):
        check_fits(model, modscope.Task("mse", torch.zeros(4, 3), torch.zeros(4, 7), loss="mse"))


def test_check_fits_asks_for_an_output_on_multi_output_models() -> None:
    from factories import TwoHeads

    import modscope

    model = modscope.load(TwoHeads())
    with pytest.raises(InvalidParameterError, match="returns 2 outputs"):
        check_fits(model, modscope.Task("t", torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)))
    check_fits(model, modscope.Task("t", torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), output=1))
