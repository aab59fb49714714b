"""The thread count: explicit > $OMP_NUM_THREADS > the usable cores that are idle; restored after; nested blocks agree."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from modscope import MaskConfig, threads
from modscope.errors import InvalidParameterError


@pytest.fixture
def automatic(monkeypatch, tmp_path):
    """No OMP_NUM_THREADS, two usable cores, an idle count the test sets, and a claims folder of the test's own."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    claims = tmp_path / "claims"
    claims.mkdir()
    monkeypatch.setattr(threads, "registry_folder", lambda: claims)

    def set_idle(value):
        monkeypatch.setattr(threads, "idle_cpus", lambda sample_seconds=0.1: value)

    return set_idle


@pytest.mark.parametrize(("idle", "expected"), [(1.9, 2), (1.0, 1), (0.8, 1), (0.1, 1), (None, 2)])
def test_automatic_choice_uses_the_idle_usable_cores(automatic, idle, expected):
    automatic(idle)
    assert threads.choose().threads == expected


def test_explicit_and_environment_win(automatic, monkeypatch):
    automatic(0.0)
    assert threads.choose(2).threads == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.choose().threads == 2 and "OMP_NUM_THREADS" in threads.choose().reason
    with pytest.raises(InvalidParameterError):
        threads.choose(0)
    with pytest.raises(InvalidParameterError):
        MaskConfig(threads=0)


def test_limited_restores_torch_and_nested_blocks_keep_the_outer_choice(automatic, capsys):
    before = torch.get_num_threads()
    automatic(1.9)
    with threads.limited() as outer:
        assert torch.get_num_threads() == outer.threads == 2
        automatic(0.0)  # the run itself now keeps a core busy: a nested block must not shrink the pool
        with threads.limited() as inner:
            assert inner is outer and torch.get_num_threads() == 2
        with threads.limited(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before


def test_idle_cpus_reads_the_machine():
    idle = threads.idle_cpus(0.05)
    assert idle is None or 0 <= idle <= (__import__("os").cpu_count() or 1) + 1e-6
    assert threads.usable_cpus() >= 1


# -- claims: runs that start together, or overlap, share the cores ------------------------------------------------
def _claims() -> Path:
    folder = threads.registry_folder()
    assert folder is not None
    return folder


def test_a_run_takes_only_the_cores_other_runs_have_not_claimed(automatic):
    automatic(1.9)  # both cores look idle: the other run has only just started
    other = threads._Claim.take(_claims(), 2, 2, 2)
    try:
        choice = threads.choose()
        assert choice.threads == 1 and "2 claimed by other modscope runs" in choice.reason
    finally:
        other.release()
    assert threads.choose().threads == 2


def test_a_dead_runs_claim_is_ignored_and_removed(automatic):
    automatic(1.9)
    stale = _claims() / "claim-999999-dead"
    stale.write_text("2")  # nobody holds its lock: the run that wrote it is gone
    assert threads.choose().threads == 2 and not stale.exists()


def test_limited_holds_a_claim_while_it_runs_and_gives_threads_back_when_others_come(automatic, monkeypatch, capsys):
    monkeypatch.setattr(threads, "REBALANCE_SECONDS", 0.0)
    automatic(1.9)
    with threads.limited() as choice:
        assert choice.threads == 2 and torch.get_num_threads() == 2
        (mine,) = _claims().glob("claim-*")
        assert mine.read_text() == "2"
        other = threads._Claim.take(_claims(), 1, 1, 2)  # a second run starts
        threads.rebalance()
        assert torch.get_num_threads() == 1 and mine.read_text() == "1"
        other.release()  # it ends; one core is idle again
        automatic(1.0)
        threads.rebalance()
        assert torch.get_num_threads() == 2 and mine.read_text() == "2"
        with threads.limited(1):  # an explicit count inside is never rebalanced
            threads.rebalance()
            assert torch.get_num_threads() == 1
    assert not list(_claims().glob("claim-*"))
    assert "now using 1 CPU thread" in capsys.readouterr().err


def test_explicit_and_environment_choices_claim_nothing(automatic, monkeypatch):
    automatic(1.9)
    with threads.limited(2):
        assert not list(_claims().glob("claim-*"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with threads.limited():
        assert not list(_claims().glob("claim-*"))


@pytest.mark.skipif(threads.registry_folder() is None, reason="no flock on this platform")
def test_two_runs_started_at_the_same_instant_do_not_both_take_every_core(tmp_path):
    script = textwrap.dedent("""
        import sys, time
        from modscope import threads
        with threads.limited(announce=False) as choice:
            print(choice.threads, threads.usable_cpus(), flush=True)
            time.sleep(1.5)
    """)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(TMPDIR=str(tmp_path), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    runs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    got = [tuple(map(int, run.communicate(timeout=120)[0].split())) for run in runs]
    first, second = sorted(t for t, _ in got)
    usable = got[0][1]
    assert second <= usable and first <= max(1, usable - second)


def test_an_explicit_block_inside_an_automatic_one_is_never_rebalanced(automatic, monkeypatch):
    monkeypatch.setattr(threads, "REBALANCE_SECONDS", 0.0)
    automatic(1.9)
    with threads.limited():
        with threads.limited(2):
            other = threads._Claim.take(_claims(), 1, 1, 2)  # the claims now exceed the cores
            try:
                threads.rebalance()
                assert torch.get_num_threads() == 2
            finally:
                other.release()
