"""ONNX tensors as torch tensors: element types, raw and typed storage, and external-data files.

External data is read only from files inside the model's own folder: a location that is absolute, that climbs out
with ``..`` or that leads out through a symbolic link is refused, so a model file cannot make modscope read
arbitrary files. Nothing in a tensor is ever executed.

A tensor's header is checked against its bytes before anything is allocated (`check_tensor_proto`): the element
type must be an ONNX type, every dimension non-negative, and the data present (raw bytes, typed values or the
external file's range) exactly what the shape needs, so a header cannot make modscope allocate more than the file
holds.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ...errors import MissingFileError, ModelLoadError

_T = onnx.TensorProto

#: ONNX element type -> torch dtype, for every type torch holds bit for bit: the converter's one dtype table (raw data
#: is read straight into it; handlers look their ``to``/``dtype`` attributes up in it).
ONNX_TO_TORCH: Mapping[int, torch.dtype] = MappingProxyType({
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
})

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
        MissingFileError: an external data file that is missing.
        ModelLoadError: strings, a data size that does not match the shape, or an external file that lies outside
            ``base_dir``.

    Example:
        >>> from onnx import numpy_helper
        >>> import numpy as np
        >>> tensor_from_proto(numpy_helper.from_array(np.arange(3, dtype=np.int64))).tolist()
        [0, 1, 2]
    """
    shape = check_tensor_proto(proto)
    dtype = ONNX_TO_TORCH.get(proto.data_type)
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


#: element types stored packed, several to a byte: bits per element.
_PACKED_BITS = {_T.INT4: 4, _T.UINT4: 4, _T.FLOAT4E2M1: 4, _T.INT2: 2, _T.UINT2: 2, _T.FLOAT6E2M3: 6, _T.FLOAT6E3M2: 6}
#: packed types whose typed field (int32_data) holds one byte of packed elements per entry: elements per entry.
_PACKED_PER_ENTRY = {_T.INT4: 2, _T.UINT4: 2, _T.FLOAT4E2M1: 2, _T.INT2: 4, _T.UINT2: 4}
_COMPLEX = (_T.COMPLEX64, _T.COMPLEX128)


def _name(proto: onnx.TensorProto) -> str:
    return f"tensor '{proto.name}'" if proto.name else "a tensor"


def check_tensor_proto(proto: onnx.TensorProto) -> tuple[int, ...]:
    """The tensor's shape, after checking that its header is consistent with the data it holds.

    External data is checked by `read_external_data` (the file is only opened there).

    Raises:
        ModelLoadError: an element type that ONNX does not define, a negative dimension, or raw bytes or typed
            values whose count does not match the shape.

    Example:
        >>> from onnx import helper, TensorProto
        >>> check_tensor_proto(helper.make_tensor("w", TensorProto.FLOAT, [2, 3], [0.0] * 6))
        (2, 3)
    """
    shape = tuple(int(d) for d in proto.dims)
    if proto.data_type not in _T.DataType.values() or proto.data_type == _T.UNDEFINED:
        raise ModelLoadError(
            f"{_name(proto)} has element type {proto.data_type}, which is not an ONNX type; the file is corrupt"
        )
    if any(d < 0 for d in shape):
        raise ModelLoadError(f"{_name(proto)} has a negative dimension in its shape {list(shape)}; the file is corrupt")
    if proto.data_location == _T.EXTERNAL:
        return shape
    numel = math.prod(shape)
    if proto.HasField("raw_data"):
        need, have, unit = expected_bytes(proto.data_type, numel), len(proto.raw_data), "bytes"
    elif proto.data_type == _T.STRING:
        need, have, unit = numel, len(proto.string_data), "strings"
    else:
        field = onnx.helper.tensor_dtype_to_field(proto.data_type)
        per_entry = _PACKED_PER_ENTRY.get(proto.data_type, 1)
        need = 2 * numel if proto.data_type in _COMPLEX else -(-numel // per_entry)
        have, unit = len(getattr(proto, field)), f"values in {field}"
    if need != have:
        raise ModelLoadError(
            f"{_name(proto)} holds {have} {unit} but its shape {list(shape)} needs {need}; the file is truncated or "
            "corrupt, re-export or re-download it"
        )
    return shape


def expected_bytes(data_type: int, numel: int) -> int:
    """The bytes ``numel`` elements of ONNX element type ``data_type`` take in ``raw_data`` or an external file."""
    bits = _PACKED_BITS.get(data_type)
    if bits is not None:
        return -(-numel * bits // 8)
    return numel * onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize


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

    Exactly the bytes the tensor's shape needs are read, after checking that the file holds them.

    Raises:
        MissingFileError: the file is missing.
        ModelLoadError: no ``base_dir`` (an in-memory model), a location that escapes ``base_dir`` or holds a NUL
            byte, an offset or length that is not a non-negative integer, a length that does not
            match the shape, or a file shorter than the tensor needs.
    """
    info = {entry.key: entry.value for entry in proto.external_data}
    location = info.get("location", "")
    shown = location if location.isprintable() else repr(location)[1:-1]
    what = f"{_name(proto)} stores its data in the external file '{shown}'"
    if base_dir is None:
        raise ModelLoadError(
            f"{what}, but the model was given in memory; load it from its file path, or load the ModelProto with "
            "onnx.load(path) so that the external data is read in"
        )
    if not location:
        raise ModelLoadError(f"{_name(proto)} is marked as external but names no file; the file is corrupt")
    if "\0" in location:
        raise ModelLoadError(f"{what}, whose name holds a NUL byte, which no file name can; the file is corrupt")
    base = Path(base_dir).resolve()
    try:
        target = (base / location).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
        raise ModelLoadError(f"{what}, which cannot be resolved ({exc}); the file is corrupt") from exc
    if Path(location).is_absolute() or not target.is_relative_to(base):
        raise ModelLoadError(
            f"{what}, which lies outside the model's folder {base}; modscope reads external data only from "
            "files inside that folder, move the data file next to the model"
        )
    if not target.is_file():
        raise MissingFileError(f"{what}, which does not exist in {base}; copy the data file next to the model")
    offset, length = _external_int(info, "offset", what), _external_int(info, "length", what)
    need = expected_bytes(proto.data_type, math.prod(int(d) for d in proto.dims))
    if length is not None and length != need:
        raise ModelLoadError(
            f"{what} with a length of {length} bytes, but its shape {list(proto.dims)} needs {need}; the file is corrupt"
        )
    offset, size = offset or 0, target.stat().st_size
    if offset + need > size:
        raise ModelLoadError(
            f"{what}, which holds {max(size - offset, 0)} bytes from offset {offset} but its shape {list(proto.dims)} "
            f"needs {need}; the data file is truncated, copy it again"
        )
    with open(target, "rb") as handle:
        handle.seek(offset)
        return handle.read(need)


def _external_int(info: dict[str, str], key: str, what: str) -> int | None:
    """A non-negative integer entry (offset, length) of a tensor's external-data record, or None when absent."""
    if key not in info:
        return None
    text = info[key]
    if not text.strip().isdigit():
        shown = text if text.isprintable() else repr(text)[1:-1]
        raise ModelLoadError(f"{what} with the {key} '{shown[:40]}', which is not a non-negative integer; the file is corrupt")
    return int(text)
