"""`Model`: a frozen torch module plus the registry of its maskable weights.

Every loader (in-memory module, ONNX file, torch checkpoint) ends in a `Model`. modscope never mutates the module it
was given: weights are substituted per call with `torch.func.functional_call`, and the evaluation-mode switch used
while training masks is undone in a ``finally`` block.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .batchable import batchable_layers
from .errors import InvalidParameterError
from .tasks import split_inputs

WeightKind = Literal["weight", "bias", "norm", "embedding"]

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


@dataclass(frozen=True)
class WeightInfo:
    """One float parameter of the model.

    Attributes:
        name: the parameter's name in the torch module (the key for `functional_call`).
        shape: its shape.
        kind: "weight", "bias", "norm" (a normalization layer's scale) or "embedding".
        layer: the layer it belongs to (a weight and its bias share one), used for per-layer metrics.
        source_name: its name in the file it came from (an ONNX initializer name, a state_dict key).
    """

    name: str
    shape: tuple[int, ...]
    kind: WeightKind
    layer: str
    source_name: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Source:
    """Where a model came from.

    Attributes:
        format: "torch" (in-memory module), "onnx", "torchscript", "export" (.pt2), "state_dict", "pickle".
        path: the file it was read from, if any.
        checksum: sha256 of the file, or of the weights for in-memory modules.
        opset: the ONNX default-domain opset, if any.
        details: anything else a loader wants to keep (producer name, torch version ...).
    """

    format: str
    path: str | None = None
    checksum: str = ""
    opset: int | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


def weights_checksum(params: Mapping[str, torch.Tensor]) -> str:
    """sha256 over parameter names, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


#: class names of normalization layers defined outside torch (transformers' LlamaRMSNorm, T5LayerNorm ...).
_NORM_CLASS = re.compile(r"(RMS|Layer|Group|Batch|Instance)Norm")


def _weight_kind(name: str, owner: nn.Module | None) -> WeightKind:
    """Embedding tables, and token, position and patch embeddings (any weight under an ``*embed*`` module); the
    scales of normalization layers; biases (also a norm's shift); everything else a weight."""
    path, _, leaf = name.rpartition(".")
    if isinstance(owner, nn.Embedding | nn.EmbeddingBag):
        return "embedding"
    if "bias" in leaf:
        return "bias"
    if isinstance(owner, _NORM_TYPES) or (owner is not None and _NORM_CLASS.search(type(owner).__name__)):
        return "norm"
    if "embed" in path.lower() or "embed" in leaf.lower() or (owner is not None and "Embed" in type(owner).__name__):
        return "embedding"
    return "weight"


def _infer_weight_info(module: nn.Module) -> list[WeightInfo]:
    owners: dict[int, tuple[str, nn.Module]] = {}
    for mod_name, mod in module.named_modules():
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), (mod_name, mod))  # a shared weight belongs to its first owner (the embedding)
    infos = []
    # named_parameters lists a parameter shared by several modules (a tied LM head and input embedding) once, under
    # its first name; `Model.run` substitutes it at every place it is used (functional_call's tie_weights).
    for name, p in module.named_parameters():
        if not p.is_floating_point():
            continue
        layer, _, leaf = name.rpartition(".")
        _, owner = owners.get(id(p), ("", None))
        kind = _weight_kind(name, owner)
        infos.append(WeightInfo(name, tuple(p.shape), kind, layer or name, name))
    return infos


