"""Quantized weights: constant integer initializers that modscope exposes as float parameters.

A quantized model stores its weights as integers plus a scale and a zero point. To make them maskable, modscope
turns each such initializer into an `nn.Parameter` holding the *dequantized* float values, named after the integer
initializer (``WeightInfo.source_name``), and lets the consuming node read the parameter:

====================================  ====================================  ====================================
consumer (weight input)               parameter                             how the node runs
====================================  ====================================  ====================================
DequantizeLinear (x)                  ``(x - zero_point) * scale``          the node's output *is* the parameter
MatMulInteger (B), ConvInteger (W)    ``w - zero_point`` (no scale exists)  float product: gradients reach the
                                                                            weight; the output is a float64
                                                                            accumulator, not int32
QLinearMatMul (b), QLinearConv (w)    ``(w - zero_point) * scale``          re-quantized (``round(w / scale)``)
                                                                            and computed as before: exact, but
                                                                            outputs are integers, so no gradient
QLinearConv (B, int32 bias)           ``B`` (zero point 0, integer units)   unchanged
Gather (data), when every reader of   ``(x - zero_point) * scale``          rows gathered from the parameter; the
its rows (after data-movement nodes)                                        DequantizeLinear nodes pass them on
is a per-tensor DequantizeLinear                                            (``gathered_rows``)
com.microsoft DynamicQuantizeMatMul,  ``(w - zero_point) * scale``          see ``ops/contrib_quantized.py``
MatMulIntegerToFloat, QAttention,     (MatMulNBits: unpacked to (K, N);
QEmbedLayerNormalization,             DynamicQuantizeLSTM: per direction
MatMulNBits, DynamicQuantizeLSTM      or per direction and column)
====================================  ====================================  ====================================

An initializer qualifies only when it has an 8/16-bit integer type (int32 for DequantizeLinear and the QLinearConv
bias), is not also a graph input, every node that reads it reads it as the weight of one of these operators with
the same scale, zero point and axis, and that scale and zero point are initializers too. A masked element is zero
in the parameter; `export_masked` writes it back as the zero point, which dequantizes to zero.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from ...errors import ModscopeError, ShapeError
from .ops.contrib import MS_DOMAIN
from .ops.contrib_quantized import lstm_dequantize, nbits_ablated, nbits_dequantize
from .ops.quantization import dequantize_linear
from .registry import NodeContext
from .roles import all_initializers, walk_nodes

_T = onnx.TensorProto
_NARROW = {_T.INT8, _T.UINT8, _T.INT16, _T.UINT16}
_BYTES = frozenset({_T.INT8, _T.UINT8})


@dataclass(frozen=True)
class _Slot:
    weight: int
    scale: int | None
    zero_point: int | None
    axis: int | None  # None: the node's ``axis`` attribute (default 1)
    types: frozenset[int]


#: op type -> the weight inputs it reads, with where their scale and zero point are.
_SLOTS: dict[str, tuple[_Slot, ...]] = {
    "DequantizeLinear": (_Slot(0, 1, 2, None, frozenset(_NARROW | {_T.INT32})),),
    "MatMulInteger": (_Slot(1, None, 3, -1, frozenset(_NARROW)),),
    "ConvInteger": (_Slot(1, None, 3, 0, frozenset(_NARROW)),),
    "QLinearMatMul": (_Slot(3, 4, 5, -1, frozenset(_NARROW)),),
    "QLinearConv": (_Slot(3, 4, 5, 0, frozenset(_NARROW)), _Slot(8, None, None, 0, frozenset({_T.INT32}))),
}

#: the same for onnxruntime's contrib operators (domain com.microsoft).
_CONTRIB_SLOTS: dict[str, tuple[_Slot, ...]] = {
    "DynamicQuantizeMatMul": (_Slot(1, 2, 3, -1, _BYTES),),
    "MatMulIntegerToFloat": (_Slot(1, 3, 5, -1, _BYTES),),
    "QAttention": (_Slot(1, 4, 7, -1, _BYTES),),
    "QEmbedLayerNormalization": tuple(_Slot(i, i + 6, i + 11, 0, _BYTES) for i in range(2, 7)),
    "MatMulNBits": (_Slot(1, 2, 3, 0, frozenset({_T.UINT8})),),
    "DynamicQuantizeLSTM": (_Slot(1, 8, 9, 0, _BYTES), _Slot(2, 10, 11, 0, _BYTES)),
}
#: contrib layouts that DequantizeLinear cannot express: dequantized by their own functions.
_OWN_LAYOUT = ("MatMulNBits", "DynamicQuantizeLSTM")


@dataclass(frozen=True)
class QuantizedWeight:
    """How one integer initializer is dequantized.

    Attributes:
        op: the operator that reads it (all its readers share it).
        slot: the input index it is read at.
        scale: the scale initializer's name, "" when the operator has none (integer units).
        zero_point: the zero-point initializer's name, "" when absent (zero).
        axis: the axis a per-axis or blocked scale and zero point run along.
        block_size: the block size of blocked quantization, 0 otherwise.
        output_dtype: DequantizeLinear's ``output_dtype`` attribute (0: the scale's type).
        domain: the operator's domain ("" for ONNX's, "com.microsoft" for onnxruntime's contrib operators).
        attrs: the reader's integer attributes where the layout depends on them (MatMulNBits' K, N, bits ...).
    """

    op: str
    slot: int
    scale: str
    zero_point: str
    axis: int
    block_size: int
    output_dtype: int
    domain: str = ""
    attrs: tuple[tuple[str, int], ...] = ()


def find_quantized_weights(graph: onnx.GraphProto) -> dict[str, QuantizedWeight]:
    """The integer initializers that can be exposed as dequantized float weights.

    Args:
        graph: the main graph (sub-graphs are searched too).

    Returns:
        integer initializer name -> `QuantizedWeight`, in the order the graph first reads them.

    Example:
        >>> from onnx import helper, numpy_helper
        >>> inits = [numpy_helper.from_array(np.ones((2, 2), np.int8), "w"),
        ...          numpy_helper.from_array(np.array(0.1, np.float32), "s")]
        >>> node = helper.make_node("DequantizeLinear", ["w", "s"], ["w_f"])
        >>> list(find_quantized_weights(helper.make_graph([node], "g", [], [], initializer=inits)))
        ['w']
    """
    inits = {t.name: t for t in all_initializers(graph)}
    fed = {i.name for i in graph.input} | {o.name for o in graph.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in walk_nodes(graph):
        for name in node.input:
            readers.setdefault(name, []).append(node)
    found: dict[str, QuantizedWeight] = {}
    rejected: set[str] = set(fed)
    for node in walk_nodes(graph):
        slots = _slots(node)
        by_index = {s.weight: s for s in slots}
        for index, name in enumerate(node.input):
            if name not in inits or name in rejected:
                continue
            slot = by_index.get(index)
            if _is_table_read(node, index) and inits[name].data_type in _NARROW:
                info = _gathered(node, inits, fed, readers)
            else:
                info = _describe(node, slot, inits, fed) if slot and inits[name].data_type in slot.types else None
            if info is None or found.setdefault(name, info) != info:
                rejected.add(name)
                found.pop(name, None)
    return found


def _is_table_read(node: onnx.NodeProto, index: int) -> bool:
    return node.op_type == "Gather" and index == 0 and node.domain in ("", "ai.onnx")


#: data-movement nodes that may stand between a quantized table's Gather and the DequantizeLinear of its rows.
_MOVES = frozenset({"Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})


def _gathered(
    node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], fed: set[str], readers: dict[str, list[onnx.NodeProto]]
) -> QuantizedWeight | None:
    """A quantized table read by Gather whose gathered rows every reader (after data-movement nodes) dequantizes
    with one per-tensor scale and zero point (``quantize_dynamic``'s embeddings); None otherwise."""
    found = set()
    pending = [node.output[0]] if node.output else []
    while pending:
        value = pending.pop()
        users = readers.get(value, [])
        if not users or value in fed:
            return None
        for user in users:
            plain = user.domain in ("", "ai.onnx") and user.input[0] == value
            if plain and user.op_type in _MOVES:
                pending.extend(user.output[:1])
                continue
            info = _describe(user, _SLOTS["DequantizeLinear"][0], inits, fed) if plain else None
            if user.op_type != "DequantizeLinear" or info is None:
                return None
            if any(int(np.prod(inits[n].dims)) != 1 for n in (info.scale, info.zero_point) if n):
                return None
            found.add(dataclasses.replace(info, op="Gather", slot=0))
    return found.pop() if len(found) == 1 else None


def gathered_rows(graph: onnx.GraphProto, tables: set[str]) -> set[str]:
    """The values gathered from one of ``tables`` (quantized tables loaded as dequantized floats), through the
    data-movement nodes after the Gather: already dequantized, so the DequantizeLinear nodes reading them pass
    them through."""
    rows: set[str] = set()
    for node in walk_nodes(graph):
        if not node.input or not node.output or node.domain not in ("", "ai.onnx"):
            continue
        if (node.op_type == "Gather" and node.input[0] in tables) or (node.op_type in _MOVES and node.input[0] in rows):
            rows.add(node.output[0])
    return rows


def _slots(node: onnx.NodeProto) -> tuple[_Slot, ...]:
    if node.domain in ("", "ai.onnx"):
        return _SLOTS.get(node.op_type, ())
    return _CONTRIB_SLOTS.get(node.op_type, ()) if node.domain == MS_DOMAIN else ()


def _describe(
    node: onnx.NodeProto, slot: _Slot, inits: dict[str, onnx.TensorProto], fed: set[str]
) -> QuantizedWeight | None:
    """The weight's dequantization at ``node``, or None when its scale or zero point is not a constant."""
    names = []
    for index in (slot.scale, slot.zero_point):
        name = node.input[index] if index is not None and index < len(node.input) else ""
        if name and (name not in inits or name in fed):
            return None
        names.append(name)
    attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
    axis = attrs.get("axis", 1) if slot.axis is None else slot.axis
    block = attrs.get("block_size", 0) if node.op_type == "DequantizeLinear" else 0
    dtype = attrs.get("output_dtype", 0) if node.op_type == "DequantizeLinear" else 0
    if node.domain == MS_DOMAIN:
        own = tuple(sorted(attrs.items())) if node.op_type in _OWN_LAYOUT else ()
        return QuantizedWeight(node.op_type, slot.weight, names[0], names[1], axis, 0, 0, MS_DOMAIN, own)
    return QuantizedWeight(node.op_type, slot.weight, names[0], names[1], axis, block, dtype)


def dequantize_weight(
    name: str, info: QuantizedWeight, values: dict[str, torch.Tensor], opset: int
) -> torch.Tensor | None:
    """The float values of quantized weight ``name``, or None when its layout cannot be dequantized.

    Args:
        name: the integer initializer.
        info: how it is dequantized (`find_quantized_weights`).
        values: every initializer by name, as loaded.
        opset: the default-domain opset the model imports.

    Returns:
        ``(q - zero_point) * scale`` computed exactly as the DequantizeLinear handler does (float32 for 8/16-bit
        data, or ``output_dtype``), or ``q - zero_point`` in float32 where the operator has no scale.
    """
    if info.domain == MS_DOMAIN and info.op in _OWN_LAYOUT:
        return _own_layout(name, info, values)
    attrs = {"axis": info.axis, "block_size": info.block_size, "output_dtype": info.output_dtype}
    node = onnx.helper.make_node("DequantizeLinear", [], [], name=f"{name} (quantized weight)")
    ctx = NodeContext(node=node, opset=max(opset, 10), attrs=attrs, run_graph=_no_graphs)
    data = values[name]
    scale = values[info.scale] if info.scale else torch.tensor(1.0, dtype=_unit_dtype(data))
    zero_point = values[info.zero_point] if info.zero_point else None
    try:
        with torch.no_grad():
            return dequantize_linear(ctx, data, scale, zero_point).detach().clone()
    except (ModscopeError, RuntimeError, IndexError):
        return None  # a layout the handler refuses: the integer tensor stays a buffer


def _own_layout(name: str, info: QuantizedWeight, values: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """MatMulNBits' and DynamicQuantizeLSTM's weights as floats; None for float zero points (a removed element
    could not be written back as an exact zero)."""
    zero_point = values[info.zero_point] if info.zero_point else None
    if zero_point is not None and zero_point.is_floating_point():
        return None
    try:
        with torch.no_grad():
            if info.op == "MatMulNBits":
                return nbits_dequantize(values[name], values[info.scale], zero_point, dict(info.attrs))
            return lstm_dequantize(values[name], values[info.scale], zero_point)
    except (ModscopeError, RuntimeError, IndexError, KeyError):
        return None


def ablated_integers(
    info: QuantizedWeight | None, stored: np.ndarray, keep: np.ndarray, zero_point: np.ndarray | None
) -> np.ndarray:
    """The integer initializer ``stored`` with the elements ``keep`` marks False removed (set to the zero point).

    Args:
        info: how the weight is dequantized; None for an integer weight of no known layout (removed elements: 0).
        stored: the initializer's values.
        keep: a boolean mask of the dequantized parameter's shape.
        zero_point: the zero-point initializer's values, None when there is none.

    Raises:
        ShapeError: ``keep`` does not have the parameter's shape.
    """
    if info is not None and info.op == "MatMulNBits" and info.domain == MS_DOMAIN:
        attrs = dict(info.attrs)
        if keep.shape != (attrs["K"], attrs["N"]):
            raise ShapeError(f"a MatMulNBits weight of K={attrs['K']}, N={attrs['N']} got a mask of {keep.shape}")
        return nbits_ablated(stored, keep, zero_point, attrs)
    if stored.shape != keep.shape:
        raise ShapeError(f"an integer weight of shape {stored.shape} got a mask of shape {keep.shape}")
    removed = np.zeros((), stored.dtype) if info is None else removed_value(info, stored.shape, zero_point)
    return np.where(keep, stored, removed.astype(stored.dtype))


def removed_value(info: QuantizedWeight, shape: tuple[int, ...], zero_point: np.ndarray | None) -> np.ndarray:
    """The integer that a masked element of a quantized weight becomes: its zero point, broadcast to ``shape``.

    Args:
        info: how the weight is dequantized.
        shape: the integer initializer's shape.
        zero_point: the zero-point initializer's values, None when there is none.

    Returns:
        An array that broadcasts against the weight (a scalar for per-tensor quantization).
    """
    if zero_point is None or zero_point.size == 1:
        return np.zeros(()) if zero_point is None else zero_point.reshape(())
    if info.op == "DynamicQuantizeLSTM" and zero_point.ndim == 2:  # per direction and column: (D, 4H)
        return zero_point.reshape(shape[0], 1, shape[-1])
    axis = info.axis % len(shape)
    if info.block_size:
        return np.repeat(zero_point, info.block_size, axis=axis).take(range(shape[axis]), axis=axis)
    view = [1] * len(shape)
    view[axis] = -1
    return zero_point.reshape(view)


def _unit_dtype(data: torch.Tensor) -> torch.dtype:
    """float64 for int32 data, whose values float32 cannot hold exactly; float32 otherwise."""
    return torch.float64 if data.dtype == torch.int32 else torch.float32


def _no_graphs(*args: object) -> list[object]:
    return []
