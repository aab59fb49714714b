"""Pieces the subcommands share: model-loading flags, stderr logging, JSON and text output."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--factory`` and ``--trust``: how to load torch checkpoints (passed to `modscope.load`)."""
    group = parser.add_argument_group("model loading (torch checkpoints)")
    group.add_argument("--factory", metavar="PKG.MOD:FN",
                       help="for a state_dict or safetensors checkpoint: the function that builds the empty module")
    group.add_argument("--trust", action="store_true",
                       help="allow loading a pickled module (this runs code from the file; only for files you trust)")
    group.add_argument("--state-key", metavar="KEY",
                       help="for a training checkpoint: the key holding the state_dict (default: model_state_dict, "
                            "model_state, state_dict, model, ...); A/B for a nested one")


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The model-loading options that were given, for `modscope.load`."""
    return {k: v for k, v in (("factory", args.factory), ("trust", args.trust), ("state_key", getattr(args, "state_key", None))) if v}


def log(args: argparse.Namespace, message: str) -> None:
    """A progress or log line on stderr (silenced by --quiet)."""
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


def print_json(data: dict[str, Any]) -> None:
    """Data for programs on stdout, with ``schema_version``."""
    from ..runs import dumps

    sys.stdout.write(dumps(data))


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An aligned plain-text table (numbers right-aligned), cells formatted like the reports' (`render_table`)."""
    from ..texttable import render_table

    return render_table(headers, rows)


def parse_assignment(text: str, what: str) -> tuple[str | None, str]:
    """``NAME=VALUE`` -> (NAME, VALUE); a bare ``VALUE`` -> (None, VALUE)."""
    name, sep, value = text.partition("=")
    if not sep:
        return None, text
    if not name or not value:
        raise argparse.ArgumentTypeError(f"{what} must be VALUE or TASK=VALUE, got {text!r}")
    return name, value
