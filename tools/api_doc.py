"""Writes docs/api.md (``python tools/api_doc.py docs/api.md``) from the package's public names: every public function and class, its arguments (with
annotations and defaults) and its return type, and the first line of its docstring."""
import inspect, importlib, sys
import modscope

SECTIONS = [
    ("The top level (`import modscope`)", "modscope", [n for n in modscope.__all__ if n not in ("metrics", "converters", "__version__")]),
    ("Metrics (`modscope.metrics`)", "modscope.metrics", None),
    ("Models (`modscope.model`; `Model` and `WeightInfo` above)", "modscope.model", ["Source", "TransformersModel", "weights_checksum"]),
    ("Loading and writing model files (`modscope.converters`)", "modscope.converters", ["load", "detect_format", "export_masked"]),
    ("Inspecting a model (`modscope.converters.inspect`)", "modscope.converters.inspect", ["describe", "layers", "weight_storage", "io_and_operators"]),
    ("Verifying against onnxruntime (`modscope.converters.verify`)", "modscope.converters.verify", ["verify", "VerifyResult", "OutputDiff", "random_inputs"]),
    ("Task data files (`modscope.taskdata`)", "modscope.taskdata", ["load_task", "check_fits"]),
    ("Run folders (`modscope.runs`)", "modscope.runs", ["fit_run", "load_fit_inputs", "FitResult", "RunFolder", "locked", "file_checksum"]),
    ("Files (`modscope.fileio`, `modscope.checksums`)", "modscope.fileio", ["atomic_write", "dumps", "jsonable", "read_json", "require_file", "require_folder", "file_error", "write_json", "write_text"]),
    ("", "modscope.checksums", ["file_sha256", "folder_checksum", "path_checksum"]),
    ("Devices (`modscope.devices`)", "modscope.devices", ["resolve_device"]),
    ("Policies (`modscope.policy`)", "modscope.policy", None),
    ("Errors and warnings (`modscope.errors`)", "modscope.errors", None),
]

def _ann(a):
    return a if isinstance(a, str) else inspect.formatannotation(a)


def sig(obj, name):
    """``name(arg: type = default, *, ...) -> return`` with the annotations as written in the code."""
    try:
        s = inspect.signature(obj)
    except (TypeError, ValueError):
        return f"{name}(...)"
    parts, star = [], False
    for p in s.parameters.values():
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*"); star = True
        text = ("*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else "") + p.name
        if p.kind is p.VAR_POSITIONAL:
            star = True
        if p.annotation is not p.empty:
            text += f": {_ann(p.annotation)}"
        if p.default is not p.empty:
            default = repr(p.default) if "<" not in repr(p.default) else "..."  # no object addresses
            text += f" = {default}" if p.annotation is not p.empty else f"={default}"
        parts.append(text)
    ret = f" -> {_ann(s.return_annotation)}" if s.return_annotation is not s.empty else ""
    return f"{name}({', '.join(parts)}){ret}"

def first_line(obj):
    doc = inspect.getdoc(obj) or ""
    return doc.split("\n\n")[0].replace("\n", " ").strip()

def public_methods(cls):
    out = []
    for n, v in cls.__dict__.items():
        if n.startswith("_") and n not in ("__getitem__", "__call__"):
            continue
        if isinstance(v, (staticmethod, classmethod)):
            v = v.__func__
        if isinstance(v, property):
            out.append((n, None, v))
        elif inspect.isfunction(v):
            out.append((n, v, v))
    return out

lines = ["# The Python API", "",
 "Every public function and class of modscope, with its arguments and return type (generated from the code by",
 "`python tools/api_doc.py`; `tests/test_layers.py` checks that it is up to date). The names in section 7 of the",
 "design (`load`, `Task`, `MaskConfig`, `train_masks`, `MaskSet`, `evaluate`, `metrics.*`, `Report`) are the stable",
 "contract; the docstrings hold the details and examples.", "",
 "## Vocabulary", "",
 "- **model**: a `Model` (what `load` returns) or, where a function says so, a `torch.nn.Module`, which becomes a",
 "  `Model` through `Model.of`. Files are read only by `load` (and `runs`, which calls it).",
 "- **task**: a `Task` object (data, loss, metric, output). **task name**: its `name` string; a `MaskSet` is keyed by",
 "  task names (`masks[\"add\"]`). Functions that measure masks (`iou`, `sharing`, `cluster`, `stability`) take",
 "  `tasks=` as task *names*; functions that run the model (`train_masks`, `evaluate`, `ablation`) take `Task` objects.",
 "- **mask**: a `Mask` (one task's `{weight name: bool tensor}`); **masks**: a `MaskSet` (one mask per task).",
 "- **weight name**: the parameter's name in the torch module (`WeightInfo.name`); **source name**: its name in the",
 "  file (`WeightInfo.source_name`, e.g. an ONNX initializer).",
 "- **density**: the fraction of a mask's weights kept: `Mask.density()` is one float (the whole model),",
 "  `MaskSet.density()` a `{task name: float}`.",
 "- **device**: `\"cpu\"`, `\"cuda\"`, `\"cuda:N\"` or `None` (cuda when present; `resolve_device`).",
 "- **errors**: every error is a `ModscopeError`, one class per failure kind whichever loader meets it: a file or",
 "  folder that does not exist raises `MissingFileError` (also a `FileNotFoundError`), one the system will not read",
 "  (a folder where a file belongs, no permission) `UnreadableFileError` (an `OSError`); bytes that are not what they",
 "  should be raise the error of that kind of file: `ModelLoadError` (models, mask files), `DataError` (task data),",
 "  `PolicyError` (policies) or `InvalidParameterError` (run folders); the command line turns any of them into one",
 "  sentence and exit code 2.", ""]
for title, modname, names in SECTIONS:
    mod = importlib.import_module(modname)
    if names is None:
        names = list(getattr(mod, "__all__", [n for n, v in vars(mod).items() if not n.startswith("_")
                                               and getattr(v, "__module__", modname) == modname]))
    if title:
        lines += [f"## {title}", ""]
    for n in names:
        obj = getattr(mod, n)
        if inspect.ismodule(obj):
            continue
        if inspect.isclass(obj):
            bases = ", ".join(b.__name__ for b in obj.__bases__ if b is not object)
            lines.append(f"### class `{n}`" + (f" ({bases})" if bases else ""))
            lines.append("")
            if first_line(obj):
                lines += [first_line(obj), ""]
            if not issubclass(obj, BaseException):
                init = obj.__dict__.get("__init__")
                if init is not None and inspect.isfunction(init):
                    lines.append(f"- `{sig(init, n).replace('(self, ', '(').replace('(self)', '()')}`")
                elif "__dataclass_fields__" in vars(obj):
                    lines.append(f"- `{sig(obj, n)}`")
                for mname, fn, raw in public_methods(obj):
                    if fn is None:
                        lines.append(f"- `.{mname}` (property): {first_line(raw)}")
                    else:
                        s = sig(fn, mname).replace("(self, ", "(").replace("(self)", "()").replace("(cls, ", "(").replace("(cls)", "()")
                        lines.append(f"- `.{s}`: {first_line(fn)}")
                lines.append("")
        elif callable(obj):
            lines += [f"### `{sig(obj, n)}`", "", first_line(obj), ""]
text = "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else None
    if out and out.startswith("-"):  # --help, or a mistyped option: never a file name
        sys.exit(__doc__)
    if out:
        open(out, "w", encoding="utf-8").write(text)
    else:
        sys.stdout.write(text)
