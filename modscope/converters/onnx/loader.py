"""Reading ONNX files and ModelProtos into a `Model`.

The file is parsed with protobuf only (nothing in it is executed), checked for the damage a truncated or foreign
file shows (no graph, no opset, values that nothing defines), and compiled into an `OnnxGraphModule`. The weight
registry comes from how the graph uses each initializer (``roles.py``): every weight keeps its ONNX initializer
name as ``WeightInfo.source_name``, so masks and ablations can be written back into the original file. Quantized
weights (``quantized.py``) are listed with their dequantized float values under the integer initializer's name.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from ...errors import ModelLoadError
from ...fileio import file_error
from ...model import Model, Source, WeightInfo
from . import make_table
from .constants import lift_constant_weights, make_names_unique, needs_rewrite
from .graph import OnnxGraphModule
from .quantized import find_quantized_weights
from .registry import Handler, OpKey
from .roles import find_weights


def load_onnx(
    source: str | os.PathLike | onnx.ModelProto,
    *,
    op_handlers: Mapping[str | OpKey, Handler] | None = None,
    max_tensor_bytes: int | str | None = None,
) -> Model:
    """Convert an ONNX model to a `Model` whose module runs the graph with torch operations.

    Args:
        source: a path to an ``.onnx`` file (external data files are read from its folder only), or a ModelProto
            (not modified; its external data must already be loaded, as ``onnx.load(path)`` does).
        op_handlers: extra or replacement op handlers, keyed by op type (default domain) or (domain, op_type);
            each is ``handler(ctx, *inputs)`` as in ``modscope.converters.onnx.registry``.
        max_tensor_bytes: the largest tensor one node may make, in bytes or as ``"8GiB"``; None reads the
            environment variable ``MODSCOPE_MAX_TENSOR_BYTES``, else 2 GiB. A node whose output would be larger
            fails the load (constant nodes) or the forward pass, naming the node (see docs/security.md).

    Returns:
        A `Model`: ``model.module`` is an `OnnxGraphModule`, ``model.weights`` lists the float initializers that
        act as weights (kind and layer filled in), ``model.source`` records the file, its sha256 and the opset.

    Raises:
        ModelLoadError: the file is missing, empty, truncated, corrupt or not ONNX, or its external data is
            missing or lies outside the model's folder.
        UnsupportedOperatorError: an operator has no handler (all of them are named).
        ResourceLimitError: a node would make a tensor larger than ``max_tensor_bytes``.

    Example:
        >>> import numpy as np
        >>> from onnx import helper, numpy_helper, TensorProto
        >>> w = numpy_helper.from_array(np.ones((3, 2), np.float32), "fc.weight")
        >>> graph = helper.make_graph(
        ...     [helper.make_node("MatMul", ["x", "fc.weight"], ["y"])], "g",
        ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], initializer=[w])
        >>> model = load_onnx(helper.make_model(graph))
        >>> [(w.name, w.kind, w.layer, w.source_name) for w in model.weights]
        [('params.fc_weight', 'weight', 'fc', 'fc.weight')]
    """
    if isinstance(source, onnx.ModelProto):
        proto, path, base_dir = source, None, None
        checksum = _proto_checksum(proto)
        _check_model(proto, "the ModelProto")
    else:
        path = Path(source)
        data = _read(path)
        proto = _parse(data, path)
        checksum = hashlib.sha256(data).hexdigest()
        base_dir = str(path.resolve().parent)
    lifted: list[str] = []
    if needs_rewrite(proto.graph):  # weights in Constant nodes, or one name in two sub-graphs: see constants.py
        if isinstance(source, onnx.ModelProto):
            proto = onnx.ModelProto()
            proto.CopyFrom(source)  # the caller's proto is never modified
        lifted = lift_constant_weights(proto.graph)  # weights kept in Constant nodes (paddle2onnx, OpenVINO)
        make_names_unique(proto.graph)  # the same name in two sub-graphs: two weights
    roles = find_weights(proto.graph, quantized=find_quantized_weights(proto.graph))
    module = OnnxGraphModule(
        proto, make_table(op_handlers), weight_initializers=roles, base_dir=base_dir, max_tensor_bytes=max_tensor_bytes
    )
    weights = []
    for onnx_name, torch_name in module.param_names.items():
        role = roles[onnx_name]
        shape = tuple(module.get_parameter(torch_name).shape)
        weights.append(WeightInfo(torch_name, shape, role.kind, role.layer, onnx_name))
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    details = {
        "producer": proto.producer_name,
        "producer_version": proto.producer_version,
        "ir_version": proto.ir_version,
        "opsets": opsets,
        "weights_in_constants": [n for n in lifted if n in roles],
    }
    src = Source("onnx", str(path) if path else None, checksum, opsets.get("ai.onnx"), details)
    return Model(module, weights=weights, source=src)


def _read(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise file_error(exc, path, "ONNX file") from exc
    if not data:
        raise ModelLoadError(f"ONNX file {path} is empty (0 bytes); export or download it again")
    return data


def _parse(data: bytes, path: Path) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(
            f"{path} is not a readable ONNX model: its bytes do not parse as an ONNX protobuf (the file is "
            "truncated, corrupt or of another format)"
        ) from exc
    _check_model(proto, str(path))
    return proto


def _check_model(proto: onnx.ModelProto, what: str) -> None:
    """Reject messages that parse but cannot be a model: no graph, no outputs, or no operator set."""
    if not proto.HasField("graph"):
        raise ModelLoadError(f"{what} is not an ONNX model: it has no graph (truncated, or another kind of file)")
    if not proto.graph.output:
        raise ModelLoadError(f"{what} is not a usable ONNX model: its graph has no outputs (truncated or corrupt)")
    if proto.ir_version >= 3 and not proto.opset_import:
        raise ModelLoadError(
            f"{what} names no operator set (opset_import is empty); the file is truncated or corrupt, re-export it"
        )
    _check_value_types(proto.graph, what)


def _check_value_types(graph: onnx.GraphProto, what: str) -> None:
    """Reject graph inputs and outputs declared with an element type ONNX does not define (e.g. 999)."""
    known = set(onnx.TensorProto.DataType.values())
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for value in values:
            if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type not in known:
                raise ModelLoadError(
                    f"{what} declares graph {kind} '{value.name}' with element type "
                    f"{value.type.tensor_type.elem_type}, which is not an ONNX type; the file is corrupt"
                )


def _proto_checksum(proto: onnx.ModelProto) -> str:
    try:
        return hashlib.sha256(proto.SerializeToString()).hexdigest()
    except ValueError:  # over protobuf's 2 GB limit: hash the structure and each tensor's bytes instead
        h = hashlib.sha256()
        graph = onnx.GraphProto()
        graph.CopyFrom(proto.graph)
        graph.ClearField("initializer")
        h.update(graph.SerializeToString())
        for init in proto.graph.initializer:
            h.update(init.name.encode())
            h.update(init.raw_data)
        return h.hexdigest()
