"""Command-line flags derived from a config dataclass: one flag per field, typed and documented by the field.

The flags carry no defaults of their own: a flag that is not given is left out, so the dataclass's default applies.
The help of each flag is the docstring under its field (the string literal that follows it in the class body).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
import types
import typing
from itertools import pairwise
from pathlib import Path
from typing import Any


def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` read from the class source (the string literal under each annotated field)."""
    try:  # not inspect.getsource: importing inspect costs more than the whole --help should take
        tree = ast.parse(Path(sys.modules[cls.__module__].__file__ or "").read_text(encoding="utf-8"))
    except (OSError, KeyError, SyntaxError):  # no source (a frozen app): the flags work without help text
        return {}
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__]
    body = classes[0].body if classes else []
    docs = {}
    for node, after in pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _optional(tp: Any) -> tuple[Any, bool]:
    """``(T, True)`` for ``T | None``, else ``(tp, False)``."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(rest) < len(args):
            return rest[0], True
    return tp, False


def _none_or(convert: Any, type_name: str) -> Any:
    def parse(text: str) -> Any:
        if text.lower() == "none":
            return None
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {type_name} or 'none', got {text!r}") from None

    parse.__name__ = type_name
    return parse


def _show(default: Any) -> str:
    if default is None or default == ():
        return "none"
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    if isinstance(default, bool):
        return "yes" if default else "no"
    return str(default)


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_dataclass_flags(group: Any, cls: type) -> None:
    """Add one flag per field of dataclass ``cls`` to an argparse parser or group.

    bool fields become ``--name/--no-name``, tuple fields repeatable flags, Literal fields choices, ``X | None``
    fields accept ``none``. Every flag has ``default=SUPPRESS``.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp, optional = _optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = docs.get(f.name, "").replace("``", "").replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                  "help": f"{help_text} (default: {_show(default)})"}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is tuple:
            kwargs.update(action="append", metavar="PATTERN")
        elif typing.get_origin(tp) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(tp))
        elif tp in (int, float, str):
            kwargs["type"] = _none_or(tp, tp.__name__) if optional else tp
            kwargs["metavar"] = {int: "N", float: "X", str: "NAME"}[tp]
        group.add_argument(flag_name(f.name), **kwargs)


def dataclass_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The values of the flags of ``cls`` that were given (tuples for repeatable flags)."""
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            v = getattr(args, f.name)
            values[f.name] = tuple(v) if isinstance(v, list) else v
    return values
