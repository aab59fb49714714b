"""Run folders: what `modscope fit` writes and `report`, `check`, `diff` and `export` read.

A run folder holds::

    RUN/
      masks.safetensors   the learned masks: logits and metadata (`MaskSet.save`)
      config.json         how the run was made: model file, checksum and load options, task files, MaskConfig
      curves.json         the training curves per task
      report.json         the metrics (`modscope.Report`)
      checkpoint.pt       the training state while a run is unfinished; removed when it completes

Every file is written to a temporary name in the folder and then renamed into place (`modscope.fileio.atomic_write`),
so a run folder never holds a half-written file, whatever stops the process.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InvalidParameterError, MissingFileError, ModelLoadError
from .fileio import (  # noqa: F401 - re-exported: run folders are written and read with these
    SCHEMA_VERSION,
    atomic_write,
    dumps,
    jsonable,
    read_json,
    require_folder,
    write_json,
    write_text,
)

if TYPE_CHECKING:  # pragma: no cover
    from .masks.config import MaskConfig
    from .masks.maskset import MaskSet
    from .model import Model
    from .report import Report
    from .tasks import Task

MASKS = "masks.safetensors"
CONFIG = "config.json"
CURVES = "curves.json"
REPORT = "report.json"
CHECKPOINT = "checkpoint.pt"
#: every file a run folder holds.
RUN_FILES = (MASKS, CONFIG, CURVES, REPORT, CHECKPOINT)
#: the lock file `fit` holds while it writes a run folder (removed when it ends; the lock itself dies with the process).
LOCK = ".modscope.lock"


@contextlib.contextmanager
def locked(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on a run folder while the block runs (``fcntl.flock`` on ``folder/.modscope.lock``).

    The operating system releases the lock when the process ends, however it ends, so a killed run never leaves a
    folder locked.

    Raises:
        InvalidParameterError: another process holds the folder.

    Example:
        >>> import tempfile
        >>> with locked(tempfile.mkdtemp()):
        ...     pass
    """
    try:
        import fcntl
    except ImportError:  # no flock on this platform (Windows): the folder is not locked
        yield
        return

    path = Path(folder) / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):  # a file system without locks
                yield
                return
            holder = _lock_holder(path)
            raise InvalidParameterError(
                f"run folder {Path(folder)} is in use by another `modscope fit`{holder}; wait for it to end or choose another --out"
            ) from None
        try:  # the holder before us may have removed the file after we opened it: lock the file that is there now
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def _lock_holder(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        return f" (process {int(path.read_text().strip())})"
    return ""


@contextlib.contextmanager
def malformed_report(path: str | os.PathLike) -> Iterator[None]:
    """Turn the errors a report.json of the wrong shape causes while it is read into one `InvalidParameterError`."""
    from .errors import ModscopeError

    try:
        yield
    except ModscopeError:
        raise
    except (TypeError, KeyError, ValueError, IndexError, AttributeError, RecursionError, ZeroDivisionError) as exc:
        raise InvalidParameterError(
            f"{path} is not a well-formed modscope report ({type(exc).__name__} while reading it); make it again with `modscope fit`"
        ) from exc


def file_checksum(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a transformers model folder (the checksum `modscope.load` records)."""
    from .checksums import path_checksum

    return path_checksum(path)


class RunFolder:
    """A run folder made by `modscope fit`.

    Args:
        path: the folder.

    Example:
        >>> run = RunFolder("runs/addmul")
        >>> run.masks_path.name, run.report_path.name
        ('masks.safetensors', 'report.json')
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @classmethod
    def open(cls, path: str | os.PathLike) -> RunFolder:
        """An existing, finished run folder.

        Raises:
            InvalidParameterError: ``path`` is not a folder or holds no finished run.
        """
        run = cls(path)
        require_folder(run.path, "run folder", f"make one with `modscope fit MODEL --task ... --out {run.path}`")
        missing = [p.name for p in (run.masks_path, run.config_path, run.report_path) if not p.is_file()]
        if missing:
            hint = ("it holds an interrupted run: finish it with `modscope fit ... --resume`" if run.checkpoint_path.exists()
                    else "make one with `modscope fit`")
            raise InvalidParameterError(f"{run.path} is not a finished run folder (no {', '.join(missing)}); {hint}")
        return run

    # -- paths ------------------------------------------------------------------------------------------------------
    @property
    def masks_path(self) -> Path:
        return self.path / MASKS

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def curves_path(self) -> Path:
        return self.path / CURVES

    @property
    def report_path(self) -> Path:
        return self.path / REPORT

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    # -- reading ----------------------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The run's config.json."""
        return read_json(self.config_path, "run config")

    def report(self) -> dict[str, Any]:
        """The run's report.json as plain data, checked to be a well-formed report (its tables build).

        Raises:
            MissingFileError, UnreadableFileError: the file is missing or the system will not read it.
            InvalidParameterError: the file is malformed.
        """
        data = read_json(self.report_path, "run report")
        from .report import Report

        with malformed_report(self.report_path):
            Report(data).tables()
        return data

    def masks(self) -> MaskSet:
        """The run's masks.

        Raises:
            ModelLoadError: the mask file is corrupt or not a modscope mask file.
        """
        from .masks.maskset import MaskSet

        return MaskSet.load(self.masks_path)

    def load_model(self, path: str | os.PathLike | None = None, *, factory: Any = None, trust: bool = False,
                   state_key: str | None = None) -> Model:
        """The model the run was trained on, after checking that its file has not changed.

        Trust and factories come only from the caller, never from the run folder: a shared folder whose config.json
        says ``trust: true`` or names a factory grants nothing by itself. When the run was made with them, the
        caller must pass them again.

        Args:
            path: the model file, if it has moved since the run; by default the path recorded in config.json.
            factory: the factory that builds the module of a state_dict checkpoint (CLI: ``--factory``).
            trust: allow the model file to run code when loaded (CLI: ``--trust``).
            state_key: the checkpoint key holding the state_dict; by default the one the run recorded (it names
                data, not code).

        Raises:
            MissingFileError: the file is missing.
            ModelLoadError: its checksum differs from the one recorded.
            UntrustedFileError: the run was made with ``trust`` and the caller did not pass it.
            InvalidParameterError: config.json is malformed.

        Example:
            >>> model = RunFolder("runs/addmul").load_model()  # doctest: +SKIP
        """
        from .converters import load
        from .errors import UntrustedFileError

        config = self.config()
        recorded = config.get("model") or {}
        if not isinstance(recorded, dict):
            raise InvalidParameterError(f"run config {self.config_path} is malformed: 'model' is not an object; make it again with `modscope fit`")
        model_path = Path(path or _text(recorded.get("path")) or "")
        if not str(model_path) or not (model_path.is_file() or model_path.is_dir()):
            raise MissingFileError(
                f"the model file {model_path} recorded in {self.config_path} does not exist; pass --model PATH of the same file"
            )
        checksum = recorded.get("checksum")
        if checksum and file_checksum(model_path) != checksum:
            raise ModelLoadError(
                f"the model file {model_path} has changed since the run was made (its sha256 differs from the one in "
                f"{self.config_path}); use the exact file the masks were trained on"
            )
        options = recorded.get("options") if isinstance(recorded.get("options"), dict) else {}
        if options.get("trust") and not trust:
            raise UntrustedFileError(
                f"the run in {self.path} was made with --trust (its model file runs code when loaded); a run folder cannot "
                "grant trust by itself, so pass --trust (API: trust=True) if you trust the model file"
            )
        if options.get("factory") and factory is None:
            raise ModelLoadError(
                f"the run in {self.path} loaded its model with factory {str(options['factory'])[:200]!r}; a run folder "
                "cannot name code to run by itself, so pass --factory (API: factory=...) yourself"
            )
        state_key = state_key or _text(options.get("state_key"))
        return load(model_path, **{k: v for k, v in (("factory", factory), ("trust", trust), ("state_key", state_key)) if v})


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and "\x00" not in value else None


# -- making a run folder (`modscope fit`) ------------------------------------------------------------------------------
@dataclass(frozen=True)
class FitResult:
    """What `fit_run` made: the run folder, the masks and their report."""

    folder: RunFolder
    masks: MaskSet
    report: Report


def fit_run(
    out: str | os.PathLike,
    model_path: str | os.PathLike,
    tasks: Mapping[str, str | os.PathLike],
    config: MaskConfig | None = None,
    *,
    eval_data: Mapping[str, str | os.PathLike] | None = None,
    task_options: Mapping[str, Mapping[str, Any]] | None = None,
    model_options: Mapping[str, Any] | None = None,
    resume: bool = False,
    force: bool = False,
    checkpoint_every: int | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    ready: Callable[[bool], None] | None = None,
) -> FitResult:
    """Load a model file and task data files, train one mask per task, measure the masks and write a run folder.

    This is ``modscope fit`` without its command line: the folder gets masks.safetensors, config.json, curves.json
    and report.json, each written atomically. The folder is locked while the run is made; a folder this call
    created is removed again when the run fails before its first checkpoint.

    Args:
        out: the run folder (created when missing).
        model_path: the model file (or transformers model folder), read with `modscope.load`.
        tasks: ``{task name: data file}`` (.npz, .pt or .safetensors; `modscope.taskdata.load_task`).
        config: the mask training settings; the paper's defaults when omitted.
        eval_data: held-out data files of some tasks for the report (default: the training data).
        task_options: ``{task name: {"loss": ..., "metric": ..., "output": ...}}`` (None values: the defaults).
        model_options: options of `modscope.load` (``factory``, ``trust``, ``state_key``), recorded in config.json.
        resume: continue an interrupted run in ``out`` (same model, tasks and config).
        force: replace the run ``out`` holds.
        checkpoint_every: steps between checkpoints (default: that of `train_masks`).
        progress: `train_masks`'s progress display.
        log: called with one-line log messages (none when omitted).
        ready: called once the folder and the inputs are checked, with whether masks will be trained (False when
            an interrupted run's masks are reused); a distributed run uses it to start the other ranks.

    Returns:
        A `FitResult`.

    Raises:
        InvalidParameterError: ``out`` is a file, holds a run (without ``resume``/``force``), is in use, or holds
            another model's run; a task name is given twice.
        ModelLoadError, DataError: the model or a task file cannot be read or does not fit.
        KeyboardInterrupt: the run was interrupted; a checkpoint in the folder lets ``resume=True`` continue it.

    Example:
        >>> result = fit_run("runs/addmul", "model.onnx", {"add": "add.npz"}, MaskConfig(n_steps=2000))  # doctest: +SKIP
    """
    import shutil

    from .masks.config import MaskConfig

    config = config or MaskConfig()
    say = log or (lambda message: None)
    folder = RunFolder(out)
    created = _create_folder(folder.path)
    with locked(folder.path):  # a second fit on this folder stops here, touching nothing
        try:
            _prepare_folder(folder, created=created, resume=resume, force=force)
            return _fit(folder, model_path, dict(tasks), config, dict(eval_data or {}), dict(task_options or {}),
                        dict(model_options or {}), resume=resume, force=force, checkpoint_every=checkpoint_every,
                        progress=progress, log=say, ready=ready)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM turned into KeyboardInterrupt by the command line
            if created and not folder.checkpoint_path.exists():
                shutil.rmtree(folder.path, ignore_errors=True)
            raise
        except BaseException as exc:
            if created and not _lost_rank(exc, folder):  # no partial run folder is left behind (removed under its lock)
                shutil.rmtree(folder.path, ignore_errors=True)
            raise


def load_fit_inputs(
    model_path: str | os.PathLike,
    tasks: Mapping[str, str | os.PathLike],
    *,
    eval_data: Mapping[str, str | os.PathLike] | None = None,
    task_options: Mapping[str, Mapping[str, Any]] | None = None,
    model_options: Mapping[str, Any] | None = None,
) -> tuple[Model, list[Task], list[Task]]:
    """The model, the training tasks and the evaluation tasks of a run, each task checked against the model.

    Raises:
        InvalidParameterError: ``eval_data`` names a task that is not in ``tasks``.
        ModelLoadError, DataError: the model or a task file cannot be read or does not fit.
    """
    from .converters import load
    from .taskdata import check_fits, load_task

    eval_data, task_options = dict(eval_data or {}), dict(task_options or {})
    stray = sorted(set(eval_data) - set(tasks))
    if stray:
        raise InvalidParameterError(f"evaluation data given for tasks {stray} that have no training data")
    model = load(model_path, **dict(model_options or {}))
    loaded = [load_task(n, tasks[n], **task_options.get(n, {})) for n in tasks]
    evals = [load_task(t.name, eval_data[t.name], **task_options.get(t.name, {})) if t.name in eval_data else t for t in loaded]
    for task in loaded + [t for t in evals if t not in loaded]:
        check_fits(model, task)
    return model, loaded, evals


def _create_folder(path: Path) -> bool:
    """Make the run folder if it is missing; return whether this call created it."""
    if path.exists() and not path.is_dir():
        raise InvalidParameterError(f"--out {path} is a file; give a folder for the run")
    try:
        path.mkdir(parents=True)
    except FileExistsError:
        if not path.is_dir():
            raise InvalidParameterError(f"--out {path} is a file; give a folder for the run") from None
        return False
    return True


def _prepare_folder(folder: RunFolder, *, created: bool, resume: bool, force: bool) -> None:
    """Check what the folder holds (under its lock): a finished or interrupted run needs resume or force."""
    if created or force:
        return
    if folder.checkpoint_path.exists() and not resume:
        raise InvalidParameterError(f"{folder.path} holds an interrupted run; continue it with --resume, or start over with --force")
    if folder.report_path.exists() and not resume:
        raise InvalidParameterError(f"{folder.path} already holds a finished run; choose another --out, or pass --force to replace it")


def _lost_rank(exc: BaseException, folder: RunFolder) -> bool:
    """A distributed run that lost a rank after a checkpoint: the folder stays, for --resume."""
    from .masks.distributed import DistributedError, MirroredError

    return isinstance(exc, DistributedError) and not isinstance(exc, MirroredError) and folder.checkpoint_path.exists()


def _fit(folder: RunFolder, model_path: str | os.PathLike, tasks: dict[str, Any], config: MaskConfig,
         eval_data: dict[str, Any], task_options: dict[str, Any], model_options: dict[str, Any], *, resume: bool,
         force: bool, checkpoint_every: int | None, progress: bool | None, log: Callable[[str], None],
         ready: Callable[[bool], None] | None) -> FitResult:
    from .masks.selection import select_weights
    from .masks.trainer import train_masks
    from .report import Report

    log(f"loading {model_path}")
    model, train, evals = load_fit_inputs(model_path, tasks, eval_data=eval_data, task_options=task_options,
                                          model_options=model_options)
    if resume and not force:
        _check_same_model(folder, model)
    n_masked = sum(w.numel for w in select_weights(model, config))
    if force:  # only now that the new run's inputs have been checked
        for name in RUN_FILES:
            (folder.path / name).unlink(missing_ok=True)
    masks = _reuse_masks(folder, model, list(tasks), config) if resume else None
    if ready is not None:
        ready(masks is None)
    if masks is None:
        resuming = resume and folder.checkpoint_path.exists()
        log(f"{'resuming' if resuming else 'training'} {len(train)} mask(s) over {n_masked:,} weights, {config.n_steps} steps")
        extra = {"checkpoint_every": checkpoint_every} if checkpoint_every else {}
        masks = train_masks(model, train, config, progress=progress, checkpoint=folder.checkpoint_path, resume=resume,
                            notes=log, **extra)
        masks.save(folder.masks_path)  # first, so that an interrupted measurement can resume without training
    log("measuring sharing, overlap, ablation and clustering")
    report = Report.from_masks(masks, model, evals, device=config.device)
    _write_run(folder, model_path, model, masks, report, config, tasks, eval_data, task_options, model_options)
    return FitResult(folder, masks, report)


def _write_run(folder: RunFolder, model_path: str | os.PathLike, model: Model, masks: MaskSet, report: Report,
               config: MaskConfig, tasks: dict[str, Any], eval_data: dict[str, Any], task_options: dict[str, Any],
               model_options: dict[str, Any]) -> None:
    """curves.json, config.json, then report.json (the mark of a finished run); the checkpoint goes last."""
    from . import __version__

    write_json(folder.curves_path, {"curves": masks.curves})
    write_json(folder.config_path, {
        "modscope_version": __version__,
        "model": {"path": str(Path(model_path).resolve()), "checksum": file_checksum(model_path),
                  "format": model.source.format, "options": model_options},
        "tasks": {n: {"data": str(Path(tasks[n]).resolve()),
                      "eval": str(Path(eval_data[n]).resolve()) if n in eval_data else None, **task_options.get(n, {})}
                  for n in tasks},
        "mask_config": config.to_dict(),
    })
    report.save(folder.report_path)
    folder.checkpoint_path.unlink(missing_ok=True)


def _check_same_model(folder: RunFolder, model: Model) -> None:
    """Refuse to resume a run folder that holds another model's run (its recorded checksum differs)."""
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
