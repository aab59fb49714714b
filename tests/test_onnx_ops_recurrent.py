"""ONNX recurrent, control-flow, quantization and detection handlers against onnxruntime.

Graphs are built in memory with ``onnx.helper`` (one exported from ``torch.nn.LSTM``), run through ``modscope.load``
and through onnxruntime's CPU provider, and compared with explicit tolerances. Weight-carrying ops also get a
gradient check, and the recurrent layers a ``torch.func.vmap`` check over stacked weight sets.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import modscope

ort = pytest.importorskip("onnxruntime")

F32 = TensorProto.FLOAT
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _ours(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = modscope.load(model)(*[torch.from_numpy(v) for v in feeds.values()])
    out = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in out]


def _assert_matches_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], atol: float = 1e-5) -> None:
    expected, got = _ort(model, feeds), _ours(model, feeds)
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        assert g.shape == e.shape
        if e.dtype.kind == "f":
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=atol)
        else:
            assert g.dtype == e.dtype
            np.testing.assert_array_equal(g, e)


# -- recurrent layers ----------------------------------------------------------------------------------------------
def _rnn_case(
    op: str,
    direction: str = "forward",
    *,
    seq: int = 5,
    batch: int = 3,
    size: int = 4,
    hidden: int = 3,
    lengths: list[int] | None = None,
    initial: bool = False,
    layout: int = 0,
    peepholes: bool = False,
    **attrs,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A one-node LSTM/GRU/RNN graph with random weights, and its feeds."""
    rng = np.random.default_rng(0)
    dirs, gates = (2 if direction == "bidirectional" else 1), GATES[op]
    inits = {
        "W": rng.normal(size=(dirs, gates * hidden, size)),
        "R": rng.normal(size=(dirs, gates * hidden, hidden)),
        "B": rng.normal(size=(dirs, 2 * gates * hidden)),
    }
    if peepholes:
        inits["P"] = rng.normal(size=(dirs, 3 * hidden))
    x_shape = (batch, seq, size) if layout else (seq, batch, size)
    state_shape = (batch, dirs, hidden) if layout else (dirs, batch, hidden)
    feeds = {"X": rng.normal(size=x_shape).astype(np.float32)}
    node_inputs = ["X", "W", "R", "B", "", "", ""]
    graph_inputs = [helper.make_tensor_value_info("X", F32, x_shape)]
    if lengths is not None:
        feeds["L"] = np.array(lengths, dtype=np.int32)
        node_inputs[4] = "L"
        graph_inputs.append(helper.make_tensor_value_info("L", TensorProto.INT32, (batch,)))
    state_names = ["H0", "C0"] if op == "LSTM" else ["H0"]
    if initial:
        for i, name in enumerate(state_names):
            feeds[name] = rng.normal(size=state_shape).astype(np.float32)
            node_inputs[5 + i] = name
            graph_inputs.append(helper.make_tensor_value_info(name, F32, state_shape))
    if peepholes:
        node_inputs.append("P")
    while node_inputs[-1] == "":
        node_inputs.pop()
    outputs = ["Y", "Y_h", "Y_c"][: 3 if op == "LSTM" else 2]
    node = helper.make_node(op, node_inputs, outputs, direction=direction, hidden_size=hidden, layout=layout, **attrs)
    initializers = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()]
    model = _model(
        [node], graph_inputs, [helper.make_tensor_value_info(o, F32, None) for o in outputs], initializers, opset=14
    )
    return model, feeds


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_recurrent_matches_onnxruntime_with_lengths_and_initial_states(op: str, direction: str) -> None:
    model, feeds = _rnn_case(op, direction, lengths=[5, 2, 4], initial=True)
    _assert_matches_ort(model, feeds)


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_recurrent_batch_major_layout_matches_onnxruntime(op: str) -> None:
    # onnxruntime's CPU kernels refuse layout=1, so compare with its layout-0 result transposed
    time_major, feeds = _rnn_case(op, "bidirectional", lengths=[4, 5, 2], initial=True)
    batch_major, _ = _rnn_case(op, "bidirectional", lengths=[4, 5, 2], initial=True, layout=1)
    batch_feeds = {k: (v.swapaxes(0, 1) if v.ndim == 3 else v) for k, v in feeds.items()}
    expected = _ort(time_major, feeds)
    got = _ours(batch_major, batch_feeds)
    np.testing.assert_allclose(got[0], expected[0].transpose(2, 0, 1, 3), rtol=1e-5, atol=1e-5)
    for g, e in zip(got[1:], expected[1:]):
        np.testing.assert_allclose(g, e.swapaxes(0, 1), rtol=1e-5, atol=1e-5)


