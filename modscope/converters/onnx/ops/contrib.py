"""What onnxruntime's ``com.microsoft`` contrib operators share: their domain, which of their inputs are weights,
and the scaled dot-product attention that Attention, MultiHeadAttention, GroupQueryAttention and QAttention run.

Files fused by ``onnxruntime.transformers.optimizer`` (or optimum) and files quantized by
``onnxruntime.quantization`` use these operators; their handlers live in ``contrib_transformer.py`` (float
fusions) and ``contrib_quantized.py`` (integer and 4-bit weights). onnxruntime's contrib-op documentation
(``docs/ContribOperators.md`` in its repository) and onnxruntime's own results are the reference for their meaning.

`CONTRIB_INPUT_ROLES` tells ``roles.py`` which inputs of these operators carry trained weights:

==================================================  =========================================================
operator (input)                                    kind
==================================================  =========================================================
Attention weights (the packed Q/K/V matrix, one     "weight" ("bias" for its packed bias)
weight), FusedMatMul A/B, MatMulNBits B,
DynamicQuantizeMatMul B, MatMulIntegerToFloat B,
QAttention weight, DynamicQuantizeLSTM W/R/P
SkipLayerNormalization gamma,                       "norm"
SkipSimplifiedLayerNormalization gamma,
SimplifiedLayerNormalization scale, EmbedLayer-
Normalization gamma
their beta and bias inputs, BiasGelu B, FastGelu    "bias"
bias, MultiHeadAttention bias
(Q)EmbedLayerNormalization word, position and       "embedding"
segment tables
==================================================  =========================================================
"""

from __future__ import annotations

import math
from types import MappingProxyType

import torch

from ....errors import ShapeError
from ....model import WeightKind
from ..registry import NodeContext

#: the domain of onnxruntime's contrib operators.
MS_DOMAIN = "com.microsoft"

_W: WeightKind = "weight"
_B: WeightKind = "bias"
_N: WeightKind = "norm"
_E: WeightKind = "embedding"

#: (domain, op_type) -> input index -> weight kind, for the contrib operators (see the module docstring).
CONTRIB_INPUT_ROLES: MappingProxyType[tuple[str, str], dict[int, WeightKind]] = MappingProxyType(
    {
        (MS_DOMAIN, "Attention"): {1: _W, 2: _B},
        (MS_DOMAIN, "MultiHeadAttention"): {3: _B},
        (MS_DOMAIN, "SkipLayerNormalization"): {2: _N, 3: _B, 4: _B},
        (MS_DOMAIN, "SkipSimplifiedLayerNormalization"): {2: _N, 3: _B},
        (MS_DOMAIN, "EmbedLayerNormalization"): {2: _E, 3: _E, 4: _E, 5: _N, 6: _B},
        (MS_DOMAIN, "BiasGelu"): {1: _B},
        (MS_DOMAIN, "FastGelu"): {1: _B},
        (MS_DOMAIN, "FusedMatMul"): {0: _W, 1: _W},
        (MS_DOMAIN, "MatMulNBits"): {1: _W, 5: _B},
        (MS_DOMAIN, "DynamicQuantizeMatMul"): {1: _W, 4: _B},
        (MS_DOMAIN, "MatMulIntegerToFloat"): {1: _W, 6: _B},
        (MS_DOMAIN, "QAttention"): {1: _W, 2: _B},
        (MS_DOMAIN, "QEmbedLayerNormalization"): {2: _E, 3: _E, 4: _E, 5: _N, 6: _B},
        (MS_DOMAIN, "DynamicQuantizeLSTM"): {1: _W, 2: _W, 3: _B, 7: _W},
        ("", "SimplifiedLayerNormalization"): {1: _N},
    }
)


def contrib_input_roles(domain: str, op_type: str) -> dict[int, WeightKind] | None:
    """The weight kinds of a contrib operator's inputs by index, or None when it is not one listed here.

    Example:
        >>> contrib_input_roles("com.microsoft", "SkipLayerNormalization")[2]
        'norm'
    """
    return CONTRIB_INPUT_ROLES.get(("" if domain == "ai.onnx" else domain, op_type))


