"""Whether a run's masks have converged: is each task's mask density still falling at the end of training?

The sparsity penalty (paper, section 2) keeps pushing down the logits of every weight a task does not need, so the
density of a mask (the fraction of weights with logit > 0) falls until only the needed weights are left, then stays
flat. A run stopped while the density is still falling gives masks that hold weights the task does not need, which
inflates sharing and IoU. The check reads the density curve recorded during training (a point every
``MaskConfig.log_every`` steps) and compares the last tenth of the run with the rest:

- the *tail* starts at the last recorded point at or before 90 % of the steps (so it covers at least the last
  tenth) and ends at the final point;
- a task is **still falling** when its density fell over the tail by more than ``threshold`` (default 1 %) of the
  density at the start of the tail, or when the tail holds more than half of the whole run's fall (the density
  has only just begun to fall, as in a short run that ends at density 0.999), or when the mask still keeps every
  weight at the end (nothing pruned yet: the logits have not come down from their initial value to 0);
- a curve with fewer than two points cannot be judged and is not flagged.

Measured on a 3-layer MLP with three tasks and the paper's defaults: the density fell by 1.1-1.3 % over the last
tenth of a 1,000-step run and by 2.6-3.1 % over that of a 3,000-step run, so both are flagged; a run whose density
is flat at the end (a high learning rate or sparsity weight) is not.

Example:
    >>> curves = {"a": {"step": [100, 200, 300, 400], "density": [0.9, 0.7, 0.5, 0.3]},
    ...           "b": {"step": [100, 200, 300, 400], "density": [0.5, 0.31, 0.3, 0.3]}}
    >>> check = check_convergence(curves)
    >>> check.converged, check.not_converged
    (False, ('a',))
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

#: the fraction of the steps at the end of a run that the check looks at.
TAIL_FRACTION = 0.1
#: a relative density fall over the tail above this means the masks are still changing.
THRESHOLD = 0.01
#: a tail holding more than this share of the run's whole fall means the density has only begun to fall.
TAIL_SHARE = 0.5


@dataclass(frozen=True)
class ConvergenceCheck:
    """The convergence verdict of one run.

    Attributes:
        tail_fall: ``{task: relative density fall over the tail}`` (None when the curve is too short to judge).
        not_converged: the tasks whose density was still falling at the end, in the run's order.
        threshold: the relative fall that counts as still falling.
        tail_fraction: the fraction of the steps at the end that was looked at.
        n_steps: the last recorded step.
        unpruned: the tasks among ``not_converged`` whose mask still kept every weight at the end.
    """

    tail_fall: dict[str, float | None]
    not_converged: tuple[str, ...]
    threshold: float = THRESHOLD
    tail_fraction: float = TAIL_FRACTION
    n_steps: int = 0
    unpruned: tuple[str, ...] = ()

    @property
    def converged(self) -> bool:
        """True when no task's density was still falling at the end of the run."""
        return not self.not_converged

    def message(self) -> str:
        """One sentence naming the tasks that did not converge and what to do; empty when all converged."""
        if self.converged:
            return ""
        parts = []
        falling = [t for t in self.not_converged if t not in self.unpruned]
        if falling:
            falls = ", ".join(_describe(t, self.tail_fall.get(t)) for t in falling)
            parts.append(f"the masks of {falls} were still shrinking at the end of training (density change over the "
                         f"last {self.tail_fraction:.0%} of the {self.n_steps} steps; converged masks change by less "
                         f"than {self.threshold:.0%}): they may hold weights their task does not need")
        if self.unpruned:
            names = ", ".join(repr(t) for t in self.unpruned)
            parts.append(f"the masks of {names} still keep every weight after {self.n_steps} steps: the training "
                         "has not pruned anything yet")
        return "; ".join(parts) + "; " + (
            _HINT.get() or f"train longer, e.g. MaskConfig(n_steps={2 * self.n_steps}) or `--n-steps {2 * self.n_steps}`")

    def to_dict(self) -> dict[str, Any]:
        return {"converged": self.converged, "not_converged": list(self.not_converged), "tail_fall": dict(self.tail_fall),
                "threshold": self.threshold, "tail_fraction": self.tail_fraction, "n_steps": self.n_steps,
                "unpruned": list(self.unpruned)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConvergenceCheck:
        return cls(dict(data["tail_fall"]), tuple(data["not_converged"]), float(data["threshold"]),
                   float(data["tail_fraction"]), int(data["n_steps"]), tuple(data.get("unpruned") or ()))


def _describe(task: str, fall: float | None) -> str:
    return f"{task!r}" if not fall else f"{task!r} (density -{fall:.1%})"


def _tail_fall(steps: Sequence[float], density: Sequence[float], tail_fraction: float) -> tuple[float, float] | None:
    """(relative fall over the tail, the tail's share of the whole fall), None when there are too few points."""
    if len(steps) < 2 or len(steps) != len(density):
        return None
    cut = steps[-1] * (1 - tail_fraction)
    start = max((i for i, s in enumerate(steps) if s <= cut), default=0)
    if start == len(steps) - 1:
        return None
    fall = density[start] - density[-1]
    whole = max(density) - density[-1]
    relative = fall / density[start] if density[start] > 0 else 0.0
    return relative, (fall / whole if whole > 0 else 0.0)


def check_convergence(curves: Mapping[str, Mapping[str, Sequence[float]]], *, threshold: float = THRESHOLD,
                      tail_fraction: float = TAIL_FRACTION) -> ConvergenceCheck:
    """Judge whether each task's mask density had stopped falling at the end of training.

    Args:
        curves: the run's training curves, ``{task: {"step": [...], "density": [...], ...}}`` (`MaskSet.curves`).
        threshold: the relative density fall over the tail above which a task counts as still falling (default 0.01).
        tail_fraction: the fraction of the steps at the end to look at (default 0.1).

    Returns:
        A `ConvergenceCheck`.
    """
    falls: dict[str, float | None] = {}
    flagged, unpruned = [], []
    last = 0
    for task, curve in curves.items():
        steps, density = list(curve.get("step") or []), list(curve.get("density") or [])
        if steps:
            last = max(last, int(steps[-1]))
        judged = _tail_fall(steps, density, tail_fraction)
        falls[task] = None if judged is None else judged[0]
        if judged is None:
            continue
        if density[-1] >= 1:
            unpruned.append(task)
        if density[-1] >= 1 or (judged[0] > 0 and (judged[0] > threshold or judged[1] > TAIL_SHARE)):
            flagged.append(task)
    return ConvergenceCheck(falls, tuple(flagged), threshold, tail_fraction, last, tuple(unpruned))


_HINT: ContextVar[str | None] = ContextVar("convergence_hint", default=None)


@contextmanager
def convergence_hint(hint: str) -> Iterator[None]:
    """Inside this block the warning ends with ``hint`` instead of the `MaskConfig`/`--n-steps` advice (for callers,
    such as `modscope reproduce`, whose users set the steps another way).

    Example:
        >>> with convergence_hint("run without --quick"):
        ...     check_convergence({"a": {"step": [1, 2], "density": [0.9, 0.5]}}).message().endswith("without --quick")
        True
    """
    token = _HINT.set(hint)
    try:
        yield
    finally:
        _HINT.reset(token)


def warn_if_unconverged(curves: Mapping[str, Mapping[str, Sequence[float]]], *, stacklevel: int = 3) -> ConvergenceCheck:
    """`check_convergence` with a `ModscopeWarning` naming the tasks whose masks were still shrinking."""
    import warnings

    from ..errors import ModscopeWarning

    result = check_convergence(curves)
    if not result.converged:
        warnings.warn(result.message(), ModscopeWarning, stacklevel=stacklevel)
    return result


__all__ = ["TAIL_FRACTION", "THRESHOLD", "ConvergenceCheck", "check_convergence", "convergence_hint",
           "warn_if_unconverged"]
