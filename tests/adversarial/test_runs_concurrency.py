"""Run folders under concurrency and reuse: `fit --out` is locked while it writes, `--resume` refuses another model's
run, temporary names carry the process id; and NaN/Inf weights are named in a warning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from cli_fixtures import FIT_FLAGS, Toy, cli, toy  # noqa: E402, F401 - toy is a fixture

import modscope  # noqa: E402
from modscope.errors import InvalidParameterError, ModscopeWarning  # noqa: E402
from modscope.runs import LOCK, atomic_write, locked  # noqa: E402


def test_a_second_fit_on_a_locked_folder_exits_2(toy: Toy, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    with locked(run):  # as a first `fit` holds it
        assert cli("fit", toy.onnx, "--task", f"a={toy.a}", "--out", run, *FIT_FLAGS) == 2
        err = capsys.readouterr().err
        assert "is in use by another `modscope fit` (process" in err and err.count("\n") == 1
        assert not (run / "report.json").exists() and run.is_dir()  # the holder's folder is left alone
    assert cli("fit", toy.onnx, "--task", f"a={toy.a}", "--out", run, *FIT_FLAGS) == 0  # released
    assert not (run / LOCK).exists()


def test_the_lock_dies_with_a_killed_process(tmp_path: Path) -> None:
    code = ("import sys, time; from modscope.runs import locked\n"
            f"with locked({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InvalidParameterError, match=f"in use .*process {holder.pid}"):
            with locked(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with locked(tmp_path):  # a stale lock file holds no lock
        pass


def test_resume_refuses_another_models_run(toy: Toy, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert cli("fit", toy.onnx, "--task", f"a={toy.a}", "--out", run, *FIT_FLAGS) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()
    other = ["fit", toy.state_dict, "--factory", "cli_fixtures:toy_net", "--task", f"a={toy.a}", "--out", run, *FIT_FLAGS]
    assert cli(*other, "--resume") == 2
    assert "holds the run of another model" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # untouched
    assert cli(*other, "--resume", "--force") == 0
    assert json.loads((run / "config.json").read_text())["model"]["path"] == str(toy.state_dict.resolve())


def test_temporary_names_carry_the_process_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with atomic_write(tmp_path / "x.json") as tmp:
        assert f".{os.getpid()}." in tmp.name
        tmp.write_text("{}")
    renamed: list[str] = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append(Path(src).name), real(src, dst))[1])
    from modscope.masks.checkpoint import TrainingState, save_checkpoint

    logits = torch.zeros(3, requires_grad=True)
    save_checkpoint(tmp_path / "checkpoint.pt", {}, TrainingState(0, {}, []), logits, torch.optim.Adam([logits]), [])
    assert renamed and all(f".{os.getpid()}." in name for name in renamed), renamed


def _nan_onnx(path: Path) -> Path:
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    with torch.no_grad():
        net[0].weight[0, 0] = float("nan")
        net[2].weight[1, 1] = float("inf")
    torch.onnx.export(net, (torch.zeros(1, 8),), str(path), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "n"}})
    return path


def test_nan_and_inf_weights_are_named_in_a_warning(toy: Toy, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        path = _nan_onnx(tmp_path / "nan.onnx")
    with pytest.warns(ModscopeWarning, match=r"2 weight\(s\) hold NaN or Inf values .*\(0\.weight, 2\.weight\)"):
        modscope.load(path)
    capsys.readouterr()
    assert cli("fit", path, "--task", f"a={toy.a}", "--out", tmp_path / "run", *FIT_FLAGS) == 2
    err = capsys.readouterr().err
    assert "0.weight, 2.weight" in err and "NaN or Inf" in err  # said before the "nothing left to mask" error


def test_a_damaged_checkpoint_is_an_invalid_parameter_error_in_the_api(tmp_path: Path) -> None:
    from modscope.masks.checkpoint import load_checkpoint

    logits = torch.zeros(5, requires_grad=True)
    optimizer = torch.optim.Adam([logits])
    torch.save(torch.zeros(3), tmp_path / "bare.pt")
    with pytest.raises(InvalidParameterError, match="holds a Tensor, not a modscope training state"):
        load_checkpoint(tmp_path / "bare.pt", {}, logits, optimizer, [])
    torch.save({"identity": {}, "logits": torch.zeros(2, 2)}, tmp_path / "shape.pt")
    with pytest.raises(InvalidParameterError, match=r"mask logits are \(2, 2\), this run needs \(5,\)"):
        load_checkpoint(tmp_path / "shape.pt", {}, logits, optimizer, [])
    torch.save({"identity": {}, "logits": torch.zeros(5)}, tmp_path / "keys.pt")
    with pytest.raises(InvalidParameterError, match="is corrupt"):
        load_checkpoint(tmp_path / "keys.pt", {}, logits, optimizer, [])
