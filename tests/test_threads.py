"""The thread count: explicit > $OMP_NUM_THREADS > the usable cores that are idle; restored after; nested blocks agree."""

from __future__ import annotations

import pytest
import torch

from modscope import MaskConfig, threads
from modscope.errors import InvalidParameterError


@pytest.fixture
def automatic(monkeypatch):
    """No OMP_NUM_THREADS, two usable cores, and an idle count the test sets."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)

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
