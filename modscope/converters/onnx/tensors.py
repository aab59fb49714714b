"""ONNX tensors as torch tensors: element types, raw and typed storage, and external-data files.

External data is read only from files inside the model's own folder: a location that is absolute, that climbs out
with ``..`` or that leads out through a symbolic link is refused, so a model file cannot make modscope read
arbitrary files. Nothing in a tensor is ever executed.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ...errors import ModelLoadError

_T = onnx.TensorProto

#: element types read straight from ``raw_data`` (little-endian bytes in ONNX's layout).
_RAW_DTYPES: dict[int, torch.dtype] = {
    _T.FLOAT: torch.float32,
    _T.DOUBLE: torch.float64,
    _T.FLOAT16: torch.float16,
    _T.BFLOAT16: torch.bfloat16,
    _T.INT8: torch.int8,
    _T.INT16: torch.int16,
    _T.INT32: torch.int32,
    _T.INT64: torch.int64,
    _T.UINT8: torch.uint8,
    _T.UINT16: torch.uint16,
    _T.UINT32: torch.uint32,
    _T.UINT64: torch.uint64,
    _T.BOOL: torch.bool,
    _T.COMPLEX64: torch.complex64,
    _T.COMPLEX128: torch.complex128,
    _T.FLOAT8E4M3FN: torch.float8_e4m3fn,
    _T.FLOAT8E4M3FNUZ: torch.float8_e4m3fnuz,
    _T.FLOAT8E5M2: torch.float8_e5m2,
    _T.FLOAT8E5M2FNUZ: torch.float8_e5m2fnuz,
}

#: ml_dtypes element types (numpy dtype names) torch has bit-identical types for.
_ML_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e4m3fnuz": torch.float8_e4m3fnuz,
    "float8_e5m2": torch.float8_e5m2,
    "float8_e5m2fnuz": torch.float8_e5m2fnuz,
}


def tensor_from_proto(proto: onnx.TensorProto, base_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """A TensorProto as a new torch tensor.

    Args:
        proto: the tensor (an initializer, a ``Constant`` value, an attribute).
        base_dir: the folder of the model file, where external data files are looked up. None for in-memory
            models, which then cannot use external data.

    Returns:
        A tensor with the ONNX element type (int64 stays int64, bool stays bool, bfloat16 and float8 types map to
        torch's). Packed 2/4/6-bit types are widened to int8/uint8/float32.

    Raises:
        ModelLoadError: strings, a data size that does not match the shape, or an external file that is missing
            or lies outside ``base_dir``.

    Example:
        >>> from onnx import numpy_helper
        >>> import numpy as np
        >>> tensor_from_proto(numpy_helper.from_array(np.arange(3, dtype=np.int64))).tolist()
        [0, 1, 2]
    """
    shape = tuple(int(d) for d in proto.dims)
    dtype = _RAW_DTYPES.get(proto.data_type)
    if proto.data_location == _T.EXTERNAL:
        raw = read_external_data(proto, base_dir)
    elif proto.HasField("raw_data"):
        raw = proto.raw_data
    else:
        return _via_numpy(proto)
    if dtype is None or sys.byteorder != "little":
        copy = _T()
        copy.CopyFrom(proto)
        copy.ClearField("external_data")
        copy.data_location = _T.DEFAULT
        copy.raw_data = raw
        return _via_numpy(copy)
    return _from_raw(raw, dtype, shape, proto.name)


def _from_raw(raw: bytes, dtype: torch.dtype, shape: tuple[int, ...], name: str) -> torch.Tensor:
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(raw) != numel * itemsize:
        raise ModelLoadError(
            f"tensor '{name}' holds {len(raw)} bytes but its shape {list(shape)} needs {numel * itemsize}; "
            "the file is truncated or corrupt, re-export or re-download it"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():  # bytes are read-only; the clone below makes the tensor writable
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(raw, dtype=dtype).reshape(shape).clone()


def _via_numpy(proto: onnx.TensorProto) -> torch.Tensor:
    if proto.data_type == _T.STRING:
        raise ModelLoadError(f"tensor '{proto.name}' holds strings, which modscope cannot convert to torch")
    try:
        array = numpy_helper.to_array(proto)
    except (ValueError, TypeError) as exc:
        raise ModelLoadError(f"tensor '{proto.name}' cannot be decoded ({exc}); the file is corrupt") from exc
    return numpy_to_torch(array)


def numpy_to_torch(array: np.ndarray) -> torch.Tensor:
    """A numpy array (including ml_dtypes element types) as a new torch tensor of the matching dtype."""
    name = array.dtype.name
    if name in _ML_DTYPES:
        bits = np.ascontiguousarray(array).view(np.uint16 if array.dtype.itemsize == 2 else np.uint8)
        return torch.from_numpy(bits.copy()).view(_ML_DTYPES[name])
    if array.dtype.kind == "V" or name.startswith(("int2", "int4", "uint2", "uint4", "float4", "float6", "float8")):
        widened = "int8" if name.startswith("int") else "uint8" if name.startswith("uint") else "float32"
        return torch.from_numpy(array.astype(widened))
    if array.dtype.kind in "OUS":
        raise ModelLoadError("string tensors are not supported by modscope's ONNX converter")
    return torch.from_numpy(np.array(array, copy=True))


def read_external_data(proto: onnx.TensorProto, base_dir: str | os.PathLike | None) -> bytes:
    """The bytes of a tensor stored in an external file, read only from inside ``base_dir``.

    Raises:
        ModelLoadError: no ``base_dir`` (an in-memory model), a location that escapes ``base_dir``, a missing
            file, or a file shorter than the tensor needs.
    """
    info = {entry.key: entry.value for entry in proto.external_data}
    location = info.get("location", "")
    what = f"tensor '{proto.name}' stores its data in the external file '{location}'"
    if base_dir is None:
        raise ModelLoadError(
            f"{what}, but the model was given in memory; load it from its file path, or load the ModelProto with "
            "onnx.load(path) so that the external data is read in"
        )
    if not location:
        raise ModelLoadError(f"tensor '{proto.name}' is marked as external but names no file; the file is corrupt")
    base = Path(base_dir).resolve()
    target = (base / location).resolve()
    if Path(location).is_absolute() or not target.is_relative_to(base):
        raise ModelLoadError(
            f"{what}, which lies outside the model's folder {base}; modscope reads external data only from "
            "files inside that folder, move the data file next to the model"
        )
    if not target.is_file():
        raise ModelLoadError(f"{what}, which does not exist in {base}; copy the data file next to the model")
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else -1
    except ValueError as exc:
        raise ModelLoadError(f"{what} with an unreadable offset or length ({exc}); the file is corrupt") from exc
    with open(target, "rb") as handle:
        handle.seek(offset)
        raw = handle.read(length)
    if length >= 0 and len(raw) != length:
        raise ModelLoadError(f"{what}, which is shorter than the {length} bytes it should hold; it is truncated")
    return raw
