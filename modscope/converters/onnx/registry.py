"""The operator registry of the ONNX converter.

An op handler is a plain function ``handler(ctx, *inputs) -> Tensor | tuple[Tensor, ...]`` that computes one ONNX
node with torch operations, differentiably. ``ctx`` is a `NodeContext` (decoded attributes, the opset in force, the
number of outputs wanted, and a way to run sub-graphs); ``inputs`` are torch tensors, python lists (ONNX sequences)
or ``None`` for omitted optional inputs.

Each op family module declares its handlers on an `OpSet` at import time; `default_table()` builds a fresh
`OpTable` from all of them for every `load` call, and callers add or override handlers per call
(``modscope.load(path, op_handlers={"MyOp": fn, ("com.me", "Other"): fn2})``). Nothing global is mutated.

Versioning: a handler registered with ``since=v`` serves every opset >= v until a later registration of the same op
takes over, mirroring ONNX's ``since_version``. Where an attribute moved to an input between opsets, register one
handler per version range or read ``ctx.opset``.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import onnx
from onnx import numpy_helper

from .tensors import check_tensor_proto, tensor_from_proto

Handler = Callable[..., Any]
OpKey = tuple[str, str]  # (domain, op_type); "" is the default ONNX domain

_DEFAULT_DOMAINS = ("", "ai.onnx")

#: operators whose results are not a function of their inputs alone: never computed ahead of time or reused.
NONDETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli", "Multinomial", "Dropout"}
)


def _norm_domain(domain: str) -> str:
    return "" if domain in _DEFAULT_DOMAINS else domain


@dataclass
class OpSet:
    """The handlers one op family module declares. Used only at import time by that module."""

    entries: list[tuple[str, str, int, Handler]] = field(default_factory=list)

    def register(self, *op_types: str, since: int = 1, domain: str = "") -> Callable[[Handler], Handler]:
        """Decorator: register the function for ``op_types`` from opset ``since`` on."""

        def deco(fn: Handler) -> Handler:
            for op_type in op_types:
                self.entries.append((_norm_domain(domain), op_type, since, fn))
            return fn

        return deco


class OpTable:
    """(domain, op_type) -> handlers sorted by ``since`` version. Each `load` call owns its own table."""

    def __init__(self, entries: Iterable[tuple[str, str, int, Handler]] = ()):
        self._ops: dict[OpKey, list[tuple[int, Handler]]] = {}
        self.overridden: set[OpKey] = set()  # ops whose handlers the caller supplied
        for domain, op_type, since, fn in entries:
            self.add(op_type, fn, domain=domain, since=since)

    def add(self, op_type: str, handler: Handler, *, domain: str = "", since: int = 1) -> None:
        versions = self._ops.setdefault((_norm_domain(domain), op_type), [])
        versions[:] = [v for v in versions if v[0] != since]
        bisect.insort(versions, (since, handler), key=lambda v: v[0])

    def override(self, handlers: Mapping[str | OpKey, Handler]) -> OpTable:
        """A copy with ``handlers`` added; keys are op types (default domain) or (domain, op_type)."""
        table = OpTable()
        table._ops = {k: list(v) for k, v in self._ops.items()}
        table.overridden = set(self.overridden)
        for key, fn in handlers.items():
            domain, op_type = key if isinstance(key, tuple) else ("", key)
            table._ops[(_norm_domain(domain), op_type)] = [(1, fn)]
            table.overridden.add((_norm_domain(domain), op_type))
        return table

    def lookup(self, domain: str, op_type: str, opset: int) -> Handler | None:
        versions = self._ops.get((_norm_domain(domain), op_type))
        if not versions:
            return None
        best = None
        for since, fn in versions:
            if since <= opset:
                best = fn
        return best if best is not None else versions[0][1]

    def __contains__(self, key: OpKey) -> bool:
        return (_norm_domain(key[0]), key[1]) in self._ops

    def op_types(self) -> list[OpKey]:
        return sorted(self._ops)


@dataclass
class NodeContext:
    """What a handler knows about the node it computes.

    Attributes:
        node: the NodeProto.
        opset: the opset version imported for the node's domain.
        attrs: decoded attributes: ints, floats, str (bytes decoded), torch tensors, GraphProto, and lists of these.
        n_outputs: how many outputs the node declares (trailing optional outputs may be empty names).
        run_graph: ``run_graph(graph, inputs, outer)`` runs a sub-graph (If/Loop/Scan bodies) with ``inputs`` bound
            to its formal inputs and ``outer`` (a dict of visible outer values) and returns its outputs as a list.
        env: the values visible at this node (read-only; sub-graphs see outer-scope names through it).
        max_tensor_bytes: the most bytes one tensor the node makes (or a Loop holds) may take (``limits.py``).
    """

    node: onnx.NodeProto
    opset: int
    attrs: dict[str, Any]
    run_graph: Callable[..., list[Any]]
    env: Mapping[str, Any] = field(default_factory=dict)
    max_tensor_bytes: int = 2 << 30

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def op_type(self) -> str:
        return self.node.op_type

    @property
    def domain(self) -> str:
        return self.node.domain

    @property
    def n_outputs(self) -> int:
        return len(self.node.output)

    @property
    def outputs(self) -> tuple[str, ...]:
        """The node's output names; an empty name is an optional output that is not wanted."""
        return tuple(self.node.output)

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)


def decode_attribute(attr: onnx.AttributeProto) -> Any:
    """An AttributeProto as a python value (tensors as torch tensors, strings as str, graphs as GraphProto).

    String tensors stay numpy arrays of bytes, since torch has no string type.
    """
    value = onnx.helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, onnx.TensorProto):
        return _decode_tensor(value)
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode("utf-8", errors="replace") for v in value]
    if isinstance(value, list) and value and isinstance(value[0], onnx.TensorProto):
        return [_decode_tensor(v) for v in value]
    return value


def _decode_tensor(proto: onnx.TensorProto) -> Any:
    if proto.data_type == onnx.TensorProto.STRING:
        check_tensor_proto(proto)
        return numpy_helper.to_array(proto)
    return tensor_from_proto(proto)
