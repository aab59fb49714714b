"""Element-wise math: arithmetic, comparisons, logic, activations."""

from __future__ import annotations

import torch

from .registry import NodeContext, OpSet

ops = OpSet()


@ops.register("Add")
def add(ctx: NodeContext, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a + b


@ops.register("Relu")
def relu(ctx: NodeContext, x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x)
