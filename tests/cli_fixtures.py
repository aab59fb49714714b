"""Files and helpers for the command-line tests: a tiny trained MLP as ONNX and as a state_dict, task data files,
and a way to run ``modscope`` in-process or as the installed console script.

The MLP reads 8 inputs: 6 features and a one-hot flag of 2; task "a" (flag 0) is the sign of feature 0 (classes
0/1), task "b" (flag 1) the sign of feature 3 (classes 2/3). It is trained to 100% in a few hundred steps.

Test modules import the fixtures by name (``from cli_fixtures import toy``) so pytest finds them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from modscope.cli import main

#: few steps and a small batch, seconds on a CPU; a low initial logit and a high rate so that the masks move.
FIT_FLAGS = ["--n-steps", "30", "--batch-size", "16", "--log-every", "10", "--init", "0.5", "--lr", "0.05", "--quiet"]


def toy_net() -> nn.Module:
    """The architecture (a factory for ``--factory cli_fixtures:toy_net``)."""
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def task_arrays(n: int, flag: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    x[:, 6:] = 0
    x[:, 6 + flag] = 1
    y = (x[:, 0] > 0).long() if flag == 0 else 2 + (x[:, 3] > 0).long()
    return x.numpy(), y.numpy()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread: on a small, shared CPU the thread pool makes tiny ops many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Toy:
    folder: Path
    onnx: Path
    state_dict: Path
    a: Path
    b: Path


def make_toy(folder: Path) -> Toy:
    torch.manual_seed(0)
    net = toy_net()
    (xa, ya), (xb, yb) = task_arrays(256, 0, 1), task_arrays(256, 1, 2)
    x, y = torch.from_numpy(np.concatenate([xa, xb])), torch.from_numpy(np.concatenate([ya, yb]))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    with one_thread():
        for _ in range(300):
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(2, 8),), str(folder / "mlp.onnx"), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    torch.save(net.state_dict(), folder / "mlp_state.pt")
    np.savez(folder / "a.npz", x=xa, y=ya)
    np.savez(folder / "b.npz", x=xb, y=yb)
    return Toy(folder, folder / "mlp.onnx", folder / "mlp_state.pt", folder / "a.npz", folder / "b.npz")


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Toy:
    """The trained MLP (ONNX and state_dict) and the task files of "a" and "b"."""
    return make_toy(tmp_path_factory.mktemp("toy"))


def cli(*argv: str | os.PathLike) -> int:
    """``modscope ARGV`` in this process (torch on one thread)."""
    with one_thread():
        return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def fitted_run(toy: Toy, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder of masks for "a" and "b" on the ONNX MLP."""
    run = tmp_path_factory.mktemp("runs") / "run"
    assert cli("fit", toy.onnx, "--task", f"a={toy.a}", "--task", f"b={toy.b}", "--out", run, *FIT_FLAGS) == 0
    return run


#: the installed ``modscope`` console script
CONSOLE = Path(sys.executable).with_name("modscope")


def console_env(**extra: str) -> dict[str, str]:
    """The environment of a console subprocess: one thread, and the checkout's own package first on the path, so
    that a worktree or a clone tests its code, not whatever is installed."""
    path = os.pathsep.join([str(Path(__file__).parents[1]), str(Path(__file__).parent)])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def console(*argv: str | os.PathLike, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the installed ``modscope`` console script."""
    return subprocess.run([str(CONSOLE), *map(str, argv)], capture_output=True, text=True, cwd=cwd, env=console_env(),
                          timeout=timeout, check=False)


def in_process(*argv: str | os.PathLike) -> subprocess.CompletedProcess:
    """``modscope ARGV`` run by the CLI's ``main`` in this process, as `console` reports it (exit code, stdout,
    stderr): the same command without the seconds a new interpreter costs, for tests whose subject is what a command
    does rather than the console script itself (a handful of tests run that)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli(*argv)
    return subprocess.CompletedProcess([str(CONSOLE), *map(str, argv)], code, out.getvalue(), err.getvalue())


def read_json(text: str) -> dict:
    data = json.loads(text)
    assert data["schema_version"] == 1
    return data
