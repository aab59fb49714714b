"""`modscope diff`: compare two runs on the same tasks (mask drift, change in sharing and ablation)."""

from __future__ import annotations

import argparse

from ._common import print_json, text_table

HELP = "compare two runs on the same tasks: mask drift, change in sharing, overlap and ablation"
DESCRIPTION = """\
Compare two runs on the same tasks, for example a model before and after a fine-tune. Mask drift is the IoU of each
task's mask in run A with its mask in run B (1: the same weights; compare with the chance level). The changes in
sharing, pairwise IoU and the ablation matrix are B minus A. Both runs must mask the same weights. Tasks present in
one run only are named and left out; sharing is then recomputed on the common tasks."""
EXAMPLE = "modscope diff runs/base runs/finetuned"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_a", metavar="RUN_A", help="the reference run folder")
    p.add_argument("run_b", metavar="RUN_B", help="the run folder to compare with it")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON (with schema_version) on stdout")


def run(args: argparse.Namespace) -> int:
    from ..report.diff import diff_runs
    from ..runs import RunFolder

    a, b = RunFolder.open(args.run_a), RunFolder.open(args.run_b)
    result = diff_runs(a.masks(), a.report(), b.masks(), b.report())
    if args.json:
        print_json({"run_a": args.run_a, "run_b": args.run_b, **result})
        return 0
    if not result["same_model"]:
        print("The runs were made on different model files (the checksums differ).\n")
    for side, name in (("only_a", args.run_a), ("only_b", args.run_b)):
        if result[side]:
            print(f"Only in {name}, not compared: {', '.join(result[side])}")
    if result["only_a"] or result["only_b"]:
        print(f"Compared on the common tasks only ({', '.join(result['tasks'])}); sharing is recomputed on them.\n")
    drift = result["drift"]
    print("Mask drift (IoU of each task's masks across the runs)")
    print(text_table(["task", "IoU A-B", "chance", "density A", "density B"],
                     [[t, d["iou"], d["chance"], d["density_a"], d["density_b"]] for t, d in drift.items()]))
    print("\nSharing (fraction of a task's mask used by other masks)")
    print(text_table(["task", "A", "B", "change"], [[t, s["a"], s["b"], s["change"]] for t, s in result["sharing"].items()]))
    if result["iou"]:
        print("\nIoU between tasks")
        print(text_table(["tasks", "A", "B", "change"],
                         [[pair.replace("|", " / "), v["a"], v["b"], v["change"]] for pair, v in result["iou"].items()]))
    ab = result["ablation"]
    print("\nAblation: change (B - A) of each task's metric (columns) with a mask removed (rows)")
    print(text_table(["mask removed", *ab["tasks"]], [[m, *row] for m, row in zip(ab["masks"], ab["change"])]))
    return 0
