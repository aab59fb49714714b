"""onnxruntime's fused transformer operators (com.microsoft), one node at a time, against onnxruntime.

Each case builds a one-node model with random inputs and a few attribute variants; its float weights are
initializers, so the case also checks their kinds, that gradients reach them, and that ``torch.func.vmap`` over a
batch of weights gives what separate calls give.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from contrib_cases import Case
from contrib_cases import check as _check
from contrib_cases import floats as _f
from contrib_cases import rng as _rng


# -- Attention -----------------------------------------------------------------------------------------------------
def _attention(variant: str) -> Case:
    rng = _rng(1)
    b, s, d, heads = 2, 5, 8, 2
    v_width = 6 if variant == "qkv_sizes" else d
    weights = {"w": "weight", "bias": "bias"}
    inputs: list = [("x", _f(rng, b, s, d)), ("w", _f(rng, d, 2 * d + v_width, scale=0.5)),
                    ("bias", _f(rng, 2 * d + v_width))]
    attrs: dict = {"num_heads": heads}
    mask = past = attention_bias = None
    outputs = 1
    if variant == "mask_2d":
        mask = np.ones((b, s), np.int32)
        mask[1, 3:] = 0
    elif variant == "mask_3d":
        mask = (rng.random((b, s, s)) > 0.3).astype(np.int32)
        mask[..., 0] = 1
    elif variant == "lengths":
        mask = np.array([5, 3], np.int32)
    elif variant == "left_padding":
        mask = np.array([5, 5, 0, 2], np.int32)
    elif variant == "causal":
        attrs["unidirectional"] = 1
    elif variant == "past":
        attrs["unidirectional"] = 1
        past = _f(rng, 2, b, heads, 3, d // heads)
        outputs = 2
    elif variant == "qkv_sizes":
        attrs["qkv_hidden_sizes"] = [d, d, v_width]
    elif variant == "scale_and_bias":
        attrs["scale"] = 0.2
        attention_bias = _f(rng, 1, heads, s, s)
    inputs += [("mask", mask), ("past", past), ("attention_bias", attention_bias)]
    while inputs[-1][1] is None:
        inputs.pop()
    return Case("Attention", inputs, weights, attrs, outputs)


@pytest.mark.parametrize(
    "variant", ["plain", "mask_2d", "mask_3d", "lengths", "left_padding", "causal", "past", "qkv_sizes", "scale_and_bias"]
)
def test_attention_matches_onnxruntime(variant: str) -> None:
    _check(_attention(variant))


def _mha(variant: str) -> Case:
    rng = _rng(2)
    b, s, l, heads, head = 2, 4, 6, 2, 3
    d = heads * head
    query, key, value = _f(rng, b, s, d), _f(rng, b, l, d), _f(rng, b, l, d)
    bias = _f(rng, 3 * d)
    attrs: dict = {"num_heads": heads}
    padding = attention_bias = past_key = past_value = None
    outputs = 1
    weights = {"bias": "bias"}
    if variant == "packed_kv":
        key, value = _f(rng, b, l, heads, 2, head), None
    elif variant == "packed_qkv":
        query, key, value = _f(rng, b, s, heads, 3, head), None, None
    elif variant == "padding":
        padding = np.ones((b, l), np.int32)
        padding[0, 4:] = 0
    elif variant == "lengths":
        padding = np.array([6, 2], np.int32)
    elif variant == "causal_past":
        attrs["unidirectional"] = 1
        key, value = _f(rng, b, s, d), _f(rng, b, s, d)
        past_key, past_value = _f(rng, b, heads, 2, head), _f(rng, b, heads, 2, head)
        outputs = 3
    elif variant == "attention_bias":
        attention_bias = _f(rng, b, 1, s, l)
    elif variant == "no_bias":
        bias, weights = None, {}
    inputs = [("query", query), ("key", key), ("value", value), ("bias", bias), ("key_padding_mask", padding),
              ("attention_bias", attention_bias), ("past_key", past_key), ("past_value", past_value)]
    while inputs[-1][1] is None:
        inputs.pop()
    return Case("MultiHeadAttention", inputs, weights, attrs, outputs)


@pytest.mark.parametrize(
    "variant", ["plain", "padding", "lengths", "causal_past", "attention_bias", "no_bias"]
)
def test_multi_head_attention_matches_onnxruntime(variant: str) -> None:
    _check(_mha(variant))


# -- normalization -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["plain", "no_beta", "bias_and_sum", "broadcast_skip"])
def test_skip_layer_normalization_matches_onnxruntime(variant: str) -> None:
    rng = _rng(3)
    x = _f(rng, 2, 3, 8)
    skip = _f(rng, 3, 8) if variant == "broadcast_skip" else _f(rng, 2, 3, 8)
    inputs = [("x", x), ("skip", skip), ("gamma", _f(rng, 8)), ("beta", _f(rng, 8))]
    weights = {"gamma": "norm", "beta": "bias"}
    outputs = 1
    if variant == "no_beta":
        inputs, weights = inputs[:3], {"gamma": "norm"}
    if variant == "bias_and_sum":
        inputs.append(("bias", _f(rng, 8)))
        weights["bias"] = "bias"
        outputs = 4
    _check(Case("SkipLayerNormalization", inputs, weights, {"epsilon": 1e-5}, outputs))


@pytest.mark.parametrize("variant", ["plain", "bias_and_sum"])
def test_skip_simplified_layer_normalization_matches_onnxruntime(variant: str) -> None:
    rng = _rng(4)
    inputs = [("x", _f(rng, 2, 3, 8)), ("skip", _f(rng, 2, 3, 8)), ("gamma", _f(rng, 8))]
    weights = {"gamma": "norm"}
    outputs = 1
    if variant == "bias_and_sum":
        inputs.append(("bias", _f(rng, 8)))
        weights["bias"] = "bias"
        outputs = 4
    _check(Case("SkipSimplifiedLayerNormalization", inputs, weights, {"epsilon": 1e-6}, outputs))


@pytest.mark.parametrize("axis", [-1, 1])
def test_simplified_layer_normalization_matches_onnxruntime(axis: int) -> None:
    rng = _rng(5)
    shape = (8,) if axis == -1 else (3, 8)
    inputs = [("x", _f(rng, 2, 3, 8)), ("scale", _f(rng, *shape))]
    _check(Case("SimplifiedLayerNormalization", inputs, {"scale": "norm"}, {"axis": axis, "epsilon": 1e-5}, 2, ""))


@pytest.mark.parametrize("variant", ["full", "no_segment", "position_ids"])
def test_embed_layer_normalization_matches_onnxruntime(variant: str) -> None:
    rng = _rng(6)
    b, s, d = 2, 5, 8
    ids = rng.integers(0, 10, (b, s)).astype(np.int32)
    segments = (np.arange(s) >= 2).astype(np.int32)[None].repeat(b, 0)
    mask = np.ones((b, s), np.int32)
    mask[1, 3:] = 0
    inputs = [("ids", ids), ("segments", segments), ("word", _f(rng, 10, d)), ("position", _f(rng, 7, d)),
              ("segment", _f(rng, 2, d)), ("gamma", _f(rng, d)), ("beta", _f(rng, d)), ("mask", mask)]
    weights = {"word": "embedding", "position": "embedding", "segment": "embedding", "gamma": "norm", "beta": "bias"}
    if variant == "no_segment":
        inputs[1], inputs[4] = ("segments", None), ("segment", None)
        del weights["segment"]
    if variant == "position_ids":
        inputs.append(("position_ids", np.array([[4, 3, 2, 1, 0]] * b, np.int32)))
    _check(Case("EmbedLayerNormalization", inputs, weights, {"epsilon": 1e-5}, 3, int_outputs=(1,)))


# -- activations and products --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "op,attrs,with_bias",
    [("Gelu", {}, False), ("BiasGelu", {}, True), ("FastGelu", {}, False), ("FastGelu", {}, True),
     ("QuickGelu", {}, False), ("QuickGelu", {"alpha": 1.2}, False)],
)
def test_gelu_family_matches_onnxruntime(op: str, attrs: dict, with_bias: bool) -> None:
    rng = _rng(7)
    inputs = [("x", _f(rng, 2, 3, 8, scale=2.0))]
    weights = {}
    if with_bias:
        inputs.append(("b", _f(rng, 8)))
        weights = {"b": "bias"}
    _check(Case(op, inputs, weights, attrs))


@pytest.mark.parametrize(
    "attrs,a_shape,b_shape",
    [({}, (3, 4), (4, 5)), ({"alpha": 0.5, "transA": 1}, (2, 4, 3), (4, 5)), ({"transB": 1}, (2, 3, 4), (2, 5, 4)),
     ({"transBatchA": 1}, (3, 2, 4), (2, 4, 5)), ({"transBatchB": 1, "transB": 1}, (2, 3, 4), (5, 2, 4))],
)
def test_fused_matmul_matches_onnxruntime(attrs: dict, a_shape: tuple, b_shape: tuple) -> None:
    rng = _rng(8)
    _check(Case("FusedMatMul", [("a", _f(rng, *a_shape)), ("b", _f(rng, *b_shape))], {"b": "weight"}, attrs))


# -- rotary embedding and grouped-query attention -------------------------------------------------------------------
def _caches(rng: np.random.Generator, positions: int, half: int) -> tuple[np.ndarray, np.ndarray]:
    angles = rng.random((positions, half)).astype(np.float32) * 3
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@pytest.mark.parametrize("variant", ["plain", "interleaved", "offset", "partial", "rank4"])
def test_rotary_embedding_matches_onnxruntime(variant: str) -> None:
    rng = _rng(9)
    b, s, heads, head = 2, 4, 2, 8
    rot = 4 if variant == "partial" else head
    cos, sin = _caches(rng, 12, rot // 2)
    x = _f(rng, b, heads, s, head) if variant == "rank4" else _f(rng, b, s, heads * head)
    positions = np.array([3], np.int64) if variant == "offset" else rng.integers(0, 12, (b, s)).astype(np.int64)
    attrs = {"interleaved": int(variant == "interleaved")}
    if variant == "partial":
        attrs.update(num_heads=heads, rotary_embedding_dim=rot)
    inputs = [("x", x), ("position_ids", positions), ("cos", cos), ("sin", sin)]
    _check(Case("RotaryEmbedding", inputs, {}, attrs))


def _gqa(variant: str) -> Case:
    rng = _rng(10)
    b, heads, kv_heads, head = 2, 4, 2, 16  # onnxruntime's rotary kernels need multiples of 16
    attrs: dict = {"num_heads": heads, "kv_num_heads": kv_heads}
    past_len = 0 if variant in ("prompt", "packed", "window", "softcap", "rotary_prompt") else 5
    s = 1 if past_len else 5
    lengths = np.array([past_len + s, past_len + s - 2], np.int32)  # the second row is padded
    total = np.array(past_len + s, np.int32)
    q = _f(rng, b, s, heads * head)
    k, v = _f(rng, b, s, kv_heads * head), _f(rng, b, s, kv_heads * head)
    if variant == "packed":
        q, k, v = np.concatenate([q, k, v], axis=-1), None, None
    past_k = _f(rng, b, kv_heads, past_len, head) if past_len else None
    past_v = _f(rng, b, kv_heads, past_len, head) if past_len else None
    cos = sin = None
    if variant.startswith("rotary"):
        attrs.update(do_rotary=1, rotary_interleaved=int(variant == "rotary_interleaved"))
        cos, sin = _caches(rng, 16, head // 2)
    if variant == "window":
        attrs["local_window_size"] = 2
    if variant == "softcap":
        attrs["softcap"] = 2.0
    if variant == "smooth":
        attrs["smooth_softmax"] = 1
    extra: list = []
    if variant == "attention_bias":
        extra = [("position_ids", None), ("attention_bias", _f(rng, b, 1, s, past_len + s))]
    if variant == "head_sink":
        extra = [("position_ids", None), ("attention_bias", None), ("head_sink", _f(rng, heads))]
    inputs = [("query", q), ("key", k), ("value", v), ("past_key", past_k), ("past_value", past_v),
              ("seqlens_k", lengths - 1), ("total_sequence_length", total), ("cos", cos), ("sin", sin), *extra]
    while inputs[-1][1] is None:
        inputs.pop()
    return Case("GroupQueryAttention", inputs, {}, attrs, 3)


@pytest.mark.parametrize(
    "variant", ["prompt", "packed", "window", "softcap", "rotary_prompt", "decode", "rotary_decode", "smooth",
                "rotary_interleaved", "attention_bias", "head_sink"]
)
def test_group_query_attention_matches_onnxruntime(variant: str) -> None:
    _check(_gqa(variant))
