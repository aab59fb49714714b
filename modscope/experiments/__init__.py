"""The paper's experiments, runnable end to end with ``modscope reproduce NAME``.

Each module exposes ``DESCRIPTION`` (one line) and ``run(options: ExperimentOptions) -> dict``, which prints a table of
the measured figures beside the paper's claims and writes a JSON report into ``options.out``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import InvalidParameterError

#: experiment name -> module; modules are imported on demand.
EXPERIMENTS: dict[str, str] = {
    "addmul": "modscope.experiments.addmul",
    "addmul-lstm": "modscope.experiments.addmul_lstm",
    "beta-sweep": "modscope.experiments.beta_sweep",
    "addmul-sizes": "modscope.experiments.addmul_sizes",
    "double-add": "modscope.experiments.double_add",
    "class-removal": "modscope.experiments.class_removal",
    "scan": "modscope.experiments.scan",
    "stability": "modscope.experiments.stability",
}


def get_experiment(name: str) -> ModuleType:
    """The module of experiment ``name``."""
    if name not in EXPERIMENTS:
        raise InvalidParameterError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    try:
        return importlib.import_module(EXPERIMENTS[name])
    except ModuleNotFoundError as exc:
        raise InvalidParameterError(f"experiment {name!r} is not available in this version ({exc.name} is missing)") from exc
