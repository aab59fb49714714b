"""TorchScript runs its own code on load (a ``__setstate__``): modscope keeps stdout clean for ``--json`` and never
fails with an IndexError when it cannot guess an input (docs/security.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from cli_fixtures import console  # noqa: E402

import modscope  # noqa: E402
from modscope.errors import ModelLoadError  # noqa: E402


class Chatty(torch.nn.Module):
    """A script submodule whose ``__setstate__`` prints while the archive loads."""

    def __init__(self) -> None:
        super().__init__()
        self.tag = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[int, bool]:
        return (self.tag, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[int, bool]) -> None:
        print("PAYLOAD RAN ON LOAD")
        self.tag = state[0]
        self.training = state[1]


class WithChatty(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)
        self.chatty = Chatty()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_setstate_output_goes_to_stderr_and_json_stays_clean(tmp_path: Path) -> None:
    path = tmp_path / "chatty.ts"
    torch.jit.save(torch.jit.script(WithChatty()), str(path))
    result = console("inspect", path, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["schema_version"] == 1  # nothing but the JSON on stdout
    assert "PAYLOAD RAN ON LOAD" in result.stderr  # TorchScript's own code did run (docs/security.md says so)


def test_an_input_that_cannot_be_guessed_is_one_model_load_error(tmp_path: Path) -> None:
    class SliceFirst(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x[:, :4] * 2)

    path = tmp_path / "slice.ts"
    torch.jit.save(torch.jit.script(SliceFirst()), str(path))
    with pytest.raises(ModelLoadError, match="pass example_inputs"):
        modscope.load(path)
    assert modscope.load(path, example_inputs=torch.zeros(2, 4)).module(torch.ones(3, 4)).shape == (3, 2)
