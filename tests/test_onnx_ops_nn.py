"""ONNX linear-algebra, convolution, normalization, pooling, resize and attention handlers on one-node graphs.

Each case builds a graph in memory and compares ``modscope.load`` with onnxruntime's CPU provider (float32:
1e-4 relative and absolute, both sides accumulate in float32 in different orders; integer outputs exactly).
Weight-carrying ops also get a gradient check (the gradient reaches the float initializers) and a
``torch.func.vmap`` check over stacked weight sets against a loop.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

import modscope

ort = pytest.importorskip("onnxruntime")

_RNG = np.random.default_rng(0)


def _rand(*shape: int, dtype: Any = np.float32) -> np.ndarray:
    return _RNG.standard_normal(shape).astype(dtype)


def _model(
    op: str,
    feeds: dict[str, np.ndarray | None],
    *,
    opset: int,
    weights: dict[str, np.ndarray] | None = None,
    n_outputs: int = 1,
    **attrs: Any,
) -> onnx.ModelProto:
    """One ``op`` node; ``feeds`` are graph inputs (None: an omitted optional input), ``weights`` initializers.
    Node inputs are ordered feeds first, then weights, so pass them in the op's input order."""
    weights = weights or {}
    names = [name if value is not None else "" for name, value in feeds.items()] + list(weights)
    outputs = [f"out{i}" for i in range(n_outputs)]
    graph = helper.make_graph(
        [helper.make_node(op, names, outputs, **attrs)],
        "g",
        [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for n, a in feeds.items()
            if a is not None
        ],
        [helper.make_value_info(n, onnx.TypeProto()) for n in outputs],
        initializer=[onnx.numpy_helper.from_array(a, n) for n, a in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _check(model: onnx.ModelProto, feeds: dict[str, np.ndarray | None], tol: float = 1e-4) -> list[np.ndarray]:
    """Assert modscope and onnxruntime agree on every output; return modscope's outputs."""
    present = {n: a for n, a in feeds.items() if a is not None}
    with torch.no_grad():
        out = modscope.load(model)(*(torch.from_numpy(a.copy()) for a in present.values()))
    ours = [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, present)
    assert len(ours) == len(expected)
    for got, want in zip(ours, expected):
        assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
        if want.dtype.kind == "f":
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
        else:
            np.testing.assert_array_equal(got, want)
    return ours


# -- convolution -----------------------------------------------------------------------------------------------------
_CONV_CASES = {
    "1d": {"x": (2, 3, 11), "w": (4, 3, 3), "attrs": {"pads": [1, 1]}},
    "2d_strided": {"x": (2, 3, 9, 8), "w": (6, 3, 3, 3), "attrs": {"strides": [2, 2], "pads": [1, 1, 1, 1]}},
    "2d_asymmetric_pads": {"x": (1, 2, 7, 7), "w": (3, 2, 3, 2), "attrs": {"pads": [0, 1, 2, 0]}},
    "2d_same_upper": {"x": (1, 2, 7, 6), "w": (3, 2, 4, 3), "attrs": {"auto_pad": "SAME_UPPER", "strides": [2, 1]}},
    "2d_same_lower": {"x": (1, 2, 7, 6), "w": (3, 2, 4, 3), "attrs": {"auto_pad": "SAME_LOWER", "strides": [2, 1]}},
    "2d_valid_dilated": {"x": (1, 2, 9, 9), "w": (3, 2, 3, 3), "attrs": {"auto_pad": "VALID", "dilations": [2, 3]}},
    "2d_groups": {"x": (2, 4, 6, 6), "w": (6, 2, 3, 3), "attrs": {"group": 2, "pads": [1, 1, 1, 1]}},
    "2d_depthwise": {"x": (1, 4, 6, 6), "w": (4, 1, 3, 3), "attrs": {"group": 4}},
    "3d": {"x": (1, 2, 5, 6, 4), "w": (3, 2, 3, 3, 2), "attrs": {"pads": [1, 0, 1, 1, 2, 0], "strides": [1, 2, 1]}},
}


@pytest.mark.parametrize("case", list(_CONV_CASES))
@pytest.mark.parametrize("bias", [True, False])
def test_conv_matches_onnxruntime(case: str, bias: bool) -> None:
    spec = _CONV_CASES[case]
    w = _rand(*spec["w"])
    weights = {"w": w, "b": _rand(w.shape[0])} if bias else {"w": w}
    feeds = {"x": _rand(*spec["x"])}
    _check(_model("Conv", feeds, opset=11, weights=weights, **spec["attrs"]), feeds)


_CONV_T_CASES = {
    "2d_basic": {"x": (1, 2, 4, 5), "w": (2, 3, 3, 3), "attrs": {}},
    "2d_stride_output_padding": {
        "x": (1, 2, 4, 5),
        "w": (2, 3, 3, 3),
        "attrs": {"strides": [2, 3], "output_padding": [1, 2]},
    },
    "2d_asymmetric_pads": {"x": (1, 2, 4, 4), "w": (2, 3, 3, 3), "attrs": {"strides": [2, 2], "pads": [0, 1, 2, 0]}},
    "2d_output_shape": {"x": (1, 2, 3, 3), "w": (2, 3, 3, 3), "attrs": {"strides": [3, 2], "output_shape": [10, 8]}},
    "2d_same_upper": {"x": (1, 2, 3, 4), "w": (2, 3, 3, 3), "attrs": {"strides": [2, 2], "auto_pad": "SAME_UPPER"}},
    "2d_groups_dilations": {
        "x": (1, 4, 4, 4),
        "w": (4, 2, 3, 3),
        "attrs": {"group": 2, "dilations": [2, 2], "strides": [2, 1]},
    },
    "1d": {"x": (2, 2, 5), "w": (2, 3, 3), "attrs": {"strides": [2], "pads": [1, 1]}},
    "3d": {"x": (1, 2, 3, 3, 3), "w": (2, 2, 2, 3, 2), "attrs": {"strides": [2, 1, 2]}},
}


@pytest.mark.parametrize("case", list(_CONV_T_CASES))
def test_conv_transpose_matches_onnxruntime(case: str) -> None:
    spec = _CONV_T_CASES[case]
    w = _rand(*spec["w"])
    group = spec["attrs"].get("group", 1)
    weights = {"w": w, "b": _rand(w.shape[1] * group)}
    feeds = {"x": _rand(*spec["x"])}
    _check(_model("ConvTranspose", feeds, opset=11, weights=weights, **spec["attrs"]), feeds)


# -- Gemm and MatMul -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("c_shape", [None, (), (5,), (1, 5), (3, 1), (3, 5)])
@pytest.mark.parametrize(
    "attrs", [{}, {"transB": 1}, {"transA": 1, "alpha": 0.5, "beta": 2.0}, {"transB": 1, "beta": 0.0}]
)
def test_gemm_matches_onnxruntime(c_shape: tuple[int, ...] | None, attrs: dict) -> None:
    a = _rand(4, 3) if attrs.get("transA") else _rand(3, 4)
    b = _rand(5, 4) if attrs.get("transB") else _rand(4, 5)
    weights = {"b": b} if c_shape is None else {"b": b, "c": _rand(*c_shape)}
    _check(_model("Gemm", {"a": a}, opset=13, weights=weights, **attrs), {"a": a})


@pytest.mark.parametrize(
    "shapes", [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((4,), (2, 4, 3)), ((2, 1, 3, 4), (5, 4, 2))]
)
def test_matmul_broadcasts_like_onnxruntime(shapes: tuple) -> None:
    feeds = {"a": _rand(*shapes[0]), "b": _rand(*shapes[1])}
    _check(_model("MatMul", feeds, opset=13), feeds)


# -- normalization ---------------------------------------------------------------------------------------------------
def test_batch_normalization_matches_onnxruntime() -> None:
    weights = {"s": _rand(3), "b": _rand(3), "m": _rand(3), "v": np.abs(_rand(3)) + 0.5}
    feeds = {"x": _rand(2, 3, 4, 5)}
    _check(_model("BatchNormalization", feeds, opset=15, weights=weights, epsilon=1e-3), feeds)


@pytest.mark.parametrize("axis", [-1, 1, 2])
def test_layer_normalization_with_stash_outputs_matches_onnxruntime(axis: int) -> None:
    feeds = {"x": _rand(2, 3, 4, 5)}
    norm_shape = feeds["x"].shape[axis:]
    weights = {"s": _rand(*norm_shape), "b": _rand(*norm_shape)}
    model = _model("LayerNormalization", feeds, opset=17, weights=weights, n_outputs=3, axis=axis, epsilon=1e-4)
    _y, mean, _inv_std = _check(model, feeds)
    assert mean.shape == feeds["x"].shape[: axis % 4] + (1,) * (4 - axis % 4)


def test_instance_and_group_normalization_match_onnxruntime() -> None:
    feeds = {"x": _rand(2, 6, 4, 3)}
    _check(_model("InstanceNormalization", feeds, opset=6, weights={"s": _rand(6), "b": _rand(6)}), feeds)
    model = _model("GroupNormalization", feeds, opset=21, weights={"s": _rand(6), "b": _rand(6)}, num_groups=3)
    _check(model, feeds)


# -- pooling ---------------------------------------------------------------------------------------------------------
_MAX_POOL_CASES = {
    "2d_pads": {"x": (1, 2, 6, 7), "attrs": {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2]}},
    "2d_asymmetric_pads": {"x": (1, 2, 6, 7), "attrs": {"kernel_shape": [3, 2], "pads": [0, 1, 2, 1]}},
    "2d_ceil_dilated": {
        "x": (2, 1, 9, 8),
        "attrs": {"kernel_shape": [2, 3], "strides": [2, 2], "dilations": [2, 1], "ceil_mode": 1},
    },
    "2d_same_upper": {
        "x": (1, 2, 7, 5),
        "attrs": {"kernel_shape": [3, 2], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
    },
    "2d_column_major_indices": {
        "x": (2, 2, 5, 6),
        "attrs": {"kernel_shape": [2, 2], "strides": [2, 2], "storage_order": 1},
    },
    "1d": {"x": (2, 3, 10), "attrs": {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}},
    "3d": {"x": (1, 2, 5, 4, 6), "attrs": {"kernel_shape": [2, 2, 3], "strides": [1, 2, 2]}},
}


@pytest.mark.parametrize("case", list(_MAX_POOL_CASES))
def test_max_pool_and_indices_match_onnxruntime(case: str) -> None:
    spec = _MAX_POOL_CASES[case]
    feeds = {"x": _rand(*spec["x"])}
    _check(_model("MaxPool", feeds, opset=12, n_outputs=2, **spec["attrs"]), feeds)


_AVG_POOL_CASES = {
    "include_pad": {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1},
    "exclude_pad": {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]},
    "asymmetric_pads": {"kernel_shape": [3, 2], "pads": [2, 0, 0, 1], "count_include_pad": 1},
    "ceil": {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
    "ceil_include_pad": {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1, "count_include_pad": 1},
    "dilated": {"kernel_shape": [2, 2], "dilations": [2, 2], "pads": [1, 0, 1, 1]},
    "same_lower": {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_LOWER"},
}


@pytest.mark.parametrize("case", list(_AVG_POOL_CASES))
def test_average_pool_matches_onnxruntime(case: str) -> None:
    feeds = {"x": _rand(2, 3, 8, 7)}
    _check(_model("AveragePool", feeds, opset=19, **_AVG_POOL_CASES[case]), feeds)


@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "LpPool"])
def test_lp_and_global_pools_match_onnxruntime(op: str) -> None:
    attrs = {"kernel_shape": [2, 3], "strides": [2, 1], "pads": [1, 0, 0, 1], "p": 3} if op == "LpPool" else {}
    feeds = {"x": _rand(2, 3, 5, 6)}
    _check(_model(op, feeds, opset=18, **attrs), feeds)


def test_max_unpool_places_values_at_maxpool_indices() -> None:
    x = _rand(1, 2, 5, 5)
    pooled = _model("MaxPool", {"x": x}, opset=12, n_outputs=2, kernel_shape=[2, 2], strides=[2, 2])
    values, indices = _check(pooled, {"x": x})
    feeds = {"v": values, "i": indices, "shape": np.array(x.shape, dtype=np.int64)}
    (restored,) = _check(_model("MaxUnpool", feeds, opset=11, kernel_shape=[2, 2], strides=[2, 2]), feeds)
    kept = restored != 0
    np.testing.assert_array_equal(restored[kept], x[kept])
    assert kept.sum() == values.size


# -- resize ----------------------------------------------------------------------------------------------------------
_RESIZE_CASES = {
    "nearest_half_pixel_round_floor": {"mode": "nearest"},
    "nearest_asymmetric_floor": {
        "mode": "nearest",
        "coordinate_transformation_mode": "asymmetric",
        "nearest_mode": "floor",
    },
    "nearest_pytorch_half_pixel_ceil": {
        "mode": "nearest",
        "coordinate_transformation_mode": "pytorch_half_pixel",
        "nearest_mode": "ceil",
    },
    "nearest_round_prefer_ceil": {"mode": "nearest", "nearest_mode": "round_prefer_ceil"},
    "linear_half_pixel": {"mode": "linear"},
    "linear_pytorch_half_pixel": {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
    "linear_half_pixel_symmetric": {"mode": "linear", "coordinate_transformation_mode": "half_pixel_symmetric"},
    "linear_antialias": {"mode": "linear", "antialias": 1},
    "cubic_half_pixel": {"mode": "cubic"},
    "cubic_exclude_outside": {"mode": "cubic", "cubic_coeff_a": -0.5, "exclude_outside": 1},
    "cubic_asymmetric_antialias": {"mode": "cubic", "coordinate_transformation_mode": "asymmetric", "antialias": 1},
}


@pytest.mark.parametrize("case", list(_RESIZE_CASES))
@pytest.mark.parametrize("scales", [[1.0, 1.0, 1.7, 2.5], [1.0, 1.0, 0.6, 0.45], [1.0, 1.0, 1.1, 0.7]])
def test_resize_with_scales_matches_onnxruntime(case: str, scales: list[float]) -> None:
    # 7 * 1.1 keeps the size (the axis is copied) and 10 * 0.7 rounds to 7 only in float32, as onnxruntime computes.
    feeds = {"x": _rand(2, 2, 7, 10), "roi": None, "scales": np.array(scales, dtype=np.float32)}
    _check(_model("Resize", feeds, opset=18, **_RESIZE_CASES[case]), feeds)


@pytest.mark.parametrize(
    "policy,coordinates",
    [
        ("stretch", "half_pixel"),
        ("not_larger", "half_pixel"),
        ("not_smaller", "half_pixel"),
        ("stretch", "align_corners"),
    ],
)
@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
def test_resize_with_sizes_axes_and_aspect_policy_matches_onnxruntime(policy: str, mode: str, coordinates: str) -> None:
    # align_corners is compared only where the output length is whole: for a scale giving a fractional length
    # (also from not_larger/not_smaller), onnxruntime divides by the integer output size and ONNX's conformance
    # cases by the fractional one (modscope follows the cases).
    feeds = {"x": _rand(1, 2, 6, 8), "roi": None, "scales": None, "sizes": np.array([9, 5], dtype=np.int64)}
    model = _model(
        "Resize",
        feeds,
        opset=18,
        mode=mode,
        axes=[2, 3],
        keep_aspect_ratio_policy=policy,
        coordinate_transformation_mode=coordinates,
    )
    _check(model, feeds)


def test_resize_tf_crop_and_resize_extrapolates_like_onnxruntime() -> None:
    feeds = {
        "x": _rand(1, 1, 6, 6),
        "roi": np.array([0, 0, -0.2, 0.3, 1, 1, 0.8, 1.3], dtype=np.float32),
        "scales": None,
        "sizes": np.array([1, 1, 4, 5], dtype=np.int64),
    }
    model = _model(
        "Resize",
        feeds,
        opset=13,
        mode="linear",
        coordinate_transformation_mode="tf_crop_and_resize",
        extrapolation_value=-7.0,
    )
    (out,) = _check(model, feeds)
    assert (out == -7.0).any()


@pytest.mark.parametrize("op,opset", [("Resize", 10), ("Upsample", 9)])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_opset_10_resize_and_upsample_match_onnxruntime(op: str, opset: int, mode: str) -> None:
    feeds = {"x": _rand(1, 2, 5, 7), "scales": np.array([1, 1, 0.6, 2.5], dtype=np.float32)}
    if op == "Upsample":
        feeds["scales"] = np.array([1, 1, 1.5, 2.5], dtype=np.float32)
    _check(_model(op, feeds, opset=opset, mode=mode), feeds)


# -- attention -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["plain", "causal_gqa", "bool_mask", "float_mask_3d_inputs"])
def test_attention_matches_onnxruntime(variant: str) -> None:
    attrs: dict[str, Any] = {}
    q, k, v = _rand(2, 4, 5, 8), _rand(2, 4, 5, 8), _rand(2, 4, 5, 6)
    mask = None
    if variant == "causal_gqa":
        k, v, attrs = k[:, :2], v[:, :2], {"is_causal": 1}
    elif variant == "bool_mask":
        mask = _RNG.random((5, 5)) > 0.3
        mask[:, 0] = True
    elif variant == "float_mask_3d_inputs":
        q, k, v = (t.transpose(0, 2, 1, 3).reshape(2, 5, -1) for t in (q, k, v))
        mask, attrs = _rand(2, 4, 5, 5), {"q_num_heads": 4, "kv_num_heads": 4, "scale": 0.2}
    feeds = {"q": q, "k": k, "v": v, "mask": mask}
    _check(_model("Attention", feeds, opset=23, **attrs), feeds)


# -- gradients and vmap ----------------------------------------------------------------------------------------------
def _conv_gemm_model() -> onnx.ModelProto:
    """x (2, 3, 6, 6) -> Conv -> Relu -> Flatten -> Gemm (transB) -> (2, 5)."""
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["y"], transB=1),
    ]
    inits = {"cw": _rand(4, 3, 3, 3), "cb": _rand(4), "gw": _rand(5, 144), "gb": _rand(5)}
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, (2, 3, 6, 6))],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, (2, 5))],
        initializer=[onnx.numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_gradients_reach_conv_and_gemm_weights() -> None:
    model = modscope.load(_conv_gemm_model())
    model(torch.from_numpy(_rand(2, 3, 6, 6))).square().sum().backward()
    for name in ("cw", "cb", "gw", "gb"):
        grad = model.module.get_parameter(model.weight(name).name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_vmap_over_stacked_conv_weights_equals_loop() -> None:
    model = modscope.load(_conv_gemm_model())
    x = torch.from_numpy(_rand(2, 3, 6, 6))
    name = model.weight("cw").name
    base = model.parameters()[name]
    stacked = torch.stack([base, base * 0.5 + 0.1, -base])

    def run(weight: torch.Tensor) -> torch.Tensor:
        return model.functional_call({name: weight}, x)

    batched = torch.func.vmap(run)(stacked)
    looped = torch.stack([run(w) for w in stacked])
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(looped[0], looped[1])


_WEIGHTED_NODES = {
    "ConvTranspose_asymmetric": (
        "ConvTranspose",
        (1, 2, 4, 4),
        {"w": (2, 3, 3, 3), "b": (3,)},
        {"strides": [2, 2], "pads": [0, 1, 1, 0]},
    ),
    "Conv_asymmetric": ("Conv", (1, 2, 5, 5), {"w": (3, 2, 3, 3)}, {"pads": [0, 1, 2, 0]}),
    "Gemm_general": ("Gemm", (4, 3), {"b": (4, 5), "c": (1, 5)}, {"transA": 1, "alpha": 0.5, "beta": 2.0}),
    "BatchNormalization": ("BatchNormalization", (2, 3, 4, 4), {"s": (3,), "b": (3,), "m": (3,), "v": (3,)}, {}),
    "LayerNormalization": ("LayerNormalization", (2, 3, 4), {"s": (4,), "b": (4,)}, {}),
    "GroupNormalization": ("GroupNormalization", (2, 4, 3, 3), {"s": (4,), "b": (4,)}, {"num_groups": 2}),
    "InstanceNormalization": ("InstanceNormalization", (2, 3, 4, 4), {"s": (3,), "b": (3,)}, {}),
    "DeformConv": ("DeformConv", (1, 2, 5, 5), {"w": (3, 2, 2, 2), "offset": (1, 8, 4, 4)}, {}),
}


@pytest.mark.parametrize("case", list(_WEIGHTED_NODES))
def test_vmap_over_first_weight_of_weighted_ops_equals_loop(case: str) -> None:
    op, x_shape, weight_shapes, attrs = _WEIGHTED_NODES[case]
    weights = {name: _rand(*shape) for name, shape in weight_shapes.items()}
    if "v" in weights:  # a variance
        weights["v"] = np.abs(weights["v"]) + 0.5
    opset = {"LayerNormalization": 17, "GroupNormalization": 21, "DeformConv": 19}.get(op, 13)
    model = modscope.load(_model(op, {"x": _rand(*x_shape)}, opset=opset, weights=weights, **attrs))
    x = torch.from_numpy(_rand(*x_shape))
    name = model.weight(next(iter(weights))).name
    base = model.parameters()[name]
    stacked = torch.stack([base, base * 0.5 + 0.1, -base])

    def run(weight: torch.Tensor) -> torch.Tensor:
        return model.functional_call({name: weight}, x)

    batched = torch.func.vmap(run)(stacked)
    looped = torch.stack([run(w) for w in stacked])
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(looped[0], looped[1])
