"""Task data files: ``.npz``, ``.pt`` and ``.safetensors`` archives read into `Task` objects.

Every format holds the same keys: the inputs as ``x`` (one input) or ``x0``, ``x1``, ... (several inputs, in the
model's input order) or, for models that take keyword arguments (transformers), any other names (``input_ids``,
``attention_mask`` ...: named inputs, passed by name), and the targets as ``y``. All arrays have one row per example. The format is read from the
file's content; the suffix is only a hint. Floating-point inputs stored as float64 (numpy's default) are read as
float32, the dtype models are trained in.

Example of writing a file::

    numpy.savez("add.npz", x=inputs, y=targets)                  # one input
    torch.save({"x0": ids, "x1": lengths, "y": labels}, "t.pt")  # two inputs
    numpy.savez("t.npz", input_ids=ids, attention_mask=mask, y=labels)  # named inputs
"""

from __future__ import annotations

import os
import re
import struct
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import (
    DataError,
    InvalidParameterError,
    ModscopeError,
    OperatorError,
    ShapeError,
)
from .fileio import file_error, require_file

if TYPE_CHECKING:  # pragma: no cover
    from .tasks import Task

_X_KEY = re.compile(r"x(\d+)$")


def load_task(
    name: str,
    path: str | os.PathLike,
    *,
    loss: str | None = None,
    metric: str | None = None,
    output: int | str | None = None,
) -> Task:
    """Read a task data file into a `Task`.

    Args:
        name: the task's name.
        path: an ``.npz``, ``.pt`` or ``.safetensors`` file with ``x`` (or ``x0``, ``x1``, ...) and ``y``.
        loss: the task's loss ("ce", "seq_ce", "bce", "mse"); the `Task` default when None.
        metric: "accuracy" or "mse"; the `Task` default when None.
        output: which model output the task reads (index or key); the only output when None.

    Returns:
        A `modscope.Task`.

    Raises:
        MissingFileError, UnreadableFileError: the file is missing, a folder, or the system will not read it.
        DataError: the file is corrupt or of another format, lacks ``x`` or ``y``, or its
            arrays are unusable (mismatched lengths, NaN, no examples).

    Example:
        >>> import numpy as np
        >>> np.savez("/tmp/doc_task.npz", x=np.zeros((4, 3)), y=np.array([0, 1, 0, 1]))
        >>> task = load_task("parity", "/tmp/doc_task.npz", loss="ce")
        >>> len(task), task.inputs[0].dtype
        (4, torch.float32)
    """
    from .tasks import Task

    arrays = read_arrays(path)
    inputs, targets = split_arrays(arrays, Path(path))
    options: dict[str, Any] = {"output": output}
    if loss is not None:
        options["loss"] = loss
    if metric is not None:
        options["metric"] = metric
    try:
        return Task(name, inputs if len(inputs) > 1 else inputs[0], targets, **options)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from exc


def read_arrays(path: str | os.PathLike) -> dict[str, Any]:
    """All arrays of a task data file as ``{key: torch tensor}``.

    Raises:
        MissingFileError, UnreadableFileError: the file is missing, a folder, or the system will not read it.
        DataError: the file is corrupt or not a task data archive.
    """
    hint = "give an .npz, .pt or .safetensors file"
    p = require_file(path, "task data file", hint)
    try:
        with open(p, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise file_error(exc, p, "task data file", hint) from exc
    kind = _detect(p, head)
    try:
        tensors = {"npz": _read_npz, "pt": _read_pt, "safetensors": _read_safetensors}[kind](p)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"task data file {p} is a damaged {kind} archive ({_first_line(exc)}); write it again") from exc
    return tensors


def split_arrays(arrays: dict[str, Any], path: Path) -> tuple[tuple[Any, ...], Any]:
    """``(inputs, targets)`` from the arrays of a task data file: ``x`` or ``x0, x1, ...``, and ``y``; any other
    keys are named inputs (``input_ids``, ``attention_mask`` ...), returned as a dict and passed by name."""
    keys = sorted(arrays)
    if "y" not in arrays:
        raise DataError(f"task data file {path} has no targets: it holds {keys} but no 'y'; save the targets as y")
    numbered = sorted((int(m.group(1)), k) for k in arrays if (m := _X_KEY.match(k)))
    if "x" in arrays and numbered:
        raise DataError(f"task data file {path} holds both 'x' and {[k for _, k in numbered]}; keep one of the two forms")
    if "x" in arrays:
        return (_as_model_dtype(arrays["x"]),), arrays["y"]
    if not numbered and len(arrays) > 1:  # named inputs (input_ids, attention_mask ...), passed as keyword arguments
        return {k: _as_model_dtype(v) for k, v in sorted(arrays.items()) if k != "y"}, arrays["y"]  # type: ignore[return-value]
    if not numbered:
        raise DataError(f"task data file {path} has no inputs: it holds {keys} but no 'x' (or x0, x1, ...); save the inputs as x")
    indices = [i for i, _ in numbered]
    if indices != list(range(len(indices))):
        raise DataError(f"task data file {path} has inputs {[k for _, k in numbered]}; number them x0, x1, ... without gaps")
    return tuple(_as_model_dtype(arrays[k]) for _, k in numbered), arrays["y"]


def _as_model_dtype(t: Any) -> Any:
    import torch

    return t.float() if t.dtype == torch.float64 else t


