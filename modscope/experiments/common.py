"""Pieces the experiments share: options, base-network training, claim tables, and report files."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..devices import resolve_device
from ..masks.config import MaskConfig
from ..masks.maskset import MaskSet
from ..masks.progress import Progress
from ..masks.trainer import train_masks
from ..model import Model
from ..fileio import atomic_write, write_json
from ..tasks import Task
from ..texttable import render_table


@dataclass(frozen=True)
class ExperimentOptions:
    """Options every experiment takes.

    Attributes:
        quick: the small preset (minutes on 2 CPU cores) instead of the paper's settings.
        medium: the middle preset (about 1.5 hours on 2 CPU cores) of the experiments that have one: the paper's
            network with as many steps as fit; excludes ``quick``.
        seeds: how many seeds to run; figures are reported as mean ± std.
        out: folder for the JSON (and HTML) report.
        device: torch device; cuda when present by default.
        data: a data file or folder for experiments that can read one (CIFAR-10).
        progress: show progress on stderr.
        overrides: experiment-specific settings to replace (e.g. {"base_steps": 100}) — used by tests.
    """

    quick: bool = False
    medium: bool = False
    seeds: int = 1
    out: Path = Path("runs")
    device: str | None = None
    data: Path | None = None
    progress: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)


def run_seeds(run_seed: Callable[[dict[str, Any], int, ExperimentOptions], dict[str, Any]], settings: dict[str, Any],
              options: ExperimentOptions) -> list[dict[str, Any]]:
    """``run_seed(settings, seed, options)`` for each of ``options.seeds`` seeds, in order. Under torchrun the seeds
    run in parallel as independent runs, seed i on rank i mod N (`masks.distributed.spread`); one seed shares its mask
    training over the ranks instead."""
    from ..masks.distributed import spread

    return spread(lambda seed: run_seed(settings, seed, options), range(options.seeds))


def run_sizes(run_size: Callable[[dict[str, Any], tuple[int, ...], int, ExperimentOptions], dict[str, Any]],
              settings: dict[str, Any], options: ExperimentOptions) -> list[list[dict[str, Any]]]:
    """``run_size(settings, hidden, seed, options)`` for every network size of ``settings["sizes"]`` and every seed:
    one list of the seeds' results per size. Under torchrun the (size, seed) runs are spread over the ranks as
    independent runs (`masks.distributed.spread`)."""
    from ..masks.distributed import spread

    pairs = [(tuple(hidden), seed) for hidden in settings["sizes"] for seed in range(options.seeds)]
    flat = spread(lambda pair: run_size(settings, pair[0], pair[1], options), pairs)
    return [flat[i : i + options.seeds] for i in range(0, len(flat), options.seeds)]


def log(message: str) -> None:
    """Progress and log lines go to stderr."""
    print(message, file=sys.stderr, flush=True)


def train_network(
    net: torch.nn.Module,
    task: Task,
    *,
    n_steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    forward: Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], torch.Tensor] | None = None,
    progress: bool = False,
) -> list[float]:
    """Train ``net`` in place with Adam on batches drawn with replacement from ``task``; returns the loss curve."""
    gen = torch.Generator().manual_seed(seed)
    net.to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = task.loss_fn()
    curve = []
    bar = Progress(n_steps, enabled=progress, what="base network")
    bar.start(0)
    for step in range(1, n_steps + 1):
        xs, y = task.batch(torch.randint(len(task), (batch_size,), generator=gen), device)
        out = forward(net, xs) if forward else task.select_output(net(*xs))
        loss = loss_fn(out, y)
        optimizer.zero_grad()
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        optimizer.step()
        if step % 100 == 0 or step == n_steps:
            curve.append(float(loss.detach()))
            bar.update(step, {"train": curve[-1]})
    bar.close()
    net.eval()
    return curve


#: the paper's training of its big feed-forward nets (sections 8.1 and 8.2; the authors' "big" FNN of their add/mul
#: and double-add figures): 2000x4 ReLU layers, 20,000 base and 20,000 mask steps of batch 128, Adam at 1e-3 for the
#: network and 1e-2 for the masks. The experiments add their own β and data sizes.
PAPER_FNN: dict[str, Any] = {
    "hidden": (2000, 2000, 2000, 2000),
    "base_steps": 20_000,
    "mask_steps": 20_000,
    "batch_size": 128,
    "base_lr": 1e-3,
    "mask_lr": 1e-2,
}


#: the paper states findings in words, not thresholds: every numeric criterion below is modscope's own reading.
def relu_mlp(n_in: int, hidden: Sequence[int], n_out: int) -> torch.nn.Sequential:
    """Linear + ReLU layers of the ``hidden`` widths, then a linear output layer (the paper's feed-forward nets).

    Example:
        >>> relu_mlp(4, (8, 8), 2)[-1]
        Linear(in_features=8, out_features=2, bias=True)
    """
    sizes = (n_in, *hidden)
    layers: list[torch.nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(sizes[-1], n_out))
    return torch.nn.Sequential(*layers)


def train_base(net: torch.nn.Module, task: Task, settings: dict[str, Any], seed: int, options: ExperimentOptions, *,
               tag: str, what: str, **train_options: Any) -> Model:
    """Train an experiment's base network on ``task`` for the settings' ``base_steps`` (``batch_size``, ``base_lr``)
    and return it, on the CPU, as the frozen `Model` the masks are trained on."""
    log(f"[{tag} seed {seed}] training {what} for {settings['base_steps']} steps")
    train_network(net, task, n_steps=settings["base_steps"], batch_size=settings["batch_size"], lr=settings["base_lr"],
                  seed=seed, device=resolve_device(options.device), progress=options.progress, **train_options)
    return Model(net.cpu())


def mask_config(settings: dict[str, Any], seed: int, options: ExperimentOptions, **changes: Any) -> MaskConfig:
    """The experiment's `MaskConfig`: the settings' ``mask_steps``, ``batch_size``, ``mask_lr`` and ``beta``, the seed
    and the options' device, with ``changes`` over them."""
    fields = {"n_steps": settings["mask_steps"], "batch_size": settings["batch_size"], "lr": settings["mask_lr"],
              "beta": settings.get("beta"), "seed": seed, "device": str(resolve_device(options.device))}
    return MaskConfig(**{**fields, **changes})


def fit_masks(model: Model, tasks: Sequence[Task], config: MaskConfig, options: ExperimentOptions, *, tag: str,
              seed: int, what: str) -> MaskSet:
    """Train one mask per task on ``model`` (logging which, for how many steps)."""
    log(f"[{tag} seed {seed}] training {what} for {config.n_steps} steps")
    return train_masks(model, list(tasks), config, progress=options.progress)


MODSCOPE = "modscope's criterion: "
PAPER = "the paper's words: "


@dataclass(frozen=True)
class Claim:
    """One line of an experiment's table: a measured figure beside what the paper reports.

    Attributes:
        what: the quantity measured.
        measured: its value, formatted.
        paper: what the paper reports, in words.
        holds: the verdict, or None where no criterion decides it.
        criterion: how ``holds`` is decided and who set the bar: `MODSCOPE` + a threshold modscope chose, or `PAPER`
            + a comparison the paper's words state (e.g. "× needs more weights than +": a ratio above 1).
    """

    what: str
    measured: str
    paper: str
    holds: bool | None = None
    criterion: str = "-"

    def to_dict(self) -> dict[str, Any]:
        return {"what": self.what, "measured": self.measured, "paper": self.paper, "holds": self.holds,
                "criterion": self.criterion}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std()) if len(arr) > 1 else 0.0


