"""The `modscope` command: help texts, documentation, start-up cost, and the exit code and message of every error a
user can cause."""

# ruff: noqa: F401, F811 - pytest fixtures are imported from cli_fixtures and then named as arguments

from __future__ import annotations

import resource
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cli_fixtures import CONSOLE, FIT_FLAGS, Toy, cli, console, toy, toy_net

from modscope.cli import main
from modscope.commands import COMMANDS
from modscope.errors import ModscopeError

ROOT = Path(__file__).resolve().parents[1]


# -- help and documentation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--help"]] + [[c, "--help"] for c in COMMANDS])
def test_help_ends_with_an_example(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert lines[-2] == "Example:"
    command = argv[0] if argv[0] != "--help" else ""
    assert lines[-1].startswith(f"  modscope {command}".rstrip())


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_is_documented(command: str) -> None:
    text = (ROOT / "docs" / "cli.md").read_text()
    assert f"modscope {command}" in text
    assert f"## `modscope {command}" in text, f"docs/cli.md has no section on {command}"


def test_fit_has_a_flag_for_every_mask_config_field(capsys: pytest.CaptureFixture[str]) -> None:
    from dataclasses import fields

    from modscope import MaskConfig

    main(["fit", "--help"])
    text = capsys.readouterr().out
    for f in fields(MaskConfig):
        assert "--" + f.name.replace("_", "-") in text


def test_help_imports_no_heavy_module() -> None:
    code = ("import sys; from modscope.cli import main; main(['fit', '--help']); "
            "print(sorted(m for m in ('torch', 'onnx', 'numpy', 'scipy', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def _child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.mark.parametrize("argv", [["--help"], ["fit", "--help"]])
def test_help_is_fast(argv: list[str]) -> None:
    """Under 0.5 s through the console script: CPU time always; wall time unless the machine is overloaded."""
    baseline = min(_timed([sys.executable, "-c", "pass"])[0] for _ in range(3))
    runs = [_timed([str(CONSOLE), *argv]) for _ in range(3)]
    assert min(cpu for _, cpu in runs) < 0.5
    if baseline < 0.1:  # an idle machine: bare python starts in well under 0.1 s
        assert min(wall for wall, _ in runs) < 0.5


def _timed(cmd: list[str]) -> tuple[float, float]:
    cpu0, t0 = _child_cpu_seconds(), time.perf_counter()
    subprocess.run(cmd, capture_output=True, check=True)
    return time.perf_counter() - t0, _child_cpu_seconds() - cpu0


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "name a command" in capsys.readouterr().err


def test_console_script_and_python_m(toy: Toy) -> None:
    script = console("inspect", toy.onnx, "--json")
    assert script.returncode == 0, script.stderr
    assert '"schema_version": 1' in script.stdout
    module = subprocess.run([sys.executable, "-m", "modscope", "--version"], capture_output=True, text=True, check=False)
    assert module.returncode == 0 and module.stdout.startswith("modscope ")


# -- errors ---------------------------------------------------------------------------------------------------------
def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _custom_op_model(path: Path) -> Path:
    from onnx import TensorProto, helper

    node = helper.make_node("FancyOp", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.save(model, path)
    return path


def _fit(toy: Toy, tmp: Path, task: str) -> list[str]:
    return ["fit", str(toy.onnx), "--task", task, "--out", str(tmp / "run"), *FIT_FLAGS]


def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


# Each case: (arguments, a fragment of the message); every one must exit 2 and leave tmp/run and tmp/out* absent.
ERRORS: dict[str, Callable[[Toy, Path], tuple[list[str], str]]] = {
    "missing model": lambda toy, tmp: (["inspect", str(tmp / "nope.onnx")], "does not exist"),
    "folder as model": lambda toy, tmp: (["inspect", str(tmp)], "is a folder"),
    "not a model": lambda toy, tmp: (["inspect", str(_write(tmp / "notes.onnx", b"hello, world\n" * 10))], "ONNX"),
    "picture as model": lambda toy, tmp: (["inspect", str(_write(tmp / "m.pt", b"\x89PNG\r\n\x1a\n" + bytes(64)))], "PNG"),
    "unknown operator": lambda toy, tmp: (["inspect", str(_custom_op_model(tmp / "custom.onnx"))], "FancyOp"),
    "pickle without --trust": lambda toy, tmp: (["inspect", str(_pickled_module(tmp / "whole.pt"))], "trust"),
    "corrupt model archive": lambda toy, tmp: (["inspect", str(_truncated(toy.state_dict, tmp / "cut.pt"))], "damaged"),
    "task without a name": lambda toy, tmp: (_fit(toy, tmp, str(toy.a)), "NAME=FILE"),
    "missing task file": lambda toy, tmp: (_fit(toy, tmp, f"a={tmp / 'none.npz'}"), "does not exist"),
    "mismatched lengths": lambda toy, tmp: (
        _fit(toy, tmp, f"a={_npz(tmp / 'd.npz', x=np.zeros((10, 8), np.float32), y=np.zeros(9, np.int64))}"), "lengths"),
    "NaN in inputs": lambda toy, tmp: (
        _fit(toy, tmp, f"a={_npz(tmp / 'd.npz', x=np.full((4, 8), np.nan, np.float32), y=np.zeros(4, np.int64))}"), "NaN"),
    "wrong width": lambda toy, tmp: (
        _fit(toy, tmp, f"a={_npz(tmp / 'd.npz', x=np.zeros((4, 5), np.float32), y=np.zeros(4, np.int64))}"), "inputs"),
    "class ids beyond the output": lambda toy, tmp: (
        _fit(toy, tmp, f"a={_npz(tmp / 'd.npz', x=np.zeros((4, 8), np.float32), y=np.full(4, 7))}"), "classes"),
    "no targets": lambda toy, tmp: (_fit(toy, tmp, f"a={_npz(tmp / 'd.npz', x=np.zeros((4, 8), np.float32))}"), "'y'"),
    "corrupt task archive": lambda toy, tmp: (_fit(toy, tmp, f"a={_truncated(toy.a, tmp / 'cut.npz')}"), "damaged"),
    "bad mask config": lambda toy, tmp: (_fit(toy, tmp, f"a={toy.a}") + ["--batch-size", "10", "--n-samples", "4"], "divisible"),
    "unknown flag": lambda toy, tmp: (["fit", str(toy.onnx), "--task", f"a={toy.a}", "--out", str(tmp / "run"), "--bogus"],
                                      "unrecognized"),
    "missing run folder": lambda toy, tmp: (["report", str(tmp / "no-run"), "--html", str(tmp / "out.html")], "does not exist"),
    "corrupt report": lambda toy, tmp: (["report", str(_write(tmp / "r" / "report.json", b"{not json")), "--csv", str(tmp / "out")],
                                        "cannot be read"),
    "check on a corrupt run": lambda toy, tmp: (["check", str(_write(tmp / "r" / "report.json", b"{not json").parent),
                                            "--policy", str(tmp / "none.toml"), "--junit", str(tmp / "out.xml")], "cannot be read"),
}


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _pickled_module(path: Path) -> Path:
    torch.save(toy_net(), path)
    return path


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_errors_exit_2_with_a_short_message(case: str, toy: Toy, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv, fragment = ERRORS[case](toy, tmp_path)
    assert cli(*argv) == 2
    captured = capsys.readouterr()
    err_lines = [line for line in captured.err.splitlines() if line.strip()]
    assert 1 <= len(err_lines) <= 3 and err_lines[0].startswith("modscope"), captured.err
    assert "Traceback" not in captured.err
    assert fragment in captured.err, captured.err
    assert captured.out == ""
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob("out*")), "partial output left behind"


def test_policy_errors_exit_2(toy: Toy, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A policy that is not TOML, and one naming a task the run lacks (the run itself is fine)."""
    run = tmp_path / "run"
    assert cli("fit", toy.onnx, "--task", f"a={toy.a}", "--out", run, *FIT_FLAGS) == 0
    capsys.readouterr()
    for text, fragment in ((None, "does not exist"), ("[[rule]\nmetric=", "not valid TOML"),
                           ('[[rule]]\nmetric = "iou"\ntasks = ["a", "zz"]\nmax = 0.5\n', "'zz'")):
        policy = tmp_path / "p.toml" if text is None else _write(tmp_path / "p.toml", text.encode())
        assert cli("check", run, "--policy", policy, "--junit", tmp_path / "out.xml") == 2
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err
        assert not (tmp_path / "out.xml").exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    with pytest.raises(ModscopeError):
        main(["inspect", str(tmp_path / "nope.onnx"), "--debug"])


def test_console_script_error_has_no_traceback(tmp_path: Path) -> None:
    result = console("inspect", tmp_path / "nope.onnx")
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_unwritable_output_is_a_user_error(toy: Toy, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = _write(tmp_path / "file", b"x")
    assert cli("fit", toy.onnx, "--task", f"a={toy.a}", "--out", blocker / "run", *FIT_FLAGS) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_zip_that_is_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    assert main(["inspect", str(path)]) == 2
    assert "zip" in capsys.readouterr().err
