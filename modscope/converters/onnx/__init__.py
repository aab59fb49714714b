"""ONNX -> torch: `load_onnx` reads a file or ModelProto into a `Model` whose module runs the graph in torch."""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from .ops import FAMILY_MODULES
from .registry import Handler, NodeContext, OpKey, OpSet, OpTable

def default_table() -> OpTable:
    """A fresh table with every built-in handler; callers may modify their copy freely."""
    entries = []
    for name in FAMILY_MODULES:
        module = importlib.import_module(f"{__name__}.ops.{name}")
        entries += module.ops.entries
    return OpTable(entries)


def make_table(op_handlers: Mapping[str | OpKey, Handler] | None = None) -> OpTable:
    table = default_table()
    return table.override(op_handlers) if op_handlers else table


__all__ = ["Handler", "NodeContext", "OpSet", "OpTable", "default_table", "make_table"]
