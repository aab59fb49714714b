"""`torchrun --nproc-per-node 2 -m modscope fit ...` on CPU (gloo): the run folder of one process, written by rank 0;
a lost rank ends the run with one sentence, keeps the checkpoint, and --resume on one process finishes it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_fixtures import FIT_FLAGS, Toy, console_env, make_toy

import modscope

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")]

FLAGS = [*FIT_FLAGS, "--n-steps", "40", "--checkpoint-every", "10"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Toy:
    return make_toy(tmp_path_factory.mktemp("toy"))


def modscope_run(*argv: object, ranks: int = 1, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """``modscope ARGV`` in one process, or under torchrun with ``ranks`` processes on this machine."""
    launch = ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "-m", "modscope"] if ranks > 1 else ["-m", "modscope"]
    return subprocess.run([sys.executable, *launch, *map(str, argv)], capture_output=True, text=True, cwd=cwd,
                          env=console_env(**env), timeout=300, check=False)


def fit_args(toy: Toy, out: Path, model: Path | None = None, *extra: str) -> list[object]:
    return ["fit", model or toy.onnx, "--task", f"a={toy.a}", "--task", f"b={toy.b}", "--out", out, *FLAGS, *extra]


def assert_same_masks(got: Path, want: Path) -> None:
    a, b = modscope.MaskSet.load(got / "masks.safetensors"), modscope.MaskSet.load(want / "masks.safetensors")
    for task in b.tasks:
        for w, logits in b.logits[task].items():
            assert torch.equal(a.logits[task][w], logits), f"{task}/{w} differs"


def test_torchrun_fit_on_two_ranks_writes_the_run_of_one_process(toy: Toy, tmp_path: Path) -> None:
    one = modscope_run(*fit_args(toy, tmp_path / "one"), cwd=tmp_path)
    two = modscope_run(*fit_args(toy, tmp_path / "two"), ranks=2, cwd=tmp_path)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert two.stdout == one.stdout  # the same table, printed once (rank 0)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert_same_masks(tmp_path / "two", tmp_path / "one")
    assert (tmp_path / "two" / "curves.json").read_text() == (tmp_path / "one" / "curves.json").read_text()


def test_a_lost_rank_ends_the_run_in_one_sentence_and_resume_on_one_process_finishes_it(toy: Toy, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    assert modscope_run(*fit_args(toy, reference, toy.state_dict, "--factory", "cli_fixtures:toy_net"), cwd=tmp_path).returncode == 0
    run = tmp_path / "run"
    dying = fit_args(toy, run, toy.state_dict, "--factory", "distributed_factories:toy_net_dying_on_rank_1")
    lost = modscope_run(*dying, ranks=2, cwd=tmp_path, DIE_AT_CALL="25")  # rank 1 dies in step 25
    assert lost.returncode != 0
    ours = [line for line in lost.stderr.splitlines() if line.startswith("modscope fit: error:")]
    assert len(ours) == 1, lost.stderr
    assert "rank 0 of 2 lost the other ranks" in ours[0]
    assert f"the last checkpoint, {run / 'checkpoint.pt'} at step 20, is intact: run again with --resume" in ours[0]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 20
    assert modscope_run(*dying, "--resume", cwd=tmp_path).returncode == 0  # no $RANK: this process does not die
    assert_same_masks(run, reference)


def test_a_refusal_on_rank_0_is_printed_once_and_every_rank_stops(toy: Toy, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert modscope_run(*fit_args(toy, run), cwd=tmp_path).returncode == 0
    again = modscope_run(*fit_args(toy, run), ranks=2, cwd=tmp_path)
    assert again.returncode != 0
    ours = [line for line in again.stderr.splitlines() if line.startswith("modscope fit: error:")]
    sentence = f"{run} already holds a finished run; choose another --out, or pass --force to replace it"
    assert ours == [f"modscope fit: error: {sentence}"]
