"""`Task`: what a mask is trained for — data, a loss, a metric, and which model output to read.

Losses (``loss=``):
    - ``"ce"``: cross-entropy with the classes on the **last** axis of the output: logits ``(N, ..., C)`` and integer
      targets ``(N, ...)``; mean over all positions.
      Targets are integers in ``[0, C)``; ``-100`` (`CE_IGNORE_INDEX`, torch's ``ignore_index`` default) marks
      positions that do not count.
    - ``"seq_ce"``: the same for padded sequences: positions whose target is ``-1`` (`IGNORE_INDEX`, the padding)
      or ``-100`` (the label padding of Hugging Face tokenizers and collators) are ignored; the loss is the sum over positions divided by the number of sequences (the paper's SCAN loss).
      Other targets are integers in ``[0, C)``.
    - ``"bce"``: binary cross-entropy on logits, targets of the output's shape.
    - ``"mse"``: mean squared error.
    - a callable ``loss(outputs, targets) -> scalar tensor`` (mean over the batch).

Metrics (``metric=``): ``"accuracy"`` (default for the classification losses; an example counts as correct only if
all of its real positions are: ignored positions do not count), ``"mse"`` (default for ``"mse"``; lower is better), or a callable
``metric(outputs, targets) -> float`` over the whole evaluation set (higher is better unless ``higher_is_better``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError, InvalidParameterError

LossName = Literal["ce", "seq_ce", "bce", "mse"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MetricFn = Callable[[torch.Tensor, torch.Tensor], float]
#: the target value ``seq_ce`` ignores (sequence padding).
IGNORE_INDEX = -1
#: the target value ``ce`` ignores (``torch.nn.functional.cross_entropy``'s default ``ignore_index``).
CE_IGNORE_INDEX = -100
#: the ignore index of each class loss.
CLASS_IGNORE = {"ce": CE_IGNORE_INDEX, "seq_ce": IGNORE_INDEX}


def check_class_targets(targets: torch.Tensor, loss: str, task: str, n_classes: int | None = None) -> torch.Tensor:
    """Class targets as ``long``, after checking they are integers in ``[0, n_classes)`` or the loss's ignore index.

    Raises:
        DataError: booleans, fractional values, or class ids out of range (the message names one).

    Example:
        >>> check_class_targets(torch.tensor([0., 2., -100.]), "ce", "t", 3).tolist()
        [0, 2, -100]
    """
    if targets.dtype == torch.bool:
        raise DataError(f"task {task!r}: loss {loss!r} needs integer class targets, got booleans; "
                        "convert them to 0/1 or use --loss bce")
    if targets.is_floating_point() or targets.is_complex():
        if targets.is_complex() or not torch.equal(targets, targets.round()):
            raise DataError(f"task {task!r}: loss {loss!r} needs integer class targets, got fractional values")
    targets = targets.long()
    ignore = CLASS_IGNORE[loss]
    bad = (targets < 0) & (targets != ignore) & ~((targets == CE_IGNORE_INDEX) & (loss == "seq_ce"))
    if n_classes is not None:
        bad |= targets >= n_classes
    if bool(bad.any()):
        value = int(targets[bad].reshape(-1)[0])
        top = f"[0, {n_classes})" if n_classes is not None else "0 or more"
        raise DataError(f"task {task!r}: class target {value} is out of range: loss {loss!r} takes classes {top} "
                        f"and {ignore}{' or -100' if loss == 'seq_ce' else ''} for positions to ignore")
    return targets


def _as_tensor(value: Any, what: str, task: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        array = np.asarray(value)
    except Exception as exc:  # noqa: BLE001 - any conversion failure is a data error
        raise DataError(f"task {task!r}: {what} cannot be read as an array ({exc})") from exc
    if array.dtype == object:
        raise DataError(f"task {task!r}: {what} is not a numeric array (got dtype object); pass numbers")
    return torch.from_numpy(np.ascontiguousarray(array))


def _check_finite(t: torch.Tensor, what: str, task: str) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        n = int((~torch.isfinite(t)).sum())
        raise DataError(f"task {task!r}: {what} contains {n} NaN or infinite values; clean or drop those examples")


def _accuracy(outputs: torch.Tensor, targets: torch.Tensor, kind: str) -> float:
    if kind == "bce":
        correct = (outputs > 0) == (targets > 0.5)
    else:
        correct = outputs.argmax(-1) == targets
        if kind in CLASS_IGNORE:
            correct = correct | (targets == CLASS_IGNORE[kind]) | (targets == CE_IGNORE_INDEX)
    correct = correct.reshape(correct.shape[0], -1).all(dim=1)
    return float(correct.float().mean())


def _mse(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return float(F.mse_loss(outputs.float(), targets.float()))


def _ce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1).long())


def _seq_ce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    targets = targets.reshape(-1).long()
    targets = torch.where(targets == CE_IGNORE_INDEX, IGNORE_INDEX, targets)  # both paddings are ignored
    total = F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / outputs.shape[0]


def _bce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(outputs, targets.to(outputs.dtype))


def _mse_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(outputs, targets.to(outputs.dtype))


_LOSSES: dict[str, LossFn] = {"ce": _ce, "seq_ce": _seq_ce, "bce": _bce, "mse": _mse_loss}


@dataclass(eq=False)
class Task:
    """A sub-task to find the weights of.

    Args:
        name: a short identifier ("add", "class_3" ...), unique among the tasks trained together.
        x: the inputs: an array or tensor ``(N, ...)``, a tuple of them for models with several inputs (passed
            positionally), a mapping of named inputs (passed as keyword arguments, e.g. ``{"input_ids": ...,
            "attention_mask": ...}`` for a transformers model; all of one length ``N``), or a
            ``torch.utils.data.Dataset`` whose items are ``(x, y)`` (then ``y`` must be omitted).
        y: the targets ``(N, ...)``.
        loss: "ce", "seq_ce", "bce", "mse" or a callable ``loss(outputs, targets) -> scalar tensor``.
        metric: "accuracy", "mse" or a callable ``metric(outputs, targets) -> float``; by default accuracy for
            classification losses and mse for "mse".
        output: which model output to read when the model returns several: an index into a tuple/list or a key
            into a dict (a transformers model's outputs are a dict such as ``{"logits": ...}``). ``None`` takes the
            output as it is, or the only entry (or ``"logits"``) of a dict.
        higher_is_better: whether a larger metric is better; derived from the metric when omitted.

    Raises:
        DataError: empty data, mismatched lengths, NaN or infinite values, missing targets.
        InvalidParameterError: an empty name or an unknown loss or metric name.

    Example:
        >>> import torch, modscope
        >>> task = modscope.Task("parity", torch.randn(8, 3), torch.randint(0, 2, (8,)), loss="ce")
        >>> len(task), task.metric_name
        (8, 'accuracy')
    """

    name: str
    x: Any
    y: Any = None
    loss: LossName | LossFn = "ce"
    metric: Literal["accuracy", "mse"] | MetricFn | None = None
    output: int | str | None = None
    higher_is_better: bool | None = None
    inputs: tuple[torch.Tensor, ...] = field(init=False, repr=False)
    #: the keyword names of the last ``len(input_names)`` inputs (all of them for a mapping; none for positional).
    input_names: tuple[str, ...] = field(init=False, repr=False, default=())
    targets: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise InvalidParameterError("a task needs a non-empty name, e.g. Task('add', x, y)")
        if isinstance(self.loss, str) and self.loss not in _LOSSES:
            raise InvalidParameterError(f"task {self.name!r}: unknown loss {self.loss!r}; use one of {sorted(_LOSSES)} or a callable")
        if self.metric is None:
            self.metric = "mse" if self.loss == "mse" else "accuracy"
        if isinstance(self.metric, str) and self.metric not in ("accuracy", "mse"):
            raise InvalidParameterError(f"task {self.name!r}: unknown metric {self.metric!r}; use 'accuracy', 'mse' or a callable")
        if self.higher_is_better is None:
            self.higher_is_better = self.metric != "mse"
        self.inputs, self.targets = self._read_data()

    def _read_data(self) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        x, y = self.x, self.y
        if isinstance(x, torch.utils.data.Dataset) and not isinstance(x, torch.Tensor):
            if y is not None:
                raise InvalidParameterError(f"task {self.name!r}: a Dataset carries its own targets; omit y")
            x, y = _collate_dataset(x, self.name)
        if y is None:
            raise DataError(f"task {self.name!r} has no targets; pass y (or a Dataset of (x, y) pairs)")
        if isinstance(x, Mapping):
            if not x or not all(isinstance(k, str) and k.isidentifier() for k in x):
                raise DataError(f"task {self.name!r}: named inputs need at least one entry, each keyed by an argument "
                                f"name of the model (got keys {list(x)[:5]})")
            self.input_names = tuple(x)
            xs = tuple(x.values())
        else:
            xs = tuple(x) if isinstance(x, tuple | list) and not _is_numeric_list(x) else (x,)
        labels = self.input_names or tuple(f"input {i}" for i in range(len(xs)))
        inputs = tuple(_as_tensor(v, label, self.name) for label, v in zip(labels, xs))
        targets = _as_tensor(y, "targets", self.name)
        lengths = {len(t) if t.dim() else 0 for t in inputs} | {len(targets) if targets.dim() else 0}
        if 0 in lengths:
            raise DataError(f"task {self.name!r} has no examples; pass at least one (x, y) pair")
        if len(lengths) > 1:
            sizes = [len(t) for t in inputs] + [len(targets)]
            raise DataError(f"task {self.name!r}: inputs and targets have different lengths {sizes}; they must all have one row per example")
        for label, t in zip(labels, inputs):
            _check_finite(t, label, self.name)
        _check_finite(targets, "targets", self.name)
        if self.loss in CLASS_IGNORE:
            targets = check_class_targets(targets, self.loss, self.name)
        elif self.loss == "mse" and targets.dtype == torch.bool:
            raise DataError(f"task {self.name!r}: loss 'mse' needs numeric targets, got booleans; use --loss bce")
        return inputs, targets

    # -- used by the trainer and evaluation ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.targets)

    @property
    def metric_name(self) -> str:
        return self.metric if isinstance(self.metric, str) else getattr(self.metric, "__name__", "metric")

    def loss_fn(self) -> LossFn:
        return _LOSSES[self.loss] if isinstance(self.loss, str) else self.loss

    def compute_metric(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        if self.metric == "accuracy":
            kind = self.loss if isinstance(self.loss, str) else "ce"
            return _accuracy(outputs, targets, kind)
        if self.metric == "mse":
            return _mse(outputs, targets)
        return float(self.metric(outputs, targets))  # type: ignore[operator]

    def select_output(self, outputs: Any) -> torch.Tensor:
        if self.output is None:
            if isinstance(outputs, tuple | list) and len(outputs) != 1:
                raise InvalidParameterError(
                    f"task {self.name!r}: the model returns {len(outputs)} outputs; pick one with Task(..., output=INDEX)"
                )
            if isinstance(outputs, Mapping):
                return _only_output(outputs, self.name)
            return outputs[0] if isinstance(outputs, tuple | list) else outputs
        try:
            return outputs[self.output]
        except (IndexError, KeyError, TypeError) as exc:
            raise InvalidParameterError(f"task {self.name!r}: the model has no output {self.output!r}") from exc

    def batch(self, index: torch.Tensor, device: torch.device | str | None = None) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The examples at ``index`` (inputs, targets), on ``device``."""
        xs = tuple(t[index].to(device) for t in self.inputs)
        return xs, self.targets[index].to(device)

    def signature(self) -> tuple[Any, ...]:
        """Per-example input shapes and dtypes and the input names; tasks with equal signatures are batched together."""
        return (*((tuple(t.shape[1:]), t.dtype) for t in self.inputs), self.input_names)


def split_inputs(xs: Sequence[Any], names: Sequence[str]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(positional, keyword)`` call arguments: the last ``len(names)`` of ``xs`` are passed by those names.

    Example:
        >>> split_inputs((1, 2, 3), ("attention_mask",))
        ((1, 2), {'attention_mask': 3})
    """
    n = len(xs) - len(names)
    return tuple(xs[:n]), dict(zip(names, xs[n:]))


def _only_output(outputs: Mapping[str, Any], task: str) -> Any:
    if len(outputs) == 1:
        return next(iter(outputs.values()))
    if "logits" in outputs:
        return outputs["logits"]
    raise InvalidParameterError(
        f"task {task!r}: the model returns several outputs {list(outputs)}; pick one with Task(..., output=NAME)"
    )


def _is_numeric_list(x: Sequence[Any]) -> bool:
    return bool(x) and not isinstance(x[0], torch.Tensor | np.ndarray | list | tuple)


def _collate_dataset(ds: torch.utils.data.Dataset, name: str) -> tuple[Any, Any]:
    try:
        n = len(ds)  # type: ignore[arg-type]
    except TypeError as exc:
        raise DataError(f"task {name!r}: the Dataset has no length; modscope needs a map-style Dataset") from exc
    if n == 0:
        raise DataError(f"task {name!r} has no examples; the Dataset is empty")
    items = [ds[i] for i in range(n)]
    if not all(isinstance(it, tuple | list) and len(it) == 2 for it in items[:1]):
        raise DataError(f"task {name!r}: Dataset items must be (x, y) pairs")
    batch = torch.utils.data.default_collate(items)
    return batch[0], batch[1]
