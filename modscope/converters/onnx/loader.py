"""Reading ONNX files and ModelProtos into a `Model`."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import onnx

from ...errors import ModelLoadError
from ...model import Model, Source, WeightInfo
from . import make_table
from .graph import OnnxGraphModule
from .registry import Handler, OpKey


def load_onnx(
    source: str | os.PathLike | onnx.ModelProto,
    *,
    op_handlers: Mapping[str | OpKey, Handler] | None = None,
) -> Model:
    """Convert an ONNX model to a `Model` whose module runs the graph with torch operations."""
    path = None
    if isinstance(source, onnx.ModelProto):
        proto = source
        checksum = hashlib.sha256(proto.SerializeToString()).hexdigest()
        base_dir = None
    else:
        path = Path(source)
        try:
            data = path.read_bytes()
            proto = onnx.load_from_string(data)
        except (OSError, Exception) as exc:  # refined by the converter issue
            raise ModelLoadError(f"cannot read ONNX model {path}: {exc}") from exc
        checksum = hashlib.sha256(data).hexdigest()
        base_dir = str(path.parent)
    module = OnnxGraphModule(proto, make_table(op_handlers), base_dir=base_dir)
    weights = [
        WeightInfo(torch_name, tuple(module.get_parameter(torch_name).shape), "weight", onnx_name, onnx_name)
        for onnx_name, torch_name in module.param_names.items()
    ]
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    src = Source("onnx", str(path) if path else None, checksum, opset, {"producer": proto.producer_name})
    return Model(module, weights=weights, source=src)
