"""Linear algebra and convolution: MatMul, Gemm, Conv, ConvTranspose, Einsum ..."""

from __future__ import annotations

import torch

from .registry import NodeContext, OpSet

ops = OpSet()


@ops.register("MatMul")
def matmul(ctx: NodeContext, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.matmul(a, b)


@ops.register("Gemm")
def gemm(ctx: NodeContext, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    if ctx.attr("transA", 0):
        a = a.transpose(-1, -2)
    if ctx.attr("transB", 0):
        b = b.transpose(-1, -2)
    out = ctx.attr("alpha", 1.0) * (a @ b)
    if c is not None:
        out = out + ctx.attr("beta", 1.0) * c
    return out
