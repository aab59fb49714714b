"""`MaskConfig`: every setting of the mask learner, with the paper's values as defaults.

The paper's values are those of Csordás et al. (ICLR 2021), see docs/method.md sections 2-4 and
8. Vary a config with ``dataclasses.replace`` and record it with ``dataclasses.asdict``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from ..errors import InvalidParameterError


@dataclass(frozen=True)
class MaskConfig:
    """Settings of `train_masks`.

    Example:
        >>> from modscope import MaskConfig
        >>> MaskConfig(n_steps=500, seed=1).alpha    # beta / batch_size, the per-logit penalty
        7.8125e-07
    """

    n_steps: int = 20_000
    """Training steps per mask. Paper: 20,000 (add/mul, double addition, CIFAR), 25,000 (SCAN)."""
    n_samples: int = 4
    """Mask samples per step; the batch is split into this many contiguous chunks, one sample each. Paper: 4."""
    batch_size: int = 128
    """Examples per step (per task). Paper: 128."""
    lr: float = 1e-2
    """Adam learning rate on the mask logits. Paper: 1e-2 (CIFAR 1e-3)."""
    init: float = 2.0
    """Initial logit of every mask element (keep probability sigmoid(2) = 0.88). Paper: 2.0."""
    tau: float = 1.0
    """Gumbel-sigmoid temperature. Paper: 1."""
    beta: float = 1e-4
    """Sparsity regularizer weight β; the loss adds (β / penalty_batch_size) · Σ logits. Paper: 1e-4."""
    penalty_batch_size: int | None = None
    """The b in β/b; ``None`` uses batch_size (the paper divides by the base-training batch size, 128)."""
    grad_clip: float | None = 1.0
    """Global-norm clip of each task's mask gradients (mask gradients only, not frozen weights). Paper: 1.0."""
    mask_biases: bool = False
    """Whether biases get masks. Paper: no for add/mul, tuples, SCAN; yes for CIFAR."""
    mask_embeddings: bool = False
    """Whether embedding tables get masks. Paper: never."""
    mask_norms: bool = True
    """Whether normalization scales get masks. Paper: yes (LayerNorm and BatchNorm weights are masked)."""
    include: tuple[str, ...] = ()
    """fnmatch patterns of weight names (torch or source names) to mask; empty means all that the flags allow."""
    exclude: tuple[str, ...] = ()
    """fnmatch patterns of weight names never to mask."""
    freeze: tuple[str, ...] = ()
    """fnmatch patterns of masked weights whose logits stay at their initial value (paper: CIFAR keep_last_layer)."""
    seed: int = 0
    """Seeds the mask noise and the order of examples. The paper fixes no global seed (it runs 10 seeds)."""
    device: str | None = None
    """"cuda", "cpu" ...; ``None`` picks cuda when present."""
    vectorize: Literal["auto", "vmap", "loop"] = "auto"
    """How the K tasks x S samples run: one torch.func.vmap call, or a loop (for ops without a batching rule)."""
    compile: bool | None = None
    """Fuse the mask sampler's element-wise work with torch.compile. ``None``: on a GPU for runs of >= 1000 steps; never
    on a CPU, where the eager step (cache-sized blocks, reused buffers) is as fast and needs no compilation."""
    max_memory: int | str | None = None
    """Peak memory the run may use (bytes, or a size like "12GB"): process RSS on a CPU, allocated memory on a GPU.
    ``None``: what the process holds plus 90% of the free memory. The step is split into passes that fit (same
    masks); see `modscope.masks.memory`."""
    pass_size: int | None = None
    """(task, sample) pairs per forward pass; ``None`` lets the memory plan choose (same masks either way)."""
    threads: int | None = None
    """CPU threads for torch while masks train. ``None``: ``$OMP_NUM_THREADS`` if set, else the usable cores that are
    idle when training starts and not claimed by other modscope runs, adjusted while they start and end (torch's
    default of one thread per core stalls when another job holds a core); see `modscope.threads`. Not part of the method: it never changes the masks."""
    train_mode: bool = False
    """Run the frozen network in train mode (dropout, batch statistics). Paper: eval mode (except SCAN-LSTM)."""
    log_every: int = 50
    """Steps between two points of the training curves."""

    def __post_init__(self) -> None:
        positive = ("n_steps", "n_samples", "batch_size", "log_every")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidParameterError(f"MaskConfig.{name} must be a positive integer, got {value!r}")
        if self.batch_size % self.n_samples:
            raise InvalidParameterError(
                f"MaskConfig.batch_size ({self.batch_size}) must be divisible by n_samples ({self.n_samples}), "
                "since each mask sample gets an equal slice of the batch"
            )
        for name in ("lr", "tau"):
            if not getattr(self, name) > 0:
                raise InvalidParameterError(f"MaskConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.beta < 0:
            raise InvalidParameterError(f"MaskConfig.beta must be >= 0, got {self.beta!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise InvalidParameterError(f"MaskConfig.grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if self.vectorize not in ("auto", "vmap", "loop"):
            raise InvalidParameterError(f"MaskConfig.vectorize must be 'auto', 'vmap' or 'loop', got {self.vectorize!r}")
        for name in ("pass_size", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise InvalidParameterError(f"MaskConfig.{name} must be a positive integer or None, got {value!r}")
        from .memory import parse_bytes

        limit = parse_bytes(self.max_memory)
        if limit is not None and limit < 1:
            raise InvalidParameterError(f"MaskConfig.max_memory must be positive, got {self.max_memory!r}")
        for name in ("include", "exclude", "freeze"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif not all(isinstance(v, str) for v in value):
                raise InvalidParameterError(f"MaskConfig.{name} must be a tuple of name patterns, got {value!r}")
            else:
                object.__setattr__(self, name, tuple(value))

    def use_compile(self, device: str | Any = "cpu") -> bool:
        """Whether the sampler is compiled on ``device`` (``compile``, or for ``None``: GPU runs of 1000+ steps).

        Example:
            >>> MaskConfig(n_steps=5000).use_compile("cpu"), MaskConfig(n_steps=5000).use_compile("cuda")
            (False, True)
        """
        if self.compile is not None:
            return self.compile
        return str(device).startswith("cuda") and self.n_steps >= 1000

    @property
    def alpha(self) -> float:
        """The per-logit penalty gradient β / b (the paper's α)."""
        return self.beta / (self.penalty_batch_size or self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MaskConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidParameterError(f"unknown MaskConfig fields {unknown}; known: {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)
