"""The mask sampler's element-wise arithmetic as plain torch operations: the reference the faster paths match.

`sampling.SamplerKernels` compiles these (or runs them eagerly), `sampling.StepBuffers` runs the same operations in
place, and `native` checks its C kernels against them bit for bit.
"""

from __future__ import annotations

import torch

LOGIT_CLAMP = 40.0  # beyond |l| = 40 the soft sample's derivative is below 1e-10 for any float32 uniform


def keep_weights(logits: torch.Tensor, uniforms: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """W where u > sigmoid(-l), else 0: ``logits`` (K, 1, n), ``uniforms`` (K, S, n), ``weight`` (n,)."""
    return torch.where(uniforms > torch.sigmoid(-logits), weight, 0)


def logit_grad(logits: torch.Tensor, uniforms: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, tau: float) -> torch.Tensor:
    """Σ_s grad · W · ds/dl: the straight-through gradient of the logits (K, n); written out-of-place to fuse."""
    if tau == 1.0:
        e = torch.exp(-logits.clamp(-LOGIT_CLAMP, LOGIT_CLAMP))
        other = (1 - uniforms) * e
        denom = other + uniforms
        local = other * uniforms / (denom * denom)
    else:
        soft = torch.sigmoid((logits + torch.logit(uniforms)) / tau)
        local = soft * (1 - soft) / tau
    return (local * grad * weight).sum(1)
