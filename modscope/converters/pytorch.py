"""PyTorch files in: ``torch.export`` programs, TorchScript archives, state_dicts and pickled modules.

What runs code, and what modscope does about it:

- **state_dicts** (``torch.save`` of a dict of tensors, safetensors) hold no code and no architecture. They are
  read with ``torch.load(weights_only=True)`` (an unpickler that only rebuilds tensors and plain containers) or
  with ``safetensors``, and loaded into the module a *factory* builds (``factory="package.module:callable"``).
- **Pickled whole modules** (``torch.save(module)``) run code from the file when unpickled. modscope first tries
  ``weights_only=True``, which refuses any global that is not allow-listed *without* calling it; only when the
  caller passes ``trust=True`` is the file unpickled for real.
- **torch.export archives** (``.pt2``) are JSON graphs plus raw tensor payloads, but ``torch.export.load``
  unpickles some members with ``weights_only=False`` (pickled weights and constants, sample inputs, legacy
  layouts) and plain ``pickle.loads`` for opaque objects. Before calling it, modscope opens every such member
  with ``weights_only=True`` (and refuses opaque objects): an archive whose pickles hold anything but tensors
  needs ``trust=True``.

TorchScript archives are handled in ``torchscript.py``.
"""

from __future__ import annotations

import importlib
import io
import json
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checksums import file_sha256
from ..errors import InvalidParameterError, ModelLoadError, ModscopeWarning, UntrustedFileError
from ..model import Model, Source, WeightInfo, WeightKind, weights_checksum
from .archives import check_zip
from .options import check_options

Factory = str | Callable[[], nn.Module]

#: keys under which training checkpoints commonly nest the state_dict (Lightning uses ``state_dict``), in the order
#: they are tried; ``state_key=`` (CLI: ``--state-key``) names another.
NESTED_STATE_KEYS = ("model_state_dict", "model_state", "state_dict", "model", "module", "net")
#: prefixes a wrapper adds to every key: DataParallel (``module.``), Lightning modules holding ``self.model``.
_KEY_PREFIXES = ("module.", "model.", "net.", "_orig_mod.")


# -- torch.export ---------------------------------------------------------------------------------------------------
def load_exported_program(program: Any, **options: Any) -> Model:
    """A `Model` running an in-memory ``torch.export.ExportedProgram``.

    Args:
        program: the ExportedProgram. Its ``module()`` is what runs; parameter names are the original FQNs.
        **options: none are accepted (present so that misuse gives a clear error).

    Returns:
        A `Model` of format ``"export"``; ``WeightInfo.source_name`` is the name in ``program.state_dict``.

    Raises:
        InvalidParameterError: an option was given.

    Example:
        >>> import torch
        >>> ep = torch.export.export(torch.nn.Linear(2, 3), (torch.zeros(1, 2),))
        >>> [w.name for w in load_exported_program(ep).weights]
        ['weight', 'bias']
    """
    check_options("an ExportedProgram", options, ())
    params = {k: v for k, v in program.state_dict.items() if isinstance(v, torch.Tensor)}
    return _model_from_program(program, Source("export", checksum=weights_checksum(params)))


