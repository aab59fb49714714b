"""Addition vs multiplication on the paper's LSTM (docs/method.md section 8.1): the same questions as ``addmul``.

The paper's performance table has a row for its LSTM beside the feed-forward net: two layers of 256 units reading the
42-d input three times, the two result digits read from the last step. Everything else (data, masks, tables, claims)
is the add/mul experiment's.
"""

from __future__ import annotations

from typing import Any

from . import addmul
from .common import ExperimentOptions

DESCRIPTION = "addition vs multiplication on the paper's 2x256 LSTM (paper 8.1, LSTM row)"

#: the paper's LSTM (docs/method.md section 8.1): 2 layers x 256 units, 3 time steps; the add/mul schedule and β.
SETTINGS: dict[str, Any] = {**addmul.SETTINGS, "model": "lstm", "hidden": (256, 256)}
#: quick: the paper's LSTM with a short schedule.
QUICK: dict[str, Any] = {"base_steps": 3000, "mask_steps": 1000, "base_lr": 3e-3}


def run(options: ExperimentOptions) -> dict[str, Any]:
    """Run the add/mul experiment on the LSTM."""
    return addmul.run(options, name="addmul-lstm", paper=SETTINGS, quick=QUICK)
