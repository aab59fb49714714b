"""The ablation **drop**, defined once: how much a task's metric falls when weights are removed.

Plain Python (no NumPy, no torch), so that `modscope check` and policies read it without loading either.
"""

from __future__ import annotations


def relative_drop(full: float | None, ablated: float | None, higher_is_better: bool = True) -> float | None:
    """The drop of a task's metric relative to the full model.

    ``(full - ablated) / |full|`` for metrics where higher is better (accuracy), ``(ablated - full) / |full|`` for
    error metrics (mse); the absolute change when ``full`` is 0. Positive means worse: 0.9 is "lost 90 % of its
    accuracy", 0 "unaffected", a negative value "improved". The report's "Relative drop" table and plot,
    `AblationResult.drop` and the ``drop`` rule of a policy all use this definition.

    Args:
        full: the metric with the full model.
        ablated: the metric with the weights removed.
        higher_is_better: whether the metric is better high (accuracy) or low (mse).

    Returns:
        The drop; None when either value is None (not measured).

    Example:
        >>> relative_drop(0.98, 0.49), relative_drop(0.25, 0.75, higher_is_better=False), relative_drop(None, 0.5)
        (0.5, 2.0, None)
    """
    if full is None or ablated is None:
        return None
    change = full - ablated if higher_is_better else ablated - full
    return change / abs(full) if full else change


__all__ = ["relative_drop"]
