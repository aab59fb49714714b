"""File modes for outputs: every file modscope writes gets the mode the user's umask gives a new file.

Temporary files made with `tempfile.mkstemp` or by safetensors are created ``0600``; renaming them into place would
otherwise leave some outputs private while the rest are ``0644`` (under the usual umask 022).
"""

from __future__ import annotations

import os
from pathlib import Path


def default_file_mode() -> int:
    """The mode a newly created regular file gets under the current umask (``0o666 & ~umask``).

    Example:
        >>> old = os.umask(0o022); mode = default_file_mode(); _ = os.umask(old)
        >>> oct(mode)
        '0o644'
    """
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def match_umask(path: str | os.PathLike) -> Path:
    """Set ``path``'s permission bits to what the umask gives a new file (or folder) and return it as a `Path`."""
    path = Path(path)
    mode = default_file_mode()
    os.chmod(path, mode | ((mode & 0o444) >> 2) if path.is_dir() else mode)  # folders: x wherever r
    return path