def test_recurrent_padded_steps_are_zero_and_final_state_is_last_valid_step() -> None:
    model, feeds = _rnn_case("GRU", "bidirectional", lengths=[5, 2, 4])
    y, y_h = _ours(model, feeds)
    assert np.all(y[2:, :, 1] == 0) and np.all(y[4:, :, 2] == 0)
    np.testing.assert_array_equal(y_h[0, 1], y[1, 0, 1])  # forward: the sequence's own last step
    np.testing.assert_array_equal(y_h[1, 1], y[0, 1, 1])  # reverse: ends at time 0


def test_gru_linear_before_reset_matches_onnxruntime() -> None:
    model, feeds = _rnn_case("GRU", "bidirectional", lengths=[3, 5, 1], initial=True, linear_before_reset=1)
    _assert_matches_ort(model, feeds)


def test_lstm_peepholes_clip_and_activations_match_onnxruntime() -> None:
    model, feeds = _rnn_case(
        "LSTM",
        "bidirectional",
        peepholes=True,
        clip=1.5,
        activations=["HardSigmoid", "Tanh", "LeakyRelu", "Sigmoid", "Softsign", "Tanh"],
        activation_alpha=[0.3, 0.2],
        activation_beta=[0.4],
    )
    _assert_matches_ort(model, feeds)


def test_lstm_input_forget_matches_onnxruntime() -> None:
    model, feeds = _rnn_case("LSTM", "forward", input_forget=1, initial=True)
    _assert_matches_ort(model, feeds)


def test_only_requested_outputs_are_returned() -> None:
    node = helper.make_node("RNN", ["X", "W", "R"], ["", "Y_h"], hidden_size=2)
    w = numpy_helper.from_array(np.ones((1, 2, 3), np.float32), "W")
    r = numpy_helper.from_array(np.eye(2, dtype=np.float32)[None], "R")
    model = _model(
        [node],
        [helper.make_tensor_value_info("X", F32, (4, 1, 3))],
        [helper.make_tensor_value_info("Y_h", F32, None)],
        [w, r],
        opset=14,
    )
    _assert_matches_ort(model, {"X": np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 1, 3)})


