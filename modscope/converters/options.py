"""Loader options: which ones a format's loader takes, and a check that the user gave only those.

A leaf of the converters (it imports only `modscope.errors`), shared by `files.load_file` and the loaders.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..errors import InvalidParameterError


def accepted_options(loader: Callable[..., Any]) -> set[str]:
    """The keyword-only parameters of a loader: the options a user may pass for its format."""
    return {
        name for name, prm in inspect.signature(loader).parameters.items() if prm.kind is inspect.Parameter.KEYWORD_ONLY
    }


def check_options(what: str, options: Mapping[str, Any], accepted: Iterable[str]) -> dict[str, Any]:
    """The options that were given (values other than None/False), after checking ``accepted`` has them all.

    Raises:
        InvalidParameterError: an option is not accepted; the message names it and the accepted ones.

    Example:
        >>> check_options("ONNX files", {"op_handlers": None, "trust": False}, ["op_handlers"])
        {}
    """
    given = {k: v for k, v in options.items() if v is not None and v is not False}
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        ok = ", ".join(sorted(accepted)) or "none"
        raise InvalidParameterError(f"option(s) {', '.join(unknown)} do not apply to {what} (accepted: {ok})")
    return given
