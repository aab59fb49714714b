"""`evaluate`: a task's metric on the frozen model with a mask's weights kept, or removed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .devices import resolve_device
from .errors import InvalidParameterError
from .model import Model
from .tasks import Task


def masked_parameters(
    model: Model, mask: Mapping[str, torch.Tensor] | None, *, invert: bool = False, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """The model's weights with those outside ``mask`` zeroed (or, with ``invert``, exactly those inside it).

    Weights that the mask does not cover (e.g. unmasked biases) are kept as they are.
    """
    params = model.parameters(device)
    if mask is None:
        return params
    unknown = [n for n in mask if n not in params]
    if unknown:
        raise InvalidParameterError(f"the mask covers weights the model does not have: {unknown[:3]}; was it trained on another model?")
    out = dict(params)
    for name, keep in mask.items():
        keep = keep.to(device=params[name].device, dtype=torch.bool)
        if keep.shape != params[name].shape:
            raise InvalidParameterError(f"mask for {name!r} has shape {tuple(keep.shape)}, the weight {tuple(params[name].shape)}")
        out[name] = params[name] * (~keep if invert else keep).to(params[name].dtype)
    return out


def predict(
    model: Model | torch.nn.Module,
    task: Task,
    mask: Mapping[str, torch.Tensor] | None = None,
    invert: bool = False,
    *,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """The model's selected outputs on all of the task's examples, with ``mask`` applied as in `evaluate`."""
    model = Model.of(model)
    dev = resolve_device(device)
    params = masked_parameters(model, mask, invert=invert, device=dev)
    chunks = []
    with model.frozen(dev) as module, torch.no_grad():
        for start in range(0, len(task), batch_size):
            index = torch.arange(start, min(start + batch_size, len(task)))
            xs, _ = task.batch(index, dev)
            out: Any = model.run(module, params, xs, task.input_names)
            chunks.append(pytree.tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, task.select_output(out)))
    return torch.cat(chunks)


def evaluate(
    model: Model | torch.nn.Module,
    task: Task,
    mask: Mapping[str, torch.Tensor] | None = None,
    invert: bool = False,
    *,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
) -> float:
    """The task's metric with only the mask's weights kept (or, with ``invert=True``, with exactly them removed).

    Args:
        model: a `Model` or torch module (never modified).
        task: the task whose data and metric are used (all of its examples).
        mask: a `Mask` (``masks["task"]``) or ``{weight name: bool tensor}``; ``None`` evaluates the full model.
        invert: remove the mask's weights instead of keeping only them.
        batch_size: examples per forward pass.
        device: where to run; cuda when present by default.

    Returns:
        The metric (accuracy by default) as a float.

    Example:
        >>> import torch, modscope
        >>> net = torch.nn.Linear(2, 2)
        >>> task = modscope.Task("t", torch.eye(2), torch.tensor([0, 1]))
        >>> modscope.evaluate(net, task, mask={"weight": torch.zeros(2, 2, dtype=torch.bool)}, invert=True) == modscope.evaluate(net, task)
        True
    """
    outputs = predict(model, task, mask, invert, batch_size=batch_size, device=device)
    return task.compute_metric(outputs, task.targets)