def test_lstm_exported_from_torch_matches_torch_and_onnxruntime() -> None:
    torch.manual_seed(0)
    net = torch.nn.LSTM(3, 4, batch_first=True, bidirectional=True)
    x = torch.randn(2, 6, 3)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (x,), buffer, dynamo=False, opset_version=14, input_names=["x"], output_names=["y", "h", "c"]
        )
    proto = onnx.load_from_string(buffer.getvalue())
    assert any(n.op_type == "LSTM" for n in proto.graph.node)
    model = modscope.load(proto)
    with torch.no_grad():
        y, h, c = model(x)
        y_ref, (h_ref, c_ref) = net(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c, c_ref, rtol=1e-5, atol=1e-5)
    _assert_matches_ort(proto, {"x": x.numpy()})


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_gradients_reach_w_r_b(op: str) -> None:
    model_proto, feeds = _rnn_case(op, "bidirectional", lengths=[5, 2, 4])
    model = modscope.load(model_proto)
    out = model(*[torch.from_numpy(v) for v in feeds.values()])
    (out[0].square().sum() + out[1].sum()).backward()
    for name in ("W", "R", "B"):
        grad = model.module.get_parameter(model.weight(name).name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_lstm_gradient_matches_finite_differences() -> None:
    from modscope.converters.onnx.ops.recurrent import lstm
    from modscope.converters.onnx.registry import NodeContext

    node = helper.make_node("LSTM", ["X", "W", "R", "B", "L"], ["Y", "Y_h"], direction="bidirectional", hidden_size=2)
    ctx = NodeContext(
        node=node, opset=14, attrs={"direction": "bidirectional", "hidden_size": 2}, run_graph=lambda *a: []
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 2, generator=gen, dtype=torch.float64)
    w, r, b = (
        torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True) for s in [(2, 8, 2), (2, 8, 2), (2, 16)]
    )
    lengths = torch.tensor([3, 1], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda w, r, b: lstm(ctx, x, w, r, b, lengths), (w, r, b))


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_vmap_over_stacked_weights_equals_loop(op: str) -> None:
    model_proto, feeds = _rnn_case(op, "bidirectional", lengths=[5, 2, 4], initial=True)
    model = modscope.load(model_proto)
    inputs = [torch.from_numpy(v) for v in feeds.values()]
    names = [model.weight(n).name for n in ("W", "R", "B")]
    base = model.parameters()
    stacked = {n: torch.stack([base[n], base[n] * 0.5 + 0.1]) for n in names}

    def run(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.functional_call(params, *inputs)[0]

    batched = torch.func.vmap(run)(stacked)
    looped = torch.stack([run({n: t[i] for n, t in stacked.items()}) for i in range(2)])
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(looped[0], looped[1])


# -- control flow --------------------------------------------------------------------------------------------------
def test_if_takes_the_branch_the_condition_selects() -> None:
    c = numpy_helper.from_array(np.array([1.0, -2.0, 3.0], np.float32), "c")
    then_g = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["t"])], "then", [], [helper.make_tensor_value_info("t", F32, [3])]
    )
    else_g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["e"])], "else", [], [helper.make_tensor_value_info("e", F32, [3])]
    )
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)
    model = _model(
        [node],
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []), helper.make_tensor_value_info("x", F32, [3])],
        [helper.make_tensor_value_info("y", F32, [3])],
        [c],
    )
    x = np.array([-1.0, 0.5, 2.0], np.float32)
    for cond in (True, False):
        _assert_matches_ort(model, {"cond": np.array(cond), "x": x})


def test_loop_with_trip_count_condition_outer_scope_and_scan_output() -> None:
    body = helper.make_graph(
        [
            helper.make_node("Add", ["acc_in", "x"], ["acc_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Identity", ["acc_out"], ["scan"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", F32, [2]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", F32, [2]),
            helper.make_tensor_value_info("scan", F32, [2]),
        ],
    )
    node = helper.make_node("Loop", ["M", "cond", "acc0"], ["acc", "scans"], body=body)
    model = _model(
        [node],
        [
            helper.make_tensor_value_info("M", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc0", F32, [2]),
            helper.make_tensor_value_info("x", F32, [2]),
        ],
        [helper.make_tensor_value_info("acc", F32, [2]), helper.make_tensor_value_info("scans", F32, None)],
    )
    feeds = {
        "M": np.array(4, np.int64),
        "cond": np.array(True),
        "acc0": np.array([1.0, 2.0], np.float32),
        "x": np.array([0.5, -1.0], np.float32),
    }
    _assert_matches_ort(model, feeds)
    _, scans = _ours(model, feeds)
    assert scans.shape == (4, 2)


def test_scan_reverse_input_and_output_axis_match_onnxruntime() -> None:
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "e"], ["s_out"]), helper.make_node("Identity", ["s_out"], ["o"])],
        "body",
        [helper.make_tensor_value_info("s_in", F32, [2]), helper.make_tensor_value_info("e", F32, [2])],
        [helper.make_tensor_value_info("s_out", F32, [2]), helper.make_tensor_value_info("o", F32, [2])],
    )
    node = helper.make_node(
        "Scan",
        ["s0", "xs"],
        ["s", "ys"],
        body=body,
        num_scan_inputs=1,
        scan_input_axes=[1],
        scan_input_directions=[1],
        scan_output_axes=[-1],
        scan_output_directions=[1],
    )
    model = _model(
        [node],
        [helper.make_tensor_value_info("s0", F32, [2]), helper.make_tensor_value_info("xs", F32, [2, 4])],
        [helper.make_tensor_value_info("s", F32, [2]), helper.make_tensor_value_info("ys", F32, None)],
    )
    feeds = {"s0": np.zeros(2, np.float32), "xs": np.arange(8, dtype=np.float32).reshape(2, 4)}
    _assert_matches_ort(model, feeds)


