"""Tiny models for the converter tests, importable as model factories (``factory="factories:tiny_mlp"``).

pytest puts ``tests/`` on ``sys.path`` (rootdir-relative imports), so ``factories`` resolves while the tests run.
The classes live in a real file because ``torch.jit.script`` reads their source.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn


def tiny_mlp() -> nn.Module:
    """3 -> 4 -> 2 MLP (architecture only; the weights come from a state_dict)."""
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def tiny_mlp_bn() -> nn.Module:
    """An MLP with a batch norm, so its state_dict has buffers."""
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def raising_factory() -> nn.Module:
    raise RuntimeError("no GPU here")


def not_a_module() -> dict:
    return {"weight": torch.zeros(2)}


NOT_CALLABLE = 3


class Encoder(nn.Module):
    """Nested modules (names with dots), an embedding and a layer norm: for name and kind checks."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 3)
        self.norm = nn.LayerNorm(3)
        self.body = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.norm(self.emb(ids))))


class Net(nn.Module):
    """A scriptable MLP with nested names."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class SmallCNN(nn.Module):
    """A convolution, a fresh batch norm (weight equal to running_var, bias to running_mean) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


class Doubler(nn.Module):
    """Its input first goes into an elementwise op, so the input shape cannot be inferred."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x * 2.0)


class Unexportable(nn.Module):
    """Uses an operator the TorchScript ONNX exporter has no symbolic for."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svd(self.fc(x))[0]


class TwoHeads(nn.Module):
    """Two outputs, for per-output comparisons."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), torch.relu(self.b(x))


def seeded(module_factory, seed: int = 0) -> nn.Module:
    """``module_factory()`` built with a fixed seed, in eval mode."""
    torch.manual_seed(seed)
    return module_factory().eval()


def export_onnx(module: nn.Module, path: Path, n_features: int = 3, **kwargs) -> Path:
    """``module`` exported with the TorchScript exporter, batch dimension dynamic."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.randn(2, n_features),),
            str(path),
            dynamo=False,
            input_names=["x"],
            dynamic_axes={"x": {0: "batch"}},
            **kwargs,
        )
    return path


class LSTMTagger(nn.Module):
    """An embedding, an LSTM and a linear head over token ids ``(N, T)``: a model saved in training checkpoints."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.lstm = nn.LSTM(6, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(ids))[0])


def lstm_tagger() -> nn.Module:
    return LSTMTagger()
