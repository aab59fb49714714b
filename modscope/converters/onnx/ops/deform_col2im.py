"""DeformConv and Col2Im for any number of spatial axes, written with gathers and ``index_add``.

Part of the linalg family: `linalg` merges this module's ``ops`` into its own.
"""

from __future__ import annotations

import itertools
import math

import torch

from ....errors import ShapeError
from .window_geometry import Window, explicit_pads, window_from_attrs
from ..registry import NodeContext, OpSet

ops = OpSet()


def _grid(sizes: list[int], device: torch.device) -> list[torch.Tensor]:
    """Per-axis integer coordinates of every point of a ``sizes`` grid, each flattened in C order."""
    if not sizes:
        return []
    axes = [torch.arange(s, device=device) for s in sizes]
    return [g.reshape(-1) for g in torch.meshgrid(*axes, indexing="ij")]


def _flat_index(coords: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    index = coords[0]
    for c, s in zip(coords[1:], sizes[1:]):
        index = index * s + c
    return index


@ops.register("DeformConv", since=19)
def deform_conv(
    ctx: NodeContext,
    x: torch.Tensor,
    w: torch.Tensor,
    offset: torch.Tensor,
    b: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deformable convolution (v1, and v2 with ``mask``): every kernel tap samples the input at its regular position
    plus a learned offset, with multilinear interpolation and zeros outside the input.

    Shapes: x (N, C, *S), w (oC, C/group, *K), offset (N, G*prod(K)*n, *O), mask (N, G*prod(K), *O).
    """
    n_batch, channels, *sizes = x.shape
    n = len(sizes)
    window = window_from_attrs(ctx, w.shape[2:])
    pads = explicit_pads(ctx, n)
    group, n_offset_groups = int(ctx.attr("group", 1)), int(ctx.attr("offset_group", 1))
    out_sizes = [(sizes[i] + pads[i][0] + pads[i][1] - window.extent(i)) // window.strides[i] + 1 for i in range(n)]
    n_taps, n_out = math.prod(window.kernel), math.prod(out_sizes)
    if offset.shape[1] != n_offset_groups * n_taps * n:
        raise ShapeError(
            f"DeformConv node '{ctx.name}' has offset with {offset.shape[1]} channels; expected "
            f"offset_group * prod(kernel) * {n} = {n_offset_groups * n_taps * n}"
        )
    offset = offset.reshape(n_batch, n_offset_groups, n_taps, n, n_out)
    positions = _tap_positions(window, pads, out_sizes, x.device, x.dtype)  # (n, taps, out)
    coords = positions[:, None, None] + offset.movedim(3, 0)  # (n, N, G, taps, out)
    columns = _sample(x.reshape(n_batch, n_offset_groups, channels // n_offset_groups, -1), coords, sizes)
    if mask is not None:
        columns = columns * mask.reshape(n_batch, n_offset_groups, 1, n_taps, n_out)
    columns = columns.reshape(n_batch, group, (channels // group) * n_taps, n_out)
    weight = w.reshape(group, w.shape[0] // group, -1)
    out = torch.einsum("gok,ngkp->ngop", weight, columns).reshape(n_batch, w.shape[0], *out_sizes)
    if b is not None:
        out = out + b.reshape(-1, *([1] * n))
    return out


def _tap_positions(window: Window, pads, out_sizes: list[int], device, dtype) -> torch.Tensor:
    """Regular (offset-free) input coordinates of every kernel tap at every output position: (n, taps, out)."""
    taps = _grid(list(window.kernel), device)
    outs = _grid(out_sizes, device)
    rows = []
    for i in range(len(out_sizes)):
        start = outs[i] * window.strides[i] - pads[i][0]
        rows.append(taps[i].unsqueeze(1) * window.dilations[i] + start.unsqueeze(0))
    return torch.stack(rows).to(dtype)


def _sample(x: torch.Tensor, coords: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Multilinear samples of x (N, G, Cg, prod(S)) at coords (n, N, G, taps, out) -> (N, G, Cg, taps, out)."""
    n_batch, groups, cg, _ = x.shape
    low = torch.floor(coords)
    frac = coords - low
    low = low.long()
    taps, n_out = coords.shape[-2:]
    result = x.new_zeros(n_batch, groups, cg, taps * n_out)
    for corner in itertools.product((0, 1), repeat=len(sizes)):
        weight = torch.ones_like(frac[0])
        valid = torch.ones_like(low[0], dtype=torch.bool)
        idx = []
        for axis, bit in enumerate(corner):
            pos = low[axis] + bit
            weight = weight * (frac[axis] if bit else 1 - frac[axis])
            valid = valid & (pos >= 0) & (pos < sizes[axis])
            idx.append(pos.clamp(0, sizes[axis] - 1))
        flat = _flat_index(idx, sizes).reshape(n_batch, groups, 1, -1).expand(-1, -1, cg, -1)
        values = torch.gather(x, 3, flat)
        result = result + values * (weight * valid).reshape(n_batch, groups, 1, -1)
    return result.reshape(n_batch, groups, cg, taps, n_out)


@ops.register("Col2Im", since=18)
def col2im(ctx: NodeContext, x: torch.Tensor, image_shape: torch.Tensor, block_shape: torch.Tensor) -> torch.Tensor:
    """Sum column blocks x (N, C*prod(block), L) back into an image (N, C, *image_shape) (N-d ``fold``)."""
    image = [int(v) for v in image_shape.tolist()]
    block = [int(v) for v in block_shape.tolist()]
    n = len(image)
    n_batch = x.shape[0]
    window = Window(
        tuple(block), tuple(ctx.attr("strides", None) or [1] * n), tuple(ctx.attr("dilations", None) or [1] * n)
    )
    pads = explicit_pads(ctx, n)
    padded = [image[i] + pads[i][0] + pads[i][1] for i in range(n)]
    counts = [(padded[i] - window.extent(i)) // window.strides[i] + 1 for i in range(n)]
    n_block, n_pos = math.prod(block), math.prod(counts)
    if x.shape[1] % n_block or x.shape[2] != n_pos:
        raise ShapeError(
            f"Col2Im node '{ctx.name}' got input of shape {tuple(x.shape)}; expected (N, C*{n_block}, {n_pos}) "
            f"for image {image} and block {block}"
        )
    taps, positions = _grid(block, x.device), _grid(counts, x.device)
    coords = [
        taps[i].unsqueeze(1) * window.dilations[i] + positions[i].unsqueeze(0) * window.strides[i] for i in range(n)
    ]
    index = _flat_index(coords, padded).reshape(-1)
    channels = x.shape[1] // n_block
    out = x.new_zeros(n_batch, channels, math.prod(padded))
    out = out.index_add(2, index, x.reshape(n_batch, channels, -1))
    out = out.reshape(n_batch, channels, *padded)
    slices = tuple(slice(p[0], p[0] + s) for p, s in zip(pads, image))
    return out[(slice(None), slice(None)) + slices]