# -- quantization --------------------------------------------------------------------------------------------------
def _qdq_matmul_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x -> QuantizeLinear -> DequantizeLinear -> MatMul with a per-column int8 weight -> QLinearMatMul path too."""
    rng = np.random.default_rng(1)
    w_q = rng.integers(-127, 128, size=(4, 3)).astype(np.int8)
    inits = [
        numpy_helper.from_array(w_q, "w_q"),
        numpy_helper.from_array(np.array([0.02, 0.05, 0.01], np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(3, np.int8), "w_zp"),
        numpy_helper.from_array(np.array(0.03, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "x_zp"),
        numpy_helper.from_array(np.array(0.02, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(10, np.uint8), "y_zp"),
        numpy_helper.from_array(np.array(0.02, np.float32), "w_scale_t"),
        numpy_helper.from_array(np.array(0, np.int8), "w_zp_t"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], axis=1),
        helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"]),
        helper.make_node(
            "QLinearMatMul", ["x_q", "x_scale", "x_zp", "w_q", "w_scale_t", "w_zp_t", "y_scale", "y_zp"], ["y_q"]
        ),
        helper.make_node("MatMulInteger", ["x_q", "w_q", "x_zp", "w_zp_t"], ["y_i"]),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", F32, [5, 4])],
        [
            helper.make_tensor_value_info("y", F32, None),
            helper.make_tensor_value_info("y_q", TensorProto.UINT8, None),
            helper.make_tensor_value_info("y_i", TensorProto.INT32, None),
        ],
        inits,
        opset=13,
    )
    return model, {"x": rng.normal(size=(5, 4)).astype(np.float32) * 2}


def test_quantized_matmul_graph_matches_onnxruntime() -> None:
    model, feeds = _qdq_matmul_model()
    _assert_matches_ort(model, feeds)


def test_dequantize_linear_is_differentiable_in_its_scale() -> None:
    from modscope.converters.onnx.ops.quantization import dequantize_linear
    from modscope.converters.onnx.registry import NodeContext

    node = helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], axis=1)
    ctx = NodeContext(node=node, opset=13, attrs={"axis": 1}, run_graph=lambda *a: [])
    q = torch.tensor([[3, -4, 5], [0, 7, -8]], dtype=torch.int8)
    scale = torch.tensor([0.5, 0.25, 2.0], requires_grad=True)
    y = dequantize_linear(ctx, q, scale, torch.tensor([1, 0, -1], dtype=torch.int8))
    y.sum().backward()
    torch.testing.assert_close(scale.grad, torch.tensor([1.0, 3.0, -1.0]))  # column sums of q - zp


def test_quantize_rounds_half_to_even_and_saturates() -> None:
    node = helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["y"])
    inits = [
        numpy_helper.from_array(np.array(1.0, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "zp"),
    ]
    model = _model(
        [node],
        [helper.make_tensor_value_info("x", F32, [6])],
        [helper.make_tensor_value_info("y", TensorProto.INT8, None)],
        inits,
        opset=13,
    )
    feeds = {"x": np.array([0.5, 1.5, 2.5, -0.5, 300.0, -300.0], np.float32)}
    _assert_matches_ort(model, feeds)
    assert _ours(model, feeds)[0].tolist() == [0, 2, 2, 0, 127, -128]


def test_blocked_dequantize_and_dynamic_quantize_match_onnxruntime() -> None:
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], axis=1, block_size=2),
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xzp"]),
    ]
    inits = [
        numpy_helper.from_array(rng.uniform(0.01, 0.1, size=(3, 2)).astype(np.float32), "s"),
        numpy_helper.from_array(rng.integers(0, 255, size=(3, 2)).astype(np.uint8), "zp"),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("q", TensorProto.UINT8, [3, 4]), helper.make_tensor_value_info("x", F32, [7])],
        [
            helper.make_tensor_value_info(n, t, None)
            for n, t in [("y", F32), ("xq", TensorProto.UINT8), ("xs", F32), ("xzp", TensorProto.UINT8)]
        ],
        inits,
        opset=21,
    )
    feeds = {"q": rng.integers(0, 255, size=(3, 4)).astype(np.uint8), "x": rng.normal(size=7).astype(np.float32)}
    _assert_matches_ort(model, feeds)


def test_qlinear_conv_with_per_channel_weights_matches_onnxruntime() -> None:
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
        numpy_helper.from_array(np.array(100, np.uint8), "xzp"),
        numpy_helper.from_array(rng.integers(-50, 50, size=(2, 1, 3, 3)).astype(np.int8), "w"),
        numpy_helper.from_array(np.array([0.01, 0.03], np.float32), "ws"),
        numpy_helper.from_array(np.zeros(2, np.int8), "wzp"),
        numpy_helper.from_array(np.array(0.1, np.float32), "ys"),
        numpy_helper.from_array(np.array(120, np.uint8), "yzp"),
        numpy_helper.from_array(np.array([500, -300], np.int32), "b"),
    ]
    node = helper.make_node(
        "QLinearConv", ["x", "xs", "xzp", "w", "ws", "wzp", "ys", "yzp", "b"], ["y"], pads=[1, 0, 1, 2], strides=[1, 2]
    )
    model = _model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 1, 6, 7])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
        inits,
        opset=13,
    )
    _assert_matches_ort(model, {"x": rng.integers(0, 255, size=(1, 1, 6, 7)).astype(np.uint8)})


# -- detection -----------------------------------------------------------------------------------------------------
def test_non_max_suppression_matches_onnxruntime() -> None:
    rng = np.random.default_rng(4)
    centers = rng.uniform(0, 10, size=(2, 40, 2))
    sizes = rng.uniform(1, 4, size=(2, 40, 2))
    boxes = np.concatenate([centers, sizes], axis=-1).astype(np.float32)
    scores = rng.uniform(size=(2, 3, 40)).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.array([5], np.int64), "k"),
        numpy_helper.from_array(np.array([0.3], np.float32), "iou"),
        numpy_helper.from_array(np.array([0.2], np.float32), "score"),
    ]
    node = helper.make_node("NonMaxSuppression", ["boxes", "scores", "k", "iou", "score"], ["sel"], center_point_box=1)
    model = _model(
        [node],
        [
            helper.make_tensor_value_info("boxes", F32, [2, 40, 4]),
            helper.make_tensor_value_info("scores", F32, [2, 3, 40]),
        ],
        [helper.make_tensor_value_info("sel", TensorProto.INT64, None)],
        inits,
        opset=11,
    )
    _assert_matches_ort(model, {"boxes": boxes, "scores": scores})


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("ctm", ["half_pixel", "output_half_pixel"])
def test_roi_align_matches_onnxruntime_and_is_differentiable(mode: str, ctm: str) -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 3, 10, 12)).astype(np.float32)
    rois = np.array([[0, 0, 5, 5], [1.5, 2.2, 11.7, 9.1], [-2, 3, 4, 14], [3, 3, 3.2, 3.4]], np.float32)
    node = helper.make_node(
        "RoiAlign",
        ["x", "rois", "idx"],
        ["y"],
        mode=mode,
        output_height=3,
        output_width=2,
        sampling_ratio=0,
        spatial_scale=0.9,
        coordinate_transformation_mode=ctm,
    )
    idx = numpy_helper.from_array(np.array([0, 1, 1, 0], np.int64), "idx")
    model = _model(
        [node],
        [helper.make_tensor_value_info("x", F32, x.shape), helper.make_tensor_value_info("rois", F32, rois.shape)],
        [helper.make_tensor_value_info("y", F32, None)],
        [idx],
        opset=16,
    )
    _assert_matches_ort(model, {"x": x, "rois": rois})
    xt = torch.from_numpy(x).requires_grad_()
    modscope.load(model)(xt, torch.from_numpy(rois)).sum().backward()
    assert xt.grad is not None and xt.grad.abs().sum() > 0


def test_roi_align_in_chunks_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    from modscope.converters.onnx.ops import detection as ops_detection

    rng = np.random.default_rng(6)
    x = torch.from_numpy(rng.normal(size=(1, 2, 8, 8)).astype(np.float32))
    corners = np.sort(rng.uniform(0, 8, size=(9, 2, 2)), axis=1)
    rois = torch.from_numpy(corners.transpose(0, 2, 1).reshape(9, 4)[:, [0, 2, 1, 3]].astype(np.float32))
    node = helper.make_node("RoiAlign", ["x", "rois", "idx"], ["y"], output_height=2, output_width=2)
    model = _model(
        [node],
        [helper.make_tensor_value_info("x", F32, [1, 2, 8, 8]), helper.make_tensor_value_info("rois", F32, [9, 4])],
        [helper.make_tensor_value_info("y", F32, None)],
        [numpy_helper.from_array(np.zeros(9, np.int64), "idx")],
        opset=16,
    )
    whole = modscope.load(model)(x, rois)
    monkeypatch.setattr(ops_detection, "_CHUNK_ELEMENTS", 1)
    torch.testing.assert_close(modscope.load(model)(x, rois), whole)
    np.testing.assert_allclose(
        whole.detach().numpy(), _ort(model, {"x": x.numpy(), "rois": rois.numpy()})[0], rtol=1e-5, atol=1e-5
    )


# -- ai.onnx.ml (scikit-learn models through skl2onnx) --------------------------------------------------------------
@pytest.mark.parametrize(
    "kind", ["forest_regressor", "forest_classifier_2", "forest_classifier_3", "boosting_classifier_2"]
)
def test_tree_ensembles_from_sklearn_match_onnxruntime(kind: str) -> None:
    skl2onnx = pytest.importorskip("skl2onnx")
    from sklearn.ensemble import (
        GradientBoostingClassifier,
        RandomForestClassifier,
        RandomForestRegressor,
    )

    rng = np.random.default_rng(7)
    x = rng.normal(size=(120, 4)).astype(np.float32)
    if kind == "forest_regressor":
        est, y = RandomForestRegressor(n_estimators=5, max_depth=4, random_state=0), x[:, 0] - x[:, 1] ** 2
    elif kind.startswith("forest_classifier"):
        classes = [-0.5, 0.5] if kind.endswith("3") else [0.0]
        est, y = RandomForestClassifier(n_estimators=5, max_depth=4, random_state=0), np.digitize(x[:, 0], classes)
    else:
        est, y = GradientBoostingClassifier(n_estimators=5, random_state=0), (x[:, 0] + x[:, 2] > 0).astype(int)
    est.fit(x, y)
    options = None if kind == "forest_regressor" else {id(est): {"zipmap": False}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = skl2onnx.to_onnx(est, x[:1], target_opset={"": 17, "ai.onnx.ml": 3}, options=options)
    assert any(n.op_type.startswith("TreeEnsemble") for n in proto.graph.node)
    test_x = rng.normal(size=(30, 4)).astype(np.float32)
    _assert_matches_ort(proto, {proto.graph.input[0].name: test_x})
    if kind != "forest_regressor":
        assert (_ours(proto, {"x": test_x})[0] == est.predict(test_x)).all()


def test_loop_body_weights_run_under_vmap() -> None:
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["h_in", "W"], ["mm"]),
            helper.make_node("Relu", ["mm"], ["h_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", F32, [1, 3]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", F32, [1, 3]),
        ],
    )
    w = numpy_helper.from_array(np.random.default_rng(8).normal(size=(3, 3)).astype(np.float32), "W")
    trip = numpy_helper.from_array(np.array(3, np.int64), "M")
    node = helper.make_node("Loop", ["M", "", "h0"], ["h"], body=body)
    proto = _model(
        [node],
        [helper.make_tensor_value_info("h0", F32, [1, 3])],
        [helper.make_tensor_value_info("h", F32, [1, 3])],
        [w, trip],
    )
    model = modscope.load(proto)
    name = model.weight("W").name
    h0 = torch.tensor([[1.0, -0.5, 2.0]])
    stacked = torch.stack([model.parameters()[name], -model.parameters()[name]])
    batched = torch.func.vmap(lambda weight: model.functional_call({name: weight}, h0))(stacked)
    looped = torch.stack([model.functional_call({name: stacked[i]}, h0) for i in range(2)])
    torch.testing.assert_close(batched, looped)
    _assert_matches_ort(proto, {"h0": h0.numpy()})
