"""A model factory for the torchrun tests: the toy MLP of `cli_fixtures`, whose process ends (as a crash or a kill
would) on rank 1's ``$DIE_AT_CALL``-th forward call."""

from __future__ import annotations

import os

import torch
from cli_fixtures import toy_net
from torch import nn


class _DiesOnRank1(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(*toy_net())
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if os.environ.get("RANK") == "1" and self.calls == int(os.environ.get("DIE_AT_CALL", "0")):
            os._exit(3)
        return super().forward(x)


def toy_net_dying_on_rank_1() -> nn.Module:
    return _DiesOnRank1()