def load_pt2(path: Path, *, trust: bool = False) -> Model:
    """Load a ``torch.export`` archive (``torch.export.save``) as a `Model`.

    Args:
        path: the .pt2 archive.
        trust: allow pickled members that hold more than tensors (they run code when loaded).

    Returns:
        A `Model` of format ``"export"``, weight names as in the program's state_dict.

    Raises:
        UntrustedFileError: a pickled member holds Python objects and ``trust`` is False.
        ModelLoadError: ``torch.export.load`` cannot read the archive.
    """
    check_zip(path)  # unique member names: the pickles judged below are the ones torch.export.load reads
    if not trust:
        _check_pt2_pickles(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(str(path))
    except Exception as exc:  # torch raises many types for corrupt archives
        raise ModelLoadError(f"cannot load torch.export archive {path}: {first_line(exc)}") from exc
    source = Source("export", str(path), file_sha256(path), details={"torch": torch.__version__})
    return _model_from_program(program, source)


def _model_from_program(program: Any, source: Source) -> Model:
    module = program.module()
    owners = _program_module_types(program)
    weights = []
    for name, p in module.named_parameters():
        if p.is_floating_point():
            layer = name.rpartition(".")[0] or name
            kind = weight_kind(name.rpartition(".")[2], owners.get(name.rpartition(".")[0], ""))
            weights.append(WeightInfo(name, tuple(p.shape), kind, layer, name))
    return Model(module, weights=weights, source=source)


def _program_module_types(program: Any) -> dict[str, str]:
    """Submodule FQN -> class path, from the ``nn_module_stack`` metadata torch.export records on each node."""
    types: dict[str, str] = {}
    for node in program.graph.nodes:
        for fqn, cls in (node.meta.get("nn_module_stack") or {}).values():
            types.setdefault(str(fqn), str(cls if isinstance(cls, str) else getattr(cls, "__name__", cls)))
    return types


def weight_kind(leaf: str, owner_class: str) -> WeightKind:
    """The kind of a parameter from its leaf name and the class name of the module that owns it."""
    cls = owner_class.rsplit(".", 1)[-1]
    if cls.startswith("Embedding"):
        return "embedding"
    if "bias" in leaf:
        return "bias"
    if "Norm" in cls:
        return "norm"
    return "weight"


def _pt2_weights_config(path: Path, name: str, raw: bytes) -> dict[str, dict[str, Any]]:
    """The ``config`` mapping of a .pt2 weights/constants config member, checked to be ``{fqn: {...}}``."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ModelLoadError(f"torch.export archive {path} has a corrupt {name} (not JSON)") from exc
    config = data.get("config", {}) if isinstance(data, dict) else None
    if not isinstance(config, dict) or not all(isinstance(meta, dict) for meta in config.values()):
        raise ModelLoadError(f"torch.export archive {path} has a corrupt {name} (expected an object of objects under 'config')")
    return config


def _check_pt2_pickles(path: Path) -> None:
    """Raise UntrustedFileError if a member that torch.export.load would unpickle holds more than tensors.

    The caller runs `check_zip` first: member names are unique, so the bytes read here are the bytes torch reads.
    """
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pickled = [n for n in names if n.endswith(".pt")]
        for config_name in (n for n in names if n.endswith("_config.json") and "/data/" in f"/{n}"):
            folder = config_name.rsplit("/", 1)[0]
            config = _pt2_weights_config(path, config_name, z.read(config_name))
            for fqn, meta in config.items():
                file_name = str(meta.get("path_name", ""))
                if file_name.startswith("opaque"):
                    _refuse(path, f"constant {fqn!r} is a pickled Python object")
                if meta.get("use_pickle"):
                    pickled.append(f"{folder}/{file_name}")
        for member in pickled:
            if member not in names:
                continue
            try:
                torch.load(io.BytesIO(z.read(member)), map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                _refuse(path, f"member {member} holds pickled Python objects")
            except Exception as exc:
                raise ModelLoadError(f"torch.export archive {path} has a corrupt member {member}: {first_line(exc)}") from exc


# -- state_dicts and pickles ----------------------------------------------------------------------------------------
def load_safetensors(path: Path, *, factory: Factory | None = None, trust: bool = False) -> Model:
    """Load a safetensors file of weights into the module ``factory`` builds.

    Args:
        path: the .safetensors file.
        factory: ``"package.module:callable"`` (or a callable) returning the architecture; called with no arguments.
        trust: accepted for symmetry; safetensors files hold no code.

    Returns:
        A `Model` of format ``"state_dict"`` (``details["container"] == "safetensors"``).

    Raises:
        ModelLoadError: no factory, the factory fails, or the keys or shapes do not match its module.
    """
    del trust
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read safetensors file {path}: {first_line(exc)}") from exc
    return _model_from_state_dict(state, factory, path, "safetensors")


def load_torch_file(path: Path, *, factory: Factory | None = None, trust: bool = False, state_key: str | None = None) -> Model:
    """Load a ``torch.save`` checkpoint: a state_dict (with ``factory``) or, with ``trust=True``, a pickled module.

    A training checkpoint that nests the state_dict (``{"epoch": 3, "model_state_dict": {...}, "optimizer": ...}``,
    Lightning's ``{"state_dict": {"model.fc.weight": ...}}``) is searched under `NESTED_STATE_KEYS`, or under
    ``state_key``; a prefix every key carries (``model.``, ``module.``) is stripped. Keys the module does not have,
    and buffers it has but the file lacks, are named in one warning; a missing parameter is an error.

    Args:
        path: the checkpoint (zip or legacy pickle format).
        factory: ``"package.module:callable"`` (or a callable) building the module a state_dict is loaded into.
        trust: allow unpickling arbitrary Python objects; only for files from a source you trust.
        state_key: the key of the checkpoint that holds the state_dict (``"a/b"`` for a nested one).

    Returns:
        A `Model` of format ``"state_dict"`` or, for a pickled module, ``"pickle"``.

    Raises:
        UntrustedFileError: the file holds pickled Python objects and ``trust`` is False.
        ModelLoadError: the file is corrupt, holds neither a module nor a state_dict, or the state_dict does not
            fit the factory's module.
    """
    if zipfile.is_zipfile(path):
        check_zip(path)  # also when called directly, not through load_file
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust:
            found = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
            _refuse(path, f"it references {found.group(1)}" if found else "it holds more than tensors")
        obj = _load_trusted(path)
    except Exception as exc:
        raise ModelLoadError(f"cannot read torch checkpoint {path} (truncated or corrupt?): {first_line(exc)}") from exc
    if isinstance(obj, nn.Module):
        if factory is not None:
            raise InvalidParameterError(f"{path} holds a whole module, so factory= does not apply; leave it out")
        return Model(obj, source=Source("pickle", str(path), file_sha256(path), details={"class": type(obj).__name__}))
    state = _state_at(obj, state_key, path) if state_key else _tensor_dict(obj)
    if state is None:
        keys = f" (top-level keys: {', '.join(map(str, list(obj)[:6]))}); name the one holding the weights with --state-key" if isinstance(obj, Mapping) else ""
        raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not a module or a state_dict (a dict of tensors){keys}")
    return _model_from_state_dict(state, factory, path, "torch")


def _state_at(obj: Any, key: str, path: Path) -> dict[str, torch.Tensor]:
    """The state_dict at ``key`` (``"a/b"`` walks nested mappings)."""
    node = obj
    for part in key.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            have = ", ".join(map(str, list(node)[:6])) if isinstance(node, Mapping) else type(node).__name__
            raise ModelLoadError(f"{path} has no key {key!r} (at {part!r} it holds: {have})")
        node = node[part]
    state = _tensor_dict(node, nested=False)
    if state is None:
        raise ModelLoadError(f"{path}: the value under {key!r} is a {type(node).__name__}, not a state_dict (a dict of tensors)")
    return state


def _load_trusted(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        if "magic number" not in str(exc):
            raise ModelLoadError(f"cannot unpickle {path}: {first_line(exc)}") from exc
    try:  # a plain pickle.dump, not torch.save
        with open(path, "rb") as f:
            return pickle.load(f)  # the caller passed trust=True
    except Exception as exc:
        raise ModelLoadError(f"cannot unpickle {path}: {first_line(exc)}") from exc


def _refuse(path: Path, why: str) -> None:
    raise UntrustedFileError(
        f"{path} is a pickled Python object ({why}); loading it runs code from the file; "
        "pass trust=True (CLI: --trust) only if you trust its source"
    )


def _tensor_dict(obj: Any, *, nested: bool = True) -> dict[str, torch.Tensor] | None:
    def plain(d: Any) -> bool:
        return isinstance(d, Mapping) and bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())

    if plain(obj):
        return dict(obj)
    if nested and isinstance(obj, Mapping):
        for key in NESTED_STATE_KEYS:
            if plain(obj.get(key)):
                return dict(obj[key])
    return None


def _model_from_state_dict(state: dict[str, torch.Tensor], factory: Factory | None, path: Path, container: str) -> Model:
    if factory is None:
        raise ModelLoadError(
            f"{path} is a state_dict: it holds weights but no architecture; pass factory='package.module:callable' "
            "(CLI: --factory) naming a function that builds the module"
        )
    module = build_module(factory)
    state, prefix = _match_keys(state, module, factory)
    try:
        module.load_state_dict(state, strict=False)  # _match_keys refused missing parameters and warned of the rest
    except RuntimeError as exc:
        raise ModelLoadError(f"the state_dict in {path} does not fit the module from factory {_name(factory)}: {first_line(exc)}") from exc
    module.eval()
    details = {"container": container, "factory": _name(factory), "key_prefix": prefix}
    model = Model(module, source=Source("state_dict", str(path), file_sha256(path), details=details))
    if not prefix:
        return model
    weights = [replace(w, source_name=prefix + w.name) for w in model.weights]
    return Model(module, weights=weights, source=model.source)


def build_module(factory: Factory) -> nn.Module:
    """Call a factory (a callable or ``"package.module:callable"``) with no arguments and check it gives a module.

    Raises:
        InvalidParameterError: ``factory`` is neither callable nor of the form ``"package.module:callable"``.
        ModelLoadError: the module cannot be imported, lacks the callable, the call fails or returns no module.
    """
    fn = resolve_factory(factory)
    try:
        module = fn()
    except Exception as exc:
        raise ModelLoadError(f"factory {_name(factory)} raised {type(exc).__name__}: {first_line(exc)}") from exc
    if not isinstance(module, nn.Module):
        raise ModelLoadError(f"factory {_name(factory)} returned a {type(module).__name__}, not a torch.nn.Module")
    return module


def resolve_factory(factory: Factory) -> Callable[[], nn.Module]:
    """The callable named by ``"package.module:callable"`` (dotted attributes allowed after the colon)."""
    if callable(factory):
        return factory
    if not isinstance(factory, str) or factory.count(":") != 1 or not all(factory.split(":")):
        raise InvalidParameterError(f"factory must look like 'package.module:callable', got {factory!r}")
    module_name, attr = factory.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot import factory module {module_name!r} ({type(exc).__name__}: {first_line(exc)}); "
            "check the name and that its folder is on PYTHONPATH"
        ) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(f"factory {factory!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelLoadError(f"factory {factory!r} names a {type(obj).__name__}, which cannot be called")
    return obj


def _match_keys(state: dict[str, torch.Tensor], module: nn.Module, factory: Factory) -> tuple[dict[str, torch.Tensor], str]:
    """The state_dict's entries the module has, after stripping the wrapper prefix that matches most keys.

    Raises:
        ModelLoadError: a parameter of the module is missing from the file, or a shape differs.

    Warns:
        ModscopeWarning: once, naming keys the module does not have and buffers the file lacks.
    """
    own = module.state_dict()
    prefix = ""
    best = len(set(state) & set(own))
    for candidate in _KEY_PREFIXES:
        stripped = {k[len(candidate):] for k in state if k.startswith(candidate)}
        if len(stripped & set(own)) > best:
            prefix, best = candidate, len(stripped & set(own))
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} | {
            k: v for k, v in state.items() if not k.startswith(prefix)}
    params = {name for name, _ in module.named_parameters()}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    missing_params = [k for k in missing if k in params]
    if missing_params:
        parts = [f"{len(keys)} {what} key(s) ({_few(keys)})" for what, keys in (("missing", missing_params), ("unexpected", unexpected)) if keys]
        raise ModelLoadError(f"the state_dict does not match the module from factory {_name(factory)}: {' and '.join(parts)}")
    if missing or unexpected:
        parts = [f"{len(keys)} {what} ({_few(keys)})" for what, keys in (
            ("key(s) the module does not have were ignored", unexpected), ("buffer(s) the file lacks keep the module's values", missing)) if keys]
        warnings.warn(f"the state_dict and the module from factory {_name(factory)} differ: {'; '.join(parts)}",
                      ModscopeWarning, stacklevel=4)
    state = {k: v for k, v in state.items() if k in own}
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise ModelLoadError(f"the state_dict's shapes do not match the module from factory {_name(factory)}: {_few(wrong)} (file vs module)")
    return state, prefix


def _few(items: Sequence[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def _name(factory: Factory) -> str:
    return repr(factory) if isinstance(factory, str) else getattr(factory, "__qualname__", repr(factory))


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (torch's messages run over many lines)."""
    text = str(exc).strip()
    return next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
