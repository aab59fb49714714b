"""`modscope reproduce`: run one of the paper's experiments end to end."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..experiments import EXPERIMENTS

if TYPE_CHECKING:  # pragma: no cover
    from ..experiments.common import ExperimentOptions

HELP = "run one of the paper's experiments end to end and compare with the paper's figures"
DESCRIPTION = f"""\
Run one of the paper's experiments: train the network, the masks, measure, and print the measured figures beside
the paper's. --quick runs a small preset (minutes on a CPU); --medium, for addmul and scan, the paper's network with
as many steps as fit in about 1.5 hours on a 2-core CPU. Experiments: {", ".join(EXPERIMENTS)}."""
EXAMPLE = "modscope reproduce addmul --quick --out runs/reproduce"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", choices=list(EXPERIMENTS), help=f"the experiment: {', '.join(EXPERIMENTS)}")
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="the small preset instead of the paper's settings")
    preset.add_argument("--medium", action="store_true",
                        help="addmul and scan: the paper's network with as many steps as fit in about 1.5 h on 2 CPU cores")
    p.add_argument("--seeds", type=int, metavar="N", help="how many seeds to run (default: 1)")
    p.add_argument("--out", metavar="DIR", help="folder for the JSON and HTML reports (default: runs)")
    p.add_argument("--device", metavar="NAME", help="torch device (default: cuda when present)")
    p.add_argument("--data", metavar="PATH", help="a data file or folder, for experiments that read one")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (default: $OMP_NUM_THREADS, else the usable cores idle at the start)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    from ..errors import InvalidParameterError
    from ..masks.convergence import convergence_hint
    from ..experiments import get_experiment
    from ..experiments.common import ExperimentOptions

    if args.seeds is not None and args.seeds < 1:
        raise InvalidParameterError(f"--seeds must be at least 1, got {args.seeds}")
    given = {"seeds": args.seeds, "device": args.device,
             "out": Path(args.out) if args.out else None, "data": Path(args.data) if args.data else None}
    options = ExperimentOptions(quick=args.quick, medium=args.medium, progress=not args.quiet, **{k: v for k, v in given.items() if v is not None})
    with _rank_output(options) as options, convergence_hint(_steps_hint(options)):
        get_experiment(args.name).run(options)
    return 0


def _steps_hint(options: ExperimentOptions) -> str:
    """How a `reproduce` user trains the masks longer (the experiments have no --n-steps)."""
    if options.quick or options.medium:
        return "the presets stop early to save time: run without --quick/--medium for the paper's step counts"
    return "these are the paper's step counts; the finding was measured at them"


@contextlib.contextmanager
def _rank_output(options: ExperimentOptions) -> Iterator[ExperimentOptions]:
    """Under torchrun, every rank runs the experiment (its mask training is shared out over the ranks) and rank 0
    alone writes the reports and progress: the other ranks write into a temporary folder, removed at the end, and
    print nothing."""
    import dataclasses
    import os
    import tempfile

    from ..masks.distributed import Ranks

    ranks = Ranks.current()
    if ranks is None or ranks.leader:
        yield options
        return
    with tempfile.TemporaryDirectory(prefix="modscope-rank") as tmp, open(os.devnull, "w") as null, \
            contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield dataclasses.replace(options, out=Path(tmp), progress=False)
