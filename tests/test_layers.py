"""The package's layers: load -> train -> measure -> report, each knowing only the ones below it.

These tests read the import statements of every module in ``modscope/`` (with `ast`, without running them) and
check the rules the layering rests on:

- no import circle: no module imports, directly or through others, a module that imports it back. Both module-level
  imports and the deferred ones inside functions count (a deferred import still makes the two modules depend on
  each other); imports under ``if TYPE_CHECKING:`` do not (they never run);
- the learner (``masks/``), ``metrics/``, ``evaluation.py`` and ``report/`` never import ``converters``: a torch
  module becomes a `Model` through `Model.of`, and files are read by the caller with `modscope.load`;
- nothing the learner, `evaluate`, the metrics or the report can reach (following every import) is a converter.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "modscope"

#: the modules and folders (relative to the package) that must not import ``modscope.converters``.
NO_CONVERTERS = ("masks", "metrics", "evaluation.py", "report")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def _import_nodes(tree: ast.Module, *, deferred: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements that run: at module level (also under if/try/with), and with ``deferred`` also those
    inside functions and classes; never those under ``if TYPE_CHECKING:``."""
    stack: list[ast.AST] = list(reversed(tree.body))
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
            if deferred:
                stack.extend(ast.iter_child_nodes(node))
        else:
            stack.extend(ast.iter_child_nodes(node))


def imported_names(name: str, *, deferred: bool) -> set[str]:
    """Every ``modscope`` module that module ``name`` imports (``from .x import y`` names ``x.y`` when y is a module)."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8")), deferred=deferred):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".") if node.level else node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        found.update(t for t in targets if t.startswith("modscope"))
    return found


@functools.cache
def import_graph(*, deferred: bool) -> dict[str, set[str]]:
    graph = {}
    for name in MODULES:
        targets = imported_names(name, deferred=deferred)
        unknown = {t for t in targets if t not in MODULES}
        assert not unknown, f"{name} imports modules that do not exist: {sorted(unknown)}"
        graph[name] = targets - {name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        v = todo.pop()
        if v not in seen:
            seen.add(v)
            todo.extend(graph[v])
    return seen


def test_the_checker_sees_circles_and_relative_imports() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
    assert "modscope.model" in imported_names("modscope.masks.trainer", deferred=False)
    assert "modscope.converters.onnx.registry" in imported_names("modscope.converters.onnx.ops.recurrent", deferred=False)
    assert "modscope.converters.files" in imported_names("modscope.converters", deferred=True)


def test_no_import_circle_at_module_level() -> None:
    assert circles(import_graph(deferred=False)) == []


def test_no_import_circle_counting_deferred_imports() -> None:
    assert circles(import_graph(deferred=True)) == []


@pytest.mark.parametrize("part", NO_CONVERTERS)
def test_lower_layers_never_import_converters(part: str) -> None:
    graph = import_graph(deferred=True)
    names = [n for n in MODULES if n == f"modscope.{part.removesuffix('.py')}" or n.startswith(f"modscope.{part}.")]
    assert names
    offenders = {n: sorted(t for t in graph[n] if t.startswith("modscope.converters")) for n in names}
    assert {n: t for n, t in offenders.items() if t} == {}


@pytest.mark.parametrize(
    "start", ["modscope.masks.trainer", "modscope.evaluation", "modscope.metrics", "modscope.report.compute", "modscope.model"]
)
def test_nothing_below_the_loaders_reaches_a_converter(start: str) -> None:
    reached = reachable(import_graph(deferred=True), start)
    assert sorted(m for m in reached if m.startswith("modscope.converters")) == []


def test_training_on_a_torch_module_loads_no_converter() -> None:
    """At run time too: training masks on an in-memory module, evaluating and reporting import no converter."""
    code = (
        "import sys, torch, modscope\n"
        "net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.LSTM(8, 4, batch_first=True))\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.a = torch.nn.Linear(4, 8); self.rnn = torch.nn.GRU(8, 4, batch_first=True)\n"
        "    def forward(self, x):\n"
        "        return self.rnn(self.a(x).unsqueeze(1))[0][:, 0, :2]\n"
        "x = torch.randn(32, 4); y = (x[:, 0] > 0).long()\n"
        "tasks = [modscope.Task('s', x, y)]\n"
        "masks = modscope.train_masks(Net(), tasks, modscope.MaskConfig(n_steps=2, batch_size=8), progress=False)\n"
        "modscope.evaluate(Net(), tasks[0], masks['s'])\n"
        "print(sorted(m for m in sys.modules if m.startswith('modscope.converters')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=PACKAGE.parent, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_private_modules_are_used_only_inside_their_package() -> None:
    """A ``_name`` module is its package's helper: no module of another package imports it."""
    graph = import_graph(deferred=True)
    outside = {
        user: sorted(t for t in targets if t.rpartition(".")[2].startswith("_") and t.rpartition(".")[0] != user.rpartition(".")[0]
                     and not (MODULES[user].name == "__init__.py" and t.rpartition(".")[0] == user))
        for user, targets in graph.items()
    }
    assert {u: t for u, t in outside.items() if t} == {}


