"""`modscope fit`: train one mask per task on a model file and write a run folder."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:  # pragma: no cover
    from ..masks.maskset import MaskSet
    from ..model import Model
    from ..report import Report
    from ..runs import RunFolder
    from ..tasks import Task


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


def _create_folder(run: RunFolder) -> bool:
    """Make ``--out`` if it is missing; return whether this command created it."""
    path = run.path
    if path.exists() and not path.is_dir():
        raise InvalidParameterError(f"--out {path} is a file; give a folder for the run")
    try:
        path.mkdir(parents=True)
    except FileExistsError:
        if not path.is_dir():
            raise InvalidParameterError(f"--out {path} is a file; give a folder for the run") from None
        return False
    return True


def _prepare_folder(run: RunFolder, args: argparse.Namespace, created: bool) -> None:
    """Check what ``--out`` holds (under its lock): a finished or interrupted run needs --resume or --force."""
    path = run.path
    if created or args.force:
        return
    if run.checkpoint_path.exists() and not args.resume:
        raise InvalidParameterError(f"{path} holds an interrupted run; continue it with --resume, or start over with --force")
    if run.report_path.exists() and not args.resume:
        raise InvalidParameterError(f"{path} already holds a finished run; choose another --out, or pass --force to replace it")


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
    from ..runs import RunFolder

    if not ranks.share(True):
        return 0
    args = argparse.Namespace(**{**vars(args), "quiet": True})
    config = MaskConfig(**dataclass_values(args, MaskConfig))
    names = _check_names(args.task, args.eval)
    model, tasks, _ = _load_inputs(args, names, _task_options(args, names))
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
    import shutil

    from ..runs import RunFolder, locked

    config = MaskConfig(**dataclass_values(args, MaskConfig))
    names = _check_names(args.task, args.eval)
    options = _task_options(args, names)
    folder = RunFolder(args.out)
    created = _create_folder(folder)
    with locked(folder.path):  # a second fit on this folder stops here, touching nothing
        try:
            _prepare_folder(folder, args, created)
            return _fit(args, config, names, options, folder, told)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the command line turns it into KeyboardInterrupt)
            if folder.checkpoint_path.exists():
                print(f"modscope fit: interrupted; the training state is saved in {folder.checkpoint_path}: "
                      "run the same command with --resume to continue", file=sys.stderr)
            else:
                print("modscope fit: interrupted before the first checkpoint", file=sys.stderr)
                if created:
                    shutil.rmtree(folder.path, ignore_errors=True)
            return 130
        except BaseException as exc:
            if created and not _lost_rank(exc, folder):  # no partial run folder is left behind (removed under its lock)
                shutil.rmtree(folder.path, ignore_errors=True)
            raise


def _lost_rank(exc: BaseException, folder: RunFolder) -> bool:
    """A distributed run that lost a rank after a checkpoint: the folder stays, for --resume."""
    from ..masks.distributed import DistributedError, MirroredError

    return isinstance(exc, DistributedError) and not isinstance(exc, MirroredError) and folder.checkpoint_path.exists()


def _fit(args: argparse.Namespace, config: MaskConfig, names: list[str], options: dict[str, dict[str, Any]],
         folder: RunFolder, told: _Told) -> int:
    from ..masks.selection import select_weights
    from ..masks.trainer import train_masks
    from ..report import Report
    from ..runs import RUN_FILES

    model, tasks, eval_tasks = _load_inputs(args, names, options)
    if args.resume and not args.force:
        _check_same_model(folder, model)
    n_masked = sum(w.numel for w in select_weights(model, config))
    if args.force:  # only now that the new run's inputs have been checked
        for name in RUN_FILES:
            (folder.path / name).unlink(missing_ok=True)

    masks = _reuse_masks(folder, model, names, config) if args.resume else None
    told.send(None, train=masks is None)
    if masks is None:
        resuming = args.resume and folder.checkpoint_path.exists()
        log(args, f"{'resuming' if resuming else 'training'} {len(tasks)} mask(s) over {n_masked:,} weights, "
                  f"{config.n_steps} steps")
        extra = {"checkpoint_every": args.checkpoint_every} if args.checkpoint_every else {}
        masks = train_masks(model, tasks, config, progress=False if args.quiet else args.progress,
                            checkpoint=folder.checkpoint_path, resume=args.resume, notes=lambda line: log(args, line), **extra)
        masks.save(folder.masks_path)  # first, so that an interrupted measurement can --resume without training
    log(args, "measuring sharing, overlap, ablation and clustering")
    report = Report.from_masks(masks, model, eval_tasks, device=config.device)
    _write_run(folder, args, model, masks, report, config, options)
    table = report.tables()[0]
    print(text_table(table.headers, table.rows))
    log(args, f"run written to {folder.path}")
    return 0


def _load_inputs(args: argparse.Namespace, names: list[str], options: dict[str, dict[str, Any]]) -> tuple[Model, list[Task], list[Task]]:
    """The model, the training tasks and the evaluation tasks, each task checked against the model."""
    from ..converters import load
    from ..taskdata import check_fits, load_task

    log(args, f"loading {args.model}")
    model = load(args.model, **model_options(args))
    data, eval_files = dict(args.task), dict(args.eval)
    tasks = [load_task(n, data[n], **options[n]) for n in names]
    eval_tasks = [load_task(n, eval_files[n], **options[n]) if n in eval_files else t for n, t in zip(names, tasks)]
    for task in tasks + [t for t in eval_tasks if t not in tasks]:
        check_fits(model, task)
    return model, tasks, eval_tasks


def _write_run(folder: RunFolder, args: argparse.Namespace, model: Model, masks: MaskSet, report: Report,
               config: MaskConfig, options: dict[str, dict[str, Any]]) -> None:
    """curves.json, config.json, then report.json (the mark of a finished run); the checkpoint goes last."""
    from .. import __version__
    from ..runs import file_checksum, write_json

    data, eval_files = dict(args.task), dict(args.eval)
    write_json(folder.curves_path, {"curves": masks.curves})
    write_json(folder.config_path, {
        "modscope_version": __version__,
        "model": {"path": str(Path(args.model).resolve()), "checksum": file_checksum(args.model),
                  "format": model.source.format, "options": model_options(args)},
        "tasks": {n: {"data": str(Path(data[n]).resolve()),
                      "eval": str(Path(eval_files[n]).resolve()) if n in eval_files else None, **options[n]}
                  for n in options},
        "mask_config": config.to_dict(),
    })
    report.save(folder.report_path)
    folder.checkpoint_path.unlink(missing_ok=True)


def _check_same_model(folder: RunFolder, model: Model) -> None:
    """Refuse to --resume a run folder that holds another model's run (its recorded checksum differs)."""
    recorded: set[str] = set()
    if folder.config_path.exists():
        entry = folder.config().get("model")
        if isinstance(entry, dict) and isinstance(entry.get("checksum"), str):
            recorded.add(entry["checksum"])
    if folder.masks_path.exists() and folder.masks().model_checksum:
        recorded.add(str(folder.masks().model_checksum))
    if recorded and recorded != {model.checksum}:
        raise InvalidParameterError(
            f"{folder.path} holds the run of another model (its checksum differs from {model.checksum[:12]}...); "
            "--resume continues only the same model's run: choose another --out, or pass --force to replace it"
        )


def _reuse_masks(folder: RunFolder, model: Model, names: list[str], config: MaskConfig) -> MaskSet | None:
    """The masks of an earlier, interrupted invocation that finished training, if they belong to this run."""
    if not folder.masks_path.exists():
        return None
    masks = folder.masks()
    same = list(masks.tasks) == names and masks.config == config and masks.model_checksum == model.checksum
    return masks if same else None
