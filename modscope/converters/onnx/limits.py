"""How much memory an ONNX file may make modscope allocate, and the one error that says a limit was hit.

A model file is untrusted input: a few hundred bytes can ask for a ``Range`` to ten billion or a
``ConstantOfShape`` of a terabyte. modscope checks the size a node would produce *before* computing it:

- while loading, every node whose inputs are all constants is sized first (``sizes.py``); one that would make a
  tensor larger than ``max_tensor_bytes`` fails the load, naming the node, and folding stops keeping results once
  ``FOLD_BUDGET_BYTES`` have been computed (the rest runs with the model);
- while the model runs, the operators whose output size comes from tensor *values* (Range, Tile, Expand,
  ConstantOfShape, Resize, Pad ...) are sized before they run, against the same limit.

The limit is ``max_tensor_bytes=`` of `modscope.load`, else the environment variable ``MODSCOPE_MAX_TENSOR_BYTES``
(a number of bytes, or with a unit: ``512MB``, ``8GiB``), else `DEFAULT_MAX_TENSOR_BYTES`.

Example:
    >>> parse_bytes("1.5GiB")
    1610612736
    >>> format_bytes(3 << 30)
    '3.0 GiB'
"""

from __future__ import annotations

import math
import os
import re

from ...errors import InvalidParameterError, ResourceLimitError

#: the environment variable that sets the per-tensor limit when ``max_tensor_bytes`` is not given.
ENV_VAR = "MODSCOPE_MAX_TENSOR_BYTES"
#: the per-tensor limit by default: larger than any tensor the models modscope studies make in one step.
DEFAULT_MAX_TENSOR_BYTES = 2 << 30
#: constant folding keeps computing results at load time until this many bytes have been made.
FOLD_BUDGET_BYTES = 256 << 20

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """A byte count written as ``123``, ``512MB`` or ``1.5GiB`` (units are case-insensitive).

    Raises:
        InvalidParameterError: the text is not a positive size.
    """
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise InvalidParameterError(
            f"'{text}' is not a size in bytes; write e.g. 4000000000, 512MB or 8GiB"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps the number at least 1 (``'3.0 GiB'``)."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def resolve_max_tensor_bytes(value: int | str | None = None) -> int:
    """The per-tensor limit: ``value`` if given, else ``$MODSCOPE_MAX_TENSOR_BYTES``, else the default.

    Raises:
        InvalidParameterError: ``value`` or the environment variable is not a positive size.
    """
    if value is None:
        env = os.environ.get(ENV_VAR, "").strip()
        if not env:
            return DEFAULT_MAX_TENSOR_BYTES
        try:
            return parse_bytes(env)
        except InvalidParameterError:
            raise InvalidParameterError(
                f"{ENV_VAR}={env!r} is not a size in bytes; write e.g. 4000000000, 512MB or 8GiB"
            ) from None
    if isinstance(value, str):
        return parse_bytes(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidParameterError(f"max_tensor_bytes must be a positive number of bytes, got {value!r}")
    return value


def too_large(node_name: str, op_type: str, numel: float, nbytes: float, limit: int) -> ResourceLimitError:
    """The one-sentence error for a node whose output would exceed ``limit`` bytes."""
    if nbytes < float("inf"):
        count = f"{int(numel):,} elements ({format_bytes(nbytes)})"
        gib = 1 << max(math.ceil(math.log2(max(nbytes, 1) / (1 << 30))), 0)
        fix = f"if the model really needs it, raise the limit with {ENV_VAR}={gib}GiB or max_tensor_bytes= of modscope.load"
    else:
        count, fix = "unboundedly many elements", "the file is corrupt or hostile"
    return ResourceLimitError(
        f"ONNX node '{node_name}' ({op_type}) would make a tensor of {count}, more than the limit of "
        f"{format_bytes(limit)} per tensor; {fix}"
    )


def loop_too_large(node_name: str, iterations: int, nbytes: float, limit: int) -> ResourceLimitError:
    """The one-sentence error for a Loop whose values outgrow ``limit`` bytes after ``iterations`` iterations."""
    return ResourceLimitError(
        f"ONNX node '{node_name}' (Loop) holds {format_bytes(nbytes)} of loop-carried and scan-output values after "
        f"{iterations:,} iterations (counting 1 KiB per iteration), more than the limit of {format_bytes(limit)}; "
        f"its trip count or body is runaway, or raise the limit with {ENV_VAR} or max_tensor_bytes= of modscope.load"
    )
