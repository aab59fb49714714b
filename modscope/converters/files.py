"""Model files in: recognise a file's format from its content, then hand it to the loader for that format.

The suffix is only a hint. The bytes decide:

========================  =================================================================================
format                    how it is recognised
========================  =================================================================================
``"export"``              a zip holding a ``torch.export`` archive (``archive_format`` = ``pt2``, or the
                          older ``serialized_exported_program.json``)
``"torchscript"``         a zip holding ``constants.pkl`` or a ``code/`` folder (``torch.jit.save``)
``"torch_zip"``           any other zip with a ``data.pkl`` (``torch.save``: a state_dict or a whole module)
``"safetensors"``         8-byte little-endian header length, then a JSON object of that length
``"pickle"``              a pickle stream (``torch.save(..., _use_new_zipfile_serialization=False)``,
                          ``pickle.dump``)
``"onnx"``                an ``onnx.ModelProto`` that parses and has a graph
========================  =================================================================================

A missing, unreadable, empty, truncated or unrecognised file raises `ModelLoadError` with one sentence saying
what is wrong. Options are checked against the loader of the detected format: one it does not take raises
`InvalidParameterError` naming it. Options given as ``None`` or ``False`` count as not given, so a command line
can pass its flags through unchanged.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from ..errors import ModelLoadError, UnreadableFileError
from ..fileio import file_error, require_file
from ..checksums import file_sha256  # noqa: F401 - re-exported: the checksum every loader records
from ..model import Model
from .archives import check_zip
from .options import accepted_options, check_options

FileFormat = Literal["onnx", "export", "torchscript", "torch_zip", "safetensors", "pickle"]

#: what each format is called in messages.
FORMAT_NAMES: Mapping[str, str] = {
    "onnx": "ONNX",
    "export": "torch.export (.pt2)",
    "torchscript": "TorchScript",
    "torch_zip": "torch.save",
    "safetensors": "safetensors",
    "pickle": "pickle",
}

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_FOREIGN_MAGIC = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive; decompress it first"),
    (b"\x89HDF", "an HDF5 file (Keras?); convert it to ONNX with tf2onnx first"),
    (b"TFL3", "a TensorFlow Lite model; convert it to ONNX with tf2onnx first"),
)
_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024


def load_file(path: str | os.PathLike, **options: Any) -> Model:
    """Load a model file of any supported format.

    Args:
        path: the model file.
        **options: options of the detected format's loader: ``op_handlers`` (ONNX, TorchScript), ``factory`` and
            ``trust`` (torch files), ``state_key`` (torch checkpoints), ``example_inputs`` and ``opset`` (TorchScript). ``None`` and ``False`` values
            count as not given.

    Returns:
        A `Model` whose ``source`` records the format, the path and the file's sha256.

    Raises:
        ModelLoadError: the file is missing, unreadable, empty, truncated or of an unknown format, or its loader
            cannot build a model from it.
        UntrustedFileError: the file holds pickled Python objects and ``trust=True`` was not given.
        InvalidParameterError: an option does not apply to the detected format.

    Example:
        >>> import torch
        >>> from modscope.converters.files import load_file
        >>> torch.export.save(torch.export.export(torch.nn.Linear(2, 3), (torch.zeros(1, 2),)), "/tmp/doc_lin.pt2")
        >>> model = load_file("/tmp/doc_lin.pt2")
        >>> model.source.format, [w.source_name for w in model.weights]
        ('export', ['weight', 'bias'])
    """
    p = Path(path)
    from .hf import is_model_folder, load_folder

    if is_model_folder(p):  # a transformers model folder (config.json + *.safetensors)
        return load_folder(p, **check_options("model folders", options, accepted_options(load_folder)))
    fmt = detect_format(p)
    loader = _loader(fmt)
    given = check_options(FORMAT_NAMES[fmt] + " files", options, accepted_options(loader))
    return loader(p, **given)


def detect_format(path: str | os.PathLike) -> FileFormat:
    """The format of a model file, read from its content.

    Args:
        path: the file.

    Returns:
        One of ``"onnx"``, ``"export"``, ``"torchscript"``, ``"torch_zip"``, ``"safetensors"``, ``"pickle"``.

    Raises:
        ModelLoadError: the file is missing, unreadable, empty, truncated or of no known format.

    Example:
        >>> import torch
        >>> from modscope.converters.files import detect_format
        >>> torch.save({"w": torch.zeros(2)}, "/tmp/doc_sd.pt")
        >>> detect_format("/tmp/doc_sd.pt")
        'torch_zip'
    """
    p = Path(path)
    head = _read_head(p, 64)
    if not head:
        raise ModelLoadError(f"model file {p} is empty")
    if head.startswith(_ZIP_MAGIC):
        return _zip_format(p)
    if _looks_like_safetensors(p, head):
        return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    for magic, what in _FOREIGN_MAGIC:
        if head.startswith(magic):
            raise ModelLoadError(f"{p} is not a model file: it is {what}")
    status = _onnx_status(p)
    if status == "model":
        return "onnx"
    if status == "no_graph":
        raise ModelLoadError(f"{p} is not an ONNX model: it is protobuf data without a graph (another kind of message, or truncated)")
    if p.suffix.lower() == ".onnx" or _onnx_like_head(head):
        raise ModelLoadError(f"{p} looks like an ONNX file but cannot be parsed (truncated or corrupt); export it again")
    raise ModelLoadError(
        f"{p} is not a model file modscope recognises (expected ONNX, a torch.export .pt2, TorchScript, "
        "a torch.save checkpoint or safetensors)"
    )


# -- detection helpers --------------------------------------------------------------------------------------------
def _loader(fmt: FileFormat) -> Callable[..., Model]:
    if fmt == "onnx":
        from .onnx.loader import load_onnx

        return load_onnx
    from . import pytorch as torch_loaders
    from .torchscript import load_torchscript

    return {
        "export": torch_loaders.load_pt2,
        "torchscript": load_torchscript,
        "torch_zip": torch_loaders.load_torch_file,
        "pickle": torch_loaders.load_torch_file,
        "safetensors": torch_loaders.load_safetensors,
    }[fmt]


def _read_head(p: Path, n: int) -> bytes:
    if p.is_dir():
        raise UnreadableFileError(f"{p} is a folder but not a model folder (config.json + *.safetensors); give the path of a model file")
    require_file(p, "model file")
    try:
        with open(p, "rb") as f:
            return f.read(n)
    except OSError as exc:
        raise file_error(exc, p, "model file") from exc


def _zip_format(p: Path) -> FileFormat:
    check_zip(p)  # unique, contained, plain members of bounded size: every reader sees the same bytes
    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
            if any(n == "archive_format" or n.endswith("/archive_format") for n in names):
                fmt_file = next(n for n in names if n == "archive_format" or n.endswith("/archive_format"))
                if z.read(fmt_file).strip() == b"pt2":
                    return "export"
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as exc:
        raise ModelLoadError(f"{p} is a damaged zip archive (truncated or corrupt): {exc}") from exc
    leaves = {n.split("/", 1)[-1] for n in names}
    if "serialized_exported_program.json" in leaves:
        return "export"
    if "constants.pkl" in leaves or any(leaf.startswith("code/") for leaf in leaves):
        return "torchscript"
    if "data.pkl" in leaves:
        return "torch_zip"
    raise ModelLoadError(f"{p} is a zip archive but not a PyTorch checkpoint, TorchScript or torch.export archive")


def _looks_like_safetensors(p: Path, head: bytes) -> bool:
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (n,) = struct.unpack("<Q", head[:8])
    size = p.stat().st_size
    if n > _SAFETENSORS_MAX_HEADER:
        return False
    if 8 + n > size:
        raise ModelLoadError(f"{p} is a truncated safetensors file (its header says {n} bytes, the file has {size - 8})")
    with open(p, "rb") as f:
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{p} is a corrupt safetensors file: its JSON header does not parse ({exc})") from exc
    if not isinstance(header, dict):
        raise ModelLoadError(f"{p} is a corrupt safetensors file: its header is not a JSON object")
    end = _safetensors_data_end(p, header)
    if 8 + n + end > size:
        raise ModelLoadError(f"{p} is a truncated safetensors file (tensor data ends past the end of the file)")
    return True


def _safetensors_data_end(p: Path, header: dict[str, Any]) -> int:
    """Where the tensor data ends, after checking each entry's dtype, shape and offsets are well-formed."""
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
        shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if ok else (None, None)
        ok = ok and isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
        ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
        if not ok or offsets[0] > offsets[1]:
            raise ModelLoadError(
                f"{p} is a corrupt safetensors file: the header entry of {str(name)[:80]!r} needs a dtype string, a shape "
                "of non-negative integers and data_offsets [begin, end] of integers"
            )
        end = max(end, offsets[1])
    return end


def _onnx_like_head(head: bytes) -> bool:
    """ModelProto bytes start with ir_version (field 1, a small varint) followed by another ModelProto field."""
    return len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 20 and head[2] in (0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42)


def _onnx_status(p: Path) -> Literal["model", "no_graph", "unparsable"]:
    import onnx
    from google.protobuf.message import DecodeError

    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(p.read_bytes())
    except (DecodeError, RuntimeError, ValueError):
        return "unparsable"
    except OSError as exc:
        raise file_error(exc, p, "model file") from exc
    has_graph = proto.HasField("graph") and (len(proto.graph.node) > 0 or len(proto.graph.output) > 0)
    return "model" if proto.ir_version > 0 and has_graph else "no_graph"
