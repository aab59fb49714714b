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
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InvalidParameterError, ModelLoadError
from .fileio import (  # noqa: F401 - re-exported: run folders are written and read with these
    SCHEMA_VERSION,
    atomic_write,
    dumps,
    jsonable,
    read_json,
    write_json,
    write_text,
)

if TYPE_CHECKING:  # pragma: no cover
    from .masks.maskset import MaskSet
    from .model import Model

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
        if not run.path.is_dir():
            raise InvalidParameterError(f"run folder {run.path} does not exist; make one with `modscope fit MODEL --task ... --out {run.path}`")
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
            InvalidParameterError: the file is missing, unreadable or malformed.
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
            ModelLoadError: the file is missing or its checksum differs from the one recorded.
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
            raise ModelLoadError(
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
