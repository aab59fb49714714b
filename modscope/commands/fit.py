"""`modscope fit`: train one mask per task on a model file and write a run folder."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from typing import Any

from ..errors import InvalidParameterError
from ..masks.config import MaskConfig
from ._common import add_model_options, log, model_options, parse_assignment, text_table
from .config_flags import add_dataclass_flags, dataclass_values

HELP = "train one mask per task and write a run folder (masks, config, curves, report.json)"
DESCRIPTION = """\
Train a binary weight mask for each task on the frozen model, measure the masks, and write a run folder.

Task data files (.npz, .pt or .safetensors) hold the inputs as x (or x0, x1, ... for several inputs) and the
targets as y, one row per example. --loss, --metric and --output apply to every task, or to one task as
TASK=VALUE. The mask-training flags are the fields of modscope.MaskConfig and default to its (the paper's) values.

The run folder gets masks.safetensors, config.json, curves.json and report.json, each written atomically.
Ctrl-C or SIGTERM leaves a checkpoint in the folder: run the same command with --resume to continue it to the masks
an uninterrupted run gives."""
EXAMPLE = "modscope fit model.onnx --task add=add.npz --task mul=mul.npz --n-steps 2000 --out runs/addmul"

def _task_spec(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"a task needs a name: NAME=FILE, e.g. --task add=add.npz (got {text!r})")
    return name, path


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="the model file (ONNX, .pt2, TorchScript, state_dict with --factory ...)")
    p.add_argument("--task", action="append", required=True, type=_task_spec, metavar="NAME=FILE",
                   help="a task and its data file; repeat for each task")
    p.add_argument("--eval", action="append", type=_task_spec, default=[], metavar="NAME=FILE",
                   help="held-out data of a task for the report's metrics (default: its training data)")
    p.add_argument("--loss", action="append", metavar="[TASK=]LOSS",
                   help="ce, seq_ce, bce or mse, for every task or for one (default: ce)")
    p.add_argument("--metric", action="append", metavar="[TASK=]METRIC",
                   help="accuracy or mse (default: accuracy; mse for the mse loss)")
    p.add_argument("--output", action="append", metavar="[TASK=]INDEX",
                   help="which model output a task reads, for models with several outputs")
    p.add_argument("--out", "-o", required=True, metavar="RUN", help="the run folder to write")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in RUN")
    p.add_argument("--force", action="store_true", help="replace the run that RUN holds")
    p.add_argument("--checkpoint-every", type=_positive, metavar="N",
                   help="steps between checkpoints (default: that of modscope.train_masks)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction,
                   help="show progress on stderr: a live bar on a terminal, a plain line every 10 s in a log "
                        "($MODSCOPE_PROGRESS_INTERVAL sets the seconds); on by default, --no-progress for none")
    p.add_argument("--quiet", "-q", action="store_true", help="no log lines on stderr")
    add_model_options(p)
    add_dataclass_flags(p.add_argument_group("mask training (the fields of modscope.MaskConfig)"), MaskConfig)


def _per_task(values: list[str] | None, flag: str, names: list[str]) -> dict[str, str]:
    """``--flag VALUE`` for every task, then ``--flag TASK=VALUE`` for one (the specific value wins)."""
    general: dict[str, str] = {}
    specific: dict[str, str] = {}
    for text in values or []:
        try:
            name, value = parse_assignment(text, flag)
        except argparse.ArgumentTypeError as exc:
            raise InvalidParameterError(str(exc)) from None
        if name is None:
            general.update(dict.fromkeys(names, value))
        elif name not in names:
            raise InvalidParameterError(f"{flag} {text}: there is no task {name!r} (the tasks are {', '.join(names)})")
        else:
            specific[name] = value
    return {**general, **specific}


def _task_options(args: argparse.Namespace, names: list[str]) -> dict[str, dict[str, Any]]:
    losses = _per_task(args.loss, "--loss", names)
    metrics = _per_task(args.metric, "--metric", names)
    outputs = _per_task(args.output, "--output", names)
    return {n: {"loss": losses.get(n), "metric": metrics.get(n),
                "output": int(outputs[n]) if n in outputs and outputs[n].lstrip("-").isdigit() else outputs.get(n)}
            for n in names}


def _check_names(tasks: list[tuple[str, str]], evals: list[tuple[str, str]]) -> list[str]:
    names = [n for n, _ in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidParameterError(f"task names must be unique; {', '.join(dupes)} is given twice")
    eval_names = [n for n, _ in evals]
    stray = [n for n in eval_names if n not in names]
    if stray or len(set(eval_names)) < len(eval_names):
        raise InvalidParameterError(f"--eval must name each task at most once, and only tasks given with --task (got {eval_names})")
    return names


def run(args: argparse.Namespace) -> int:
    from ..masks.distributed import Ranks

    ranks = Ranks.current()  # under torchrun: rank 0 checks, trains its share and writes; the others train theirs
    if ranks is not None and not ranks.leader:
        return _follow(args, ranks)
    told = _Told(ranks)
    try:
        return _lead(args, told)
    except BaseException as exc:
        told.send(exc)
        raise


class _Told:
    """Tells the other ranks of a distributed run, once, whether rank 0's checks passed and whether to train."""

    def __init__(self, ranks: Any):
        self.ranks, self.done = ranks, False

    def send(self, error: BaseException | None, train: bool = True) -> None:
        if self.ranks is None or self.done:
            return
        self.done = True
        if error is None:
            self.ranks.share(train)
            return
        with contextlib.suppress(Exception):  # rank 0 raises its own error itself
            self.ranks.share(train, error)


def _follow(args: argparse.Namespace, ranks: Any) -> int:
    """A rank other than 0: once rank 0 has checked the command and the run folder, train this rank's share of the
    masks (reading the checkpoint to resume, writing nothing)."""
    from ..masks.trainer import train_masks
    from ..runs import RunFolder, load_fit_inputs

    if not ranks.share(True):
        return 0
    args = argparse.Namespace(**{**vars(args), "quiet": True})
    config = MaskConfig(**dataclass_values(args, MaskConfig))
    names = _check_names(args.task, args.eval)
    model, tasks, _ = load_fit_inputs(args.model, dict(args.task), eval_data=dict(args.eval),
                                      task_options=_task_options(args, names), model_options=model_options(args))
    extra = {"checkpoint_every": args.checkpoint_every} if args.checkpoint_every else {}
    try:
        with warnings.catch_warnings():  # rank 0 gives the same warnings
            warnings.simplefilter("ignore")
            train_masks(model, tasks, config, progress=False, checkpoint=RunFolder(args.out).checkpoint_path,
                        resume=args.resume, **extra)
    except KeyboardInterrupt:  # rank 0 says what was saved
        return 130
    return 0


def _lead(args: argparse.Namespace, told: _Told) -> int:
    from ..runs import RunFolder, fit_run

    config = MaskConfig(**dataclass_values(args, MaskConfig))
    names = _check_names(args.task, args.eval)
    try:
        result = fit_run(
            args.out, args.model, dict(args.task), config, eval_data=dict(args.eval),
            task_options=_task_options(args, names), model_options=model_options(args), resume=args.resume,
            force=args.force, checkpoint_every=args.checkpoint_every, progress=False if args.quiet else args.progress,
            log=lambda line: log(args, line), ready=lambda train: told.send(None, train=train),
        )
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the command line turns it into KeyboardInterrupt)
        checkpoint = RunFolder(args.out).checkpoint_path
        if checkpoint.exists():
            print(f"modscope fit: interrupted; the training state is saved in {checkpoint}: "
                  "run the same command with --resume to continue", file=sys.stderr)
        else:
            print("modscope fit: interrupted before the first checkpoint", file=sys.stderr)
        return 130
    table = result.report.tables()[0]
    print(text_table(table.headers, table.rows))
    log(args, f"run written to {result.folder.path}")
    return 0
