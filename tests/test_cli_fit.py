"""`modscope fit`: the run folder, its atomic files, torch checkpoints, per-task options, and kill + --resume."""

# ruff: noqa: F401, F811 - pytest fixtures are imported from cli_fixtures and then named as arguments

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_fixtures import (
    in_process,
    CONSOLE,
    FIT_FLAGS,
    Toy,
    cli,
    console,
    console_env,
    fitted_run,
    read_json,
    toy,
)

from modscope import MaskConfig, MaskSet
from modscope.commands.fit import _task_options
from modscope.errors import InvalidParameterError


def test_fit_writes_a_complete_run_folder(fitted_run: Path, toy: Toy) -> None:
    names = sorted(p.name for p in fitted_run.iterdir())
    assert names == ["config.json", "curves.json", "masks.safetensors", "report.json"]  # no checkpoint, no temp files
    masks = MaskSet.load(fitted_run / "masks.safetensors")
    assert masks.tasks == ("a", "b")
    assert masks.config == MaskConfig(n_steps=30, batch_size=16, log_every=10, init=0.5, lr=0.05)  # the flags given
    config = read_json((fitted_run / "config.json").read_text())
    assert config["model"]["path"] == str(toy.onnx.resolve())
    import hashlib

    assert config["model"]["checksum"] == hashlib.sha256(toy.onnx.read_bytes()).hexdigest()
    assert config["tasks"]["a"]["data"] == str(toy.a.resolve())
    report = read_json((fitted_run / "report.json").read_text())
    for section in ("sharing", "iou", "iomin", "ablation", "clustering", "density_per_layer", "curves"):
        assert report[section], section
    assert report["iou"]["chance_total"][0][1] > 0
    assert len(report["ablation"]["removed"]) == 2
    curves = read_json((fitted_run / "curves.json").read_text())["curves"]
    assert curves["a"]["step"] == [10, 20, 30]


def test_fit_prints_a_summary_and_logs_to_stderr(toy: Toy, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags = [f for f in FIT_FLAGS if f != "--quiet"]
    assert cli("fit", toy.onnx, "--task", f"a={toy.a}", "--out", tmp_path / "run", *flags) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].split()[:3] == ["task", "metric", "full"]
    assert "training 1 mask(s)" in err and "run written to" in err and "memory plan: about" in err
    assert "task" not in err.splitlines()[0]
    # 30 steps do not converge: one warning line that names the task and suggests more steps
    assert "modscope: warning: the masks of 'a'" in err and "--n-steps 60" in err


