"""Scaled dot-product attention: ONNX Attention (opsets 23 to 25) and ai.onnx.preview FlexAttention.

Attention builds one additive bias (Sq, Skv) or (B, *, Sq, Skv) from the mask, the causal frontier, the sliding
window and the ``nonpad_kv_seqlen`` padding (0 where a key may be attended, -inf where not), then computes
``softmax(softcap(Q K^T * scale) + bias) V`` with grouped-query heads repeated per query head. A query row that
may attend no key gives zeros (not NaN), in Y and in the mode-3 ``qk_matmul_output``.
"""

from __future__ import annotations

import math

import onnx
import torch

from ....errors import InvalidParameterError, ShapeError
from .util import torch_dtype
from ..registry import NodeContext, OpSet

ops = OpSet()


def _split_heads(x: torch.Tensor, n_heads: int | None, name: str, ctx: NodeContext) -> torch.Tensor:
    """(B, S, H*D) -> (B, H, S, D)."""
    if not n_heads or x.shape[-1] % n_heads:
        raise ShapeError(
            f"Attention node '{ctx.name}' has 3-D {name} of width {x.shape[-1]} and {name} heads {n_heads}; "
            f"set q_num_heads/kv_num_heads to divisors of the hidden sizes"
        )
    return x.reshape(x.shape[0], x.shape[1], n_heads, -1).transpose(1, 2)


