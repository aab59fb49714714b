"""onnxruntime's quantized contrib operators (``com.microsoft``): MatMulNBits, DynamicQuantizeMatMul,
MatMulIntegerToFloat, QAttention, QEmbedLayerNormalization and DynamicQuantizeLSTM.

Their integer weights load as float parameters holding the dequantized values (``quantized.py``), so each handler
takes its weight either as that float parameter or, when it could not be exposed, as the stored integers:

=========================  ======================================  ==============================================
operator                   parameter                               computed as
=========================  ======================================  ==============================================
MatMulNBits (2/4/8-bit B)  (K, N) ``(q - zero_point) * scale``     ``A @ W + bias`` in float (accuracy_level 4:
                           per block of K, unpacked                A rounded to int8 per block first)
DynamicQuantizeMatMul,     (K, N) ``(B - zero_point) * scale``     A quantized to uint8 as DynamicQuantizeLinear
MatMulIntegerToFloat                                               does (DynamicQuantizeMatMul), an exact integer
                                                                   product, then the scales and bias
QAttention                 packed Q/K/V (D, 3D), as above          the integer projection, then Attention
QEmbedLayerNormalization   each table, gamma and beta              EmbedLayerNormalization on the dequantized ones
DynamicQuantizeLSTM        W (D, I, 4H), R (D, H, 4H) per          LSTM on the dequantized W and R, X rounded to
                           direction or per column                 uint8 and the hidden state rounded to uint8
                                                                   per example at each step
=========================  ======================================  ==============================================

Integer products are exact (float64) while their gradient passes straight through the rounding: a weight's
integer value is ``round(w / scale)`` and its gradient that of ``w / scale``, and a dynamically quantized input's
gradient is that of ``x / scale`` — so masks anywhere in the network receive gradients. Masked elements are 0 in
the parameter and are written back as the zero point (`nbits_ablated` packs them into MatMulNBits' nibbles).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ....errors import InvalidParameterError, UnsupportedOperatorError
from .contrib import MS_DOMAIN
from .contrib_transformer import embed_layer_normalization, packed_attention
from .quantization import dynamic_quantize_linear
from .recurrent import lstm
from ..registry import NodeContext, OpSet

ops = OpSet()


def straight_through(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` (exact) with the gradient of ``surrogate``."""
    return surrogate + (value - surrogate).detach()


def _centred(q: torch.Tensor, zero_point: torch.Tensor | None, view: list[int] | None = None) -> torch.Tensor:
    """``q - zero_point`` in float64 (exact for 8-bit integers); ``view`` reshapes a per-axis zero point."""
    out = q.to(torch.float64)
    if zero_point is None:
        return out
    zp = zero_point.to(torch.float64)
    return out - (zp.reshape(view) if view is not None and zp.numel() > 1 else zp)