def split_heads(x: torch.Tensor, n_heads: int, ctx: NodeContext, what: str) -> torch.Tensor:
    """(B, S, N*H) -> (B, N, S, H)."""
    if n_heads <= 0 or x.shape[-1] % n_heads:
        raise ShapeError(
            f"{ctx.op_type} node '{ctx.name}' has {what} of width {x.shape[-1]} and num_heads {n_heads}; "
            "num_heads must divide the hidden size"
        )
    return x.reshape(x.shape[0], x.shape[1], n_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, N, S, H) -> (B, S, N*H)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def key_padding(
    ctx: NodeContext, mask: torch.Tensor | None, batch: int, n_q: int, n_kv: int, past: int
) -> torch.Tensor | None:
    """Which keys each query may see, from an onnxruntime ``mask_index`` / ``key_padding_mask``, as a bool tensor
    broadcastable to (B, N, S, T); None when there is no mask.

    Accepted forms (onnxruntime's): (B,) valid lengths (right padding); (2B,) exclusive ends then inclusive starts
    (left padding); (B, T) or (B, S, T) raw 0/1 masks; (B, 1, M, M) a 4-D mask of a longer maximum length, read at
    the rows of the current queries (from the documentation: onnxruntime's CPU kernel refuses this form).
    """
    if mask is None:
        return None
    keys = torch.arange(n_kv, device=mask.device)
    if mask.dim() == 1 and mask.shape[0] in (batch, 2 * batch):
        ends = mask[:batch].reshape(batch, 1).long()
        allowed = keys.reshape(1, n_kv) < ends
        if mask.shape[0] == 2 * batch:
            allowed = allowed & (keys.reshape(1, n_kv) >= mask[batch:].reshape(batch, 1).long())
        return allowed.reshape(batch, 1, 1, n_kv)
    if mask.dim() == 2:
        return (mask[:, :n_kv] != 0).reshape(mask.shape[0], 1, 1, n_kv)
    if mask.dim() == 3:
        return (mask[:, :, :n_kv] != 0).unsqueeze(1)
    if mask.dim() == 4:
        return mask[:, :, past : past + n_q, :n_kv] != 0
    raise ShapeError(
        f"{ctx.op_type} node '{ctx.name}' has a mask of shape {tuple(mask.shape)}; onnxruntime's forms are (B), "
        "(2*B), (B, T), (B, S, T) and (B, 1, M, M)"
    )


def causal_allowed(n_q: int, n_kv: int, device: torch.device) -> torch.Tensor:
    """(S, T) bool: query i (at absolute position T - S + i) may see keys up to its own position."""
    past = n_kv - n_q
    return torch.arange(n_kv, device=device).reshape(1, n_kv) <= torch.arange(n_q, device=device).reshape(n_q, 1) + past


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None,
    allowed: torch.Tensor | None = None,
    filter_value: float = -10000.0,
    causal: bool = False,
    attention_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(Q K^T * scale + mask + attention_bias) V`` as onnxruntime computes it on CPU.

    Args:
        q, k, v: (B, N, S, H), (B, N, T, H), (B, N, T, Hv); K/V heads already repeated for grouped queries.
        scale: None for 1/sqrt(H).
        allowed: keys each query may see (`key_padding`); the others get ``filter_value`` added to their score.
        causal: keys after the query's position get the lowest float instead (they never win the softmax).
        attention_bias: added to the scores (broadcast to (B, N, S, T)).

    Returns:
        (B, N, S, Hv).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None or scale == 0.0 else float(scale)
    scores = (q @ k.transpose(-1, -2)) * scale
    if allowed is not None:
        zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
        scores = scores + torch.where(allowed, zero, torch.full_like(zero, filter_value))
    if attention_bias is not None:
        scores = scores + attention_bias
    if causal:
        lowest = torch.full((), torch.finfo(scores.dtype).min, dtype=scores.dtype, device=scores.device)
        scores = torch.where(causal_allowed(q.shape[-2], k.shape[-2], q.device), scores, lowest)
    return torch.softmax(scores, dim=-1) @ v


def declared_outputs(ctx: NodeContext, values: tuple) -> torch.Tensor | tuple:
    """The first value when the node declares one output, else as many values as it declares."""
    if ctx.n_outputs == 1:
        return values[0]
    return values[: ctx.n_outputs]
