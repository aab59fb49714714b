"""Sliding-window geometry shared by Conv, ConvTranspose, DeformConv and the pooling ops.

ONNX describes windows with per-axis lists (``kernel_shape``, ``strides``, ``dilations``, ``pads`` as
``[begin..., end...]``) and an ``auto_pad`` string; these helpers turn them into per-axis python ints and
``(begin, end)`` padding pairs. Shapes are python ints even under ``torch.func.vmap``, so nothing here touches
tensor values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ....errors import InvalidParameterError, UnsupportedOperatorError
from ..registry import NodeContext

Pads = list[tuple[int, int]]


@dataclass(frozen=True)
class Window:
    """Per-axis window parameters of one node, for ``len(kernel)`` spatial axes."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]

    def extent(self, axis: int) -> int:
        """The span of the dilated kernel along ``axis``."""
        return (self.kernel[axis] - 1) * self.dilations[axis] + 1


def window_from_attrs(ctx: NodeContext, kernel: Sequence[int]) -> Window:
    """The kernel, strides and dilations of ``ctx``'s node (``kernel`` is used when ``kernel_shape`` is absent)."""
    kernel = tuple(ctx.attr("kernel_shape", None) or kernel)
    n = len(kernel)
    strides = tuple(ctx.attr("strides", None) or [1] * n)
    dilations = tuple(ctx.attr("dilations", None) or [1] * n)
    if len(strides) != n or len(dilations) != n:
        raise InvalidParameterError(
            f"node '{ctx.name}' ({ctx.op_type}) has {n} kernel axes but strides {list(strides)} and dilations "
            f"{list(dilations)}; give one value per spatial axis"
        )
    return Window(kernel, strides, dilations)


def explicit_pads(ctx: NodeContext, n: int) -> Pads:
    """The ``pads`` attribute as ``(begin, end)`` pairs (zeros when absent)."""
    pads = ctx.attr("pads", None) or [0] * (2 * n)
    if len(pads) != 2 * n:
        raise InvalidParameterError(
            f"node '{ctx.name}' ({ctx.op_type}) has pads {list(pads)}; expected {2 * n} values [begin..., end...]"
        )
    return [(int(pads[i]), int(pads[i + n])) for i in range(n)]


def same_pads(total: int, mode: str) -> tuple[int, int]:
    """Split ``total`` padding for SAME_UPPER (extra at the end) or SAME_LOWER (extra at the start)."""
    small, large = total // 2, total - total // 2
    return (small, large) if mode == "SAME_UPPER" else (large, small)


def resolve_pads(ctx: NodeContext, in_sizes: Sequence[int], window: Window) -> Pads:
    """Padding of a Conv/Pool node after applying ``auto_pad`` (NOTSET, VALID, SAME_UPPER, SAME_LOWER)."""
    auto_pad = ctx.attr("auto_pad", "NOTSET") or "NOTSET"
    n = len(in_sizes)
    if auto_pad == "NOTSET":
        return explicit_pads(ctx, n)
    if auto_pad == "VALID":
        return [(0, 0)] * n
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for i, size in enumerate(in_sizes):
            out = -(-size // window.strides[i])
            total = max(0, (out - 1) * window.strides[i] + window.extent(i) - size)
            pads.append(same_pads(total, auto_pad))
        return pads
    raise InvalidParameterError(
        f"node '{ctx.name}' ({ctx.op_type}) has auto_pad '{auto_pad}'; use NOTSET, VALID, SAME_UPPER or SAME_LOWER"
    )


def pooled_size(size: int, pads: tuple[int, int], window: Window, axis: int, ceil_mode: bool) -> int:
    """Output length of a pooling window along one axis (a ceil-mode window must start inside input or left pad)."""
    span = size + pads[0] + pads[1] - window.extent(axis)
    stride = window.strides[axis]
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + pads[0]:
        out -= 1
    return out


def pad_spatial(x: torch.Tensor, pads: Pads, value: float = 0.0) -> torch.Tensor:
    """``x`` (N, C, *spatial) padded by ``(begin, end)`` per spatial axis; negative values crop."""
    flat = []
    for begin, end in reversed(pads):
        flat += [begin, end]
    if not any(flat):
        return x
    return F.pad(x, flat, value=value)


def functional(ctx: NodeContext, n_spatial: int, table: Sequence) -> object:
    """The 1-D/2-D/3-D variant of a torch function, or an UnsupportedOperatorError for other ranks."""
    if not 1 <= n_spatial <= len(table):
        raise UnsupportedOperatorError(
            ctx.op_type,
            ctx.domain,
            ctx.opset,
            ctx.name,
            hint=f"only 1 to {len(table)} spatial dimensions are supported, got {n_spatial}",
        )
    return table[n_spatial - 1]


def symmetric(pads: Pads) -> bool:
    """Whether every axis is padded equally at both ends."""
    return all(b == e for b, e in pads)