def fmt(values: Sequence[float] | float, percent: bool = True) -> str:
    """``12.3%`` for one value, ``12.3 ± 0.4%`` for several."""
    vals = [values] if isinstance(values, int | float) else list(values)
    scale, unit = (100.0, "%") if percent else (1.0, "")
    m, s = mean_std(vals)
    return f"{m * scale:.1f}{unit}" if len(vals) == 1 else f"{m * scale:.1f} ± {s * scale:.1f}{unit}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with aligned columns, cells as ``str`` gives them, all left-aligned (`render_table`)."""
    return render_table(headers, rows, fmt=str, align_numbers=False)


def claims_table(claims: Sequence[Claim]) -> str:
    verdict = {True: "yes", False: "NO", None: "-"}
    return format_table(["measurement", "measured", "paper", "criterion", "holds"],
                        [[c.what, c.measured, c.paper, c.criterion, verdict[c.holds]] for c in claims])


def write_html(path: Path, title: str, sections: Sequence[tuple[str, str]],
               figures: Sequence[tuple[str, str]] = ()) -> Path:
    """A self-contained HTML page of preformatted text sections (tables as printed), then inline SVG figures."""
    import html

    body = "\n".join(f"<h2>{html.escape(h)}</h2>\n<pre>{html.escape(text)}</pre>" for h, text in sections)
    body += "\n".join(f"<h2>{html.escape(h)}</h2>\n<figure>{svg}</figure>" for h, svg in figures)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        f"pre{{background:#f6f8fa;padding:1em;overflow-x:auto}}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(page)
    return path


