"""The safe zip reader (modscope/converters/archives.py): what it refuses, from the central directory alone, and
which error class each reader raises."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import hostile  # noqa: E402

import modscope  # noqa: E402
from modscope.converters.archives import check_zip  # noqa: E402
from modscope.converters.pytorch import load_torch_file  # noqa: E402
from modscope.errors import DataError, InvalidParameterError, ModelLoadError  # noqa: E402
from modscope.taskdata import load_task  # noqa: E402


def _zip(path: Path, *members: tuple[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members:
            z.writestr(name, data)
    return path


@pytest.mark.parametrize("name", ["/abs/x", "a/../../x", "..", "a\\..\\x", "a\x00b", "C:/x"])
def test_names_outside_the_root_are_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / "a.zip"
    stand_in = "a_b" if "\x00" in name else name  # zipfile cuts names at NUL when writing: patch the bytes after
    _zip(path, (stand_in, b"x"))
    if stand_in != name:
        path.write_bytes(path.read_bytes().replace(stand_in.encode(), name.encode()))
    with pytest.raises(ModelLoadError, match="outside the archive"):
        check_zip(path)


def test_a_plain_archive_passes_and_lists_its_members(tmp_path: Path) -> None:
    path = _zip(tmp_path / "ok.zip", ("a/b.bin", b"123"), ("c", b""))
    assert [m.filename for m in check_zip(path)] == ["a/b.bin", "c"]


def test_the_total_declared_size_is_limited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _zip(tmp_path / "two.zip", ("a", b"x" * 600), ("b", b"x" * 600))
    assert check_zip(path, max_total_bytes=1200)
    with pytest.raises(ModelLoadError, match="more than 1,000 bytes in all"):
        check_zip(path, max_total_bytes=1000)
    monkeypatch.setenv("MODSCOPE_MAX_ZIP_TOTAL_BYTES", "1000")
    with pytest.raises(ModelLoadError, match="MODSCOPE_MAX_ZIP_TOTAL_BYTES"):
        check_zip(path)
    monkeypatch.setenv("MODSCOPE_MAX_ZIP_TOTAL_BYTES", "lots")
    with pytest.raises(InvalidParameterError, match="MODSCOPE_MAX_ZIP_TOTAL_BYTES must be a positive number of bytes"):
        check_zip(path)


def test_a_damaged_zip_is_one_error(tmp_path: Path) -> None:
    path = _zip(tmp_path / "d.zip", ("a", b"x" * 100))
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DataError, match="damaged zip archive"):
        check_zip(path, "task data file", error=DataError)


def test_direct_loaders_check_too(tmp_path: Path) -> None:
    """load_torch_file and the TorchScript reader refuse a crafted zip also when called without load_file."""
    case = hostile.zip_duplicate_members(tmp_path, {})
    with pytest.raises(ModelLoadError, match="two members named"):
        load_torch_file(Path(case.argv[1]), factory="factories:tiny_mlp")
    from modscope.converters.torchscript import read_script

    with pytest.raises(ModelLoadError, match="two members named"):
        read_script(case.argv[1])
    assert not (tmp_path / hostile.CANARY).exists()


def test_task_files_raise_data_errors(tmp_path: Path) -> None:
    case = hostile.npz_duplicate_members(tmp_path, {"model": "unused"})
    with pytest.raises(DataError, match="two members named 'x.npy'"):
        load_task("a", case.argv[3].split("=", 1)[1])
    lies = hostile.npz_header_lies(tmp_path, {"model": "unused"})
    with pytest.raises(DataError, match=r"declares shape \(1000, 8\) but holds 64 bytes"):
        load_task("a", lies.argv[3].split("=", 1)[1])


def test_ordinary_files_still_load(tmp_path: Path) -> None:
    np.savez_compressed(tmp_path / "t.npz", x=np.zeros((5, 3), np.float32), y=np.arange(5) % 2)
    assert len(load_task("t", tmp_path / "t.npz")) == 5
    torch.save({"x": torch.zeros(4, 3), "y": torch.zeros(4, dtype=torch.long)}, tmp_path / "t.pt")
    assert len(load_task("t", tmp_path / "t.pt")) == 4
    torch.export.save(torch.export.export(torch.nn.Linear(2, 3), (torch.zeros(1, 2),)), str(tmp_path / "m.pt2"))
    assert [w.name for w in modscope.load(tmp_path / "m.pt2").weights] == ["weight", "bias"]
