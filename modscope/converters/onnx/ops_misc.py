"""Constants and identity-like nodes."""

from __future__ import annotations

from typing import Any

import torch

from .registry import NodeContext, OpSet

ops = OpSet()


@ops.register("Constant")
def constant(ctx: NodeContext) -> Any:
    for key in ("value", "value_float", "value_int", "value_floats", "value_ints"):
        if key in ctx.attrs:
            value = ctx.attrs[key]
            if isinstance(value, torch.Tensor):
                return value.clone()
            dtype = torch.float32 if "float" in key else torch.int64
            return torch.tensor(value, dtype=dtype)
    raise ValueError(f"Constant node '{ctx.name}' has no supported value attribute")


@ops.register("Identity")
def identity(ctx: NodeContext, x: Any) -> Any:
    return x