class Model:
    """A frozen network and the list of its maskable (float) weights.

    Args:
        module: the torch module to analyse. It is never modified.
        weights: the weight registry; inferred from the module's parameters when omitted.
        source: where the module came from; an in-memory module when omitted.

    Example:
        >>> import torch, modscope
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> model = modscope.load(net)
        >>> [w.name for w in model.weights]
        ['0.weight', '0.bias', '2.weight', '2.bias']
        >>> model(torch.zeros(1, 3)).shape
        torch.Size([1, 2])
    """

    def __init__(self, module: nn.Module, *, weights: list[WeightInfo] | None = None, source: Source | None = None):
        if not isinstance(module, nn.Module):
            raise InvalidParameterError(f"Model needs a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self.weights: tuple[WeightInfo, ...] = tuple(weights if weights is not None else _infer_weight_info(module))
        params = dict(module.named_parameters())
        missing = [w.name for w in self.weights if w.name not in params]
        if missing:
            raise InvalidParameterError(f"weights {missing[:3]} are not parameters of the module")
        self.source = source or Source("torch", checksum=weights_checksum({w.name: params[w.name] for w in self.weights}))
        self._by_name = {w.name: w for w in self.weights}
        self._copies: dict[str, nn.Module] = {}

    @classmethod
    def of(cls, source: Model | nn.Module) -> Model:
        """``source`` as a `Model`: a `Model` unchanged, a torch module wrapped (never modified).

        This is how the learner, `evaluate`, the metrics and the report accept either; it reads no files, so it
        needs none of the converters (files are read with `modscope.load`). A ``transformers.PreTrainedModel``
        becomes a `TransformersModel` (calls without cache, tensor outputs by name), as with `modscope.load`.

        Args:
            source: a `Model`, or a ``torch.nn.Module``.

        Returns:
            The `Model`.

        Raises:
            InvalidParameterError: ``source`` is neither (a path or an ONNX model: load it with `modscope.load`).

        Example:
            >>> import torch
            >>> model = Model.of(torch.nn.Linear(2, 3))
            >>> Model.of(model) is model, len(model.weights)
            (True, 2)
        """
        if isinstance(source, Model):
            return source
        if is_transformers_model(source):
            return load_transformers(source)
        if isinstance(source, nn.Module):
            return Model(source)
        raise InvalidParameterError(
            f"expected a modscope Model or a torch.nn.Module, got {type(source).__name__}; "
            "read model files (and ONNX models, .pt2 programs) with modscope.load first"
        )

    # -- registry -------------------------------------------------------------------------------------------------
    def weight(self, name: str) -> WeightInfo:
        """The `WeightInfo` of a weight by its torch name or its source name."""
        if name in self._by_name:
            return self._by_name[name]
        for w in self.weights:
            if w.source_name == name:
                return w
        raise InvalidParameterError(f"no weight named {name!r}; see model.weights for the names")

    @property
    def checksum(self) -> str:
        return self.source.checksum

    def parameters(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The registered weights as detached tensors (on ``device`` if given)."""
        module = self.module_on(device)
        params = dict(module.named_parameters())
        return {w.name: params[w.name].detach() for w in self.weights}

    @property
    def device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        for b in self.module.buffers():
            return b.device
        return torch.device("cpu")

    def module_on(self, device: torch.device | str | None) -> nn.Module:
        """The module on ``device``: the original if it is already there, else a private copy (made once)."""
        if device is None or torch.device(device) == self.device:
            return self.module
        key = str(torch.device(device))
        if key not in self._copies:
            self._copies[key] = copy.deepcopy(self.module).to(device)
        return self._copies[key]

    # -- running --------------------------------------------------------------------------------------------------
    def __call__(self, *inputs: Any, **kwargs: Any) -> Any:
        return self.module(*inputs, **kwargs)

    def functional_call(self, params: Mapping[str, torch.Tensor], *inputs: Any, device: torch.device | str | None = None) -> Any:
        """Run the module with some parameters replaced by ``params`` (the module is not changed)."""
        return self.run(self.module_on(device), params, inputs)

    def run(self, module: nn.Module, params: Mapping[str, torch.Tensor], inputs: tuple[Any, ...] | list[Any],
            names: tuple[str, ...] = ()) -> Any:
        """Call ``module`` (this model's module or its copy from `module_on`/`frozen`) with ``params`` substituted.

        The last ``len(names)`` inputs are passed as keyword arguments of those names (a `Task`'s named inputs).
        Tied weights stay tied: a weight substituted by one name is used wherever the module shares it. Subclasses
        add call options and reduce the output to tensors (`call_options`, `reduce_output`).
        """
        args, kwargs = split_inputs(inputs, names)
        kwargs.update(self.call_options(module))
        if params:
            out = torch.func.functional_call(module, dict(params), args, kwargs, strict=False, tie_weights=True)
        else:
            out = module(*args, **kwargs)
        return self.reduce_output(out)

    def call_options(self, module: nn.Module) -> dict[str, Any]:
        """Keyword arguments added to every call (none for plain modules)."""
        return {}

    def reduce_output(self, output: Any) -> Any:
        """The output as `Task.select_output` reads it (unchanged for plain modules)."""
        return output

    @contextlib.contextmanager
    def frozen(self, device: torch.device | str | None = None, *, train: bool = False) -> Iterator[nn.Module]:
        """Put the module in eval mode (or train mode), turn off the attention fast path and give attention and
        LSTM/GRU layers forwards that `torch.func.vmap` batches (`modscope.batchable`); all restored on exit."""
        module = self.module_on(device)
        modes = [(m, m.training) for m in module.modules()]
        fastpath = _mha_fastpath_enabled()
        try:
            # set the flags directly: torch.export's modules refuse .train()/.eval() (their mode is fixed at export)
            for m, _ in modes:
                m.training = train
            _set_mha_fastpath(False)
            with batchable_layers(module):
                yield module
        finally:
            for m, was_training in modes:
                m.training = was_training
            _set_mha_fastpath(fastpath)

    def __len__(self) -> int:
        return len(self.weights)

    def __repr__(self) -> str:
        n = sum(w.numel for w in self.weights)
        return f"Model(format={self.source.format!r}, weights={len(self.weights)}, parameters={n:,})"


def _mha_fastpath_enabled() -> bool:
    getter = getattr(torch.backends.mha, "get_fastpath_enabled", None)
    return bool(getter()) if getter else False


def _set_mha_fastpath(enabled: bool) -> None:
    setter = getattr(torch.backends.mha, "set_fastpath_enabled", None)
    if setter:
        setter(enabled)


# -- transformers models ----------------------------------------------------------------------------------------
def is_transformers_model(obj: Any) -> bool:
    """Whether ``obj`` is a ``transformers.PreTrainedModel`` (without importing transformers)."""
    module = sys.modules.get("transformers")
    cls = getattr(module, "PreTrainedModel", None) if module is not None else None
    return cls is not None and isinstance(obj, cls)


class TransformersModel(Model):
    """A `Model` over a ``transformers.PreTrainedModel``: calls without cache, tensor outputs, batchable attention."""

    def call_options(self, module: nn.Module) -> dict[str, Any]:
        params = inspect.signature(module.forward).parameters
        return {k: v for k, v in (("use_cache", False), ("return_dict", True)) if k in params}

    def reduce_output(self, output: Any) -> Any:
        if isinstance(output, dict):  # a ModelOutput: keep its tensors (and tuples of them); drop caches
            return {k: v for k, v in output.items() if _is_tensors(v)}
        return output

    @contextlib.contextmanager
    def frozen(self, device: torch.device | str | None = None, *, train: bool = False) -> Iterator[nn.Module]:
        with super().frozen(device, train=train) as module, batchable_attention(module):
            yield module


def _is_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, tuple | list) and all(_is_tensors(v) for v in value)


@contextlib.contextmanager
def batchable_attention(module: nn.Module) -> Iterator[None]:
    """Run ``module``'s attention on its eager implementation with masks built without data-dependent shortcuts.

    transformers' default (``sdpa``) and its mask builders skip the mask when no token is padded, a test on the
    data that ``torch.func.vmap`` cannot batch; the eager path computes the same attention with plain tensor ops.
    The module's implementation setting and transformers' eager mask builder are restored on exit.
    """
    from transformers import masking_utils

    previous = getattr(module.config, "_attn_implementation", None)
    masks = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS
    had_local = "eager" in masks._local_mapping
    old_local = masks._local_mapping.get("eager")
    eager_mask = masks["eager"]

    def eager_mask_always(*args: Any, **kwargs: Any) -> Any:
        kwargs["allow_is_bidirectional_skip"] = False
        return eager_mask(*args, **kwargs)

    try:
        if previous not in (None, "eager"):
            module.set_attn_implementation("eager")
        masks["eager"] = eager_mask_always
        yield
    finally:
        if had_local:
            masks["eager"] = old_local
        else:
            masks._local_mapping.pop("eager", None)
        if previous not in (None, "eager"):
            module.set_attn_implementation(previous)


def load_transformers(model: nn.Module, *, path: str | None = None, checksum: str | None = None) -> TransformersModel:
    """Wrap a ``transformers.PreTrainedModel`` (never modified) as a `Model`.

    Args:
        model: the model.
        path: the folder it was read from, if any.
        checksum: the weights' checksum (computed from the weights when omitted).

    Returns:
        A `TransformersModel`; a tied LM head and input embedding are one weight.
    """
    params = dict(model.named_parameters())
    details = {"architecture": type(model).__name__, "model_type": getattr(model.config, "model_type", "")}
    source = Source("transformers", path=path, checksum=checksum or weights_checksum(params), details=details)
    return TransformersModel(model, source=source)
