"""ONNX -> torch: `load_onnx` reads a file or ModelProto into a `Model` whose module runs the graph in torch."""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from .registry import Handler, NodeContext, OpKey, OpSet, OpTable

#: the op family modules whose `ops` make up the default table (one file per family).
FAMILY_MODULES = (
    "ops_elementwise",
    "ops_activation",
    "ops_linalg",
    "ops_misc",
    "ops_shape",
    "ops_indexing",
    "ops_reduction",
    "ops_sequence",
    "ops_normalization",
    "ops_pooling",
    "ops_nn",
    "ops_signal",
    "ops_recurrent",
    "ops_control_flow",
    "ops_quantization",
    "ops_detection",
    "ops_ml",
    "ops_ml_linear",
    "ops_contrib_transformer",
    "ops_contrib_quantized",
)


def default_table() -> OpTable:
    """A fresh table with every built-in handler; callers may modify their copy freely."""
    entries = []
    for name in FAMILY_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        entries += module.ops.entries
    return OpTable(entries)


def make_table(op_handlers: Mapping[str | OpKey, Handler] | None = None) -> OpTable:
    table = default_table()
    return table.override(op_handlers) if op_handlers else table


__all__ = ["Handler", "NodeContext", "OpSet", "OpTable", "default_table", "make_table"]
