"""Compiling an ONNX graph for `OnnxGraphModule`: handlers, constant folding, fast paths, plans.

`GraphCompiler` runs once per load. It looks up a handler for every node (naming every unsupported operator at
once), gives merged BatchNorm statistics their own copy (see `GraphCompiler.separate_statistics`), computes the
nodes that read only constants, and turns each graph (the main one and every sub-graph) into a `Plan`, applying the
load-time speed-ups on the way: Identity nodes become aliases, data-movement nodes with constant parameters get
fast paths (``specialize.py``), MatMul + bias Add pairs fuse (``fusion.py``) and shape arithmetic is reused
between calls (``shapes.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import onnx
import torch

from ...errors import UnsupportedOperatorError
from .fusion import fuse_linear
from .limits import DEFAULT_MAX_TENSOR_BYTES, FOLD_BUDGET_BYTES, too_large
from .quantized_gradients import straighten
from .plan import Entry, Plan, build_plan, free_names, live_nodes, order_nodes
from .quantized import gathered_rows
from .registry import NONDETERMINISTIC_OPS, Handler, NodeContext, OpTable, _norm_domain, decode_attribute
from .roles import subgraphs, walk_nodes
from .shapes import cache_shape_arithmetic
from .sizes import RULES, SizeGuard, predict
from .specialize import specialize

#: node inputs that hold statistics, never weights, even when an exporter merged them with an equal weight.
_STATISTICS_INPUTS = {"BatchNormalization": (3, 4)}
#: results larger than this many elements are recomputed on each call rather than kept in memory.
_FOLD_MAX_NUMEL = 1 << 22

PlanIndex = dict[int, tuple[onnx.GraphProto, Plan]]


class GraphCompiler:
    """Compiles one model's graphs (used once, while the module is built).

    Args:
        table: the op handlers.
        opsets: domain -> imported opset version.
        run_graph: the module's sub-graph runner, handed to every `NodeContext`.
        weights: the ONNX names of the initializers that are parameters.
        overridable: initializers the graph also lists as inputs (a caller may feed them, so they are not constant).
        dequantized: quantized weights whose parameter holds the dequantized values: a DequantizeLinear node
            reading one becomes an alias of it.
        add_buffer: registers a computed constant on the module: ``add_buffer(value_name, tensor)``.
        max_tensor_bytes: the largest tensor a node may make (see ``limits.py``); a node whose inputs are all
            constants and whose output would be larger fails the load, and the operators whose output size comes
            from values are checked against it while the model runs.
    """

    def __init__(
        self,
        table: OpTable,
        opsets: dict[str, int],
        run_graph: Callable[..., list[Any]],
        *,
        weights: set[str],
        overridable: set[str],
        add_buffer: Callable[[str, torch.Tensor], None],
        dequantized: set[str] | None = None,
        max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
    ):
        self.table, self.opsets, self.run_graph = table, opsets, run_graph
        self.weights, self.overridable, self.add_buffer = weights, overridable, add_buffer
        self.dequantized = dequantized or set()
        self.prepared: dict[int, tuple[Handler, NodeContext]] = {}
        self.rewired: dict[tuple[int, int], str] = {}
        self.constants: dict[str, torch.Tensor] = {}
        self.folded: set[int] = set()
        self.plans: PlanIndex = {}
        self.preset_shapes: dict[str, tuple[int, ...]] = {}
        self.max_tensor_bytes = max_tensor_bytes
        self.live: set[int] = set()  # ids of the nodes the graph outputs depend on (sub-graphs included)
        self.fold_bytes = 0  # bytes computed by constant folding so far (bounded by FOLD_BUDGET_BYTES)
        self.folded_values: list[str] = []  # the values folding computed, in order

    def compile(
        self,
        graph: onnx.GraphProto,
        values: dict[str, torch.Tensor],
        presets: Callable[[], list[tuple[str, torch.Tensor]]],
        inputs: tuple[str, ...],
    ) -> tuple[Plan, PlanIndex]:
        """The main graph's plan and every graph's plan by ``id(graph)``.

        Args:
            graph: the main graph.
            values: every initializer by name (parameters included); computed constants are added.
            presets: called after folding: the (value name, tensor) pairs the main plan starts from, in order.
            inputs: the main graph's inputs the caller feeds.

        Raises:
            UnsupportedOperatorError: some nodes have no handler.
            ModelLoadError: the graph reads values nothing defines, or never computes an output.
            ResourceLimitError: a node would make a tensor larger than ``max_tensor_bytes``.
        """
        self.prepare_nodes(graph)
        self.dequantized |= gathered_rows(graph, self.dequantized)
        self.separate_statistics(graph, values)
        self.fold_constants(graph, values)
        pairs = presets()
        names = [name for name, _ in pairs]
        self.preset_shapes = {n: tuple(t.shape) for n, t in pairs if t.is_floating_point()}
        main = self._compile(graph, set(names), presets=names, inputs=inputs)
        return main, self.plans

    def separate_statistics(self, graph: onnx.GraphProto, values: dict[str, torch.Tensor]) -> None:
        """Give running statistics that an exporter merged with an equal weight a buffer of their own.

        Exporters store bit-identical tensors once, so a fresh BatchNorm's running variance (all ones) may be the
        same initializer as its scale. Masking the scale must not change the statistics, so such node inputs read
        an unmasked copy instead (``self.rewired``: (node id, input index) -> the name of the copy).
        """
        aliases = {n.output[0]: n.input[0] for n in walk_nodes(graph) if n.op_type == "Identity" and n.input}
        rewired = self.rewired
        for node in walk_nodes(graph):
            for slot in _STATISTICS_INPUTS.get(node.op_type, ()):
                name = source = node.input[slot] if slot < len(node.input) else ""
                for _ in range(len(aliases)):
                    if source not in aliases:
                        break
                    source = aliases[source]
                if source not in self.weights:
                    continue
                copy = f"{name}#statistics"
                if copy not in values:
                    values[copy] = values[source].detach().clone()
                    self.add_buffer(copy, values[copy])
                rewired[(id(node), slot)] = copy

    def prepare_nodes(self, graph: onnx.GraphProto) -> None:
        """Handler and context for every node (sub-graphs included), naming all unsupported operators at once."""
        prepared = self.prepared
        missing: dict[str, tuple[onnx.NodeProto, int]] = {}
        for node in walk_nodes(graph):
            domain = _norm_domain(node.domain)
            opset = self.opsets.get(domain, self.opsets.get("", 1) if domain == "" else 1)
            handler = self.table.lookup(domain, node.op_type, opset)
            if handler is None:
                missing.setdefault(f"{domain + '::' if domain else ''}{node.op_type}", (node, opset))
                continue
            attrs = {a.name: decode_attribute(a) for a in node.attribute}
            ctx = NodeContext(node, opset, attrs, self.run_graph, max_tensor_bytes=self.max_tensor_bytes)
            prepared[id(node)] = (handler, ctx)
        if missing:
            first, (node, opset) = next(iter(missing.items()))
            others = ", ".join(list(missing)[1:])
            hint = (f"the model also uses {others}; " if others else "") + (
                "pass op_handlers={...} to modscope.load to supply implementations"
            )
            raise UnsupportedOperatorError(node.op_type, node.domain, opset, node.name or node.output[0], hint)

    def fold_constants(self, graph: onnx.GraphProto, values: dict[str, torch.Tensor]) -> None:
        """Compute once every live node that reads only constants (``self.folded``: the ids of the nodes folded away).

        Dead nodes (whose outputs nothing needs) are skipped. Each node is sized before it is computed
        (``sizes.py``): over ``max_tensor_bytes`` fails the load, and a node that cannot be sized, that would make
        more than ``_FOLD_MAX_NUMEL`` elements or would overrun ``FOLD_BUDGET_BYTES`` is left to run with the model.
        Only the folded values that the remaining nodes or the outputs read are kept, as buffers.
        """
        constants = self.constants  # grows as nodes fold; the fast paths read it too
        constants.update((n, v) for n, v in values.items() if n not in self.weights and n not in self.overridable)
        folded = self.folded
        self.live = live_nodes(graph, lambda n: self._reads(n, folded))
        for node in walk_nodes(graph):  # Constant nodes anywhere, sub-graphs included
            if node.op_type == "Constant" and not node.input and _norm_domain(node.domain) == "":
                if id(node) in self.live:
                    self._try_fold(node, constants, folded)
        known = set(values) | set(constants) | {i.name for i in graph.input}
        for node in order_nodes(graph.node, known, lambda n: self._reads(n, folded)):
            if id(node) in folded or id(node) not in self.live or node.op_type in NONDETERMINISTIC_OPS:
                continue
            if _norm_domain(node.domain) != "" or subgraphs(node):
                continue
            if all(not name or name in constants for name in node.input):
                self._try_fold(node, constants, folded)
        needed = self._needed(graph)
        for name in self.folded_values:
            if name in needed:
                self.add_buffer(name, constants[name])
            else:
                del constants[name]  # read only by other folded nodes

    def _try_fold(self, node: onnx.NodeProto, constants: dict[str, torch.Tensor], folded: set[int]) -> None:
        handler, ctx = self.prepared[id(node)]
        args = [constants[name] if name else None for name in node.input]
        size = predict(ctx, handler, args)
        if size is None:
            return  # cannot be sized without computing it: it runs with the model
        if size.exact and size.nbytes > self.max_tensor_bytes:
            raise too_large(node.name or node.output[0], node.op_type, size.numel, size.nbytes, self.max_tensor_bytes)
        if size.nbytes > FOLD_BUDGET_BYTES - self.fold_bytes or (size.exact and size.numel > _FOLD_MAX_NUMEL):
            return
        try:
            with torch.no_grad():
                result = handler(ctx, *args)
        except Exception:  # noqa: BLE001 - the node then runs normally and reports its error at run time
            return
        results = result if isinstance(result, tuple) else (result,)
        if len(results) < len(node.output) or not all(isinstance(r, torch.Tensor) for r in results):
            return
        self.fold_bytes += sum(r.numel() * r.element_size() for r in results)
        if any(r.numel() > _FOLD_MAX_NUMEL for r in results):
            return
        for name, value in zip(node.output, results):
            if name:
                constants[name] = value
                self.folded_values.append(name)
        folded.add(id(node))

    def _needed(self, graph: onnx.GraphProto) -> set[str]:
        """The values that the live nodes left to run (sub-graphs included) and the graph outputs read."""
        names = {o.name for o in graph.output}
        for node in graph.node:
            if id(node) in self.live and id(node) not in self.folded:
                names.update(node.input)
                for sub in subgraphs(node):
                    names |= self._needed(sub)
        return names

    def _reads(self, node: onnx.NodeProto, folded: set[int]) -> list[str]:
        """The values a node needs before it runs: its inputs and what its sub-graphs read from outside."""
        names = [name for name in node.input if name]
        for sub in subgraphs(node):
            names += free_names(sub, folded)
        return names

    def _compile(
        self,
        graph: onnx.GraphProto,
        visible: set[str],
        *,
        presets: list[str] | None = None,
        inputs: tuple[str, ...] | None = None,
    ) -> Plan:
        folded, overridden = self.folded, self.table.overridden
        free = sorted(free_names(graph, folded)) if presets is None else []
        formal = tuple(i.name for i in graph.input) if inputs is None else inputs
        known = visible | set(formal) | set(free)
        inner = known | {name for n in graph.node for name in n.output}
        entries = []
        aliases: dict[str, str] = {}
        for node in order_nodes(graph.node, known, lambda n: self._reads(n, folded)):
            if id(node) in folded or id(node) not in self.live:
                continue
            if (_is_alias(node) and ("", "Identity") not in overridden) or self._reads_dequantized(node):
                aliases[node.output[0]] = aliases.get(node.input[0], node.input[0])
                continue
            handler, ctx = self.prepared[id(node)]
            outer: set[str] = set()
            for sub in _graph_attributes(ctx):  # the very objects the handler will pass to run_graph
                self._compile(sub, inner)
                outer |= free_names(sub, folded)
            names = [aliases.get(n, n) for n in node.input]
            names = [self.rewired.get((id(node), slot), name) for slot, name in enumerate(names)]
            entry = Entry(node, names, list(node.output), handler, ctx, frozenset(outer))
            entry = specialize(entry, self.constants, overridden)
            if entry.handler is handler and node.op_type in RULES and _norm_domain(node.domain) == "":
                if ("", node.op_type) not in overridden:  # size the node from its inputs before it runs
                    entry = entry._replace(handler=SizeGuard(handler, self.max_tensor_bytes))
            entries.append(entry)
        if ("", "MatMul") not in overridden and ("", "Add") not in overridden:
            entries = fuse_linear(entries, self.preset_shapes, keep={o.name for o in graph.output})
        entries = straighten(entries, {aliases.get(o.name, o.name) for o in graph.output}, overridden)
        entries = cache_shape_arithmetic(entries, set(self.constants))
        plan = build_plan(
            entries,
            inputs=formal,
            outputs=[o.name for o in graph.output],
            presets=presets or (),
            free_vars=free,
            aliases=aliases,
        )
        self.plans[id(graph)] = (graph, plan)
        return plan


    def _reads_dequantized(self, node: onnx.NodeProto) -> bool:
        """A DequantizeLinear node of a quantized weight whose parameter already holds its output."""
        plain = node.op_type == "DequantizeLinear" and _norm_domain(node.domain) == ""
        return plain and bool(node.input) and node.input[0] in self.dequantized and len(node.output) == 1


def _is_alias(node: onnx.NodeProto) -> bool:
    """An Identity node: its output is its input, so it needs no step of its own."""
    plain = node.op_type == "Identity" and _norm_domain(node.domain) == ""
    return plain and len(node.input) == 1 and bool(node.input[0])


def _graph_attributes(ctx: NodeContext) -> Iterator[onnx.GraphProto]:
    for value in ctx.attrs.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, onnx.GraphProto):
                yield item