def _detect(p: Path, head: bytes) -> str:
    if not head:
        raise DataError(f"task data file {p} is empty")
    if head.startswith(b"PK"):
        from .converters.archives import check_zip

        names = [info.filename for info in check_zip(p, "task data file", error=DataError)]
        if any(n.endswith(".npy") for n in names):
            return "npz"
        if any(n.endswith("data.pkl") for n in names):
            return "pt"
        raise DataError(f"task data file {p} is a zip archive but neither .npz nor a torch.save file")
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < p.stat().st_size:
        return "safetensors"
    if head[:1] == b"\x80":
        return "pt"
    raise DataError(f"task data file {p} is not an .npz, .pt or .safetensors archive; save the arrays with numpy.savez")


def _read_npz(p: Path) -> dict[str, Any]:
    import numpy as np
    import torch

    _check_npz_rows(p)
    with np.load(p, allow_pickle=False) as archive:
        out = {}
        for key in archive.files:
            array = archive[key]
            if array.dtype.kind not in "biuf":
                raise DataError(f"task data file {p}: array {key!r} has dtype {array.dtype}; store numbers only")
            out[key] = torch.from_numpy(np.ascontiguousarray(array))
        return out


def _check_npz_rows(p: Path) -> None:
    """Read only the .npy headers: each member's data must match its declared size, and x*/y agree on the number of
    rows, before any array is decompressed (a small deflated file can declare gigabytes)."""
    import numpy as np

    rows: dict[str, int] = {}
    with zipfile.ZipFile(p) as z:
        for info in z.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[:-4]
            with z.open(info) as f:
                try:
                    version = np.lib.format.read_magic(f)
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read_header(f)
                except ValueError as exc:
                    raise DataError(f"task data file {p}: array {key!r} has a corrupt header ({_first_line(exc)})") from exc
                data_bytes = int(np.prod(shape, dtype=np.float64) * dtype.itemsize) if dtype.kind in "biuf" else None
                if data_bytes is not None and data_bytes != info.file_size - f.tell():
                    raise DataError(f"task data file {p}: array {key!r} declares shape {shape} but holds "
                                    f"{info.file_size - f.tell():,} bytes of data; write the file again")
            if (key == "y" or _X_KEY.match(key) or key == "x") and shape:
                rows[key] = int(shape[0])
    if len(set(rows.values())) > 1:
        raise DataError(f"task data file {p}: its arrays have different lengths "
                        f"({', '.join(f'{k}: {n}' for k, n in sorted(rows.items()))}); give every array one row per example")


def _read_pt(p: Path) -> dict[str, Any]:
    import pickle

    import torch

    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise DataError(
            f"task data file {p} holds Python objects besides tensors, which modscope does not unpickle; "
            "save a dict of tensors {'x': ..., 'y': ...}"
        ) from exc
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(f"task data file {p} must hold a dict of tensors {{'x': ..., 'y': ...}}, got {type(obj).__name__}")
    return {str(k): v for k, v in obj.items()}


def _read_safetensors(p: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(p))


def check_fits(model: Any, task: Task, *, n_examples: int = 2) -> None:
    """Run the model once on a few of the task's examples and compute the loss, so that data which does not fit the
    model fails here with one clear sentence instead of deep inside training.

    Args:
        model: a `Model`.
        task: the task to try.
        n_examples: how many examples to run.

    Raises:
        ShapeError: the model rejects the task's inputs (wrong width, rank or dtype).
        DataError: the targets do not fit the model's output under the task's loss (wrong shape, class ids out of
            range).
        InvalidParameterError: the model has several outputs and the task does not say which one it reads.
    """
    import torch

    from .tasks import CLASS_IGNORE, check_class_targets

    xs, y = task.batch(torch.arange(min(n_examples, len(task))))
    shapes = ", ".join(f"{tuple(x.shape[1:])} {str(x.dtype).replace('torch.', '')}" for x in xs)
    with model.frozen() as module, torch.no_grad():
        try:
            raw = model.run(module, {}, xs, task.input_names)
        except Exception as exc:  # any failure of the first forward pass means the data does not fit
            if isinstance(exc, ModscopeError) and not isinstance(exc, OperatorError):
                raise
            hint = "" if isinstance(exc, OperatorError) else "; make the data match the model's inputs (`modscope inspect MODEL` lists them)"
            raise ShapeError(
                f"task {task.name!r}: the model cannot run on its inputs (per example: {shapes}): {_first_line(exc)}{hint}"
            ) from exc
    if isinstance(raw, tuple | list) and len(raw) != 1 and task.output is None:
        raise InvalidParameterError(
            f"task {task.name!r}: the model returns {len(raw)} outputs; say which one the task reads "
            f"(Task(..., output=INDEX), or --output {task.name}=INDEX on the command line)"
        )
    out = task.select_output(raw)
    if task.loss in CLASS_IGNORE and isinstance(out, torch.Tensor) and out.dim():
        top = int(task.targets.max())
        if top >= out.shape[-1]:
            raise DataError(f"task {task.name!r}: targets go up to class {top} but the model's output has "
                            f"{out.shape[-1]} classes on its last axis; check the targets or pick another --loss/--output")
        check_class_targets(task.targets, str(task.loss), task.name, out.shape[-1])
    try:
        task.loss_fn()(out, y)
        task.compute_metric(out, y)
    except Exception as exc:
        if isinstance(exc, ModscopeError):
            raise
        raise DataError(
            f"task {task.name!r}: its targets (per example {tuple(y.shape[1:])}) do not fit the model's output "
            f"({tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__}) under loss "
            f"{task.loss!r}: {_first_line(exc)}; check the loss and the targets"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:240] if text else type(exc).__name__)
