"""onnxruntime's fused transformer operators (``com.microsoft``), as ``onnxruntime.transformers.optimizer`` and
optimum write them: Attention, MultiHeadAttention, GroupQueryAttention, RotaryEmbedding, EmbedLayerNormalization,
SkipLayerNormalization, SkipSimplifiedLayerNormalization, SimplifiedLayerNormalization (default domain),
BiasGelu, FastGelu, Gelu, QuickGelu and FusedMatMul.

Each is written with plain torch operations, so it is differentiable in every float input (the packed Q/K/V weight
of Attention is one weight) and batches under ``torch.func.vmap``: masks, lengths and positions come from the
model's integer inputs and are never read back into Python. Layer statistics are computed in float32 for
half-precision inputs, as onnxruntime does.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from ....errors import InvalidParameterError, ShapeError, UnsupportedOperatorError
from .nn_sequence import rotary_embedding
from .contrib import (
    MS_DOMAIN,
    attend,
    declared_outputs,
    key_padding,
    merge_heads,
    split_heads,
)
from .util import as_int
from ..registry import NodeContext, OpSet

ops = OpSet()

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _refuse(ctx: NodeContext, what: str) -> UnsupportedOperatorError:
    return UnsupportedOperatorError(ctx.op_type, ctx.domain, ctx.opset, ctx.name, hint=f"{what} is not supported")


def _heads(ctx: NodeContext) -> int:
    n = int(ctx.attr("num_heads", 0))
    if n <= 0:
        raise InvalidParameterError(f"{ctx.op_type} node '{ctx.name}' needs a positive num_heads attribute")
    return n


# -- attention ------------------------------------------------------------------------------------------------------
@ops.register("Attention", domain=MS_DOMAIN)
def attention(
    ctx: NodeContext,
    x: torch.Tensor,
    weights: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask_index: torch.Tensor | None = None,
    past: torch.Tensor | None = None,
    attention_bias: torch.Tensor | None = None,
    past_sequence_length: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Self-attention with the packed Q/K/V projection ``x @ weights + bias`` (BERT-, GPT-2- and ViT-style).

    ``unidirectional`` makes it causal; ``past`` (2, B, N, P, H) is prepended to K and V and ``present`` returned.

    Returns:
        output (B, S, Hv_total), and present (2, B, N, P + S, H) when the node declares it.
    """
    proj = x @ weights
    if bias is not None:
        proj = proj + bias
    sizes = ctx.attr("qkv_hidden_sizes", None) or [weights.shape[-1] // 3] * 3
    return packed_attention(ctx, proj, sizes, mask_index, past, attention_bias)


def packed_attention(
    ctx: NodeContext,
    proj: torch.Tensor,
    sizes: list[int],
    mask_index: torch.Tensor | None,
    past: torch.Tensor | None,
    attention_bias: torch.Tensor | None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention (and QAttention) after the packed projection ``proj`` (B, S, Q + K + V widths ``sizes``)."""
    if ctx.attr("do_rotary", 0) or ctx.attr("past_present_share_buffer", 0):
        raise _refuse(ctx, "do_rotary / past_present_share_buffer")
    n_heads = _heads(ctx)
    q, k, v = (split_heads(t, n_heads, ctx, "Q/K/V") for t in proj.split(list(sizes), dim=-1))
    past_len = 0
    if past is not None:
        past_len = past.shape[3]
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    allowed = key_padding(ctx, mask_index, proj.shape[0], q.shape[2], k.shape[2], past_len)
    y = _attend_as_attributed(ctx, q, k, v, allowed, attention_bias)
    if ctx.n_outputs == 1:
        return merge_heads(y)
    return merge_heads(y), torch.stack([k, v])


def _mha_qkv(
    ctx: NodeContext, query: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None, bias, n_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V as (B, N, S, H) from MultiHeadAttention's separate, packed-KV or packed-QKV inputs (+ bias)."""
    if key is None:  # packed QKV: (B, S, N, 3, H)
        if query.dim() != 5:
            raise ShapeError(f"MultiHeadAttention node '{ctx.name}' has no key and a query that is not packed QKV")
        if bias is not None:
            query = query + bias.reshape(3, n_heads, -1).transpose(0, 1)
        q, k, v = query.unbind(dim=3)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    widths = None
    if bias is not None:
        d = query.shape[-1]
        widths = bias.split([d, d, bias.shape[0] - 2 * d])
        query = query + widths[0]
    q = split_heads(query, n_heads, ctx, "query")
    if value is None:  # packed KV: (B, L, N, 2, H)
        if bias is not None:
            key = key + torch.stack([widths[1].reshape(n_heads, -1), widths[2].reshape(n_heads, -1)], dim=1)
        k, v = key.unbind(dim=3)
        return q, k.transpose(1, 2), v.transpose(1, 2)
    if key.dim() == 4:  # already (B, N, L, H): projected and split (cross-attention cache); no bias is added
        return q, key, value
    if bias is not None:
        key, value = key + widths[1], value + widths[2]
    return q, split_heads(key, n_heads, ctx, "key"), split_heads(value, n_heads, ctx, "value")


@ops.register("MultiHeadAttention", domain=MS_DOMAIN)
def multi_head_attention(
    ctx: NodeContext,
    query: torch.Tensor,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    attention_bias: torch.Tensor | None = None,
    past_key: torch.Tensor | None = None,
    past_value: torch.Tensor | None = None,
    *rest: torch.Tensor | None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Attention on projected Q, K, V (separate, packed KV or packed QKV), with an optional bias added to them,
    a key padding mask, an additive attention bias, ``unidirectional`` and a KV cache. (The packed forms follow
    onnxruntime's documentation; its CPU kernel refuses them, so they are not checked against it.)

    Returns:
        (output (B, S, N*Hv), present_key, present_value) trimmed to the outputs the node declares.
    """
    n_heads = _heads(ctx)
    q, k, v = _mha_qkv(ctx, query, key, value, bias, n_heads)
    past_len = 0
    if past_key is not None and past_value is not None and key is not None and key.dim() != 4:
        past_len = past_key.shape[2]
        k, v = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
    allowed = key_padding(ctx, key_padding_mask, q.shape[0], q.shape[2], k.shape[2], past_len)
    y = _attend_as_attributed(ctx, q, k, v, allowed, attention_bias)
    return declared_outputs(ctx, (merge_heads(y), k, v))


# -- normalization --------------------------------------------------------------------------------------------------
def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _layer_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None, eps: float, simplified: bool):
    """(y, mean, inv_std) of a layer norm (or RMS norm when ``simplified``) over the last axis."""
    xs = x.to(_stats_dtype(x))
    if simplified:
        inv_std = torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + eps)
        mean = torch.zeros_like(inv_std)
        y = (xs * inv_std).to(x.dtype) * gamma
    else:
        mean = xs.mean(-1, keepdim=True)
        centred = xs - mean
        inv_std = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
        y = (centred * inv_std).to(x.dtype) * gamma
    if beta is not None:
        y = y + beta
    return y, mean, inv_std


def _skip_norm(
    ctx: NodeContext, x, skip, gamma, beta, bias, *, simplified: bool
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    total = x + skip
    if bias is not None:
        total = total + bias
    eps = float(ctx.attr("epsilon", 1e-12 if not simplified else 1e-5))
    if ctx.n_outputs == 1 and not simplified and total.dtype == torch.float32:
        return F.layer_norm(total, (total.shape[-1],), gamma, beta, eps)
    y, mean, inv_std = _layer_norm(total, gamma, beta, eps, simplified)
    return declared_outputs(ctx, (y, mean, inv_std, total))


@ops.register("SkipLayerNormalization", domain=MS_DOMAIN)
def skip_layer_normalization(
    ctx: NodeContext,
    x: torch.Tensor,
    skip: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``LayerNorm(x + skip + bias) * gamma + beta`` over the last axis.

    Returns:
        (output, mean, inv_std_var, input_skip_bias_sum) trimmed to the outputs the node declares.
    """
    return _skip_norm(ctx, x, skip, gamma, beta, bias, simplified=False)


@ops.register("SkipSimplifiedLayerNormalization", domain=MS_DOMAIN)
def skip_simplified_layer_normalization(
    ctx: NodeContext, x: torch.Tensor, skip: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``RMSNorm(x + skip + bias) * gamma`` over the last axis (T5 / LLaMA style).

    Returns:
        (output, mean (unused, 0), inv_std_var, input_skip_bias_sum) trimmed to the outputs the node declares.
    """
    return _skip_norm(ctx, x, skip, gamma, None, bias, simplified=True)


@ops.register("SimplifiedLayerNormalization")
def simplified_layer_normalization(
    ctx: NodeContext, x: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``x / sqrt(mean(x^2) + epsilon) * scale`` over axes ``[axis, rank)`` (onnxruntime's, default domain).

    Returns:
        Y, and inv_std_var when the node declares it.
    """
    axis = int(ctx.attr("axis", -1)) % x.dim()
    eps = float(ctx.attr("epsilon", 1e-5))
    xs = x.to(_stats_dtype(x))
    inv_std = torch.rsqrt(xs.pow(2).mean(list(range(axis, x.dim())), keepdim=True) + eps)
    y = (xs * inv_std).to(x.dtype) * scale
    return declared_outputs(ctx, (y, inv_std))


@ops.register("EmbedLayerNormalization", domain=MS_DOMAIN)
def embed_layer_normalization(
    ctx: NodeContext,
    input_ids: torch.Tensor,
    segment_ids: torch.Tensor | None,
    word_embedding: torch.Tensor,
    position_embedding: torch.Tensor,
    segment_embedding: torch.Tensor | None,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """BERT's embedding block: word + position (+ segment) embeddings, then LayerNorm.

    Returns:
        (output (B, S, H), mask_index (B,) int32: the number of ones in each row of ``mask`` (zeros without a
        mask), embedding_sum (B, S, H)) trimmed to the outputs the node declares.
    """
    batch, seq = input_ids.shape[0], input_ids.shape[1]
    if position_ids is None:
        position_ids = torch.arange(seq, device=input_ids.device).reshape(1, seq)
    total = word_embedding[input_ids.long()] + position_embedding[position_ids.long()]
    if segment_embedding is not None and segment_ids is not None:
        total = total + segment_embedding[segment_ids.long()]
    eps = float(ctx.attr("epsilon", 1e-12))
    y = F.layer_norm(total, (total.shape[-1],), gamma, beta, eps)
    if mask is not None:
        mask_index = (mask == 1).sum(-1).to(torch.int32)
    else:
        mask_index = torch.zeros(batch, dtype=torch.int32, device=input_ids.device)
    return declared_outputs(ctx, (y, mask_index, total))


# -- activations ----------------------------------------------------------------------------------------------------
@ops.register("Gelu", domain=MS_DOMAIN)
def gelu(ctx: NodeContext, x: torch.Tensor) -> torch.Tensor:
    """``0.5 * x * (1 + erf(x / sqrt 2))``."""
    return F.gelu(x)


@ops.register("BiasGelu", domain=MS_DOMAIN)
def bias_gelu(ctx: NodeContext, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Gelu (erf form) of ``a + b``."""
    return F.gelu(a + b)


@ops.register("FastGelu", domain=MS_DOMAIN)
def fast_gelu(ctx: NodeContext, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The tanh approximation of Gelu of ``x + bias``: ``0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3)))``."""
    y = x if bias is None else x + bias
    return 0.5 * y * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (y + 0.044715 * y * y * y)))


@ops.register("QuickGelu", domain=MS_DOMAIN)
def quick_gelu(ctx: NodeContext, x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(alpha * x)`` (``alpha`` defaults to 1.702)."""
    return x * torch.sigmoid(float(ctx.attr("alpha", 1.702)) * x)


# -- matrix products ------------------------------------------------------------------------------------------------
def _batch_transposed(x: torch.Tensor) -> torch.Tensor:
    """FusedMatMul's transBatch: the leading axis moves to just before the last one ([d0, .., dn] -> [d1, .., d0, dn])."""
    if x.dim() < 3:
        return x
    return x.permute(*range(1, x.dim() - 1), 0, x.dim() - 1)


@ops.register("FusedMatMul", domain=MS_DOMAIN)
def fused_matmul(ctx: NodeContext, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``alpha * op(A) @ op(B)``, op transposing the last two axes (``transA``/``transB``) after an optional batch
    transposition (``transBatchA``/``transBatchB``)."""
    if ctx.attr("transBatchA", 0):
        a = _batch_transposed(a)
    if ctx.attr("transBatchB", 0):
        b = _batch_transposed(b)
    if ctx.attr("transA", 0) and a.dim() >= 2:
        a = a.transpose(-1, -2)
    if ctx.attr("transB", 0) and b.dim() >= 2:
        b = b.transpose(-1, -2)
    y = a @ b
    alpha = float(ctx.attr("alpha", 1.0))
    return y if alpha == 1.0 else y * alpha


# -- rotary embeddings and grouped-query attention ------------------------------------------------------------------
def _positions(position_ids: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """(B, S) positions: ``position_ids`` itself, or a scalar start offset followed by S consecutive positions."""
    if position_ids.dim() <= 1 and position_ids.numel() == 1:
        start = position_ids.reshape(1, 1).long()
        return (start + torch.arange(seq, device=position_ids.device).reshape(1, seq)).expand(batch, seq)
    return position_ids.long().expand(batch, seq)


@ops.register("RotaryEmbedding", domain=MS_DOMAIN)
def ms_rotary_embedding(
    ctx: NodeContext,
    x: torch.Tensor,
    position_ids: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
) -> torch.Tensor:
    """Rotary position embedding (halves, or even/odd pairs when ``interleaved``) of the first
    ``rotary_embedding_dim`` features of each head; input (B, S, N*H) or (B, N, S, H), ``position_ids`` (B, S) or
    a one-element start offset; caches (max_position, rotary_dim / 2)."""
    if ctx.attr("is_packed_batching", 0):
        raise _refuse(ctx, "is_packed_batching")
    batch, seq = x.shape[0], x.shape[-2]
    attrs = dict(ctx.attrs)
    if x.dim() == 3:
        seq = x.shape[1]
        if not int(attrs.get("num_heads", 0)):
            head = int(attrs.get("rotary_embedding_dim", 0)) or cos_cache.shape[-1] * 2
            attrs["num_heads"] = x.shape[-1] // head
    inner = dataclasses.replace(ctx, attrs=attrs)
    return rotary_embedding(inner, x, cos_cache, sin_cache, _positions(position_ids, batch, seq))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """(B, N, S, H) rotated by (B, 1, S, R/2) angles on its first R features."""
    rot = cos.shape[-1] * 2
    part, keep = x[..., :rot], x[..., rot:]
    if interleaved:
        x1, x2 = part[..., 0::2], part[..., 1::2]
    else:
        x1, x2 = part[..., : rot // 2], part[..., rot // 2 :]
    real, imag = x1 * cos - x2 * sin, x1 * sin + x2 * cos
    rotated = torch.stack([real, imag], -1).flatten(-2) if interleaved else torch.cat([real, imag], -1)
    return torch.cat([rotated, keep], dim=-1)


def _place(past: torch.Tensor | None, new: torch.Tensor, start: torch.Tensor, total: int) -> torch.Tensor:
    """(B, N, total, H): ``past``'s first ``start[b]`` positions, then ``new`` (B, N, S, H) from ``start[b]`` on.

    Written with a one-hot placement matrix rather than per-batch slicing, so the lengths stay tensors.
    """
    positions = torch.arange(total, device=new.device).reshape(1, total, 1)
    steps = torch.arange(new.shape[2], device=new.device).reshape(1, 1, -1)
    place = (positions == start.reshape(-1, 1, 1) + steps).to(new.dtype)  # (B, total, S)
    placed = torch.einsum("bts,bnsh->bnth", place, new)
    if past is None:
        return placed
    if past.shape[2] < total:
        past = F.pad(past, (0, 0, 0, total - past.shape[2]))
    keep_past = positions.reshape(1, 1, total, 1) < start.reshape(-1, 1, 1, 1)
    return torch.where(keep_past, past[:, :, :total], placed)


@ops.register("GroupQueryAttention", domain=MS_DOMAIN)
def group_query_attention(
    ctx: NodeContext,
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor | None,
    past_key: torch.Tensor | None,
    past_value: torch.Tensor | None,
    seqlens_k: torch.Tensor,
    total_sequence_length: torch.Tensor,
    cos_cache: torch.Tensor | None = None,
    sin_cache: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    attention_bias: torch.Tensor | None = None,
    head_sink: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Causal grouped-query attention with a KV cache (LLaMA / Phi style), optional rotary embedding, local window,
    softcap and smooth softmax.

    Batch ``b`` holds ``seqlens_k[b] + 1`` valid keys in all; its S new tokens sit at the end of them.

    Returns:
        (output (B, S, N*H), present_key, present_value (B, N_kv, T, H)) trimmed to the outputs the node declares.
    """
    n_heads, n_kv = _heads(ctx), int(ctx.attr("kv_num_heads", 0))
    if n_kv <= 0 or n_heads % n_kv:
        raise InvalidParameterError(f"GroupQueryAttention node '{ctx.name}' needs kv_num_heads dividing num_heads")
    if key is None:
        head = query.shape[-1] // (n_heads + 2 * n_kv)
        query, key, value = query.split([n_heads * head, n_kv * head, n_kv * head], dim=-1)
    q = split_heads(query, n_heads, ctx, "query")
    k, v = split_heads(key, n_kv, ctx, "key"), split_heads(value, n_kv, ctx, "value")
    batch, seq = q.shape[0], q.shape[2]
    valid = seqlens_k.reshape(-1).long() + 1  # keys per batch
    total_length = as_int(total_sequence_length)
    # where the new tokens go: after the past, or at 0 in a first prompt (whose padded rows have fewer keys)
    start = torch.zeros_like(valid) if seq == total_length else valid - seq
    total = max(total_length, past_key.shape[2] if past_key is not None else 0)
    if ctx.attr("do_rotary", 0):
        if position_ids is None:
            positions = start.reshape(-1, 1) + torch.arange(seq, device=q.device).reshape(1, seq)
        else:
            positions = position_ids.long().expand(batch, seq)
        cos, sin = cos_cache[positions].unsqueeze(1), sin_cache[positions].unsqueeze(1)
        interleaved = bool(ctx.attr("rotary_interleaved", 0))
        q, k = _rotate(q, cos, sin, interleaved), _rotate(k, cos, sin, interleaved)
    present_k, present_v = _place(past_key, k, start, total), _place(past_value, v, start, total)
    query_pos = start.reshape(-1, 1, 1, 1) + torch.arange(seq, device=q.device).reshape(1, 1, seq, 1)
    key_pos = torch.arange(total, device=q.device).reshape(1, 1, 1, total)
    allowed = (key_pos <= query_pos) & (key_pos < valid.reshape(-1, 1, 1, 1))
    window = int(ctx.attr("local_window_size", -1))
    if window > 0:
        allowed = allowed & (key_pos > query_pos - window)
    group = n_heads // n_kv
    keys, values = present_k.repeat_interleave(group, dim=1), present_v.repeat_interleave(group, dim=1)
    scale = ctx.attr("scale", None)
    scale = 1.0 / math.sqrt(q.shape[-1]) if not scale else float(scale)
    scores = (q @ keys.transpose(-1, -2)) * scale
    softcap = float(ctx.attr("softcap", 0.0))
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_bias is not None:
        scores = scores + attention_bias
    lowest = torch.full((), torch.finfo(scores.dtype).min, dtype=scores.dtype, device=scores.device)
    scores = torch.where(allowed, scores, lowest)
    probs = _sink_softmax(scores, head_sink, bool(ctx.attr("smooth_softmax", 0)))
    probs = torch.where(allowed.any(-1, keepdim=True), probs, torch.zeros_like(probs))  # no key: zeros
    y = merge_heads(probs @ values)
    return declared_outputs(ctx, (y, present_k, present_v))


def _sink_softmax(scores: torch.Tensor, head_sink: torch.Tensor | None, smooth: bool) -> torch.Tensor:
    """Softmax over the keys with an extra logit that takes probability but no value: ``head_sink[n]`` per head,
    or 0 for ``smooth_softmax``; plain softmax without either."""
    if head_sink is None and not smooth:
        return torch.softmax(scores, dim=-1)
    sink = (
        head_sink.to(scores.dtype).reshape(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
        if head_sink is not None
        else torch.zeros(*scores.shape[:-1], 1, dtype=scores.dtype, device=scores.device)
    )
    return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]


def _attend_as_attributed(ctx: NodeContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          allowed: torch.Tensor | None, attention_bias: torch.Tensor | None) -> torch.Tensor:
    """`attend` with the node's ``scale``, ``mask_filter_value`` and ``unidirectional`` attributes (Attention and
    MultiHeadAttention read them the same way)."""
    return attend(q, k, v, scale=ctx.attr("scale", None), allowed=allowed,
                  filter_value=float(ctx.attr("mask_filter_value", -10000.0)),
                  causal=bool(ctx.attr("unidirectional", 0)), attention_bias=attention_bias)
