"""Files modscope writes and reads back: every file is written atomically (`atomic_write`: a temporary name in the
same folder, renamed into place on success, removed on failure), and JSON has one writer (`dumps`: ``schema_version``
first, numpy/torch values made plain, NaN and infinities written as ``null`` since JSON has none) and one reader
(`read_json`).

A leaf module (standard library, `modscope.errors` and `modscope.filemodes` only): run folders, reports, experiments, masks and exports
share it without importing each other.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import InvalidParameterError, MissingFileError, UnreadableFileError
from .filemodes import match_umask

#: version of the JSON files modscope writes (config.json, report.json, --json outputs).
SCHEMA_VERSION = 1


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new temporary path next to ``path``; on success it is renamed to ``path``, on failure removed.

    modscope's one atomic writer: run folders, reports, masks, checkpoints, experiment outputs and exported models
    all go through it, so no reader ever sees a half-written file, whatever stops the process. The temporary name
    (``.NAME.PID.<random>.tmp``) is unique even between threads and carries the process id; the file gets the mode
    the umask gives a new file before the rename (``mkstemp`` and writers such as safetensors make files ``0600``).

    Example:
        >>> from pathlib import Path
        >>> with atomic_write("/tmp/doc_atomic.txt") as tmp:
        ...     _ = tmp.write_text("done")
        >>> Path("/tmp/doc_atomic.txt").read_text()
        'done'
    """
    final = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        match_umask(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def jsonable(value: Any) -> Any:
    """``value`` with numpy/torch values made plain and non-finite floats made ``None`` (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars, torch tensors
    if callable(tolist):
        return jsonable(tolist())
    return value


def dumps(data: Mapping[str, Any]) -> str:
    """JSON text with ``schema_version`` first (added when missing)."""
    body = {"schema_version": SCHEMA_VERSION, **jsonable(data)}
    return json.dumps(body, indent=1, allow_nan=False) + "\n"


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> Path:
    """Write ``data`` (with ``schema_version``) as JSON to ``path`` atomically."""
    return write_text(path, dumps(data))


def require_file(path: str | os.PathLike, what: str, hint: str = "") -> Path:
    """``path`` as a `Path` when it names an existing file.

    Raises:
        MissingFileError: nothing exists at ``path``.
        UnreadableFileError: ``path`` is a folder.

    Example:
        >>> require_file("/no/such/model.onnx", "model file")
        Traceback (most recent call last):
        ...
        modscope.errors.MissingFileError: model file /no/such/model.onnx does not exist
    """
    return _require(Path(path), what, hint, folder=False)


def require_folder(path: str | os.PathLike, what: str, hint: str = "") -> Path:
    """``path`` as a `Path` when it names an existing folder; else `MissingFileError` (or `UnreadableFileError`
    when it is a file)."""
    return _require(Path(path), what, hint, folder=True)


def _require(p: Path, what: str, hint: str, *, folder: bool) -> Path:
    if p.is_dir() if folder else p.is_file():
        return p
    if p.exists():
        wrong, right = ("file", "folder") if folder else ("folder", "file")
        raise UnreadableFileError(f"{what} {p} is a {wrong}, not a {right}{_hint(hint)}")
    raise MissingFileError(f"{what} {p} does not exist{_hint(hint)}")


def file_error(exc: OSError, path: str | os.PathLike, what: str, hint: str = "") -> MissingFileError | UnreadableFileError:
    """The modscope error for an `OSError` met while reading ``path``: `MissingFileError` when it is gone,
    `UnreadableFileError` otherwise (to raise ``from exc``)."""
    if isinstance(exc, FileNotFoundError):
        return MissingFileError(f"{what} {Path(path)} does not exist{_hint(hint)}")
    return UnreadableFileError(f"{what} {Path(path)} cannot be read ({_reason(exc)}){_hint(hint)}")


def _hint(hint: str) -> str:
    return f"; {hint}" if hint else ""


def read_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """Read a JSON object written by modscope.

    Raises:
        MissingFileError, UnreadableFileError: the file is missing or the system will not read it.
        InvalidParameterError: the file is not JSON, or of a newer schema.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise file_error(exc, p, what) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidParameterError(f"{what} {p} cannot be read ({_reason(exc)}); make it again with `modscope fit`") from exc
    except RecursionError:
        raise InvalidParameterError(f"{what} {p} cannot be read (it is nested too deeply to be modscope's); make it again with `modscope fit`") from None
    if not isinstance(data, dict):
        raise InvalidParameterError(f"{what} {p} is not a JSON object; make it again with `modscope fit`")
    version = data.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise InvalidParameterError(
            f"{what} {p} has schema_version {version!r}, this modscope reads up to {SCHEMA_VERSION}; upgrade modscope"
        )
    return data


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc).splitlines()[0]
