"""Zip archives (``.pt``, ``.pt2``, TorchScript, ``.npz``) checked before torch or numpy reads them.

Python's ``zipfile``, ``torch``'s C++ reader and numpy do not agree on every archive: with two members of the same
name, ``zipfile.ZipFile.read`` returns the *last* one while ``torch.export.load`` reads the *first*. A safety check
that reads one copy and a loader that reads the other would judge trust on bytes the loader never sees. So every
zip modscope opens goes through `check_zip` first, which refuses any archive that a reader could interpret in two
ways or that would cost unbounded memory to read:

- two members with the same name;
- a member whose name is absolute, holds ``..``, a backslash or a NUL byte (outside the archive's root);
- an encrypted member, or one stored with a compression method other than stored (0) or deflate (8);
- a member whose declared uncompressed size is over ``max_member_bytes``, a deflated member that would inflate to
  more than `MAX_INFLATED_BYTES`, or members that together declare more than ``max_total_bytes`` (all checked from
  the central directory, before anything is decompressed).

Once an archive passes, its member names are unique, so every reader sees the same bytes for each name.

The limits default to `MAX_MEMBER_BYTES`, `MAX_INFLATED_BYTES` and `MAX_TOTAL_BYTES`; raise them with the
environment variables ``MODSCOPE_MAX_ZIP_MEMBER_BYTES``, ``MODSCOPE_MAX_ZIP_INFLATED_BYTES`` and
``MODSCOPE_MAX_ZIP_TOTAL_BYTES`` (integers, bytes).

Example:
    >>> import numpy as np
    >>> np.savez("/tmp/doc_arch.npz", x=np.zeros(3))
    >>> [m.filename for m in check_zip("/tmp/doc_arch.npz", "task data file")]
    ['x.npy']
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from ..errors import ModelLoadError, ModscopeError

#: default limit on one member's declared uncompressed size (16 GiB: larger than any single weight file we read).
MAX_MEMBER_BYTES = 16 << 30
#: default limit on the declared uncompressed size of all members together (64 GiB).
MAX_TOTAL_BYTES = 64 << 30
#: default limit on what one *deflated* member may inflate to (2 GiB). torch writes its archives stored, so this
#: bounds what a small compressed file (an .npz, a re-zipped checkpoint) can make a reader allocate.
MAX_INFLATED_BYTES = 2 << 30
#: compression methods the readers behind modscope support: stored and deflate.
_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
_MAX_MEMBERS = 1_000_000


def limit(name: str, default: int) -> int:
    """An integer limit from the environment variable ``name``, or ``default`` when unset.

    Raises:
        InvalidParameterError: the variable is set but is not a positive integer.
    """
    from ..errors import InvalidParameterError

    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise InvalidParameterError(f"environment variable {name} must be a positive number of bytes, got {text!r}")
    return value


def check_zip(
    path: str | os.PathLike,
    what: str = "model file",
    *,
    error: type[ModscopeError] = ModelLoadError,
    max_member_bytes: int | None = None,
    max_total_bytes: int | None = None,
) -> list[zipfile.ZipInfo]:
    """Check a zip archive's directory and return its members; nothing is decompressed.

    Args:
        path: the archive.
        what: how the file is called in messages ("model file", "task data file").
        error: the `ModscopeError` subclass to raise.
        max_member_bytes: limit on one member's declared size (default `MAX_MEMBER_BYTES` or the environment).
        max_total_bytes: limit on the declared size of all members (default `MAX_TOTAL_BYTES` or the environment).

    Returns:
        The members (``zipfile.ZipInfo``), in archive order.

    Raises:
        error: the archive is damaged, or has a duplicate, escaping, encrypted, unknown-method or oversized member.
    """
    p = Path(path)
    member_cap = max_member_bytes or limit("MODSCOPE_MAX_ZIP_MEMBER_BYTES", MAX_MEMBER_BYTES)
    inflate_cap = limit("MODSCOPE_MAX_ZIP_INFLATED_BYTES", MAX_INFLATED_BYTES)
    total_cap = max_total_bytes or limit("MODSCOPE_MAX_ZIP_TOTAL_BYTES", MAX_TOTAL_BYTES)
    try:
        with zipfile.ZipFile(p) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise error(f"{what} {p} is a damaged zip archive (truncated or corrupt: {_short(exc)})") from exc
    if len(infos) > _MAX_MEMBERS:
        raise error(f"{what} {p} is a zip archive with {len(infos):,} members, more than the {_MAX_MEMBERS:,} modscope reads")
    seen: set[str] = set()
    total = 0
    for info in infos:
        name = getattr(info, "orig_filename", info.filename)  # as stored: zipfile cuts names at a NUL byte, torch does not
        if name in seen:
            raise error(f"{what} {p} is refused: its zip archive holds two members named {name!r}, which readers resolve differently")
        seen.add(name)
        if _escapes(name):
            raise error(f"{what} {p} is refused: its zip member {name!r} points outside the archive")
        if info.flag_bits & 0x1:
            raise error(f"{what} {p} is refused: its zip member {name!r} is encrypted")
        if info.compress_type not in _METHODS:
            raise error(f"{what} {p} is refused: its zip member {name!r} uses compression method {info.compress_type} "
                        "(only stored and deflate are read)")
        if info.file_size > member_cap:
            raise error(f"{what} {p} is refused: its zip member {name!r} declares {info.file_size:,} bytes, over the limit of "
                        f"{member_cap:,} (raise it with MODSCOPE_MAX_ZIP_MEMBER_BYTES)")
        if info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > inflate_cap:
            raise error(f"{what} {p} is refused: its compressed zip member {name!r} would inflate to {info.file_size:,} bytes, "
                        f"over the limit of {inflate_cap:,} (raise it with MODSCOPE_MAX_ZIP_INFLATED_BYTES)")
        total += info.file_size
        if total > total_cap:
            raise error(f"{what} {p} is refused: its zip members declare more than {total_cap:,} bytes in all "
                        "(raise the limit with MODSCOPE_MAX_ZIP_TOTAL_BYTES)")
    return infos


def _escapes(name: str) -> bool:
    if not name or "\x00" in name or "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return True
    return any(part == ".." for part in name.split("/"))


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
