"""Shared fixtures: seeding, a device option, tiny models and a toy network with planted disjoint pathways."""

from __future__ import annotations

import os

# The test models are tiny: one thread is as fast, and it keeps torch's thread pool from stalling when the machine is
# shared (with two busy-waiting threads on two loaded cores, tiny ops run ~35x slower). Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="device for tests that can run on a GPU (default cpu)")


@pytest.fixture
def device(request: pytest.FixtureRequest) -> str:
    return request.config.getoption("--device")


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


class TwoPathways(nn.Module):
    """Two independent sub-networks in one module: output 0 reads x[:, :2] through `a`, output 1 x[:, 2:] via `b`."""

    def __init__(self, hidden: int = 16, n_classes: int = 4):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))
        self.b = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x[:, :2]), self.b(x[:, 2:])


def quadrant(x: torch.Tensor) -> torch.Tensor:
    return (x[:, 0] > 0).long() * 2 + (x[:, 1] > 0).long()


@pytest.fixture(scope="session")
def toy_modular() -> tuple[TwoPathways, dict]:
    """A trained TwoPathways net and its two tasks ("a": quadrant of x[:2], read from output 0; "b": of x[2:])."""
    import modscope

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = TwoPathways()
    x = torch.randn(1024, 4, generator=gen)
    ya, yb = quadrant(x[:, :2]), quadrant(x[:, 2:])
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(400):
        out_a, out_b = net(x)
        loss = nn.functional.cross_entropy(out_a, ya) + nn.functional.cross_entropy(out_b, yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    net.eval()
    tasks = {"a": modscope.Task("a", x, ya, output=0), "b": modscope.Task("b", x, yb, output=1)}
    return net, tasks


@pytest.fixture
def torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mask step as torch operations only: the native kernels off, as where they cannot be built."""
    from modscope.masks import native

    monkeypatch.setattr(native, "_loaded", (None, "native kernels off for this test"))


@pytest.fixture
def native_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of the native kernels' calls by name (skips the test where the kernels cannot be built here)."""
    from modscope.masks import native

    found = native.kernels()
    if found is None:
        pytest.skip(native.status())
    calls = {name: 0 for name in ("uniforms_many", "keep", "logit_grad", "adam_step")}
    for name in calls:
        method = getattr(found, name)

        def counted(*args, _name=name, _method=method, **kwargs):
            calls[_name] += 1
            return _method(*args, **kwargs)

        monkeypatch.setattr(found, name, counted)
    return calls
