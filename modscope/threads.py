"""How many CPU threads torch should use: no more than the cores that are actually free.

torch starts one intra-op thread per core it can see. On a machine where another job keeps a core busy, those threads
spin-wait for each other and a small network's step becomes many times slower (measured on the project's 2-core
machine with one core busy: the add/mul LSTM's base training at 6.4 steps/s with torch's default of 2 threads,
41 steps/s with 1). modscope therefore counts the cores it may use (CPU affinity and a cgroup quota) and, of those, the
ones idle right now (from ``/proc/stat`` over a tenth of a second), and uses that many threads, at least one.

An explicit choice always wins: ``--threads N`` / ``MaskConfig.threads``, else ``$OMP_NUM_THREADS``, else the count
above. The choice is announced once per process.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

_announced = False
_active: ThreadChoice | None = None  # the choice of an enclosing `limited` block, reused by nested ones


@dataclass(frozen=True)
class ThreadChoice:
    """How many threads, and why."""

    threads: int
    reason: str

    def __str__(self) -> str:
        return f"using {self.threads} CPU thread{'s' if self.threads != 1 else ''} ({self.reason})"


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity, capped by a cgroup v2 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(n, math.floor(quota)) if quota else n)


def _cgroup_quota() -> float | None:
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else max(int(quota) / int(period), 1.0)


def idle_cpus(sample_seconds: float = 0.1) -> float | None:
    """How many CPUs of the whole machine were idle over ``sample_seconds`` (``/proc/stat``); None where unknown."""
    first = _cpu_times()
    if first is None:
        return None
    time.sleep(sample_seconds)
    second = _cpu_times()
    if second is None:
        return None
    busy = [b - a for a, b in zip(first, second)]
    total = sum(busy)
    if total <= 0:
        return None
    idle = busy[3] + busy[4]  # idle + iowait
    return idle / total * (os.cpu_count() or 1)


def _cpu_times() -> list[int] | None:
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    return [int(v) for v in fields[1:9]] if fields and fields[0] == "cpu" else None


def choose(explicit: int | None = None) -> ThreadChoice:
    """The thread count to use: ``explicit``, else ``$OMP_NUM_THREADS``, else the free usable cores (at least 1).

    Example:
        >>> choose(3).threads
        3
    """
    if explicit is not None:
        if explicit < 1:
            from .errors import InvalidParameterError

            raise InvalidParameterError(f"threads must be at least 1, not {explicit}")
        return ThreadChoice(explicit, "as asked")
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return ThreadChoice(int(env), "from OMP_NUM_THREADS")
    usable = usable_cpus()
    idle = idle_cpus()
    if idle is None:
        return ThreadChoice(usable, f"{usable} usable CPUs")
    free = max(1, min(usable, int(idle + 0.25)))  # a core 75% idle counts as free
    return ThreadChoice(free, f"{free} of {usable} usable CPUs free; --threads N to change")


@contextlib.contextmanager
def limited(explicit: int | None = None, *, announce: bool = True) -> Iterator[ThreadChoice]:
    """Run the block with torch using `choose`'s thread count; torch's previous setting is restored after.

    Nested blocks without an explicit count keep the enclosing block's choice (inside a run, this process's own
    threads would make its cores look busy). With ``announce``, an automatic choice is printed once per process on
    stderr (explicit ones are not).
    """
    global _announced, _active
    if explicit is None and _active is not None:
        yield _active
        return
    choice = choose(explicit)
    before = torch.get_num_threads()
    if announce and not _announced and explicit is None and "OMP_NUM_THREADS" not in choice.reason:
        print(f"modscope: {choice}", file=sys.stderr, flush=True)
        _announced = True
    torch.set_num_threads(choice.threads)
    outer, _active = _active, choice
    try:
        yield choice
    finally:
        _active = outer
        torch.set_num_threads(before)
