"""Sequence-model building blocks: RotaryEmbedding (opset 23), LinearAttention and CausalConvWithState (opset 27).

LinearAttention runs its recurrence one token at a time (the ONNX definition; ``chunk_size`` is only a speed hint),
with plain tensor ops so it stays differentiable and batches under ``torch.func.vmap``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ....errors import InvalidParameterError, ShapeError
from ..registry import NodeContext, OpSet

ops = OpSet()


@ops.register("RotaryEmbedding", since=23)
def rotary_embedding(
    ctx: NodeContext,
    x: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate the first ``rotary_embedding_dim`` features of every head (halves, or even/odd pairs when
    ``interleaved``) by the angles in the cos/sin caches, indexed by ``position_ids`` when given.

    Shapes: x (B, H, S, D) or (B, S, H*D) with ``num_heads``; caches (max_pos, R/2) with position_ids (B, S),
    else (B, S, R/2).
    """
    rank4 = x.dim() == 4
    if rank4:
        heads = x.transpose(1, 2)  # (B, S, H, D)
    else:
        n_heads = int(ctx.attr("num_heads", 0))
        if n_heads <= 0 or x.shape[-1] % n_heads:
            raise ShapeError(
                f"RotaryEmbedding node '{ctx.name}' has 3-D input of width {x.shape[-1]} and num_heads {n_heads}; "
                f"num_heads must divide the hidden size"
            )
        heads = x.reshape(x.shape[0], x.shape[1], n_heads, -1)
    rot_dim = int(ctx.attr("rotary_embedding_dim", 0)) or heads.shape[-1]
    if position_ids is not None:
        cos_cache, sin_cache = cos_cache[position_ids.long()], sin_cache[position_ids.long()]
    if cos_cache.shape[-1] * 2 != rot_dim:
        raise ShapeError(
            f"RotaryEmbedding node '{ctx.name}' has caches of width {cos_cache.shape[-1]}; expected rotary dim / 2 "
            f"= {rot_dim // 2}"
        )
    cos, sin = cos_cache.unsqueeze(2), sin_cache.unsqueeze(2)  # (B, S, 1, R/2)
    rotate, keep = heads[..., :rot_dim], heads[..., rot_dim:]
    interleaved = bool(ctx.attr("interleaved", 0))
    if interleaved:
        x1, x2 = rotate[..., 0::2], rotate[..., 1::2]
    else:
        x1, x2 = rotate[..., : rot_dim // 2], rotate[..., rot_dim // 2 :]
    real, imag = cos * x1 - sin * x2, sin * x1 + cos * x2
    if interleaved:
        rotated = torch.stack([real, imag], dim=-1).reshape(rotate.shape)
    else:
        rotated = torch.cat([real, imag], dim=-1)
    out = torch.cat([rotated, keep], dim=-1)
    return out.transpose(1, 2) if rank4 else out.reshape(x.shape)


def _unpack(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, H*D) -> (B, H, T, D)."""
    return x.reshape(x.shape[0], x.shape[1], n_heads, -1).transpose(1, 2)


@ops.register("LinearAttention", since=27)
def linear_attention(
    ctx: NodeContext,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_state: torch.Tensor | None = None,
    decay: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recurrent linear attention with the ``linear``, ``gated``, ``delta`` or ``gated_delta`` state update.

    State S (B, H_kv, d_k, d_v); per token: decay ``S *= exp(g)``; delta rule ``v <- beta * (v - S^T k)``;
    ``S += k v^T``; output ``scale * q^T S`` (each K/V head read by a contiguous block of query heads).
    Computed in float32 (float64 for double inputs).

    Returns:
        (output (B, T, H_q * d_v), present_state (B, H_kv, d_k, d_v)).
    """
    rule = ctx.attr("update_rule", "gated_delta")
    if rule not in ("linear", "gated", "delta", "gated_delta"):
        raise InvalidParameterError(
            f"LinearAttention node '{ctx.name}' has update_rule '{rule}'; use linear, gated, delta or gated_delta"
        )
    n_q, n_kv = int(ctx.attr("q_num_heads", 0)), int(ctx.attr("kv_num_heads", 0))
    if n_q <= 0 or n_kv <= 0 or n_q % n_kv:
        raise InvalidParameterError(
            f"LinearAttention node '{ctx.name}' has q_num_heads={n_q}, kv_num_heads={n_kv}; both must be positive "
            f"and kv_num_heads must divide q_num_heads"
        )
    gated, delta = rule in ("gated", "gated_delta"), rule in ("delta", "gated_delta")
    if (gated and decay is None) or (delta and beta is None):
        raise InvalidParameterError(
            f"LinearAttention node '{ctx.name}' with update_rule '{rule}' needs its decay/beta input"
        )
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    batch, steps = query.shape[:2]
    q, k, v = _unpack(query.to(dtype), n_q), _unpack(key.to(dtype), n_kv), _unpack(value.to(dtype), n_kv)
    d_k, d_v = q.shape[-1], v.shape[-1]
    if gated:
        per_head = decay.shape[-1] == n_kv
        g = decay.to(dtype).reshape(batch, steps, n_kv, 1 if per_head else d_k).transpose(1, 2)
    if delta:
        b = beta.to(dtype).reshape(batch, steps, beta.shape[-1], 1).transpose(1, 2)
    if past_state is not None:
        state = past_state.to(dtype)
    else:
        state = torch.zeros(batch, n_kv, d_k, d_v, dtype=dtype, device=query.device)
    scale = float(ctx.attr("scale", 0.0)) or 1 / math.sqrt(d_k)
    outputs = []
    for t in range(steps):
        k_t, v_t = k[:, :, t], v[:, :, t]
        if gated:
            state = state * torch.exp(g[:, :, t]).unsqueeze(-1)
        if delta:
            v_t = b[:, :, t] * (v_t - torch.einsum("bhkv,bhk->bhv", state, k_t))
        state = state + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
        read = state.repeat_interleave(n_q // n_kv, dim=1) if n_q != n_kv else state
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, :, t], read))
    out = torch.stack(outputs, dim=2).transpose(1, 2).reshape(batch, steps, n_q * d_v)
    state_dtype = past_state.dtype if past_state is not None else query.dtype
    return out.to(query.dtype), state.to(state_dtype)


@ops.register("CausalConvWithState", since=27)
def causal_conv_with_state(
    ctx: NodeContext,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    past_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal 1-D convolution over (B, C, L) continuing from ``past_state`` (B, C, k-1), optional SiLU.

    Returns:
        (output (B, C, L), present_state: the last k-1 positions of the state-extended input).
    """
    activation = ctx.attr("activation", "none")
    if activation not in ("none", "silu", "swish"):
        raise InvalidParameterError(
            f"CausalConvWithState node '{ctx.name}' has activation '{activation}'; use none, silu or swish"
        )
    channels, width = x.shape[1], weight.shape[-1]
    if past_state is None:
        past_state = x.new_zeros(x.shape[0], channels, width - 1)
    extended = torch.cat([past_state.to(x.dtype), x], dim=2)
    out = F.conv1d(extended, weight, bias, groups=channels)
    if activation != "none":
        out = F.silu(out.float()).to(x.dtype) if x.dtype in (torch.float16, torch.bfloat16) else F.silu(out)
    return out, extended[:, :, extended.shape[2] - (width - 1) :]
