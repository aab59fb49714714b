"""Every registered ONNX op handler is differentiable and batchable, checked on the onnx package's own node cases.

Mask training needs two things from each handler: gradients that reach the weights (finite, so one op cannot poison
the logits with NaN), and a `torch.func.vmap` batching rule, since the K tasks x S samples of effective weights run
as one batched call. For each default-domain op type this test takes the first conformance case whose inputs are
all numeric tensors with at least one float among them, and checks

- vmap == loop: every float input stacked with a perturbed copy; the batched call equals two separate calls;
- finite gradients: the sum of the float outputs, differentiated with respect to the float inputs.

Ops that no such case covers, or that cannot be batched over their float inputs by nature, are listed below with the
reason; a handler that is neither covered nor listed fails `test_every_handler_is_covered`.
"""

from __future__ import annotations

import warnings
from functools import cache

import numpy as np
import pytest
import torch

import modscope
from modscope.converters.onnx import default_table

pytest.importorskip("onnx.backend.test.case.node")

#: Ops that cannot be batched by nature: how many values they return depends on the values.
NOT_BATCHED: dict[str, str] = {
    "NonMaxSuppression": "the number of boxes kept depends on the scores",
    "Unique": "the number of distinct values depends on the values",
}

#: Ops whose gradient is legitimately absent or infinite on the case's input.
NO_GRADIENT: dict[str, str] = {
    "Unique": "a set of values has no derivative (torch has none for unique)",
    "Acosh": "its derivative is infinite at 1, which the case's input contains",
}

#: (op, input index) of float inputs that are settings or statistics, not data or weights: never batched by the
#: learner (roles.py keeps them as buffers), so neither batched nor differentiated here.
PARAMETER_INPUTS: dict[tuple[str, int], str] = {
    ("BatchNormalization", 3): "running mean: a buffer",
    ("BatchNormalization", 4): "running variance: a buffer",
    ("Resize", 1): "region of interest: a setting",
    ("Resize", 2): "scales decide the output shape",
    ("Upsample", 1): "scales decide the output shape",
}

#: Default-domain ops with no conformance case that has a float data input: integer, boolean or index operators
#: (nothing to mask flows through them) and generators whose float inputs are scalars.
_LOGIC = "boolean or integer operands only"
_GENERATOR = "a generator: its output depends on shapes or scalar settings, not on data"
_SEQUENCE = "works on sequences or optionals, not tensors"
NO_FLOAT_CASE: dict[str, str] = {
    **{op: _LOGIC for op in ("And", "Or", "Xor", "Not", "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor",
                             "BitwiseNot")},
    **{op: _GENERATOR for op in ("BlackmanWindow", "HammingWindow", "HannWindow", "MelWeightMatrix", "Range",
                                 "ConstantOfShape", "EyeLike", "Constant")},
    **{op: _SEQUENCE for op in ("ConcatFromSequence", "SequenceAt", "SequenceConstruct", "SequenceEmpty",
                                "SequenceErase", "SequenceInsert", "SequenceLength", "SequenceMap", "Optional")},
    "Equal": "a comparison: boolean output, no gradient",
    "NonZero": "returns indices whose number depends on the values",
    "ConvInteger": "integer operands; dequantized weights are covered in test_onnx_quantized.py",
    "MatMulInteger": "integer operands; dequantized weights are covered in test_onnx_quantized.py",
    "If": "its condition is a boolean; the ops of its branches are covered here",
    "SimplifiedLayerNormalization": "onnxruntime's, no onnx case; vmap and gradients in test_onnx_contrib_ops.py",
}