def safe_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis where an all ``-inf`` row gives zeros instead of NaN."""
    row_max = scores.amax(-1, keepdim=True)
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    e = torch.exp(scores - row_max.detach())
    total = e.sum(-1, keepdim=True)
    return e / torch.where(total == 0, torch.ones_like(total), total)


def _repeat_kv(x: torch.Tensor, n_q_heads: int) -> torch.Tensor:
    """Grouped-query attention: each K/V head serves a contiguous block of query heads."""
    n_kv = x.shape[1]
    if n_kv == n_q_heads:
        return x
    if n_q_heads % n_kv:
        raise ShapeError(f"{n_q_heads} query heads are not a multiple of {n_kv} key/value heads")
    return x.repeat_interleave(n_q_heads // n_kv, dim=1)


def _where_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.full((), float("-inf"), dtype=dtype, device=allowed.device))


class _Frontier:
    """Query/key positions for the causal and window rules: query i sits at absolute position i + offset,
    where offset is the past length (internal cache), ``nonpad_kv_seqlen - Sq`` per batch (external cache), or 0."""

    def __init__(self, n_q: int, n_kv: int, offset: int | torch.Tensor, device: torch.device):
        i = torch.arange(n_q, device=device).reshape(n_q, 1)
        j = torch.arange(n_kv, device=device).reshape(1, n_kv)
        if isinstance(offset, torch.Tensor):  # per batch: (B, 1, Sq, Skv) after broadcasting
            i = i + offset.reshape(-1, 1, 1, 1).to(device)
        else:
            i = i + offset
        self.diff = i - j  # query position minus key position

    def causal(self) -> torch.Tensor:
        return self.diff >= 0

    def window(self, left: int, right: int) -> torch.Tensor:
        allowed = torch.ones_like(self.diff, dtype=torch.bool)
        if left >= 0:
            allowed = allowed & (self.diff <= left)
        if right >= 0:
            allowed = allowed & (-self.diff <= right)
        return allowed


def _attention_bias(
    ctx: NodeContext,
    mask: torch.Tensor | None,
    dtype: torch.dtype,
    n_q: int,
    n_kv: int,
    past_len: int | None,
    nonpad: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """The additive bias (broadcastable to (B, H, Sq, Skv)) of mask, causal frontier, window and padding."""
    bias = torch.zeros(n_q, n_kv, dtype=dtype, device=device)
    if mask is not None:
        short = n_kv - mask.shape[-1]
        if short > 0:  # a mask shorter than the keys masks the rest
            fill = False if mask.dtype == torch.bool else float("-inf")
            mask = torch.nn.functional.pad(mask, (0, short), value=fill)
        bias = bias + (_where_bias(mask, dtype) if mask.dtype == torch.bool else mask.to(dtype))
    offset: int | torch.Tensor = past_len or 0
    if past_len is None and nonpad is not None:
        offset = nonpad.reshape(-1).long() - n_q
    frontier = None
    if ctx.attr("is_causal", 0):
        frontier = _Frontier(n_q, n_kv, offset, device)
        bias = bias + _where_bias(frontier.causal(), dtype)
    left, right = int(ctx.attr("left_window_size", -1)), int(ctx.attr("right_window_size", -1))
    if left >= 0 or right >= 0:
        frontier = frontier or _Frontier(n_q, n_kv, offset, device)
        bias = bias + _where_bias(frontier.window(left, right), dtype)
    if nonpad is not None:
        keep = torch.arange(n_kv, device=device).reshape(1, n_kv) < nonpad.reshape(-1, 1).to(device)
        bias = bias + _where_bias(keep, dtype).reshape(-1, 1, 1, n_kv)
    return bias


@ops.register("Attention", since=23)
def attention(
    ctx: NodeContext,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    past_key: torch.Tensor | None = None,
    past_value: torch.Tensor | None = None,
    nonpad_kv_seqlen: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor | None, ...]:
    """Multi-head / grouped-query / multi-query attention with masks, causal and window limits, KV cache,
    softcap, softmax precision and the four ``qk_matmul_output_mode`` debug outputs.

    Shapes: 4-D (B, H, S, D) or 3-D (B, S, H*D) with ``q_num_heads``/``kv_num_heads``.

    Returns:
        (Y, present_key, present_value, qk_matmul_output), trimmed to the outputs the node declares.
    """
    if (past_key is None) != (past_value is None):
        raise InvalidParameterError(f"Attention node '{ctx.name}' has only one of past_key/past_value; give both")
    rank3 = q.dim() == 3
    if rank3:
        q = _split_heads(q, ctx.attr("q_num_heads"), "Q", ctx)
        k = _split_heads(k, ctx.attr("kv_num_heads"), "K", ctx)
        v = _split_heads(v, ctx.attr("kv_num_heads"), "V", ctx)
    scale = ctx.attr("scale", None)
    root = math.sqrt(1 / math.sqrt(q.shape[-1]) if scale is None else float(scale))
    root = torch.tensor(root, dtype=q.dtype, device=q.device)
    if past_key is not None:
        k, v = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
    present_key, present_value = k, v
    n_q, n_kv = q.shape[2], k.shape[2]
    bias = _attention_bias(
        ctx, attn_mask, q.dtype, n_q, n_kv, None if past_key is None else past_key.shape[2], nonpad_kv_seqlen, q.device
    )
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    scores = (q * root) @ (k * root).transpose(-1, -2)
    softcap = ctx.attr("softcap", None)
    if softcap is not None and float(softcap) > 0:
        scores = float(softcap) * torch.tanh(scores / float(softcap))
    biased = scores + bias
    mode = int(ctx.attr("qk_matmul_output_mode", 0))
    precision = ctx.attr("softmax_precision", None)
    probs = safe_softmax(biased.to(torch_dtype(precision)) if precision is not None else biased)
    blocked = torch.isneginf(bias.amax(-1, keepdim=True))
    probs = torch.where(blocked, torch.zeros_like(probs), probs)
    qk_out = {2: biased, 3: probs}.get(mode, scores).to(q.dtype)
    y = probs.to(q.dtype) @ v
    if rank3:
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    return _declared_outputs(ctx, (y, present_key, present_value, qk_out))


def _declared_outputs(ctx: NodeContext, values: tuple) -> torch.Tensor | tuple:
    if ctx.n_outputs == 1:
        return values[0]
    return values[: ctx.n_outputs]


def _run_modifier(ctx: NodeContext, name: str, x: torch.Tensor) -> torch.Tensor:
    graph = ctx.attr(name, None)
    if graph is None:
        return x
    if not isinstance(graph, onnx.GraphProto):
        raise InvalidParameterError(f"FlexAttention node '{ctx.name}' has a non-graph {name} attribute")
    return ctx.run_graph(graph, [x], ctx.env)[0]


@ops.register("FlexAttention", since=1, domain="ai.onnx.preview")
def flex_attention(ctx: NodeContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(score_mod(Q K^T * scale))`` then ``prob_mod`` then ``@ V``, on rank-4 inputs (GQA allowed).

    The scores are computed in ``softmax_precision`` (float32 unless the inputs are double).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ShapeError(f"FlexAttention node '{ctx.name}' needs rank-4 Q, K and V (B, H, S, D)")
    precision = ctx.attr("softmax_precision", None)
    dtype = (
        torch_dtype(precision)
        if precision is not None
        else (torch.float64 if q.dtype == torch.float64 else torch.float32)
    )
    scale = ctx.attr("scale", None)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    scores = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * scale
    scores = _run_modifier(ctx, "score_mod", scores)
    probs = _run_modifier(ctx, "prob_mod", safe_softmax(scores))
    return (probs.to(dtype) @ v.to(dtype)).to(q.dtype)
