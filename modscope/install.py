"""Install hints that fit the way modscope was installed: from a clone (``pip install -e``) or as a package."""

from __future__ import annotations

from pathlib import Path


def installed_from_clone(package_dir: Path | None = None) -> bool:
    """True when modscope runs from a source checkout (a ``pyproject.toml`` beside the package folder)."""
    package_dir = package_dir or Path(__file__).resolve().parent
    return (package_dir.parent / "pyproject.toml").is_file()


def install_hint(extra: str, *, from_clone: bool | None = None) -> str:
    """The pip command that installs ``extra`` for this installation.

    Example:
        >>> install_hint("verify", from_clone=False)
        'pip install "modscope[verify]"'
        >>> install_hint("verify", from_clone=True)
        'pip install -e ".[verify]" (in your modscope clone)'
    """
    if installed_from_clone() if from_clone is None else from_clone:
        return f'pip install -e ".[{extra}]" (in your modscope clone)'
    return f'pip install "modscope[{extra}]"'
