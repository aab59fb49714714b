"""The ``modscope`` command: a thin layer over the library.

Subcommands (one module each in `modscope.commands`): ``inspect``, ``fit``, ``report``, ``check``, ``diff``,
``export``, ``reproduce``. Exit codes follow linters and test runners:

- 0: success;
- 1: the command ran and found a problem: ``check`` found a violated rule, ``inspect --verify`` a mismatch;
- 2: the input or command line is wrong (a missing or unreadable file, data that does not fit the model, an
  unsupported operator ...): one or two lines on stderr say what is wrong and how to fix it; ``--debug`` shows the
  traceback instead;
- 130: interrupted (Ctrl-C or SIGTERM; ``fit`` leaves a checkpoint to ``--resume`` from); 141: stdout was closed.

Data goes to stdout (``--json`` gives it as JSON with a ``schema_version``); progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from .commands import COMMANDS
from .errors import InvalidParameterError, ModscopeError

EXAMPLE = """\
Example:
  modscope fit model.onnx --task add=add.npz --task mul=mul.npz --n-steps 2000 --out runs/addmul"""


class _UsageError(Exception):
    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog, self.message = prog, message


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors end in two lines (what is wrong, where the help is), not the full usage."""

    def error(self, message: str) -> Any:  # type: ignore[override]  # raises instead of exiting
        raise _UsageError(self.prog, message)


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``modscope`` command with every subcommand."""
    from . import __version__

    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")
    parser = _Parser(prog="modscope", formatter_class=_formatter, parents=[common],
                     description="Find which weights of a trained network implement which function "
                                 "(differentiable weight masks, Csordás et al. 2021).",
                     epilog=EXAMPLE)
    parser.add_argument("--version", action="version", version=f"modscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION, parents=[common],
                           formatter_class=_formatter, epilog=f"Example:\n  {module.EXAMPLE}")
        module.add_arguments(p)
        p.set_defaults(command_function=module.run)
    return parser


def _say(prog: str, message: str) -> None:
    lines = [line for line in str(message).strip().splitlines() if line.strip()] or ["unknown error"]
    print(f"{prog}: error: {lines[0]}", file=sys.stderr)
    if len(lines) > 1:
        print(f"  {lines[1].strip()}", file=sys.stderr)


def _show_warning(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    print(f"modscope: warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while a command runs, so that a kill (a CI timeout, a preempted job) runs
    the same clean-up as Ctrl-C: temporary files are removed and `fit` saves a checkpoint."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail again."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout has no file descriptor (captured): nothing to flush
        pass


def _threads_for(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """The commands that train (fit, reproduce) run with a thread count that fits the free cores (`threads`)."""
    if args.command not in ("fit", "reproduce"):
        return contextlib.nullcontext()
    from . import threads

    return threads.limited(getattr(args, "threads", None), announce=not getattr(args, "quiet", False))


def _launched(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """fit and reproduce under torchrun join its process group for the command's duration (`masks.distributed`); the
    other commands refuse to run in several processes at once (each would write the same files)."""
    import os

    if args.command not in ("fit", "reproduce"):
        if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
            raise InvalidParameterError(f"modscope {args.command} runs in one process; only fit and reproduce run under "
                                        "torchrun with several processes: run it without torchrun")
        return contextlib.nullcontext()
    from .masks import distributed

    return distributed.launched()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``modscope`` command.

    Args:
        argv: the arguments after the program name; ``sys.argv[1:]`` when None.

    Returns:
        The exit code: 0 success, 1 a check failed, 2 bad input, 130 interrupted.

    Example:
        >>> main(["check", "/nonexistent-run", "--policy", "p.toml"])
        2
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        _say(exc.prog, exc.message)
        print(f"  run '{exc.prog} --help' for the options", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help and --version exit through argparse
        return exc.code if isinstance(exc.code, int) else 0
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("modscope: error: name a command, e.g. 'modscope inspect MODEL'; 'modscope --help' lists them", file=sys.stderr)
        return 2
    prog = f"modscope {args.command}"
    debug = getattr(args, "debug", False)
    with warnings.catch_warnings(), _sigterm_as_interrupt():
        warnings.showwarning = _show_warning
        try:
            with _threads_for(args), _launched(args):
                return int(args.command_function(args))
        except ModscopeError as exc:
            if debug:
                raise
            if not getattr(exc, "quiet", False):  # rank 0's error mirrored on another rank: rank 0 prints it
                _say(prog, str(exc))
        except BrokenPipeError:  # stdout was closed early (`modscope ... | head`): stop quietly, as `cat` does
            _silence_stdout()
            return 141
        except OSError as exc:  # an output that cannot be written, a full disk
            if debug:
                raise
            where = f" {exc.filename}" if exc.filename else ""
            _say(prog, f"cannot access{where}: {exc.strerror or exc}; check the path and its permissions")
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
