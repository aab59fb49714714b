"""`Mask` and `MaskSet`: the learned binary masks, their set algebra, and their file format.

A `Mask` is one task's subnetwork: ``{weight name: bool tensor}`` over the masked weights. A `MaskSet` holds one
mask per task together with the logits they came from (m = [logit > 0]), the config and seed of the run, the training
curves and the checksum of the model they belong to. Masks save to safetensors, with the metadata as JSON in the
file's header, so a run can be re-analysed without the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidParameterError, ModelLoadError, ModscopeError, UnknownTaskError
from ..fileio import atomic_write, require_file
from ..model import WeightInfo
from .config import MaskConfig

SCHEMA_VERSION = 1


class Mask(Mapping[str, torch.Tensor]):
    """One task's boolean mask over the masked weights.

    ``mask[name]`` is a bool tensor of the weight's shape; True keeps the weight. Masks combine with ``&``, ``|``,
    ``^`` and ``~`` (over the same weights).

    Example:
        >>> import torch
        >>> from modscope.masks.maskset import Mask
        >>> a = Mask({"w": torch.tensor([True, True, False])})
        >>> b = Mask({"w": torch.tensor([True, False, False])})
        >>> (a & b).count(), (a | b).count(), (~a).count(), a.density()
        (1, 2, 1, 0.6666666666666666)
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], layers: Mapping[str, str] | None = None):
        self._tensors = {name: t.to(torch.bool) for name, t in tensors.items()}
        self.layers: dict[str, str] = {n: (layers or {}).get(n, n) for n in self._tensors}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def _combine(self, other: Mask, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Mask:
        if not isinstance(other, Mask):
            return NotImplemented
        if set(self) != set(other):
            raise InvalidParameterError("masks cover different weights; combine masks of the same model and filter")
        return Mask({n: op(t, other[n]) for n, t in self.items()}, self.layers)

    def __and__(self, other: Mask) -> Mask:
        return self._combine(other, torch.logical_and)

    def __or__(self, other: Mask) -> Mask:
        return self._combine(other, torch.logical_or)

    def __xor__(self, other: Mask) -> Mask:
        return self._combine(other, torch.logical_xor)

    def __invert__(self) -> Mask:
        return Mask({n: ~t for n, t in self.items()}, self.layers)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mask):
            return NotImplemented
        return set(self) == set(other) and all(torch.equal(t, other[n]) for n, t in self.items())

    __hash__ = None  # type: ignore[assignment]

    def select(self, patterns: str | tuple[str, ...] | list[str], *, exclude: bool = False) -> Mask:
        """The mask over the weights (or layers) whose name matches any fnmatch pattern (or does not, if exclude)."""
        pats = (patterns,) if isinstance(patterns, str) else tuple(patterns)
        hit = {n for n in self if any(fnmatch(n, p) or fnmatch(self.layers[n], p) for p in pats)}
        keep = [n for n in self if (n in hit) != exclude]
        return Mask({n: self[n] for n in keep}, self.layers)

    def count(self) -> int:
        """How many weights the mask keeps."""
        return sum(int(t.sum()) for t in self.values())

    def numel(self) -> int:
        return sum(t.numel() for t in self.values())

    def density(self) -> float:
        """The fraction of masked weights kept."""
        return self.count() / max(self.numel(), 1)

    def per_layer(self) -> dict[str, tuple[int, int]]:
        """``{layer: (kept, total)}``."""
        out: dict[str, tuple[int, int]] = {}
        for n, t in self.items():
            kept, total = out.get(self.layers[n], (0, 0))
            out[self.layers[n]] = (kept + int(t.sum()), total + t.numel())
        return out

    def density_per_layer(self) -> dict[str, float]:
        return {layer: kept / max(total, 1) for layer, (kept, total) in self.per_layer().items()}

    def __repr__(self) -> str:
        return f"Mask(tensors={len(self)}, kept={self.count():,} of {self.numel():,} weights)"