def test_op_handlers_live_in_the_ops_package() -> None:
    """The ONNX folder holds the compiler, ``converters/onnx/ops/`` every op family; a handler uses of the compiler
    only the registry (`NodeContext`, `OpSet`), the size limits and the tensor decoding, never the compiler itself."""
    from modscope.converters.onnx.ops import FAMILY_MODULES

    onnx_dir = PACKAGE / "converters" / "onnx"
    assert sorted(p.name for p in onnx_dir.glob("ops_*.py")) == []
    assert all((onnx_dir / "ops" / f"{name}.py").is_file() for name in FAMILY_MODULES)
    allowed = {f"modscope.converters.onnx.{n}" for n in ("registry", "limits", "tensors")}
    compiler = {n for n in MODULES if n.startswith("modscope.converters.onnx.") and ".ops" not in n} - allowed
    graph = import_graph(deferred=True)
    handlers = [n for n in MODULES if n.startswith("modscope.converters.onnx.ops.")]
    assert {h: sorted(graph[h] & compiler) for h in handlers if graph[h] & compiler} == {}


#: the report's renderers: a policy reads values through the report (``report.values``), never through these.
RENDERERS = ("modscope.report.tables", "modscope.report.html", "modscope.report.markdown", "modscope.report.plots",
             "modscope.report.csv_files", "modscope.texttable")


def test_policy_imports_no_renderer() -> None:
    reached = reachable(import_graph(deferred=True), "modscope.policy")
    assert "modscope.report.values" in reached and "modscope.metrics.drop" in reached
    assert sorted(m for m in reached if m in RENDERERS) == []


def test_metrics_never_import_the_report() -> None:
    graph = import_graph(deferred=True)
    offenders = {n: sorted(t for t in graph[n] if t.startswith("modscope.report")) for n in MODULES if n.startswith("modscope.metrics")}
    assert {n: t for n, t in offenders.items() if t} == {}


def test_api_doc_lists_the_public_api() -> None:
    """docs/api.md (``python tools/api_doc.py docs/api.md``) documents every name of the public API: the top level's
    and the metrics', each with its arguments and return type as the code has them when it was generated."""
    import modscope
    import modscope.metrics

    doc = (PACKAGE.parent / "docs" / "api.md").read_text(encoding="utf-8")
    names = [n for n in modscope.__all__ if n not in ("metrics", "converters", "__version__")] + list(modscope.metrics.__all__)
    missing = [n for n in names if f"`{n}(" not in doc and f"class `{n}`" not in doc]
    assert missing == []
    assert "`.of(source: Model | nn.Module) -> Model`" in doc and "### `fit_run(" in doc