def _single_node_case(op: str, inputs: list[np.ndarray], **attrs):
    """A conformance-like case for an op whose onnx cases have no float input: one node, these inputs."""
    from types import SimpleNamespace

    from onnx import helper

    names = [f"x{i}" for i in range(len(inputs))]
    node = helper.make_node(op, names, ["y"], **attrs)
    graph = helper.make_graph(
        [node], op, [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                     for n, a in zip(names, inputs)],
        [helper.make_tensor_value_info("y", 0, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return SimpleNamespace(name=f"synthetic_{op}", model=model, data_sets=[(inputs, [])])


def _synthetic_cases() -> dict[str, object]:
    rng = np.random.default_rng(0)
    return {
        "GlobalLpPool": _single_node_case("GlobalLpPool", [rng.standard_normal((1, 2, 3, 3), dtype=np.float32)]),
        "Trilu": _single_node_case("Trilu", [rng.standard_normal((3, 4), dtype=np.float32)], upper=0),
    }


@cache
def _cases_by_op() -> dict[str, object]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = [c for c in collect_testcases(None) if c.kind == "node"]
    first: dict[str, object] = {}
    for case in cases:
        nodes = case.model.graph.node
        if len(nodes) != 1 or nodes[0].domain not in ("", "ai.onnx"):
            continue
        op = nodes[0].op_type
        if op in first or not case.data_sets:
            continue
        inputs = _arrays(case)
        if not all(isinstance(a, np.ndarray) and a.dtype.kind in "fiub" for a in inputs):
            continue
        if any(_batched(op, i, a.dtype, a.ndim) for i, a in enumerate(inputs)):
            first[op] = case
    for op, case in _synthetic_cases().items():
        first.setdefault(op, case)
    return first


def _default_domain_ops() -> list[str]:
    return sorted(op for domain, op in default_table().op_types() if domain == "")


_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _batched(op: str, index: int, dtype: np.dtype, ndim: int) -> bool:
    """Whether input ``index`` of ``op`` is data or a weight: a float tensor of rank >= 1 that is not a setting."""
    return dtype in _FLOATS and ndim >= 1 and (op, index) not in PARAMETER_INPUTS


def _arrays(case) -> list:
    """The case's first inputs, with numpy scalars and TensorProtos as numpy arrays."""
    from onnx import TensorProto, numpy_helper

    def one(a):
        if isinstance(a, TensorProto):
            return numpy_helper.to_array(a)
        return np.asarray(a) if isinstance(a, np.generic) else a

    return [one(a) for a in case.data_sets[0][0]]


def _tensors(case) -> list[torch.Tensor]:
    return [torch.from_numpy(np.array(a, copy=True)) for a in _arrays(case)]


def _float_outputs(out) -> list[torch.Tensor]:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()]


def _perturbed(t: torch.Tensor) -> torch.Tensor:
    # a relative change small enough to keep comparisons and rounding boundaries mostly in place
    return t * 1.01 + 0.001


SMOKE_OPS = sorted(set(_cases_by_op()) & set(_default_domain_ops()))


def test_every_handler_is_covered():
    uncovered = sorted(set(_default_domain_ops()) - set(SMOKE_OPS) - set(NO_FLOAT_CASE))
    assert not uncovered, f"handlers with no float conformance case and no entry in NO_FLOAT_CASE: {uncovered}"
    stale = sorted(set(NO_FLOAT_CASE) & set(SMOKE_OPS))
    assert not stale, f"these ops have a float case now; remove them from NO_FLOAT_CASE: {stale}"


@pytest.mark.parametrize("op", SMOKE_OPS)
def test_handler_batches_and_differentiates(op: str):
    case = _cases_by_op()[op]
    model = modscope.load(case.model)
    inputs = _tensors(case)
    is_float = [_batched(op, i, t.numpy().dtype, t.dim()) for i, t in enumerate(inputs)]

    # finite gradients with respect to every float input
    leaves = [t.clone().requires_grad_(True) if f else t for t, f in zip(inputs, is_float)]
    outs = _float_outputs(model(*leaves))
    wanted = [t for t, f in zip(leaves, is_float) if f]
    if op not in NO_GRADIENT and outs and any(o.requires_grad for o in outs):
        total = sum(o.sum() for o in outs if o.requires_grad)
        grads = torch.autograd.grad(total, wanted, allow_unused=True)
        assert any(g is not None for g in grads), f"{op}: no gradient reaches its float inputs"
        for g in grads:
            if g is not None:
                assert torch.isfinite(g).all(), f"{op}: non-finite gradient"

    if op in NOT_BATCHED:
        return
    # vmap over a batch of two: the float inputs and a perturbed copy of them
    with torch.no_grad():
        stacked = [torch.stack([t, _perturbed(t)]) if f else t for t, f in zip(inputs, is_float)]
        in_dims = tuple(0 if f else None for f in is_float)
        batched = torch.func.vmap(lambda *xs: tuple(_float_outputs(model(*xs))), in_dims=in_dims)(*stacked)
        for i in range(2):
            single = _float_outputs(model(*[s[i] if f else s for s, f in zip(stacked, is_float)]))
            assert len(single) == len(batched)
            for b, s in zip(batched, single):
                torch.testing.assert_close(b[i], s, rtol=1e-4, atol=1e-5, equal_nan=True, msg=f"{op}: vmap != loop")
