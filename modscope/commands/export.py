"""`modscope export`: write the model with a task's subnetwork removed, or with only it kept."""

from __future__ import annotations

import argparse
import sys

from ._common import add_model_options, model_options

HELP = "write the model with a task's mask removed (--remove) or with only it kept (--keep)"
DESCRIPTION = """\
Write the model the run was trained on with one task's masked weights zeroed (--remove TASK: the ablated model,
what the report's ablation matrix measures) or with every masked weight outside the task's mask zeroed (--keep TASK:
the extracted subnetwork). Weights that were not masked (biases, by default) stay as they are.

An output ending in .onnx is an edited copy of the original ONNX file (only the changed initializers differ); .safetensors
or any other suffix writes a state_dict. The model file must be the one the run was made on: its checksum is checked.
A run made with --trust or --factory needs them again here: a run folder never grants trust or names code by itself."""
EXAMPLE = "modscope export runs/addmul --remove mul -o model-without-mul.onnx"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a run folder made by `modscope fit`")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--remove", metavar="TASK", help="zero the weights of TASK's mask")
    what.add_argument("--keep", metavar="TASK", help="keep only the weights of TASK's mask (among the masked weights)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the file to write (.onnx, .safetensors, .pt)")
    p.add_argument("--model", metavar="PATH", help="the model file, if it moved since the run (default: the path in config.json)")
    p.add_argument("--no-check", action="store_true", help="do not run an ONNX output once in onnxruntime before writing it")
    add_model_options(p)


def run(args: argparse.Namespace) -> int:
    from ..converters.export import export_masked
    from ..runs import RunFolder

    folder = RunFolder.open(args.run)
    masks = folder.masks()
    task = args.remove or args.keep
    mask = ~masks[task] if args.remove else masks[task]
    model = folder.load_model(args.model, **model_options(args))
    out = export_masked(model, dict(mask), args.output, check=not args.no_check)
    removed = mask.numel() - mask.count()
    print(f"wrote {out}: {removed:,} of {mask.numel():,} masked weights zeroed "
          f"({'without' if args.remove else 'only'} {task}'s mask)", file=sys.stderr)
    return 0
