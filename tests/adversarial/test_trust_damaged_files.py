"""Damaged or crafted files that modscope reads besides models: mask files whose metadata disagrees with itself or
with its tensors, report.json files of the wrong shape given to `diff`, and policy files nested too deeply or naming a
metric of the wrong type. Each is refused with one
sentence: a `ModscopeError` subclass from the API, exit code 2 from the command line, no traceback."""

# ruff: noqa: F401, F811 - pytest fixtures are imported from cli_fixtures and then named as arguments
from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))

from cli_fixtures import FIT_FLAGS, Toy, cli, fitted_run, toy  # noqa: E402
from onnx_hostile import one_sentence  # noqa: E402

from modscope.errors import ModelLoadError, PolicyError  # noqa: E402
from modscope.masks.maskset import MaskSet  # noqa: E402
from modscope.policy import load_policy  # noqa: E402


def _masks_file(tmp_path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The metadata and tensors of a small, valid mask file."""
    path = tmp_path / "ok.safetensors"
    MaskSet.from_masks({"a": {"w": torch.ones(3, 2, dtype=torch.bool)}, "b": {"w": torch.zeros(3, 2, dtype=torch.bool)}}).save(path)
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {})["modscope"]), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _edit(key: str, value: object) -> Callable[[dict], None]:
    return lambda meta: meta.__setitem__(key, value)


DAMAGED_METADATA: dict[str, Callable[[dict], None]] = {
    "tasks_missing": lambda meta: meta.pop("tasks"),
    "weights_missing": lambda meta: meta.pop("weights"),
    "tasks_a_string": _edit("tasks", "ab"),
    "tasks_numbers": _edit("tasks", [5, 6]),
    "weights_a_number": _edit("weights", 5),
    "weight_without_shape": lambda meta: meta["weights"][0].pop("shape"),
    "weight_shape_lies": lambda meta: meta["weights"][0].__setitem__("shape", [1000, 1000]),
    "config_of_unknown_fields": _edit("config", {"colour": 1}),
    "config_a_list": _edit("config", [1]),
    "curves_a_number": _edit("curves", 5),
    "extra_a_string": _edit("extra", "x"),
    "checksum_a_list": _edit("model_checksum", [1]),
}


@pytest.mark.parametrize("name", sorted(DAMAGED_METADATA))
def test_a_mask_file_with_damaged_metadata_is_one_load_error(tmp_path: Path, name: str) -> None:
    meta, tensors = _masks_file(tmp_path)
    DAMAGED_METADATA[name](meta)
    path = tmp_path / "damaged.safetensors"
    save_file(tensors, str(path), metadata={"modscope": json.dumps(meta)})
    with pytest.raises(ModelLoadError, match="damaged modscope mask file") as err:
        MaskSet.load(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("metadata", ["5", "[]", "null", '"x"'])
def test_mask_metadata_that_is_not_an_object_is_one_load_error(tmp_path: Path, metadata: str) -> None:
    _, tensors = _masks_file(tmp_path)
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={"modscope": metadata})
    with pytest.raises(ModelLoadError, match="not a modscope mask file"):
        MaskSet.load(tmp_path / "m.safetensors")


def test_integer_logits_are_refused(tmp_path: Path) -> None:
    meta, tensors = _masks_file(tmp_path)
    save_file({k: v.to(torch.int32) for k, v in tensors.items()}, str(tmp_path / "m.safetensors"),
              metadata={"modscope": json.dumps(meta)})
    with pytest.raises(ModelLoadError, match=r"logits of w are \(3, 2\) torch.int32"):
        MaskSet.load(tmp_path / "m.safetensors")


def test_a_valid_mask_file_still_loads(tmp_path: Path) -> None:
    meta, tensors = _masks_file(tmp_path)
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={"modscope": json.dumps(meta)})
    masks = MaskSet.load(tmp_path / "m.safetensors")
    assert masks.tasks == ("a", "b") and masks["a"].count() == 6 and masks["b"].count() == 0


POLICIES = {
    "nested_100k_deep": "a = " + "[" * 100_000 + "]" * 100_000 + "\n",
    "metric_a_list": "[[rule]]\nmetric = [1]\nmax = 1\n",
    "metric_a_table": "[[rule]]\nmax = 1\n[rule.metric]\nx = 1\n",
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_crafted_policy_is_one_policy_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.toml"
    path.write_text(POLICIES[name])
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_check_with_a_crafted_policy_exits_2(fitted_run: Path, tmp_path: Path, name: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / f"{name}.toml"
    path.write_text(POLICIES[name])
    assert cli("check", fitted_run, "--policy", path) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and one_sentence(captured.err), captured.err


def test_export_of_a_run_with_damaged_mask_metadata_exits_2(fitted_run: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    with safe_open(str(run / "masks.safetensors"), "pt") as f:
        meta = json.loads((f.metadata() or {})["modscope"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    del meta["weights"]
    save_file(tensors, str(run / "masks.safetensors"), metadata={"modscope": json.dumps(meta)})
    out = tmp_path / "out.safetensors"
    assert cli("export", run, "--remove", "a", "-o", out) == 2
    captured = capsys.readouterr()
    assert one_sentence(captured.err), captured.err
    assert not out.exists()


@pytest.mark.parametrize("key, value", [("iou", [[1]]), ("ablation", "x"), ("ablation", {"a": {"b": "c"}}), ("tasks", 5)])
def test_diff_with_a_crafted_report_exits_2(fitted_run: Path, tmp_path: Path, key: str, value: object,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    report = json.loads((run / "report.json").read_text())
    report[key] = value
    (run / "report.json").write_text(json.dumps(report))
    assert cli("diff", fitted_run, run) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and one_sentence(captured.err), captured.err
