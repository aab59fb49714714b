"""Where tensors run: `resolve_device` turns a user's ``device`` option into a ``torch.device``.

A leaf module (it imports only torch and `modscope.errors`), so that the learner, `evaluate` and the report resolve
devices the same way without importing each other.
"""

from __future__ import annotations

import torch

from .errors import InvalidParameterError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or cuda when present, else cpu.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, a ``torch.device``, or ``None`` for the default.

    Returns:
        The ``torch.device`` to run on.

    Raises:
        InvalidParameterError: the name is not a device, or CUDA was asked for and is not available.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InvalidParameterError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidParameterError("device 'cuda' was asked for but CUDA is not available; use device='cpu'")
    return dev
