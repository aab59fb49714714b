"""Mask training on 2 gloo processes (torch.multiprocessing): the masks of one process, resumable across rank counts,
rank 0 alone writes, a lost rank ends the run with one sentence and leaves the last checkpoint as it was, and each rank
holds half of the logits, their gradient and Adam's moments."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_trainer_speed import (
    CONFIG,
    REFERENCE,
    fingerprint,
    reference_net,
    reference_tasks,
)

import modscope
from modscope.errors import InvalidParameterError
from modscope.experiments import get_experiment
from modscope.experiments.common import ExperimentOptions
from modscope.masks.distributed import DistributedError, Ranks, share_work, spread
from modscope.masks.trainer import MaskTrainer

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

#: checkpoints at steps 10, 20 and 30 of the 40-step reference run: the last one stays in the file.
EVERY = 10


def _config(**overrides) -> modscope.MaskConfig:
    return modscope.MaskConfig(**{**CONFIG, "compile": False, **overrides})


def _tasks(n: int) -> list[modscope.Task]:
    """The reference tasks, and a third on the same inputs."""
    tasks = reference_tasks()
    x = tasks[0].inputs[0]
    return [*tasks, modscope.Task("third", x, (x[:, 4] > 0).long())][:n]


def _train(tasks: int = 2, **kwargs) -> modscope.MaskSet:
    return modscope.train_masks(reference_net(), _tasks(tasks), _config(**kwargs.pop("config", {})),
                                progress=False, **kwargs)


def _state_numels(tasks: int) -> dict[str, int]:
    """Elements of the logits, their gradient and Adam's moments this process holds after 2 steps, and the whole
    (K, N) logits' elements."""
    model = modscope.load(reference_net())
    trainer = MaskTrainer(model, model.module_on("cpu"), _tasks(tasks), _config(), torch.device("cpu"))
    for _ in range(2):
        trainer.step()
    trainer.close()
    logits = trainer.logits
    local = getattr(logits, "to_local", lambda: logits)
    moments = trainer.optimizer.state[logits]
    grad = logits.grad.to_local() if hasattr(logits.grad, "to_local") else logits.grad
    return {"logits": local().numel(), "grad": grad.numel(),
            "adam": sum(getattr(moments[k], "to_local", lambda k=k: moments[k])().numel() for k in ("exp_avg", "exp_avg_sq")),
            "whole": tasks * trainer.layout.total}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_group(rank: int, world: int, port: int, timeout: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout))


def _scenarios(rank: int, port: int, folder: Path) -> None:
    """Every 2-rank run of the module's tests, in one process group (processes are slow to start)."""
    _join_group(rank, 2, port, timeout=60)
    try:
        _train(checkpoint=folder / f"rank{rank}" / "ckpt.pt", checkpoint_every=EVERY).save(folder / f"two-{rank}.safetensors")
        _train(tasks=1).save(folder / f"split-{rank}.safetensors")
        _train(tasks=3).save(folder / f"three-{rank}.safetensors")
        (folder / f"state-{rank}.json").write_text(json.dumps({k: _state_numels(k) for k in (1, 2, 3)}))
        resumed = folder / f"one-ckpt-{rank}.pt"  # each rank resumes from its own copy: the file must stay the same
        shutil.copy(folder / "one.pt", resumed)
        _train(checkpoint=resumed, checkpoint_every=EVERY, resume=True).save(folder / f"resumed-{rank}.safetensors")
        try:
            _train(config={"pass_size": 2})
        except DistributedError as exc:
            (folder / f"refusal-{rank}.txt").write_text(str(exc))
        (folder / f"spread-{rank}.json").write_text(json.dumps(spread(_who_runs, [10, 11, 12])))
        report = _double_add(folder / f"double-add-{rank}")
        (folder / f"double-add-{rank}.json").write_text(json.dumps(report["runs"], default=str))
    finally:
        dist.destroy_process_group()


