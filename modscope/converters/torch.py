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
- **TorchScript archives** are read by TorchScript's own C++ unpickler, which resolves class names only to
  TorchScript types compiled from the archive's ``code/`` folder and never imports or calls Python objects
  (a ``data.pkl`` naming ``os.system`` fails with "Unknown type name"; ``tests/test_torch_checkpoints.py``
  checks this). The TorchScript code itself can call any registered torch operator, so a hostile archive is
  still not harmless when *run*; modscope does not run it, it exports it. We treat TorchScript as safe to load
  without ``trust``. Script modules' parameters cannot be swapped reliably with ``torch.func.functional_call``,
  so the archive is exported to ONNX in memory (``torch.onnx.export(..., dynamo=False)``) and loaded through
  the ONNX converter; weight names stay the script module's parameter names wherever the exporter keeps them.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidParameterError, ModelLoadError, UntrustedFileError
from ..model import Model, Source, WeightInfo, WeightKind, weights_checksum
from .files import check_options, file_sha256

Factory = str | Callable[[], nn.Module]

#: keys under which training checkpoints commonly nest the state_dict.
_NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")


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
    if not trust:
        _check_pt2_pickles(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(str(path))
    except Exception as exc:  # torch raises many types for corrupt archives
        raise ModelLoadError(f"cannot load torch.export archive {path}: {_first_line(exc)}") from exc
    source = Source("export", str(path), file_sha256(path), details={"torch": torch.__version__})
    return _model_from_program(program, source)


def _model_from_program(program: Any, source: Source) -> Model:
    module = program.module()
    owners = _program_module_types(program)
    weights = []
    for name, p in module.named_parameters():
        if p.is_floating_point():
            layer = name.rpartition(".")[0] or name
            kind = _weight_kind(name.rpartition(".")[2], owners.get(name.rpartition(".")[0], ""))
            weights.append(WeightInfo(name, tuple(p.shape), kind, layer, name))
    return Model(module, weights=weights, source=source)


def _program_module_types(program: Any) -> dict[str, str]:
    """Submodule FQN -> class path, from the ``nn_module_stack`` metadata torch.export records on each node."""
    types: dict[str, str] = {}
    for node in program.graph.nodes:
        for fqn, cls in (node.meta.get("nn_module_stack") or {}).values():
            types.setdefault(str(fqn), str(cls if isinstance(cls, str) else getattr(cls, "__name__", cls)))
    return types


def _weight_kind(leaf: str, owner_class: str) -> WeightKind:
    cls = owner_class.rsplit(".", 1)[-1]
    if cls.startswith("Embedding"):
        return "embedding"
    if "bias" in leaf:
        return "bias"
    if "Norm" in cls:
        return "norm"
    return "weight"


def _check_pt2_pickles(path: Path) -> None:
    """Raise UntrustedFileError if a member that torch.export.load would unpickle holds more than tensors."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pickled = [n for n in names if n.endswith(".pt")]
        for config_name in (n for n in names if n.endswith("_config.json") and "/data/" in f"/{n}"):
            folder = config_name.rsplit("/", 1)[0]
            try:
                config = json.loads(z.read(config_name)).get("config", {})
            except (json.JSONDecodeError, AttributeError) as exc:
                raise ModelLoadError(f"torch.export archive {path} has a corrupt {config_name}") from exc
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
                raise ModelLoadError(f"torch.export archive {path} has a corrupt member {member}: {_first_line(exc)}") from exc


# -- TorchScript ----------------------------------------------------------------------------------------------------
def load_torchscript(
    path: Path,
    *,
    example_inputs: Any = None,
    op_handlers: Mapping[Any, Callable[..., Any]] | None = None,
    opset: int | None = None,
    trust: bool = False,
) -> Model:
    """Load a TorchScript archive by exporting it to ONNX in memory and converting that.

    Args:
        path: the archive (``torch.jit.save``).
        example_inputs: a tensor or tuple of tensors with the right rank and dtype (sizes do not matter: every
            dimension is exported as dynamic). When omitted, modscope infers them when each input goes straight
            into a linear, convolution or embedding layer.
        op_handlers: extra ONNX op handlers for the converter (see `modscope.load`).
        opset: the ONNX opset to export with (torch's default when omitted).
        trust: accepted for symmetry with other torch files; TorchScript archives are read without running
            Python code (see the module docstring).

    Returns:
        A `Model` of format ``"torchscript"`` whose weights carry the script module's parameter names.

    Raises:
        ModelLoadError: the archive cannot be read, its input shapes cannot be inferred, or the ONNX export or
            conversion fails (the message names what failed and suggests torch.export or ONNX).
    """
    del trust
    try:
        script = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ModelLoadError(f"cannot load TorchScript archive {path}: {_first_line(exc)}") from exc
    inputs = _as_tuple(example_inputs) if example_inputs is not None else _infer_script_inputs(script, path)
    proto = _script_to_onnx(script, inputs, opset, path)
    from .onnx.loader import load_onnx

    try:
        converted = load_onnx(proto, op_handlers=op_handlers)
    except Exception as exc:
        raise ModelLoadError(
            f"TorchScript archive {path} exported to ONNX but the ONNX graph cannot be converted ({_first_line(exc)}); "
            "save the model with torch.export (.pt2) or export it to ONNX yourself"
        ) from exc
    weights = _script_weight_infos(script, converted.weights)
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    source = Source("torchscript", str(path), file_sha256(path), opset_used, {"converted_via": "onnx"})
    return Model(converted.module, weights=weights, source=source)


def _as_tuple(inputs: Any) -> tuple[torch.Tensor, ...]:
    items = tuple(inputs) if isinstance(inputs, list | tuple) else (inputs,)
    if not items or not all(isinstance(t, torch.Tensor) for t in items):
        raise InvalidParameterError("example_inputs must be a tensor or a tuple of tensors")
    return items


def _infer_script_inputs(script: Any, path: Path) -> tuple[torch.Tensor, ...]:
    graph = script.graph.copy()
    torch._C._jit_pass_inline(graph)
    graph_inputs = list(graph.inputs())
    tensors = dict(script.named_parameters())
    tensors.update(dict(script.named_buffers()))
    order = {node: i for i, node in enumerate(graph.nodes())}
    inferred = []
    for value in graph_inputs[1:]:
        users = sorted((u.user for u in value.uses() if u.user in order), key=lambda n: order[n])
        guess = _guess_input(users[0], value, tensors, graph_inputs[0]) if users else None
        if guess is None:
            first = users[0].kind() if users else "nothing"
            raise ModelLoadError(
                f"cannot tell the input shape of TorchScript archive {path} (input {value.debugName()!r} goes into "
                f"{first}); pass example_inputs=(tensor, ...) with the right rank and dtype"
            )
        inferred.append(guess)
    return tuple(inferred)


def _guess_input(node: Any, value: Any, tensors: Mapping[str, torch.Tensor], self_value: Any) -> torch.Tensor | None:
    kind = node.kind()
    args = list(node.inputs())
    weight_path = _attr_path(args[1] if kind != "aten::embedding" else args[0], self_value)
    weight = tensors.get(weight_path or "")
    if weight is None:
        return None
    if kind == "aten::linear" and args[0] is value:
        return torch.zeros(2, weight.shape[-1])
    if kind in ("aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::_convolution") and args[0] is value:
        groups = args[-1].toIValue() if kind != "aten::_convolution" else args[8].toIValue()
        n_spatial = weight.dim() - 2
        return torch.zeros(1, weight.shape[1] * int(groups or 1), *[32] * n_spatial)
    if kind == "aten::embedding" and args[1] is value:
        return torch.zeros(2, 4, dtype=torch.long)
    return None


def _attr_path(value: Any, self_value: Any) -> str | None:
    parts = []
    while value is not self_value:
        node = value.node()
        if node.kind() != "prim::GetAttr":
            return None
        parts.append(node.s("name"))
        value = node.input()
    return ".".join(reversed(parts))


def _script_to_onnx(script: Any, inputs: tuple[torch.Tensor, ...], opset: int | None, path: Path) -> Any:
    import onnx

    names = [f"input_{i}" for i in range(len(inputs))]
    dynamic = {name: {d: f"{name}_d{d}" for d in range(t.dim())} for name, t in zip(names, inputs)}
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), _onnx_log_to_stderr():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                script,
                inputs,
                buffer,
                dynamo=False,
                input_names=names,
                dynamic_axes=dynamic,
                do_constant_folding=False,  # keeps weights as they are (no BN folding, no pre-transposed copies)
                keep_initializers_as_inputs=True,  # no merging of equal-valued weights (a fresh BN weight = running_var)
                **({"opset_version": opset} if opset is not None else {}),
            )
    except Exception as exc:
        raise ModelLoadError(
            f"TorchScript archive {path} cannot be converted: exporting it to ONNX failed ({_first_line(exc)}); "
            "save the model with torch.export (.pt2) or export it to ONNX yourself"
        ) from exc
    return onnx.load_from_string(buffer.getvalue())


@contextlib.contextmanager
def _onnx_log_to_stderr() -> Iterator[None]:
    """The TorchScript exporter prints the graph to stdout when it fails; stdout is for modscope's JSON output."""
    set_stream = getattr(torch._C, "_jit_set_onnx_log_output_stream", None)
    if set_stream is None:
        yield
        return
    set_stream("stderr")
    try:
        yield
    finally:
        set_stream("stdout")  # torch's default


def _script_weight_infos(script: Any, converted: Sequence[WeightInfo]) -> list[WeightInfo]:
    """Give converted weights the kind and layer of the script parameter of the same name, where there is one."""
    params = dict(script.named_parameters())
    classes = {name: getattr(m, "original_name", "") for name, m in script.named_modules()}
    out = []
    for w in converted:
        if w.source_name in params:
            layer, _, leaf = w.source_name.rpartition(".")
            w = replace(w, kind=_weight_kind(leaf, classes.get(layer, "")), layer=layer or w.source_name)
        out.append(w)
    return out


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
        raise ModelLoadError(f"cannot read safetensors file {path}: {_first_line(exc)}") from exc
    return _model_from_state_dict(state, factory, path, "safetensors")


def load_torch_file(path: Path, *, factory: Factory | None = None, trust: bool = False) -> Model:
    """Load a ``torch.save`` checkpoint: a state_dict (with ``factory``) or, with ``trust=True``, a pickled module.

    Args:
        path: the checkpoint (zip or legacy pickle format).
        factory: ``"package.module:callable"`` (or a callable) building the module a state_dict is loaded into.
        trust: allow unpickling arbitrary Python objects; only for files from a source you trust.

    Returns:
        A `Model` of format ``"state_dict"`` or, for a pickled module, ``"pickle"``.

    Raises:
        UntrustedFileError: the file holds pickled Python objects and ``trust`` is False.
        ModelLoadError: the file is corrupt, holds neither a module nor a state_dict, or the state_dict does not
            fit the factory's module.
    """
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
        raise ModelLoadError(f"cannot read torch checkpoint {path} (truncated or corrupt?): {_first_line(exc)}") from exc
    if isinstance(obj, nn.Module):
        if factory is not None:
            raise InvalidParameterError(f"{path} holds a whole module, so factory= does not apply; leave it out")
        return Model(obj, source=Source("pickle", str(path), file_sha256(path), details={"class": type(obj).__name__}))
    state = _tensor_dict(obj)
    if state is None:
        raise ModelLoadError(
            f"{path} holds a {type(obj).__name__}, not a module or a state_dict (a dict of tensors)"
            + (f" (top-level keys: {', '.join(map(str, list(obj)[:6]))})" if isinstance(obj, Mapping) else "")
        )
    return _model_from_state_dict(state, factory, path, "torch")


def _load_trusted(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        if "magic number" not in str(exc):
            raise ModelLoadError(f"cannot unpickle {path}: {_first_line(exc)}") from exc
    try:  # a plain pickle.dump, not torch.save
        with open(path, "rb") as f:
            return pickle.load(f)  # the caller passed trust=True
    except Exception as exc:
        raise ModelLoadError(f"cannot unpickle {path}: {_first_line(exc)}") from exc


def _refuse(path: Path, why: str) -> None:
    raise UntrustedFileError(
        f"{path} is a pickled Python object ({why}); loading it runs code from the file. "
        "Pass trust=True (CLI: --trust) only if you trust its source."
    )


def _tensor_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    def plain(d: Any) -> bool:
        return isinstance(d, Mapping) and bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())

    if plain(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in _NESTED_STATE_KEYS:
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
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"the state_dict in {path} does not fit the module from factory {_name(factory)}: {_first_line(exc)}") from exc
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
        raise ModelLoadError(f"factory {_name(factory)} raised {type(exc).__name__}: {_first_line(exc)}") from exc
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
            f"cannot import factory module {module_name!r} ({type(exc).__name__}: {_first_line(exc)}); "
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
    """Check the keys against the module's; a common prefix such as ``module.`` (DataParallel) is stripped."""
    expected = set(module.state_dict())
    prefix = ""
    if set(state) != expected:
        for candidate in ("module.", "model."):
            if all(k.startswith(candidate) for k in state) and {k[len(candidate):] for k in state} == expected:
                prefix, state = candidate, {k[len(candidate):]: v for k, v in state.items()}
                break
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        parts = [f"{len(keys)} {what} key(s) ({_few(keys)})" for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise ModelLoadError(f"the state_dict does not match the module from factory {_name(factory)}: {' and '.join(parts)}")
    own = module.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise ModelLoadError(f"the state_dict's shapes do not match the module from factory {_name(factory)}: {_few(wrong)} (file vs module)")
    return state, prefix


def _few(items: Sequence[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def _name(factory: Factory) -> str:
    return repr(factory) if isinstance(factory, str) else getattr(factory, "__qualname__", repr(factory))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
