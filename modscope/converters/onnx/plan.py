"""Compiling an ONNX graph into an execution plan: node order, value slots and when each value can be freed.

A plan numbers every value of a graph with a *slot*; running the plan fills a python list indexed by slot, which is
faster than a dict keyed by name. Slot 0 always holds ``None`` (an omitted optional input reads it) and slot 1
swallows the outputs a node leaves unnamed. After each step the plan drops the values no later step reads, so
intermediate tensors are freed as soon as possible.

Sub-graphs (If branches, Loop and Scan bodies) get their own plans. The names they read from enclosing graphs are
their *free variables*, copied in from the enclosing scope when the sub-graph runs; the node that owns a sub-graph
counts as reading them, so they stay alive until it has run.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, NamedTuple

import onnx

from ...errors import ModelLoadError
from .roles import subgraphs

NONE_SLOT, SINK_SLOT, FIRST_SLOT = 0, 1, 2


class Step(NamedTuple):
    """One node to run: ``handler(ctx, *values[inputs])`` stored into ``outputs``, then ``free`` cleared.

    A tuple, because the interpreter unpacks it on every call.
    """

    handler: Callable[..., Any]
    ctx: Any
    fetch: Callable[[list[Any]], Any] | None  # itemgetter over the input slots: a value for 1, a tuple for more
    arity: int
    outputs: tuple[int, ...]
    free: tuple[int, ...]
    scoped: bool  # the node owns sub-graphs, so its handler needs ``ctx.env``
    inputs: tuple[int, ...]


class Entry(NamedTuple):
    """A node ready to be planned: what it reads and writes, its handler, and what its sub-graphs read."""

    node: onnx.NodeProto
    inputs: Sequence[str]
    outputs: Sequence[str]
    handler: Callable[..., Any]
    ctx: Any
    outer: frozenset[str]


@dataclass(frozen=True)
class Plan:
    """A compiled graph.

    Attributes:
        steps: the nodes in execution order.
        slot_of: value name -> slot.
        n_slots: the length of the value list.
        inputs: the slots of the graph's formal inputs, in order.
        outputs: the slots of the graph's outputs, in order.
        free_vars: (name, slot) for each value read from enclosing scopes (empty for the main graph).
    """

    steps: tuple[Step, ...]
    slot_of: dict[str, int]
    n_slots: int
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    free_vars: tuple[tuple[str, int], ...]


def free_names(graph: onnx.GraphProto, skip: set[int]) -> set[str]:
    """Names ``graph`` (or a sub-graph of it) reads but does not define; nodes in ``skip`` (by id) define nothing.

    Initializers of ``graph`` count as free: modscope keeps every initializer in the main graph's scope.
    """
    defined = {i.name for i in graph.input}
    used = {o.name for o in graph.output}  # an output may be an outer value or a folded constant
    for node in graph.node:
        used.update(name for name in node.input if name)
        for sub in subgraphs(node):
            used |= free_names(sub, skip)
        if id(node) not in skip:
            defined.update(node.output)
    return used - defined


def order_nodes(
    nodes: Sequence[onnx.NodeProto], defined: set[str], reads: Callable[[onnx.NodeProto], Iterable[str]]
) -> list[onnx.NodeProto]:
    """``nodes`` in an order where each runs after the values it reads exist (the file's order when it is valid).

    Kahn's algorithm, linear in the size of the graph: each node waits for a count of values, and making a value
    releases the nodes that wait for it. Among the nodes that are ready, the one listed first in the file runs first.

    Raises:
        ModelLoadError: a node reads a value that nothing defines, or the nodes form a cycle.
    """
    known = set(defined)
    waiting: dict[str, list[int]] = {}
    missing = [0] * len(nodes)
    ready: list[int] = []
    for i, node in enumerate(nodes):
        for name in {name for name in reads(node) if name not in known}:
            waiting.setdefault(name, []).append(i)
            missing[i] += 1
        if not missing[i]:
            ready.append(i)
    heapq.heapify(ready)
    ordered: list[onnx.NodeProto] = []
    while ready:
        node = nodes[heapq.heappop(ready)]
        ordered.append(node)
        for name in node.output:
            if name in known:
                continue
            known.add(name)
            for j in waiting.pop(name, ()):
                missing[j] -= 1
                if not missing[j]:
                    heapq.heappush(ready, j)
    if len(ordered) < len(nodes):
        node = nodes[next(i for i, count in enumerate(missing) if count)]
        name = next(name for name in reads(node) if name not in known)
        producers = {out for n in nodes for out in n.output if out not in known}
        why = "the nodes form a cycle" if name in producers else "nothing in the graph defines it"
        raise ModelLoadError(
            f"node '{node.name or node.output[0]}' ({node.op_type}) reads '{name}', but {why}; "
            "the file is truncated or corrupt, re-export it"
        )
    return ordered


def live_nodes(graph: onnx.GraphProto, reads: Callable[[onnx.NodeProto], Iterable[str]]) -> set[int]:
    """The ids of the nodes whose outputs the graph's outputs depend on, in ``graph`` and its live sub-graphs.

    A node nothing reads (directly or through other nodes) is dead: it is neither folded nor run.

    Args:
        graph: the graph.
        reads: the values a node needs (its inputs and what its sub-graphs read from outside).

    The ids are those of the node objects the caller holds: keep them alive while using the result (protobuf may
    hand out new wrapper objects for nodes nobody references).
    """
    producers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.output:
            if name:
                producers.setdefault(name, []).append(node)
    live: set[int] = set()
    wanted, seen = [o.name for o in graph.output], set()
    while wanted:
        name = wanted.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in producers.get(name, ()):
            if id(node) not in live:
                live.add(id(node))
                wanted.extend(reads(node))
                for sub in subgraphs(node):
                    live |= live_nodes(sub, reads)
    return live


def build_plan(
    entries: Sequence[Entry],
    *,
    inputs: Sequence[str],
    outputs: Sequence[str],
    presets: Sequence[str] = (),
    free_vars: Sequence[str] = (),
    aliases: dict[str, str] | None = None,
) -> Plan:
    """Number the values and work out when each can be freed.

    Args:
        entries: the nodes in execution order.
        inputs: the graph's formal inputs (fed by the caller).
        outputs: the graph's outputs.
        presets: values filled before the run starts, given slots ``FIRST_SLOT`` on in this order (weights and
            constants of the main graph).
        free_vars: values copied in from enclosing scopes (sub-graphs).
        aliases: value -> the earlier value it is identical to (Identity outputs): both share one slot and the
            node that made the alias is left out of ``entries``.

    Raises:
        ModelLoadError: a graph output that nothing computes.
    """
    slot_of: dict[str, int] = {"": NONE_SLOT}
    n_slots = FIRST_SLOT
    aliases_of: dict[str, list[str]] = {}  # source -> the aliases that take its slot once it has one
    for alias, source in (aliases or {}).items():
        aliases_of.setdefault(source, []).append(alias)

    def slot(name: str) -> int:
        nonlocal n_slots
        if name not in slot_of:
            slot_of[name], n_slots = n_slots, n_slots + 1
            sources = [name]
            while sources:  # chains of aliases resolve here
                source = sources.pop()
                for alias in aliases_of.pop(source, ()):
                    slot_of[alias] = slot_of[source]
                    sources.append(alias)
        return slot_of[name]

    for name in [*presets, *free_vars, *inputs]:
        slot(name)
    raw_steps = []
    for node, names, out_names, handler, ctx, outer in entries:
        ins = tuple(slot_of.get(name, NONE_SLOT) if name else NONE_SLOT for name in names)
        reads = set(ins) | {slot_of[name] for name in outer if name in slot_of}
        outs = tuple(slot(name) if name else SINK_SLOT for name in out_names)
        raw_steps.append((node, handler, ctx, ins, outs, reads, bool(outer) or bool(subgraphs(node))))
    missing = [name for name in outputs if name not in slot_of]
    if missing:
        raise ModelLoadError(f"graph output '{missing[0]}' is never computed; the file is truncated or corrupt")
    out_slots = tuple(slot_of[name] for name in outputs)
    keep = set(out_slots) | {NONE_SLOT, SINK_SLOT} | set(range(FIRST_SLOT, FIRST_SLOT + len(presets)))
    last_use: dict[int, int] = {}
    for index, (_, _, _, _, outs, reads, _) in enumerate(raw_steps):
        for s in outs:
            last_use.setdefault(s, index)  # an output nobody reads is freed right away
        for s in reads:
            last_use[s] = index
    free_at: dict[int, list[int]] = {}
    for s, index in last_use.items():
        if s not in keep:
            free_at.setdefault(index, []).append(s)
    steps = tuple(
        Step(handler, ctx, itemgetter(*ins) if ins else None, len(ins), outs, tuple(free_at.get(i, ())), scoped, ins)
        for i, (_, handler, ctx, ins, outs, _, scoped) in enumerate(raw_steps)
    )
    return Plan(
        steps=steps,
        slot_of=slot_of,
        n_slots=n_slots,
        inputs=tuple(slot_of[name] for name in inputs),
        outputs=out_slots,
        free_vars=tuple((name, slot_of[name]) for name in free_vars),
    )


def without_dead_nodes(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy of ``model`` whose main graph keeps only the nodes its outputs depend on; None when all are live.

    For handing a file to another runtime (onnxruntime in ``verify``), which would otherwise compute dead nodes too.
    """
    graph = model.graph

    def reads(node: onnx.NodeProto) -> list[str]:
        names = [name for name in node.input if name]
        for sub in subgraphs(node):
            names += free_names(sub, set())
        return names

    nodes = list(graph.node)  # held, so that the ids live_nodes returns stay theirs
    live = live_nodes(graph, reads)
    if all(id(node) in live for node in nodes):
        return None
    kept = [node for node in nodes if id(node) in live]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.node[:]
    copy.graph.node.extend(kept)
    return copy
