"""Composite neural-network ops: losses here; Attention, RotaryEmbedding, LinearAttention, FlexAttention and
CausalConvWithState in `nn_attention`/`nn_sequence`; GridSample and AffineGrid in `nn_sampling`; Resize and
Upsample in `nn_resize`. This module's ``ops`` holds all of them.
"""

from __future__ import annotations

import torch

from ....errors import InvalidParameterError
from . import nn_attention, nn_resize, nn_sampling, nn_sequence
from ..registry import NodeContext, OpSet

ops = OpSet(
    entries=[
        *nn_attention.ops.entries,
        *nn_sequence.ops.entries,
        *nn_sampling.ops.entries,
        *nn_resize.ops.entries,
    ]
)


def _nll(ctx: NodeContext, log_prob: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Negative log-likelihood of ``target`` classes under log_prob (N, C, *d) with optional class weights,
    ``ignore_index`` and ``reduction`` (none | sum | mean, mean dividing by the total weight)."""
    reduction = ctx.attr("reduction", "mean")
    if reduction not in ("none", "sum", "mean"):
        raise InvalidParameterError(
            f"{ctx.op_type} node '{ctx.name}' has reduction '{reduction}'; use none, sum or mean"
        )
    target = target.long()
    ignore_index = ctx.attr("ignore_index", None)
    keep = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != int(ignore_index)
    safe_target = torch.where(keep, target, torch.zeros_like(target))
    picked = -log_prob.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    w = keep.to(log_prob.dtype)
    if weight is not None:
        w = w * weight.to(log_prob.dtype)[safe_target]
    loss = picked * w
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / w.sum()


@ops.register("NegativeLogLikelihoodLoss", since=12)
def negative_log_likelihood_loss(
    ctx: NodeContext, x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """NLL of log-probabilities x (N, C, *d) at integer targets (N, *d)."""
    return _nll(ctx, x, target, weight)


@ops.register("SoftmaxCrossEntropyLoss", since=12)
def softmax_cross_entropy_loss(
    ctx: NodeContext, scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross entropy of scores (N, C, *d) against labels (N, *d); optional second output: the log-probabilities."""
    log_prob = torch.log_softmax(scores, dim=1)
    loss = _nll(ctx, log_prob, labels, weights)
    return (loss, log_prob) if ctx.n_outputs > 1 else loss
