"""Hard Gumbel-sigmoid mask samples with the straight-through estimator.

For a logit l and a uniform u, the logistic noise ``logit(u)`` (the difference of two Gumbel variables) gives the
soft sample s = sigmoid((l + logit(u)) / τ) and the hard sample m = [s > 0.5] = [l + logit(u) > 0], which is exactly
Bernoulli(sigmoid(l)). The forward pass uses the hard 0/1 value; the backward pass uses the soft sample's derivative
ds/dl = s(1 - s)/τ (the paper's ``stopgrad(hard - s) + s``).

modscope draws one uniform per mask element (the paper draws two and takes the difference of two Gumbels, which
costs twice the noise) and fuses the sampling into one autograd function: the forward pass only compares
``u > sigmoid(-l)``; the soft sample is recomputed in the backward pass from the saved uniforms instead of being kept
in memory.
"""

from __future__ import annotations

from typing import Any

import torch


class _HardConcrete(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, uniforms: torch.Tensor, tau: float) -> torch.Tensor:
        ctx.save_for_backward(logits, uniforms)
        ctx.tau = tau
        threshold = torch.sigmoid(-logits).unsqueeze(-2)
        return (uniforms > threshold).to(logits.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, uniforms = ctx.saved_tensors
        soft = torch.sigmoid((logits.unsqueeze(-2) + torch.logit(uniforms)) / ctx.tau)
        local = soft.mul_(1 - soft).mul_(grad)
        return local.sum(-2) / ctx.tau, None, None


def sample_masks(logits: torch.Tensor, uniforms: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Hard 0/1 mask samples with straight-through gradients to ``logits``.

    Args:
        logits: ``(..., N)`` mask logits.
        uniforms: ``(..., S, N)`` uniform noise in [0, 1), one per sample and element.
        tau: the temperature τ of the soft sample used for the gradient.

    Returns:
        ``(..., S, N)`` tensor of 0.0/1.0 in the dtype of ``logits``; P(1) = sigmoid(logit).

    Example:
        >>> import torch
        >>> logits = torch.zeros(1, 5, requires_grad=True)
        >>> m = sample_masks(logits, torch.rand(1, 3, 5, generator=torch.Generator().manual_seed(0)))
        >>> m.shape, sorted(set(m.flatten().tolist())) <= [0.0, 1.0]
        (torch.Size([1, 3, 5]), True)
    """
    return _HardConcrete.apply(logits, uniforms, tau)


def draw_uniforms(shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniforms from ``generator`` (a CPU generator gives the same stream whatever ``device`` is)."""
    u = torch.rand(shape, generator=generator, device=generator.device)
    return u.to(device, non_blocking=True) if u.device != torch.device(device) else u
