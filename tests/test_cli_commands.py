"""`modscope inspect`, `report`, `diff`, `export` and `reproduce` on ONNX files and torch checkpoints."""

# ruff: noqa: F401, F811 - pytest fixtures are imported from cli_fixtures and then named as arguments

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cli_fixtures import (
    FIT_FLAGS,
    Toy,
    cli,
    console,
    fitted_run,
    read_json,
    toy,
    toy_net,
)

import modscope
from modscope import MaskSet


# -- inspect ----------------------------------------------------------------------------------------------------------
def test_inspect_onnx_json(toy: Toy, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("inspect", toy.onnx, "--json") == 0
    info = read_json(capsys.readouterr().out)
    assert info["format"] == "onnx" and info["opset"] >= 7
    assert info["inputs"] == [{"name": "x", "shape": ["batch", 8], "dtype": "float32"}]
    assert info["outputs"][0]["shape"] == ["batch", 4]
    assert info["operators"] == {"Gemm": 3, "Relu": 2}
    assert [layer["n_weights"] for layer in info["layers"]] == [8 * 16 + 16, 16 * 16 + 16, 16 * 4 + 4]
    assert info["n_masked_by_default"] == 8 * 16 + 16 * 16 + 16 * 4  # biases are not masked by default


def test_inspect_text_and_verify(toy: Toy, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    assert cli("inspect", toy.onnx, "--verify") == 0
    out = capsys.readouterr().out
    assert "format: ONNX" in out and "x (batch, 8) float32" in out and "Gemm x3" in out
    assert "outputs agree" in out and "CPUExecutionProvider" in out


def test_inspect_state_dict_and_export_program(toy: Toy, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("inspect", toy.state_dict, "--factory", "cli_fixtures:toy_net", "--json") == 0
    info = read_json(capsys.readouterr().out)
    assert info["format"] == "state_dict" and info["inputs"] is None
    assert info["operators"] == {"Linear": 3, "ReLU": 2}
    pt2 = tmp_path / "mlp.pt2"
    torch.export.save(torch.export.export(toy_net().eval(), (torch.zeros(2, 8),)), pt2)
    assert cli("inspect", pt2, "--json") == 0
    info = read_json(capsys.readouterr().out)
    assert info["format"] == "export" and info["details"]["torch"] == torch.__version__
    assert info["inputs"][0]["shape"] == [2, 8]
    assert info["operators"].get("linear") == 3
    script = tmp_path / "mlp.ts"
    torch.jit.save(torch.jit.script(toy_net().eval()), script)
    assert cli("inspect", script, "--json") == 0
    info = read_json(capsys.readouterr().out)
    assert info["format"] == "torchscript" and info["operators"] == {"linear": 3, "relu": 2}


# -- report -----------------------------------------------------------------------------------------------------------
def test_report_outputs(fitted_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    html, md, csv = tmp_path / "r.html", tmp_path / "r.md", tmp_path / "tables"
    assert cli("report", fitted_run, "--html", html, "--md", md, "--csv", csv) == 0
    assert capsys.readouterr().out == ""  # files were asked for: nothing on stdout
    page = html.read_text()
    for section in ("summary", "sharing", "overlap", "ablation", "clustering", "density", "curves"):
        assert f'<section id="{section}">' in page
    assert page.count("data:image/png;base64,") == 6
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing loaded from the network
    assert "## Ablation" in md.read_text()
    assert {p.name for p in csv.iterdir()} >= {"summary.csv", "sharing.csv", "overlap.csv", "ablation.csv", "density.csv"}
    assert not list(tmp_path.glob(".*.tmp"))


def test_report_text_and_json(fitted_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("report", fitted_run) == 0
    text = capsys.readouterr().out
    assert text.startswith("# modscope report")
    assert "## Sharing per layer" in text and "| a | b |" in text  # the IoU table's row of the pair a, b
    assert cli("report", fitted_run / "report.json", "--json") == 0
    data = read_json(capsys.readouterr().out)
    assert data == json.loads((fitted_run / "report.json").read_text())


# -- diff ---------------------------------------------------------------------------------------------------------------
def test_diff_of_a_run_with_itself_and_with_another_seed(fitted_run: Path, toy: Toy, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("diff", fitted_run, fitted_run, "--json") == 0
    same = read_json(capsys.readouterr().out)
    assert same["tasks"] == ["a", "b"] and same["same_model"]
    assert all(d["iou"] == 1.0 for d in same["drift"].values())
    assert all(v == 0 for row in same["ablation"]["change"] for v in row)

    other = tmp_path / "seed1"
    assert cli("fit", toy.onnx, "--task", f"a={toy.a}", "--out", other, "--seed", "1", *FIT_FLAGS) == 0
    capsys.readouterr()
    assert cli("diff", fitted_run, other, "--json") == 0
    changed = read_json(capsys.readouterr().out)
    assert changed["tasks"] == ["a"]  # only the common task
    assert changed["only_a"] == ["b"] and changed["only_b"] == [] and changed["sharing_basis"] == "common tasks"
    assert changed["drift"]["a"]["chance"] < changed["drift"]["a"]["iou"] < 1  # another seed: some weights differ
    assert cli("diff", fitted_run, other) == 0
    out = capsys.readouterr().out
    assert "Mask drift" in out and "Sharing" in out and "Ablation" in out
    assert f"Only in {fitted_run}, not compared: b" in out


# -- export -----------------------------------------------------------------------------------------------------------
def test_export_remove_and_keep_onnx(fitted_run: Path, tmp_path: Path) -> None:
    masks = MaskSet.load(fitted_run / "masks.safetensors")
    out = tmp_path / "without_a.onnx"
    assert cli("export", fitted_run, "--remove", "a", "-o", out) == 0
    removed = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(out).graph.initializer}
    model = modscope.load(out)
    for w in masks.weights:
        zeroed = removed[w.source_name] == 0
        assert np.array_equal(zeroed | ~masks["a"][w.name].numpy(), np.ones_like(zeroed)), w.name
    assert len(model.weights) == 6
    assert cli("export", fitted_run, "--keep", "b", "-o", tmp_path / "only_b.safetensors") == 0
    from safetensors.torch import load_file

    kept = load_file(tmp_path / "only_b.safetensors")
    for w in masks.weights:
        assert torch.all(kept[w.source_name][~masks["b"][w.name]] == 0)


def test_export_of_a_torch_checkpoint(toy: Toy, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert cli("fit", toy.state_dict, "--factory", "cli_fixtures:toy_net", "--task", f"a={toy.a}", "--out", run, *FIT_FLAGS) == 0
    # the run folder does not name the factory by itself: without --factory export refuses, writing nothing
    assert cli("export", run, "--remove", "a", "-o", tmp_path / "ablated.pt") == 2
    assert not (tmp_path / "ablated.pt").exists()
    assert cli("export", run, "--remove", "a", "-o", tmp_path / "ablated.pt", "--factory", "cli_fixtures:toy_net") == 0
    state = torch.load(tmp_path / "ablated.pt", weights_only=True)
    net = toy_net()
    net.load_state_dict(state)  # strict: the same keys as the original
    mask = MaskSet.load(run / "masks.safetensors")["a"]
    assert torch.all(state["0.weight"][mask["0.weight"]] == 0)


def test_export_refuses_a_changed_model(toy: Toy, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model.onnx"
    shutil.copy(toy.onnx, model)
    run = tmp_path / "run"
    assert cli("fit", model, "--task", f"a={toy.a}", "--out", run, *FIT_FLAGS) == 0
    proto = onnx.load(model)
    proto.producer_name = "changed"
    onnx.save(proto, model)
    assert cli("export", run, "--remove", "a", "-o", tmp_path / "out.onnx") == 2
    assert "has changed" in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()
    # the original file, wherever it now is, is accepted
    assert cli("export", run, "--remove", "a", "-o", tmp_path / "out.onnx", "--model", toy.onnx) == 0


def test_export_needs_a_known_task(fitted_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("export", fitted_run, "--remove", "zz", "-o", tmp_path / "out.onnx") == 2
    assert "no mask for task 'zz'" in capsys.readouterr().err


@pytest.mark.slow  # the console script runs in test_cli.py; export itself in test_export_remove_and_keep_onnx
def test_export_through_the_console_script(fitted_run: Path, tmp_path: Path) -> None:
    result = console("export", fitted_run, "--keep", "a", "-o", tmp_path / "only_a.onnx")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stderr and result.stdout == ""
    assert onnx.load(tmp_path / "only_a.onnx").graph.node


# -- reproduce --------------------------------------------------------------------------------------------------------
def test_reproduce_passes_its_options_to_the_experiment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fake_experiment.py").write_text(
        "import json\n"
        "def run(options):\n"
        "    (options.out / 'options.json').write_text(json.dumps({'quick': options.quick, 'seeds': options.seeds,\n"
        "        'device': options.device, 'progress': options.progress}))\n"
        "    return {}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from modscope.experiments import EXPERIMENTS

    monkeypatch.setitem(EXPERIMENTS, "fake", "fake_experiment")
    out = tmp_path / "out"
    out.mkdir()
    assert cli("reproduce", "fake", "--quick", "--seeds", "3", "--out", out, "--device", "cpu") == 0
    assert json.loads((out / "options.json").read_text()) == {"quick": True, "seeds": 3, "device": "cpu", "progress": True}
    assert cli("reproduce", "nonexistent") == 2


@pytest.mark.slow
def test_reproduce_addmul_quick(tmp_path: Path) -> None:
    result = console("reproduce", "addmul", "--quick", "--out", tmp_path, timeout=3600)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "addmul.json").exists()


def test_python_dash_m_matches_the_console_script(fitted_run: Path) -> None:
    import subprocess

    a = subprocess.run([sys.executable, "-m", "modscope", "report", str(fitted_run), "--json"], capture_output=True, text=True,
                       check=False)
    b = console("report", fitted_run, "--json")
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout
