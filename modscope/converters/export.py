"""Models out: write a model with some weights zeroed, as an edited copy of its ONNX file or as a state_dict.

`export_masked` keeps the weights a boolean mask marks and zeroes the rest. To remove a task's subnetwork (what
``modscope.evaluate(model, task, mask, invert=True)`` measures), pass the inverted mask as ``keep``.

For ONNX output, the original ``ModelProto`` is copied and only the data of the initializers that lose weights is
replaced, in the storage they had (``raw_data``, typed fields such as ``float_data``, or external data), with the
same name and dtype; every other byte of the graph stays as it was. A quantized weight (an integer initializer
that loaded as dequantized floats) gets its zero point where the mask removes an element, so it dequantizes to 0. Ablated external tensors go to
``<output name>.data`` next to the output. Untouched external tensors keep pointing at the original data file when
the output is written into the same folder, and are copied into ``<output name>.data`` otherwise. The result is
run once in onnxruntime, when it is installed, before it replaces anything.

For state_dict output (``.safetensors``, or ``torch.save`` for any other suffix) the keys are the names in the
source file (``WeightInfo.source_name``); models that came from torch also keep their buffers, so the result
loads with ``load_state_dict(strict=True)``.

Every file is first written to a temporary file in the destination folder and then moved into place with
``os.replace``, so a failed export never leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InvalidParameterError, MissingFileError, ModelLoadError, ModscopeError, ShapeError
from ..fileio import atomic_write, require_file
from ..model import Model

#: source formats whose module's state_dict keys are the names in the source file.
_TORCH_FORMATS = ("torch", "state_dict", "pickle", "export")
_ALIGN = 64


def export_masked(
    model: Model,
    keep: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    source: str | os.PathLike | Any | None = None,
    check: bool = True,
) -> Path:
    """Write ``model`` with every weight that ``keep`` marks False set to zero.

    Args:
        model: the model the masks were trained on.
        keep: ``{weight name: bool tensor of the weight's shape}``; True keeps a weight, False zeroes it. Names
            are torch names or source names (``model.weight(name)``); weights not in ``keep`` are unchanged.
        path: the output. A path without suffix, for a transformers model, writes a model folder
            (``save_pretrained``'s layout: config.json + safetensors) that transformers loads; ``.onnx`` writes an edited copy of the ONNX source; ``.safetensors`` a safetensors
            state_dict; anything else a ``torch.save`` state_dict.
        source: the ONNX file or ``onnx.ModelProto`` to edit (ONNX output only); defaults to the file the model
            was loaded from.
        check: for ONNX output, run the result once in onnxruntime (when installed) before moving it into place.

    Returns:
        The output path.

    Raises:
        InvalidParameterError: a name in ``keep`` is not a weight, a mask is not boolean, or ONNX output was asked
            for a model with no ONNX source.
        ShapeError: a mask's shape differs from its weight's.
        ModelLoadError: the ONNX source cannot be read, has changed since loading, or lacks an initializer.
        ModscopeError: the written ONNX fails in onnxruntime (pass ``check=False`` to write it anyway).

    Example:
        >>> import torch, modscope
        >>> model = modscope.load(torch.nn.Linear(2, 2))
        >>> keep = {"weight": torch.tensor([[True, False], [True, True]])}
        >>> out = export_masked(model, keep, "/tmp/doc_ablated.safetensors")
        >>> from safetensors.torch import load_file
        >>> float(load_file(out)["weight"][0, 1])
        0.0
    """
    out = Path(path)
    if not out.parent.is_dir():
        raise MissingFileError(f"the output folder {out.parent} does not exist; create it first")
    masks = _check_keep(model, keep)
    if model.source.format == "transformers" and not out.suffix:  # a model folder transformers loads
        from .hf import save_folder

        return save_folder(model, _zeroed(model, masks), out)
    if out.suffix.lower() == ".onnx":
        proto, base_dir = _onnx_source(model, source)
        _export_onnx(model, masks, out, proto, base_dir, check)
    else:
        if source is not None:
            raise InvalidParameterError("source= applies only to ONNX output (a path ending in .onnx)")
        _export_state_dict(model, masks, out)
    return out


# -- masks ----------------------------------------------------------------------------------------------------------
def _check_keep(model: Model, keep: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if not isinstance(keep, Mapping):
        raise InvalidParameterError(f"keep must map weight names to boolean tensors, got {type(keep).__name__}")
    masks = {}
    for key, value in keep.items():
        w = model.weight(key)
        mask = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        if mask.dtype != torch.bool:
            raise InvalidParameterError(f"the keep mask of {key!r} must be boolean, got {mask.dtype}")
        if tuple(mask.shape) != w.shape:
            raise ShapeError(f"the keep mask of {key!r} has shape {tuple(mask.shape)}, the weight has {w.shape}")
        masks[w.name] = mask.detach().cpu()
    return masks


def _zeroed(model: Model, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The masked weights with those that ``masks`` marks False set to zero."""
    params = model.parameters()
    return {name: torch.where(keep, params[name].cpu(), torch.zeros((), dtype=params[name].dtype)) for name, keep in masks.items()}


# -- state_dict -----------------------------------------------------------------------------------------------------
def _export_state_dict(model: Model, masks: Mapping[str, torch.Tensor], out: Path) -> None:
    state: dict[str, torch.Tensor] = {}
    if model.source.format in _TORCH_FORMATS:
        prefix = str(model.source.details.get("key_prefix", ""))
        state.update({prefix + k: v for k, v in model.module.state_dict().items()})
    params = model.parameters()
    for w in model.weights:
        t = params[w.name].cpu()
        if w.name in masks:
            t = torch.where(masks[w.name], t, torch.zeros((), dtype=t.dtype))
        state[w.source_name] = t
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}  # clone: no shared storage
    if out.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        with atomic_write(out) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "modscope"})
    else:
        with atomic_write(out) as tmp:
            torch.save(tensors, tmp)


# -- ONNX -----------------------------------------------------------------------------------------------------------
def _onnx_source(model: Model, source: Any) -> tuple[Any, Path | None]:
    """A private copy of the ONNX proto to edit (external data not loaded) and the folder its data lives in."""
    import onnx

    model_dir = Path(model.source.path).parent if model.source.path else None
    if isinstance(source, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(source)
        return proto, model_dir
    if source is None:
        if model.source.format != "onnx" or not model.source.path:
            raise InvalidParameterError(
                f"ONNX output needs the original ONNX file, but the model came from {model.source.format!r}"
                f"{'' if model.source.path else ' in memory'}; pass source= (an .onnx path or ModelProto) "
                "or write .safetensors or .pt instead"
            )
        src = Path(model.source.path)
        _check_unchanged(src, model.source.checksum)
    else:
        src = Path(source)
    try:
        return onnx.load(str(src), load_external_data=False), src.parent
    except Exception as exc:
        raise ModelLoadError(f"cannot read the ONNX source {src}: {exc}") from exc


def _check_unchanged(src: Path, checksum: str) -> None:
    from ..checksums import file_sha256

    require_file(src, "the ONNX source", "pass source= with its new location")
    if checksum and file_sha256(src) != checksum:
        raise ModelLoadError(f"the ONNX source {src} changed since the model was loaded; load it again")


def _export_onnx(model: Model, masks: Mapping[str, torch.Tensor], out: Path, proto: Any, base_dir: Path | None, check: bool) -> None:
    from onnx import TensorProto

    from .onnx.constants import weight_places

    initializers = weight_places(proto.graph)  # initializers and weight-like Constants, by the loader's keys
    data = _ExternalData(f"{out.name}.data")
    edited = set()
    quantized: dict[str, Any] | None = None
    for name, mask in masks.items():
        w = model.weight(name)
        init = initializers.get(w.source_name)
        if init is None:
            raise ModelLoadError(f"the ONNX source has no initializer {w.source_name!r} (weight {name!r}); pass the file the model was loaded from")
        if bool(mask.all()):
            continue
        array = _read_array(init, base_dir)
        if array.dtype.kind in "iu":  # quantized: removed elements become the zero point
            quantized = _quantized_weights(proto) if quantized is None else quantized
            ablated = _ablated_integers(quantized.get(init.name), array, mask.numpy(), initializers, base_dir)
        elif array.shape != tuple(mask.shape):
            raise ShapeError(f"initializer {init.name!r} has shape {array.shape}, the mask {tuple(mask.shape)}")
        else:
            ablated = np.where(mask.numpy(), array, np.zeros((), array.dtype))
        _replace_data(init, ablated, data)
        edited.add(w.source_name)
    same_dir = base_dir is not None and out.parent.resolve() == base_dir.resolve()
    for key, init in initializers.items():
        if key in edited or init.data_location != TensorProto.EXTERNAL:
            continue
        location = _external_info(init).get("location", "")
        if not same_dir or location == data.file_name:  # the output folder cannot point at the original file
            _relocate(init, base_dir, data)
    _write_onnx(proto, out, data, check)


def _quantized_weights(proto: Any) -> dict[str, Any]:
    from .onnx.quantized import find_quantized_weights

    return find_quantized_weights(proto.graph)


def _ablated_integers(
    info: Any, array: np.ndarray, keep: np.ndarray, initializers: Mapping[str, Any], base_dir: Path | None
) -> np.ndarray:
    """The integer weight ``array`` with removed elements set to its zero point (0 without one)."""
    from .onnx.quantized import ablated_integers

    zero_point = _read_array(initializers[info.zero_point], base_dir) if info is not None and info.zero_point else None
    return ablated_integers(info, array, keep, zero_point)


def _read_array(init: Any, base_dir: Path | None) -> np.ndarray:
    from onnx import TensorProto, numpy_helper

    if init.data_location == TensorProto.EXTERNAL and base_dir is None:
        raise ModelLoadError(f"initializer {init.name!r} keeps its data in an external file; pass source= as a file path")
    try:
        return numpy_helper.to_array(init, str(base_dir or ""))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read initializer {init.name!r} of the ONNX source: {exc}") from exc


def _replace_data(init: Any, array: np.ndarray, data: _ExternalData) -> None:
    """Put ``array`` into ``init`` in the storage it already uses (external, raw_data or a typed field)."""
    from onnx import TensorProto, helper, numpy_helper

    if init.data_location == TensorProto.EXTERNAL:
        data.add(init, numpy_helper.from_array(array).raw_data)
    elif init.HasField("raw_data"):
        init.raw_data = numpy_helper.from_array(array).raw_data
    else:
        field = helper.tensor_dtype_to_field(init.data_type)
        typed = helper.make_tensor(init.name, init.data_type, array.shape, array.flatten(), raw=False)
        values = getattr(init, field)
        del values[:]
        values.extend(getattr(typed, field))


def _relocate(init: Any, base_dir: Path | None, data: _ExternalData) -> None:
    """Copy an untouched external tensor's bytes, unchanged, into the output's data file."""
    info = _external_info(init)
    if base_dir is None:
        raise ModelLoadError(f"initializer {init.name!r} keeps its data in an external file; pass source= as a file path")
    try:
        with open(base_dir / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            raw = f.read(int(info["length"])) if "length" in info else f.read()
    except (OSError, KeyError) as exc:
        raise ModelLoadError(f"cannot read the external data of initializer {init.name!r}: {exc}") from exc
    data.add(init, raw)


def _external_info(init: Any) -> dict[str, str]:
    return {e.key: e.value for e in init.external_data}


class _ExternalData:
    """The tensors that go into the output's external data file, with their offsets."""

    def __init__(self, file_name: str):
        self.file_name = file_name
        self.chunks: list[bytes] = []
        self.size = 0
        self.tensors: list[Any] = []

    def add(self, init: Any, raw: bytes) -> None:
        from onnx import TensorProto

        offset = -(-self.size // _ALIGN) * _ALIGN
        self.chunks += [b"\0" * (offset - self.size), raw]
        self.size = offset + len(raw)
        init.ClearField("raw_data")
        init.data_location = TensorProto.EXTERNAL
        del init.external_data[:]
        for key, value in (("location", self.file_name), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = init.external_data.add()
            entry.key, entry.value = key, value
        self.tensors.append(init)

    def point_to(self, location: str) -> None:
        for init in self.tensors:
            for entry in init.external_data:
                if entry.key == "location":
                    entry.value = location


def _write_onnx(proto: Any, out: Path, data: _ExternalData, check: bool) -> None:
    """Write the data file and the model to temporary files, check the model runs, then move both into place (the
    data file first)."""
    with contextlib.ExitStack() as stack:
        model_tmp = stack.enter_context(atomic_write(out))
        data_tmp = stack.enter_context(atomic_write(out.parent / data.file_name)) if data.tensors else None
        if data_tmp is not None:
            data_tmp.write_bytes(b"".join(data.chunks))
            data.point_to(data_tmp.name)
        model_tmp.write_bytes(proto.SerializeToString())
        if check:
            _check_runs(model_tmp, proto, out)
        if data_tmp is not None:
            data.point_to(data.file_name)
            model_tmp.write_bytes(proto.SerializeToString())


def _check_runs(model_path: Path, proto: Any, out: Path) -> None:
    from .verify import import_onnxruntime, random_inputs

    try:
        ort = import_onnxruntime()
    except ModscopeError:
        return  # onnxruntime is optional; without it the result is written unchecked
    try:
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        try:
            feeds = random_inputs(proto)
        except ShapeError:
            return  # inputs that cannot be made up: creating the session is the check
        session.run(None, feeds)
    except Exception as exc:
        raise ModscopeError(
            f"the ablated ONNX model for {out} does not run in onnxruntime ({str(exc).strip().splitlines()[0]}); "
            "pass check=False to write it anyway"
        ) from exc
