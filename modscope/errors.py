"""The exceptions and warnings modscope raises.

``ModscopeError`` is the one base to catch. Each subclass also inherits the builtin exception a caller would
expect (``ValueError`` for bad values, ``NotImplementedError`` for unsupported operators, ``FileNotFoundError`` for a missing
file ...), so code written against the builtins keeps working.

One class per failure kind: a file that is not there is always a `MissingFileError` and one the operating system
will not read an `UnreadableFileError`, whatever kind of file it is; what is wrong inside a file is the error of
that kind of file (`ModelLoadError` for models and mask files, `DataError` for task data, `PolicyError` for
policies, `InvalidParameterError` for run folders and modscope's own JSON). The command line turns any ``ModscopeError`` into one line on stderr and exit
code 2.
"""

from __future__ import annotations


class ModscopeError(Exception):
    """Base class of every error modscope raises on purpose."""


class MissingFileError(ModscopeError, FileNotFoundError):
    """A file or folder the caller named does not exist: a model, task data, a mask file, a policy, a run folder, an
    ONNX file's external data. The same class whichever loader looked for it; the message says which file it was."""


class UnreadableFileError(ModscopeError, OSError):
    """A file exists but cannot be read as a file: a folder where a file is expected, no permission, an I/O error.
    What the bytes hold is the loader's own error (`ModelLoadError`, `DataError`, `PolicyError` ...)."""


class InvalidParameterError(ModscopeError, ValueError, TypeError):
    """An argument or configuration value is out of range or of the wrong type."""


class UnknownTaskError(InvalidParameterError, KeyError):
    """A task name that a `MaskSet` (or another result keyed by task) does not have.

    A ``KeyError`` too, so the mapping protocol works: ``"name" in masks`` and ``masks.get("name")`` answer instead
    of raising.
    """

    def __str__(self) -> str:  # KeyError would quote the whole sentence
        return str(self.args[0]) if self.args else ""


class DataError(ModscopeError, ValueError):
    """Task data is unusable: empty, mismatched lengths, NaN, wrong width, missing targets."""


class ShapeError(ModscopeError, ValueError):
    """Tensors do not have the shapes an operation needs."""


class ModelLoadError(ModscopeError, ValueError):
    """A model file or object cannot be read: missing, empty, truncated, corrupt or of an unknown format."""


class UntrustedFileError(ModelLoadError):
    """Loading the file would execute code from it (a pickle) and the caller did not pass ``trust=True``."""


class ResourceLimitError(ModscopeError, ValueError):
    """The input would make modscope allocate or compute more than a configured limit (e.g. an ONNX node whose output
    would exceed ``max_tensor_bytes``); the message names the cause and how to raise the limit."""


class UnsupportedOperatorError(ModscopeError, NotImplementedError):
    """The model uses an operator modscope cannot convert.

    Attributes:
        op_type: the ONNX operator (or torch op) name.
        domain: the operator's domain ("" is the default ONNX domain).
        opset: the opset version the model imports for that domain.
        node: the name of the offending node (may be empty).
    """

    def __init__(self, op_type: str, domain: str = "", opset: int | None = None, node: str = "", hint: str = ""):
        self.op_type, self.domain, self.opset, self.node = op_type, domain, opset, node
        where = f" in node '{node}'" if node else ""
        dom = domain or "ai.onnx"
        msg = f"unsupported operator {dom}::{op_type} (opset {opset}){where}"
        msg += f"; {hint}" if hint else "; pass op_handlers={...} to modscope.load to supply an implementation"
        super().__init__(msg)


class OperatorError(ModscopeError, RuntimeError):
    """An operator failed while a converted model ran (usually an input of the wrong shape or dtype).

    Attributes:
        op_type: the ONNX operator.
        node: the name of the node that failed (its first output when it has no name).

    The original exception is kept as ``__cause__``.
    """

    def __init__(self, message: str, *, op_type: str = "", node: str = ""):
        self.op_type, self.node = op_type, node
        super().__init__(message)


class NotTrainedError(ModscopeError, AttributeError):
    """A result was asked for before the object that holds it was computed."""


class PolicyError(ModscopeError, ValueError):
    """A `modscope check` policy file cannot be read or names unknown quantities."""


def warn_nonfinite_weights(names: list[str], *, stacklevel: int = 3) -> None:
    """One `ModscopeWarning` naming the weights that hold NaN or Inf: a mask cannot make them meaningful, so they
    are left out of the maskable weights (or, when already chosen, masked but still non-finite)."""
    import warnings

    if names:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        warnings.warn(f"{len(names)} weight(s) hold NaN or Inf values and cannot be masked meaningfully ({shown}); "
                      "check the model file", ModscopeWarning, stacklevel=stacklevel)


class ModscopeWarning(UserWarning):
    """Warnings modscope emits (once per cause) about a default it applied or a slower path it took."""


class OutOfMemoryPlanError(ModscopeError, MemoryError):
    """The memory plan of a mask-training run finds that not even one mask sample fits in the memory allowed."""
