"""sha256 checksums of model files and model folders: what `modscope.load` records in ``Model.source`` and a run
folder in its config.json, so that a run can tell when its model file has changed.

A leaf module (standard library only): the loaders, the exporter and the run folders share it without importing
each other.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in chunks.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile(delete=False) as f:
        ...     _ = f.write(b"abc")
        >>> file_sha256(f.name)[:16]
        'ba7816bf8f01cfea'
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_checksum(path: str | os.PathLike) -> str:
    """sha256 over a transformers model folder's config.json and safetensors files (names and contents)."""
    p = Path(path)
    h = hashlib.sha256()
    for f in sorted([p / "config.json", *p.glob("*.safetensors")]):
        h.update(f.name.encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def path_checksum(path: str | os.PathLike) -> str:
    """The checksum of a model file, or of a transformers model folder (`folder_checksum`)."""
    return folder_checksum(path) if Path(path).is_dir() else file_sha256(path)