def _who_runs(item: int) -> list:
    return [item, dist.get_rank(), Ranks.current() is None]


def _double_add(out: Path) -> dict:
    """`reproduce double-add` with a tiny network and 2 seeds."""
    tiny = {"hidden": (16, 16, 16), "base_steps": 20, "mask_steps": 4, "n_train": 2000, "n_valid": 200, "batch_size": 32}
    return get_experiment("double-add").run(ExperimentOptions(out=out, seeds=2, progress=False, overrides=tiny))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 2-rank runs' outputs; ``one.pt`` is a 1-process checkpoint at step 30 for them to resume."""
    folder = tmp_path_factory.mktemp("dist")
    _train(checkpoint=folder / "one.pt", checkpoint_every=EVERY)
    mp.spawn(_scenarios, args=(_free_port(), folder), nprocs=2, join=True)
    return folder


def _same_masks(got: modscope.MaskSet, want: modscope.MaskSet, atol: float) -> None:
    assert got.tasks == want.tasks
    for task in want.tasks:
        for w, logits in want.logits[task].items():
            assert torch.equal(got.logits[task][w] > 0, logits > 0), f"{task}/{w}: the binary mask differs"
            torch.testing.assert_close(got.logits[task][w], logits, rtol=0, atol=atol)


def test_share_work_gives_every_task_and_sample_to_one_rank():
    for tasks, samples, world in [(2, 4, 2), (3, 4, 2), (1, 4, 4), (5, 3, 4), (1, 1, 1)]:
        shares = share_work(tasks, samples, world)
        pairs = [(u.task, s) for units in shares for u in units for s in range(u.s0, u.s1)]
        assert sorted(pairs) == [(k, s) for k in range(tasks) for s in range(samples)]
        sizes = [sum(u.s1 - u.s0 for u in units) for units in shares]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(InvalidParameterError, match="at most 4 ranks"):
        share_work(1, 4, 5)


def test_two_ranks_whole_tasks_give_the_recorded_masks_and_logits_bit_for_bit(runs):
    for rank in (0, 1):  # every rank returns the masks
        masks = modscope.MaskSet.load(runs / f"two-{rank}.safetensors")
        for task, (bits, digest) in REFERENCE.items():
            assert fingerprint(masks, task) == (bits, digest), f"rank {rank}, task {task!r} changed"


def test_one_task_split_over_two_ranks_gives_the_masks_of_one_process(runs):
    # the two ranks' halves of the gradient are summed in another order than in one process: the logits move by
    # float32 rounding (measured up to 1.2e-6 after 40 steps), the binary masks not at all
    _same_masks(modscope.MaskSet.load(runs / "split-0.safetensors"), _train(tasks=1), atol=1e-5)


def test_three_tasks_on_two_ranks_sharded_by_weights_give_the_masks_of_one_process(runs):
    # 3 tasks on 2 ranks: the state is sharded by masked weights (columns, padded to an even number) and the middle
    # task's samples are split; the clipping norms are summed from the two halves of each row (measured: logits within
    # 1.2e-6 of one process after 40 steps)
    _same_masks(modscope.MaskSet.load(runs / "three-1.safetensors"), _train(tasks=3), atol=1e-5)


def test_each_of_two_ranks_holds_half_of_the_logits_their_gradient_and_the_adam_moments(runs):
    one = _state_numels(2)
    assert one == {"logits": one["whole"], "grad": one["whole"], "adam": 2 * one["whole"], "whole": one["whole"]}
    for rank in (0, 1):
        for tasks, numels in json.loads((runs / f"state-{rank}.json").read_text()).items():
            whole = numels["whole"]  # K x 435 masked weights, cut in two runs: rank 0 holds the longer one when odd
            half = (whole + 1) // 2 if rank == 0 else whole // 2
            assert (numels["logits"], numels["grad"], numels["adam"]) == (half, half, 2 * half), (rank, tasks, numels)