def _integer_weight(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """A weight as exact integers centred on its zero point (float64): re-quantized from a dequantized float
    parameter (gradient straight through), or the stored integers minus the zero point."""
    if not w.is_floating_point():
        return _centred(w, zero_point)
    units = w.to(torch.float64) / scale.to(torch.float64)
    return straight_through(torch.round(units), units)


def _dynamic_quantized(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x quantized to uint8 as DynamicQuantizeLinear does, centred, float64 with x / scale's gradient; scale)."""
    with torch.no_grad():
        q, scale, zero_point = dynamic_quantize_linear(None, x.detach())
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return straight_through(_centred(q, zero_point), x.to(torch.float64) / safe.to(torch.float64)), scale


def _scaled(acc: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """An exact integer accumulator times the combined scale, plus the bias, in ``dtype`` (onnxruntime's order)."""
    y = acc.to(dtype) * scale.to(dtype)
    return y if bias is None else y + bias


# -- 8-bit matrix products ------------------------------------------------------------------------------------------
@ops.register("DynamicQuantizeMatMul", domain=MS_DOMAIN)
def dynamic_quantize_matmul(
    ctx: NodeContext,
    a: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    b_zero_point: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``A`` quantized to uint8 per tensor, times the int8/uint8 ``B`` (per-tensor or per-column scale), in float."""
    a_int, a_scale = _dynamic_quantized(a)
    acc = a_int @ _integer_weight(b, b_scale, b_zero_point)
    return _scaled(acc, a_scale.detach() * b_scale, bias, a.dtype)


@ops.register("MatMulIntegerToFloat", domain=MS_DOMAIN)
def matmul_integer_to_float(
    ctx: NodeContext,
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    a_zero_point: torch.Tensor | None = None,
    b_zero_point: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(A - a_zero_point) @ (B - b_zero_point) * a_scale * b_scale + bias`` for quantized ``A``."""
    acc = _centred(a, a_zero_point, [-1, 1]) @ _integer_weight(b, b_scale, b_zero_point)
    scale = a_scale.reshape(-1, 1) * b_scale if a_scale.numel() > 1 else a_scale * b_scale
    return _scaled(acc, scale, bias, a_scale.dtype)


@ops.register("QAttention", domain=MS_DOMAIN)
def q_attention(
    ctx: NodeContext,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    input_scale: torch.Tensor,
    weight_scale: torch.Tensor,
    mask_index: torch.Tensor | None = None,
    input_zero_point: torch.Tensor | None = None,
    weight_zero_point: torch.Tensor | None = None,
    past: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention whose packed Q/K/V projection is an integer product of the quantized input and weight."""
    acc = _centred(x, input_zero_point) @ _integer_weight(weight, weight_scale, weight_zero_point)
    proj = _scaled(acc, input_scale * weight_scale, bias, bias.dtype)
    return packed_attention(ctx, proj, [proj.shape[-1] // 3] * 3, mask_index, past, None)


def _dequantized(q: torch.Tensor | None, scale: torch.Tensor | None, zero_point: torch.Tensor | None):
    """A per-tensor quantized table as floats (None stays None; a float parameter is already dequantized)."""
    if q is None or q.is_floating_point():
        return q
    return (_centred(q, zero_point) * scale.to(torch.float64)).to(scale.dtype)


@ops.register("QEmbedLayerNormalization", domain=MS_DOMAIN)
def q_embed_layer_normalization(ctx: NodeContext, *inputs: torch.Tensor | None) -> torch.Tensor | tuple:
    """EmbedLayerNormalization on per-tensor quantized word/position/segment tables, gamma and beta.

    Returns:
        (layernorm_out, mask_index_out) trimmed to the outputs the node declares.
    """
    padded = list(inputs) + [None] * (18 - len(inputs))
    ids, segments, mask = padded[0], padded[1], padded[7]
    tables = [_dequantized(padded[i], padded[i + 6], padded[i + 11]) for i in range(2, 7)]
    return embed_layer_normalization(ctx, ids, segments, *tables, mask)


# -- MatMulNBits ----------------------------------------------------------------------------------------------------
def _int_attrs(ctx: NodeContext) -> dict[str, int]:
    return {k: int(v) for k, v in ctx.attrs.items() if isinstance(v, int)}


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-wide codes from bytes, lowest bits first: (..., n) -> (..., n * 8 // bits) int64.

    Example:
        >>> unpack_codes(torch.tensor([0x21], dtype=torch.uint8), 4).tolist()
        [1, 2]
    """
    shifts = torch.arange(0, 8, bits, device=packed.device)
    codes = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.flatten(-2)


def nbits_dequantize(
    b: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    attrs: Mapping[str, int],
) -> torch.Tensor:
    """MatMulNBits' packed (N, blocks, blob) weight as the (K, N) float matrix it multiplies by.

    Each block of ``block_size`` values along K has one scale and one zero point (packed like the data, or of the
    scales' float type, or absent: ``2 ** (bits - 1)``).
    """
    k, n, bits, block = attrs["K"], attrs["N"], attrs.get("bits", 4), attrs["block_size"]
    if bits not in (2, 4, 8):
        raise InvalidParameterError(f"MatMulNBits has bits={bits}; onnxruntime's are 2, 4 and 8")
    blocks = -(-k // block)
    codes = unpack_codes(b.reshape(n, -1), bits)[:, : blocks * block].reshape(n, blocks, block)
    scale = scales.reshape(n, blocks, 1)
    if zero_points is None:
        zp = torch.full((), 1 << (bits - 1), dtype=scale.dtype, device=b.device)
    elif zero_points.is_floating_point():
        zp = zero_points.reshape(n, blocks, 1)
    else:
        zp = unpack_codes(zero_points.reshape(n, -1), bits)[:, :blocks].reshape(n, blocks, 1).to(scale.dtype)
    w = (codes.to(scale.dtype) - zp) * scale
    return w.reshape(n, blocks * block)[:, :k].transpose(0, 1)


def nbits_ablated(stored: np.ndarray, keep: np.ndarray, zero_points: np.ndarray | None, attrs: Mapping[str, int]):
    """MatMulNBits' packed weight with the elements that ``keep`` (K, N) marks False set to their block's zero
    point, packed again (the padding past K is left as it was)."""
    k, n, bits, block = attrs["K"], attrs["N"], attrs.get("bits", 4), attrs["block_size"]
    blocks, per_byte = -(-k // block), 8 // bits
    codes = unpack_codes(torch.tensor(stored.reshape(n, -1)), bits).numpy()
    if zero_points is None:
        zp = np.full((n, blocks), 1 << (bits - 1), np.int64)
    else:
        zp = unpack_codes(torch.tensor(zero_points.reshape(n, -1)), bits).numpy()[:, :blocks]
    removed = np.repeat(zp, block, axis=1)[:, :k]
    codes[:, :k] = np.where(keep.T, codes[:, :k], removed)
    grouped = codes.reshape(n, -1, per_byte) << (np.arange(per_byte) * bits)
    return grouped.sum(-1).astype(np.uint8).reshape(stored.shape)


def _blockwise_int8(a: torch.Tensor, block: int) -> torch.Tensor:
    """``a`` rounded to symmetric int8 per block of ``block`` values along its last axis (onnxruntime's
    accuracy_level 4 input quantization), dequantized, with ``a``'s gradient."""
    k = a.shape[-1]
    pad = -k % block
    padded = torch.nn.functional.pad(a, (0, pad)).reshape(*a.shape[:-1], -1, block)
    scale = padded.detach().abs().amax(-1, keepdim=True) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    rounded = (torch.round(padded.detach() / safe) * scale).reshape(*a.shape[:-1], -1)[..., :k]
    return straight_through(rounded, a)


@ops.register("MatMulNBits", domain=MS_DOMAIN)
def matmul_nbits(
    ctx: NodeContext,
    a: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None = None,
    g_idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``A @ dequantize(B) + bias`` with B's 2/4/8-bit block-quantized weight (see `nbits_dequantize`)."""
    if g_idx is not None:
        raise UnsupportedOperatorError(ctx.op_type, ctx.domain, ctx.opset, ctx.name, hint="g_idx is not supported")
    attrs = _int_attrs(ctx)
    w = b if b.is_floating_point() else nbits_dequantize(b, scales, zero_points, attrs)
    if attrs.get("accuracy_level", 0) == 4:
        a = _blockwise_int8(a, attrs["block_size"])
    y = a @ w.to(a.dtype)
    return y if bias is None else y + bias


# -- DynamicQuantizeLSTM --------------------------------------------------------------------------------------------
def lstm_dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """A DynamicQuantizeLSTM weight (D, rows, 4H) with a scale and zero point per direction (D,) or per direction
    and column (D, 4H), as floats."""
    view = [q.shape[0], 1, -1] if scale.dim() == 2 else [q.shape[0], 1, 1]
    centred = q.to(torch.float64)
    if zero_point is not None:
        centred = centred - zero_point.to(torch.float64).reshape(view)
    return (centred * scale.to(torch.float64).reshape(view)).to(scale.dtype)


@ops.register("DynamicQuantizeLSTM", domain=MS_DOMAIN)
def dynamic_quantize_lstm(
    ctx: NodeContext,
    x: torch.Tensor,
    w: torch.Tensor,
    r: torch.Tensor,
    b: torch.Tensor | None,
    sequence_lens: torch.Tensor | None,
    initial_h: torch.Tensor | None,
    initial_c: torch.Tensor | None,
    p: torch.Tensor | None,
    w_scale: torch.Tensor,
    w_zero_point: torch.Tensor | None,
    r_scale: torch.Tensor,
    r_zero_point: torch.Tensor | None,
) -> tuple:
    """The ONNX LSTM with W (D, I, 4H) and R (D, H, 4H) dequantized (onnxruntime stores them transposed), X
    rounded to uint8 over the whole sequence and the hidden state rounded to uint8 per example at every step, as
    onnxruntime's quantized products do (see `_rounded_rows`)."""
    x_int, x_scale = _dynamic_quantized(x)
    x = (x_int * x_scale.detach().to(torch.float64)).to(x.dtype)
    if not w.is_floating_point():
        w = lstm_dequantize(w, w_scale, w_zero_point)
    if not r.is_floating_point():
        r = lstm_dequantize(r, r_scale, r_zero_point)
    return lstm(
        ctx, x, w.transpose(1, 2), r.transpose(1, 2), b, sequence_lens, initial_h, initial_c, p,
        recurrent_matmul=_rounded_recurrent_matmul,
    )


def _rounded_rows(h: torch.Tensor) -> torch.Tensor:
    """Each row (last axis) of ``h`` rounded to uint8 with its own range (which includes 0), dequantized, with
    ``h``'s gradient.

    onnxruntime quantizes the hidden state of the rows it processes together: one row per thread chunk, which is
    one example when the machine has more threads than the batch has examples (always for a batch of one). Rounding
    each example alone keeps examples independent of each other, whatever the machine.
    """
    with torch.no_grad():
        low = torch.clamp(h.amin(-1, keepdim=True), max=0.0)
        high = torch.clamp(h.amax(-1, keepdim=True), min=0.0)
        scale = (high - low) / 255.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.round(torch.clamp(-low / safe, 0.0, 255.0))
        q = torch.clamp(torch.round(h / safe) + zero_point, 0.0, 255.0)
        rounded = (q - zero_point) * safe
    return straight_through(rounded, h)


def _rounded_recurrent_matmul(h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """h (D, B, H) rounded per example, @ r^T with r (D, 4H, H)."""
    return torch.matmul(_rounded_rows(h), r.transpose(1, 2))