def test_fit_a_state_dict_with_a_factory(toy: Toy, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert cli("fit", toy.state_dict, "--factory", "cli_fixtures:toy_net", "--task", f"a={toy.a}", "--task", f"b={toy.b}",
               "--out", run, *FIT_FLAGS) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["format"] == "state_dict"
    assert config["model"]["options"] == {"factory": "cli_fixtures:toy_net"}
    assert [w.name for w in MaskSet.load(run / "masks.safetensors").weights] == ["0.weight", "2.weight", "4.weight"]


def test_fit_with_held_out_data_and_same_seed_same_masks(toy: Toy, tmp_path: Path) -> None:
    for name in ("one", "two"):
        assert cli("fit", toy.onnx, "--task", f"a={toy.a}", "--eval", f"a={toy.b}", "--out", tmp_path / name, *FIT_FLAGS) == 0
    one, two = (MaskSet.load(tmp_path / n / "masks.safetensors") for n in ("one", "two"))
    assert one["a"] == two["a"]
    config = json.loads((tmp_path / "one" / "config.json").read_text())
    assert config["tasks"]["a"]["eval"] == str(toy.b.resolve())


def test_fit_refuses_to_overwrite_a_run_unless_forced(fitted_run: Path, toy: Toy, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["fit", toy.onnx, "--task", f"a={toy.a}", "--out", fitted_run, *FIT_FLAGS]
    before = (fitted_run / "masks.safetensors").read_bytes()
    assert cli(*argv) == 2
    assert "--force" in capsys.readouterr().err
    assert (fitted_run / "masks.safetensors").read_bytes() == before


def test_force_replaces_the_run(toy: Toy, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert cli("fit", toy.onnx, "--task", f"a={toy.a}", "--task", f"b={toy.b}", "--out", run, *FIT_FLAGS) == 0
    assert cli("fit", toy.onnx, "--task", f"b={toy.b}", "--out", run, "--force", *FIT_FLAGS) == 0
    assert MaskSet.load(run / "masks.safetensors").tasks == ("b",)


def test_per_task_options_general_then_specific() -> None:
    args = argparse.Namespace(loss=["b=mse", "ce"], metric=None, output=["0", "b=logits"])
    options = _task_options(args, ["a", "b"])
    assert options["a"] == {"loss": "ce", "metric": None, "output": 0}
    assert options["b"] == {"loss": "mse", "metric": None, "output": "logits"}
    with pytest.raises(InvalidParameterError, match="no task 'c'"):
        _task_options(argparse.Namespace(loss=["c=ce"], metric=None, output=None), ["a", "b"])


def test_multi_output_model_needs_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from factories import TwoHeads, export_onnx

    torch.manual_seed(0)
    model = export_onnx(TwoHeads().eval(), tmp_path / "two.onnx")
    x = np.random.randn(32, 3).astype(np.float32)
    np.savez(tmp_path / "t.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    base = ["fit", model, "--task", f"t={tmp_path / 't.npz'}", *FIT_FLAGS]
    assert cli(*base, "--out", tmp_path / "r1") == 2
    assert "--output t=INDEX" in capsys.readouterr().err
    assert cli(*base, "--output", "t=0", "--out", tmp_path / "r2") == 0


@pytest.mark.slow  # a real SIGTERM to a console process; the API's resume is tested in test_trainer.py
def test_kill_then_resume_gives_the_masks_of_an_uninterrupted_run(toy: Toy, tmp_path: Path) -> None:
    argv = ["fit", toy.onnx, "--task", f"a={toy.a}", "--task", f"b={toy.b}", "--n-steps", "100", "--batch-size", "16",
            "--log-every", "10", "--checkpoint-every", "10", "--quiet"]
    run = tmp_path / "killed"
    proc = subprocess.Popen([str(CONSOLE), *map(str, argv), "--out", str(run)], env=console_env(), stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert (run / "checkpoint.pt").exists() and not (run / "masks.safetensors").exists()
    step = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert 10 <= step < 100

    resumed = console(*argv, "--out", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert not (run / "checkpoint.pt").exists()
    assert cli(*argv, "--out", tmp_path / "whole") == 0
    a, b = MaskSet.load(run / "masks.safetensors"), MaskSet.load(tmp_path / "whole" / "masks.safetensors")
    for task in ("a", "b"):
        for name in a.logits[task]:
            assert torch.equal(a.logits[task][name], b.logits[task][name])
    # the curves' points are the same; a loss point averaged over a window the kill cut may differ in its value
    assert all(a.curves[t]["step"] == b.curves[t]["step"] and a.curves[t]["density"] == b.curves[t]["density"] for t in a.tasks)


def _torch_file(kind: str, folder: Path) -> tuple[Path, list[str]]:
    from cli_fixtures import toy_net

    torch.manual_seed(0)
    net = toy_net().eval()
    if kind == "pt2":
        path = folder / "mlp.pt2"
        batch = torch.export.Dim("batch")
        torch.export.save(torch.export.export(net, (torch.zeros(2, 8),), dynamic_shapes=({0: batch},)), path)
        return path, []
    if kind == "torchscript":
        path = folder / "mlp.ts"
        torch.jit.save(torch.jit.script(net), path)
        return path, []
    path = folder / "mlp_whole.pt"
    torch.save(net, path)
    return path, ["--trust"]


@pytest.mark.parametrize("kind", ["pt2", "torchscript", "pickle"])
def test_fit_and_export_torch_formats(kind: str, toy: Toy, tmp_path: Path) -> None:
    model, flags = _torch_file(kind, tmp_path)
    run = tmp_path / "run"
    assert cli("fit", model, *flags, "--task", f"a={toy.a}", "--out", run, *FIT_FLAGS) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["options"] == ({"trust": True} if flags else {})
    if flags:  # a run folder never grants trust by itself
        assert cli("export", run, "--remove", "a", "-o", tmp_path / "ablated.safetensors") == 2
        assert not (tmp_path / "ablated.safetensors").exists()
    assert cli("export", run, "--remove", "a", "-o", tmp_path / "ablated.safetensors", *flags) == 0
    from safetensors.torch import load_file

    ablated = load_file(tmp_path / "ablated.safetensors")
    mask = MaskSet.load(run / "masks.safetensors")["a"]
    for w in MaskSet.load(run / "masks.safetensors").weights:
        assert torch.all(ablated[w.source_name][mask[w.name]] == 0)


def test_fit_writes_periodic_plain_progress_lines_into_a_log(toy: Toy, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MODSCOPE_PROGRESS_INTERVAL", "0.000001")  # every recorded point
    flags = [f for f in FIT_FLAGS if f != "--quiet"]
    result = in_process("fit", toy.onnx, "--task", f"a={toy.a}", "--out", tmp_path / "run", *flags)  # stderr: not a tty
    assert result.returncode == 0
    text = result.stderr
    lines = [line for line in text.splitlines() if line.startswith("masks ")]
    assert [line.split()[1] for line in lines] == ["10/30", "20/30", "30/30"]
    assert all(" steps/s | " in line and " left | a: loss " in line and " density " in line for line in lines)
    assert not any(ch in text for ch in "\r\x1b"), "a log must hold no control characters"