class MaskSet(Mapping[str, Mask]):
    """One learned mask per task, with the logits, config, seed and training curves of the run.

    Args:
        logits: ``{task: {weight name: float tensor}}``; the mask is ``logits > 0``.
        weights: the `WeightInfo` of every masked weight (gives layers and source names).
        config: the `MaskConfig` the masks were trained with, if any.
        curves: ``{task: {"step": [...], "loss": [...], "density": [...], ...}}``.
        model_checksum: the checksum of the model the masks belong to.

    Example:
        >>> import torch, modscope
        >>> ms = modscope.MaskSet.from_masks({"a": {"w": torch.tensor([True, False])},
        ...                                   "b": {"w": torch.tensor([True, True])}})
        >>> ms.tasks, ms["a"].count(), (ms["a"] & ms["b"]).count()
        (('a', 'b'), 1, 1)
    """

    def __init__(
        self,
        logits: Mapping[str, Mapping[str, torch.Tensor]],
        weights: list[WeightInfo] | tuple[WeightInfo, ...],
        *,
        config: MaskConfig | None = None,
        curves: Mapping[str, Mapping[str, list[float]]] | None = None,
        model_checksum: str = "",
        extra: Mapping[str, Any] | None = None,
    ):
        if not logits:
            raise InvalidParameterError("a MaskSet needs at least one task")
        self.weights = tuple(weights)
        names = [w.name for w in self.weights]
        for task, per_weight in logits.items():
            if list(per_weight) != names:
                raise InvalidParameterError(f"task {task!r}: logits must cover exactly the masked weights, in order")
        self.logits = {t: {n: v.detach().float().cpu() for n, v in lw.items()} for t, lw in logits.items()}
        self.config = config
        self.curves = {t: dict(c) for t, c in (curves or {}).items()}
        self.model_checksum = model_checksum
        self.extra = dict(extra or {})
        self._layers = {w.name: w.layer for w in self.weights}
        self._masks = {t: Mask({n: v > 0 for n, v in lw.items()}, self._layers) for t, lw in self.logits.items()}

    @classmethod
    def from_masks(cls, masks: Mapping[str, Mapping[str, torch.Tensor]], layers: Mapping[str, str] | None = None) -> MaskSet:
        """A MaskSet from hand-made boolean masks (logits ±1), e.g. to analyse masks made elsewhere."""
        first = next(iter(masks.values()))
        weights = [
            WeightInfo(n, tuple(t.shape), "weight", (layers or {}).get(n, n), n) for n, t in first.items()
        ]
        logits = {task: {n: torch.where(t.bool(), 1.0, -1.0) for n, t in m.items()} for task, m in masks.items()}
        return cls(logits, weights)

    # -- mapping of task -> Mask ----------------------------------------------------------------------------------
    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self._masks)

    @property
    def layers(self) -> dict[str, str]:
        """weight name -> layer name."""
        return dict(self._layers)

    def __getitem__(self, task: str) -> Mask:
        try:
            return self._masks[task]
        except KeyError:
            raise UnknownTaskError(f"no mask for task {task!r}; the tasks are {list(self._masks)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def subset(self, tasks: list[str] | tuple[str, ...]) -> MaskSet:
        return self._derive({t: self.logits[t] for t in tasks if self[t] is not None})

    def _derive(self, logits: Mapping[str, Mapping[str, torch.Tensor]]) -> MaskSet:
        return MaskSet(logits, self.weights, config=self.config, curves={t: self.curves[t] for t in logits if t in self.curves},
                       model_checksum=self.model_checksum, extra=self.extra)

    def _apply(self, other: MaskSet | None, op: Callable[..., Mask]) -> MaskSet:
        out = {}
        for t in self.tasks:
            mask = op(self[t]) if other is None else op(self[t], other[t])
            out[t] = {n: torch.where(m, 1.0, -1.0) for n, m in mask.items()}
        return self._derive(out)

    def __and__(self, other: MaskSet) -> MaskSet:
        return self._apply(other, Mask.__and__)

    def __or__(self, other: MaskSet) -> MaskSet:
        return self._apply(other, Mask.__or__)

    def __invert__(self) -> MaskSet:
        return self._apply(None, Mask.__invert__)

    def counts(self) -> dict[str, dict[str, int]]:
        """``{task: {layer: kept}}``."""
        return {t: {layer: kept for layer, (kept, _) in m.per_layer().items()} for t, m in self._masks.items()}

    def density(self) -> dict[str, float]:
        return {t: m.density() for t, m in self._masks.items()}

    def density_per_layer(self) -> dict[str, dict[str, float]]:
        return {t: m.density_per_layer() for t, m in self._masks.items()}

    # -- files ------------------------------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "tasks": list(self.tasks),
            "weights": [asdict(w) for w in self.weights],
            "config": self.config.to_dict() if self.config else None,
            "seed": self.config.seed if self.config else None,
            "model_checksum": self.model_checksum,
            "curves": self.curves,
            "extra": self.extra,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the logits to a safetensors file with the metadata as JSON (atomically: temp file, then rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {f"{i}/{j}": self.logits[t][w.name].contiguous() for i, t in enumerate(self.tasks) for j, w in enumerate(self.weights)}
        with atomic_write(path) as tmp:
            save_file(tensors, str(tmp), metadata={"modscope": json.dumps(self.metadata())})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> MaskSet:
        """Read a file written by `save`."""
        from safetensors import safe_open

        path = Path(path)
        require_file(path, "mask file")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["modscope"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt or foreign file
            raise ModelLoadError(f"{path} is not a modscope mask file (it cannot be read: {exc})") from exc
        if not isinstance(meta, dict):
            raise ModelLoadError(f"{path} is not a modscope mask file (its metadata is a {type(meta).__name__}, not an object)")
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise ModelLoadError(f"{path} has mask schema {meta.get('schema_version')}, this modscope reads {SCHEMA_VERSION}")
        try:  # any missing key or value of the wrong type means a damaged or crafted file (issue: one sentence)
            weights = [WeightInfo(w["name"], tuple(w["shape"]), w["kind"], w["layer"], w["source_name"]) for w in meta["weights"]]
            logits = {t: {w.name: tensors[f"{i}/{j}"] for j, w in enumerate(weights)} for i, t in enumerate(meta["tasks"])}
            _check_loaded(meta, weights, logits)
            config = MaskConfig.from_dict(meta["config"]) if meta.get("config") else None
            return cls(logits, weights, config=config, curves=meta.get("curves"),
                       model_checksum=meta.get("model_checksum", ""), extra=meta.get("extra"))
        except ModscopeError as exc:
            raise ModelLoadError(f"{path} is a damaged modscope mask file ({exc})") from exc
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RecursionError) as exc:
            what = f"no entry {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            raise ModelLoadError(f"{path} is a damaged modscope mask file ({what}); make it again with `modscope fit`") from exc

    def __repr__(self) -> str:
        dens = ", ".join(f"{t}={d:.3f}" for t, d in self.density().items())
        return f"MaskSet(tasks={list(self.tasks)}, weight_tensors={len(self.weights)}, kept fraction: {dens})"


def _check_loaded(meta: dict[str, Any], weights: list[WeightInfo], logits: dict[Any, dict[str, torch.Tensor]]) -> None:
    """Raise ValueError unless a mask file's metadata agrees with its tensors (the caller words the error)."""
    if not isinstance(meta["tasks"], list) or not all(isinstance(t, str) for t in meta["tasks"]):
        raise ValueError("its tasks are not a list of names")
    if not isinstance(meta.get("model_checksum", ""), str):
        raise ValueError("its model checksum is not a string")
    for per_weight in logits.values():
        for w in weights:
            t = per_weight[w.name]
            if tuple(t.shape) != tuple(w.shape) or not t.is_floating_point():
                raise ValueError(f"the logits of {w.name} are {tuple(t.shape)} {t.dtype}, not {tuple(w.shape)} floats")
