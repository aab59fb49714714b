"""`OnnxGraphModule`: an ONNX graph run with torch operations.

The graph is compiled once into a list of steps (handler, context, input names, output names); `forward` walks the
list with a dict of values. Float initializers that act as weights become `nn.Parameter`s named after the ONNX
initializer (made safe for torch), so gradients reach them, `torch.func.functional_call` can replace them, and
results can be written back under the original name. Sub-graphs (If/Loop/Scan bodies) are compiled the same way and
see the values of the scopes around them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import onnx
import torch
from torch import nn

from ...errors import UnsupportedOperatorError
from .registry import Handler, NodeContext, OpTable, _norm_domain, decode_attribute, tensor_from_proto


@dataclass
class _Step:
    handler: Handler
    ctx: NodeContext
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass
class _Plan:
    steps: list[_Step]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def safe_name(name: str, taken: set[str]) -> str:
    """``name`` made into a valid, unused torch attribute name."""
    base = re.sub(r"\W", "_", name) or "w"
    if base[0].isdigit():
        base = "w_" + base
    candidate, i = base, 1
    while candidate in taken:
        candidate, i = f"{base}_{i}", i + 1
    taken.add(candidate)
    return candidate


class OnnxGraphModule(nn.Module):
    """Runs an ONNX model's main graph; inputs in graph order, outputs as a tensor or a tuple.

    Attributes:
        input_names: the graph inputs the caller feeds (initializers excluded).
        output_names: the graph outputs, in order.
        param_names: ONNX initializer name -> torch parameter name (``params.<safe name>``) for weights.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        table: OpTable,
        *,
        weight_initializers: set[str] | None = None,
        base_dir: str | None = None,
    ):
        super().__init__()
        self.opsets = {_norm_domain(o.domain): o.version for o in model.opset_import}
        self._table = table
        self.params = nn.ParameterDict()
        self.consts = nn.Module()
        self.param_names: dict[str, str] = {}
        self._const_names: dict[str, str] = {}
        taken: set[str] = set()
        for init in _all_initializers(model.graph):
            if init.name in self.param_names or init.name in self._const_names:
                continue
            tensor = tensor_from_proto(init, base_dir)
            is_weight = tensor.is_floating_point() and (
                init.name in weight_initializers if weight_initializers is not None else tensor.numel() > 1
            )
            safe = safe_name(init.name, taken)
            if is_weight:
                self.params[safe] = nn.Parameter(tensor)
                self.param_names[init.name] = f"params.{safe}"
            else:
                self.consts.register_buffer(safe, tensor)
                self._const_names[init.name] = safe
        self._plans: dict[int, _Plan] = {}
        init_names = set(self.param_names) | set(self._const_names)
        graph = model.graph
        self.input_names = tuple(i.name for i in graph.input if i.name not in init_names)
        self.output_names = tuple(o.name for o in graph.output)
        self._main = self._compile(graph)

    # -- compilation ----------------------------------------------------------------------------------------------
    def _compile(self, graph: onnx.GraphProto) -> _Plan:
        key = id(graph)
        if key in self._plans:
            return self._plans[key]
        steps = []
        for node in graph.node:
            domain = _norm_domain(node.domain)
            opset = self.opsets.get(domain, self.opsets.get("", 1))
            handler = self._table.lookup(domain, node.op_type, opset)
            if handler is None:
                raise UnsupportedOperatorError(node.op_type, node.domain, opset, node.name or (node.output[0] if node.output else ""))
            attrs = {a.name: decode_attribute(a) for a in node.attribute}
            for value in attrs.values():
                for sub in value if isinstance(value, list) else [value]:
                    if isinstance(sub, onnx.GraphProto):
                        self._compile(sub)
            ctx = NodeContext(node=node, opset=opset, attrs=attrs, run_graph=self.run_graph)
            steps.append(_Step(handler, ctx, tuple(node.input), tuple(node.output)))
        plan = _Plan(steps, tuple(i.name for i in graph.input), tuple(o.name for o in graph.output))
        self._plans[key] = plan
        return plan

    # -- execution ------------------------------------------------------------------------------------------------
    def _initial_env(self) -> dict[str, Any]:
        env: dict[str, Any] = {name: self.params[p.split(".", 1)[1]] for name, p in self.param_names.items()}
        for name, safe in self._const_names.items():
            env[name] = getattr(self.consts, safe)
        return env

    def run_graph(self, graph: onnx.GraphProto, inputs: list[Any], outer: Mapping[str, Any]) -> list[Any]:
        """Run a (sub-)graph with ``inputs`` bound to its formal inputs, seeing the values in ``outer``."""
        plan = self._compile(graph)
        env = dict(outer)
        env.update(zip(plan.inputs, inputs))
        return self._execute(plan, env)

    def _execute(self, plan: _Plan, env: dict[str, Any]) -> list[Any]:
        for step in plan.steps:
            args = [env[name] if name else None for name in step.inputs]
            step.ctx.env = env
            result = step.handler(step.ctx, *args)
            if isinstance(result, tuple):
                for name, value in zip(step.outputs, result):
                    if name:
                        env[name] = value
            else:
                env[step.outputs[0]] = result
        return [env[name] for name in plan.outputs]

    def forward(self, *inputs: Any) -> Any:
        env = self._initial_env()
        env.update(zip(self.input_names, inputs))
        outputs = self._execute(self._main, env)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _all_initializers(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    found = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found += _all_initializers(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    found += _all_initializers(g)
    return found