def test_a_two_rank_checkpoint_resumes_on_one_process_and_a_one_process_one_on_two(runs):
    reference = _train()
    resumed_here = _train(checkpoint=runs / "rank0" / "ckpt.pt", checkpoint_every=EVERY, resume=True)
    _same_masks(resumed_here, reference, atol=0)
    for rank in (0, 1):
        _same_masks(modscope.MaskSet.load(runs / f"resumed-{rank}.safetensors"), reference, atol=0)
    assert (runs / "one-ckpt-0.pt").read_bytes() == (runs / "one.pt").read_bytes()  # resumed at 30, nothing to save


def test_only_rank_zero_writes_the_checkpoint(runs):
    assert torch.load(runs / "rank0" / "ckpt.pt", weights_only=True)["step"] == 30
    assert not (runs / "rank1").exists()


def test_an_unsupported_combination_is_refused_on_every_rank_in_one_sentence(runs):
    for rank in (0, 1):
        message = (runs / f"refusal-{rank}.txt").read_text()
        assert "pass_size cannot be combined with torch.distributed" in message
        assert "\n" not in message


class _DiesAtStep:
    """Cross-entropy that ends the process (as a crash or a kill would) on its ``step``-th call."""

    def __init__(self, step: int):
        self.calls, self.step = 0, step

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.step:
            os._exit(3)
        return torch.nn.functional.cross_entropy(out, y)


def _lose_a_rank(rank: int, port: int, folder: Path) -> None:
    _join_group(rank, 2, port, timeout=20)  # a hung collective would end after 20 s
    tasks = reference_tasks()
    if rank == 1:  # rank 1 runs task "second"
        tasks[1] = modscope.Task("second", tasks[1].inputs[0], tasks[1].targets, loss=_DiesAtStep(25))
    try:
        modscope.train_masks(reference_net(), tasks, _config(), progress=False, checkpoint=folder / "ckpt.pt",
                             checkpoint_every=EVERY)
    except DistributedError as exc:
        (folder / "error.txt").write_text(str(exc))
    finally:  # as the CLI does: a group left to interpreter exit after a peer died can abort in gloo's teardown
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_rank_that_dies_ends_the_run_with_one_sentence_and_keeps_the_last_checkpoint(tmp_path):
    context = mp.spawn(_lose_a_rank, args=(_free_port(), tmp_path), nprocs=2, join=False)
    for process in context.processes:
        process.join(60)
    assert [p.exitcode for p in context.processes] == [0, 3]
    message = (tmp_path / "error.txt").read_text()
    assert "\n" not in message
    assert "rank 0 of 2 lost the other ranks" in message
    assert f"the last checkpoint, {tmp_path / 'ckpt.pt'} at step 20, is intact: run again with --resume" in message
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 20
    resumed = _train(checkpoint=tmp_path / "ckpt.pt", checkpoint_every=EVERY, resume=True)
    _same_masks(resumed, _train(), atol=0)


def test_spread_runs_each_item_once_on_one_rank_alone_and_gives_every_rank_all_results(runs):
    for rank in (0, 1):
        assert json.loads((runs / f"spread-{rank}.json").read_text()) == [[10, 0, True], [11, 1, True], [12, 0, True]]


def test_reproduce_seeds_spread_over_two_ranks_give_the_runs_of_one_process(runs, tmp_path):
    alone = json.loads(json.dumps(_double_add(tmp_path)["runs"], default=str))
    for rank in (0, 1):
        assert json.loads((runs / f"double-add-{rank}.json").read_text()) == alone


def test_commands_other_than_fit_and_reproduce_refuse_to_run_in_several_processes(monkeypatch, capsys):
    from modscope.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    assert main(["report", "/nonexistent-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    sentence = "runs in one process; only fit and reproduce run under torchrun with several processes: run it without torchrun"
    assert err == [f"modscope report: error: modscope report {sentence}"]