class Settings(dict):
    """An experiment's settings, knowing where they depart from the paper's (``departures``: key -> paper value)."""

    departures: dict[str, Any]

    def describe(self) -> str:
        """One line for the report's header: the paper's settings, or how these differ from them."""
        if not self.departures:
            return "the paper's settings"
        diffs = ", ".join(f"{k} {setting_text(self[k])} (paper {setting_text(v)})" for k, v in self.departures.items())
        return f"differs from the paper's settings in: {diffs}"


def setting_text(value: Any) -> str:
    """A setting as the tables print it: ``2000x4`` for equal layer sizes, ``400-400-200`` otherwise, ``20,000``."""
    if isinstance(value, tuple | list) and all(isinstance(v, int) for v in value):
        return f"{value[0]}x{len(value)}" if len(value) > 1 and len(set(value)) == 1 else "-".join(map(str, value))
    if isinstance(value, tuple | list) and len(value) > 6:
        return f"{len(value)} values {setting_text(value[0])} … {setting_text(value[-1])}"
    if isinstance(value, tuple | list):
        return "/".join(setting_text(v) for v in value)
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def preset_label(options: ExperimentOptions) -> str:
    """"quick preset", "medium preset" or "full run": what a report calls the settings it ran at."""
    return "quick preset" if options.quick else "medium preset" if options.medium else "full run"


def resolve_settings(defaults: dict[str, Any], quick: dict[str, Any], options: ExperimentOptions,
                     medium: dict[str, Any] | None = None) -> Settings:
    """The paper's settings, the quick or medium preset over them if asked for, then the caller's overrides."""
    from ..errors import InvalidParameterError

    if options.quick and options.medium:
        raise InvalidParameterError("choose one preset: --quick or --medium, not both")
    if options.medium and medium is None:
        raise InvalidParameterError("this experiment has no medium preset; run it with --quick or at the paper's settings")
    settings = Settings(defaults)
    if options.quick:
        settings.update(quick)
    if options.medium:
        settings.update(medium)
    unknown = sorted(set(options.overrides) - set(settings))
    if unknown:
        raise InvalidParameterError(f"unknown experiment settings {unknown}; known: {sorted(settings)}")
    settings.update(options.overrides)
    settings.departures = {k: v for k, v in defaults.items() if settings[k] != v}
    return settings


def publish(
    name: str,
    options: ExperimentOptions,
    settings: dict[str, Any],
    runs: list[Any],
    checks: Sequence[Claim],
    tables: Sequence[tuple[str, str]],
    figures: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """Print ``tables`` and the claims, write ``NAME.json`` and ``NAME.html`` (with ``figures``: (title, SVG) pairs)
    into ``options.out``; return the report."""
    preset = settings.describe() if isinstance(settings, Settings) else "custom settings"
    label = preset_label(options)
    tables = [("Settings", f"{label}: {preset}"), *tables, ("Claims", claims_table(checks))]
    for title, text in tables:
        print(f"\n{title}\n{text}")
    report = {"experiment": name, "settings": settings, "quick": options.quick, "medium": options.medium, "preset": f"{label}: {preset}", "runs": runs,
              "claims": [c.to_dict() for c in checks]}
    options.out.mkdir(parents=True, exist_ok=True)
    path = write_json(options.out / f"{name}.json", report)  # modscope's JSON: schema_version first, NaN as null
    page = write_html(options.out / f"{name}.html", f"modscope reproduce {name}", tables, figures)
    log(f"report written to {path} and {page}")
    return report


def run_experiment(
    name: str,
    options: ExperimentOptions,
    *,
    paper: dict[str, Any],
    quick: dict[str, Any],
    medium: dict[str, Any] | None = None,
    run_seed: Callable[[dict[str, Any], int, ExperimentOptions], Any] | None = None,
    run_size: Callable[[dict[str, Any], tuple[int, ...], int, ExperimentOptions], Any] | None = None,
    claims: Callable[[list[Any]], Sequence[Claim]],
    tables: Callable[[list[Any]], Sequence[tuple[str, str]]],
    figures: Callable[[list[Any]], Sequence[tuple[str, str]]] | None = None,
) -> dict[str, Any]:
    """The one path every experiment runs: settings (the paper's, a preset, the overrides), the runs (``run_seed``
    for each seed, `run_seeds`, or ``run_size`` for each network size and seed, `run_sizes`), the claims, then the
    tables and figures printed and written (`publish`).

    Returns:
        The report written to ``options.out / NAME.json``.
    """
    settings = resolve_settings(paper, quick, options, medium=medium)
    runs = run_sizes(run_size, settings, options) if run_size is not None else run_seeds(run_seed, settings, options)
    checks = claims(runs)
    return publish(name, options, settings, runs, checks, tables(runs), figures(runs) if figures is not None else ())
