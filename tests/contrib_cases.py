"""One-node models of onnxruntime's contrib operators, checked against onnxruntime (shared by the contrib tests).

A `Case` lists a node's inputs in order; those named in ``weights`` (with the kind modscope must give them) or in
``constants`` become initializers, the rest graph inputs. `check` compares modscope with onnxruntime, checks the
weight kinds, that ``torch.func.vmap`` over a batch of weights equals separate calls, that gradients reach every
weight, and (``export=True``) that a randomly ablated file written back runs in onnxruntime like the masked model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

import modscope
from modscope.converters.export import export_masked

MS = "com.microsoft"
_NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int8): TensorProto.INT8,
}


@dataclass
class Case:
    op: str
    inputs: list[tuple[str, np.ndarray | None]]  # in node order; None: omitted optional input
    weights: dict[str, str] = field(default_factory=dict)  # input name -> expected kind (an initializer)
    attrs: dict = field(default_factory=dict)
    n_outputs: int = 1
    domain: str = MS
    int_outputs: tuple[int, ...] = ()  # outputs of type int32
    constants: tuple[str, ...] = ()  # inputs that are initializers but not weights (scales, zero points)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def floats(gen: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (gen.standard_normal(shape) * scale).astype(np.float32)


def build(case: Case) -> onnx.ModelProto:
    inits, graph_inputs, names = [], [], []
    for name, value in case.inputs:
        if value is None:
            names.append("")
            continue
        names.append(name)
        if name in case.weights or name in case.constants:
            inits.append(numpy_helper.from_array(value, name))
        else:
            graph_inputs.append(helper.make_tensor_value_info(name, _NP_TO_ONNX[value.dtype], value.shape))
    outputs = [f"y{i}" for i in range(case.n_outputs)]
    node = helper.make_node(case.op, names, outputs, domain=case.domain, name=f"{case.op}_0", **case.attrs)
    graph = helper.make_graph(
        [node],
        "g",
        graph_inputs,
        [
            helper.make_tensor_value_info(o, TensorProto.INT32 if i in case.int_outputs else TensorProto.FLOAT, None)
            for i, o in enumerate(outputs)
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    model.ir_version = 8
    return model


def feeds(case: Case) -> dict[str, np.ndarray]:
    fixed = set(case.weights) | set(case.constants)
    return {n: v for n, v in case.inputs if v is not None and n not in fixed}


def run_ort(model: onnx.ModelProto | Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, inputs)


def run_torch(model: modscope.Model, inputs: dict[str, np.ndarray], params: dict | None = None) -> list[np.ndarray]:
    named = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        out = torch.func.functional_call(model.module, params or {}, (), named, strict=False)
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def assert_outputs_close(got: list[np.ndarray], expected: list[np.ndarray], rtol: float) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        if e.dtype.kind in "iu":
            np.testing.assert_array_equal(g, e)
        else:
            np.testing.assert_allclose(g, e, rtol=rtol, atol=rtol * max(1.0, float(np.abs(e).max())))


def check(case: Case, rtol: float = 1e-4, *, export_to: Path | None = None) -> modscope.Model:
    """Load the case's model, compare with onnxruntime and run the weight checks (see the module docstring)."""
    proto = build(case)
    inputs = feeds(case)
    model = modscope.load(proto)
    assert_outputs_close(run_torch(model, inputs), run_ort(proto, inputs), rtol)
    assert {w.source_name: w.kind for w in model.weights} == case.weights
    if case.weights:
        _check_vmap_and_gradients(model, {k: torch.from_numpy(v) for k, v in inputs.items()})
    if export_to is not None:
        check_export(model, proto, inputs, export_to, rtol)
    return model


def check_export(model: modscope.Model, proto: onnx.ModelProto, inputs: dict, folder: Path, rtol: float) -> None:
    """A random keep mask written back with `export_masked`: onnxruntime on the file gives what the model gives
    with the removed weights zeroed."""
    gen = torch.Generator().manual_seed(5)
    keep = {w.name: torch.rand(w.shape, generator=gen) > 0.4 for w in model.weights}
    out = export_masked(model, keep, folder / "ablated.onnx", source=proto)
    params = model.parameters()
    zeroed = {n: torch.where(k, params[n], torch.zeros(())) for n, k in keep.items()}
    assert_outputs_close(run_torch(model, inputs, zeroed), run_ort(out, inputs), rtol)
    reloaded = modscope.load(out)
    for w in model.weights:
        values = reloaded.module.get_parameter(w.name).detach()
        assert bool((values[~keep[w.name]] == 0).all()), w.source_name


def _check_vmap_and_gradients(model: modscope.Model, inputs: dict[str, torch.Tensor]) -> None:
    params = model.parameters()
    gen = torch.Generator().manual_seed(0)
    stacked = {n: torch.stack([p, p * (torch.rand(p.shape, generator=gen) > 0.3)]) for n, p in params.items()}

    def first(ps: dict[str, torch.Tensor]) -> torch.Tensor:
        out = torch.func.functional_call(model.module, ps, (), inputs, strict=False)
        return out[0] if isinstance(out, tuple) else out

    batched = torch.func.vmap(first)(stacked)
    for i in range(2):
        single = first({n: t[i] for n, t in stacked.items()})
        torch.testing.assert_close(batched[i], single, rtol=1e-5, atol=1e-5)
    leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    first(leaves).square().sum().backward()
    for name, leaf in leaves.items():
        assert leaf.grad is not None and bool(leaf.grad.abs().sum() > 0), name


def assert_loss_reaches_every_matrix(model: modscope.Model, inputs: dict[str, np.ndarray], output: int = 0) -> None:
    """Output ``output``'s gradient is non-zero for every weight matrix (not cut by rounding or by quantizing)."""
    params = {name: p.clone().requires_grad_(True) for name, p in model.parameters().items()}
    named = {k: torch.from_numpy(v) for k, v in inputs.items() if k in model.module.input_names}
    out = torch.func.functional_call(model.module, params, (), named, strict=False)
    (out[output] if isinstance(out, tuple) else out).square().sum().backward()
    matrices = [w.name for w in model.weights if w.kind == "weight"]
    cut = [n for n in matrices if params[n].grad is None or not bool(params[n].grad.abs().sum() > 0)]
    assert not cut, f"no gradient reaches {cut}"
