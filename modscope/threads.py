"""How many CPU threads torch should use: no more than the cores that are actually free.

torch starts one intra-op thread per core it can see. On a machine where another job keeps a core busy, those threads
spin-wait for each other and a small network's step becomes many times slower (measured on the project's 2-core
machine with one core busy: the add/mul LSTM's base training at 6.4 steps/s with torch's default of 2 threads,
41 steps/s with 1). modscope therefore counts the cores it may use (CPU affinity and a cgroup quota) and, of those, the
ones idle right now (from ``/proc/stat`` over a tenth of a second), and uses that many threads, at least one.

The idle count cannot see a second modscope that starts at the same instant (both find the cores idle and both take
them all), so automatic choices are also written down: each run holds a claim file (locked with ``flock`` while it
lives, so a crashed run's claim is ignored) in a folder of the user's own in the temporary directory, a new run
takes at most the cores not claimed by the others, and a long run checks every few seconds between steps
(`rebalance`) whether the claims add up to more cores than there are, giving threads back when they do and taking
them again when the others end.

An explicit choice always wins: ``--threads N`` / ``MaskConfig.threads``, else ``$OMP_NUM_THREADS``, else the count
above. The choice is announced once per process, and so is every later change.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

_announced = False
_active: ThreadChoice | None = None  # the choice of an enclosing `limited` block, reused by nested ones
_held: _Claim | None = None  # this process's claim while an automatic `limited` block runs

#: how often (seconds) a run compares the claims with the cores (`rebalance`)
REBALANCE_SECONDS = 5.0


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
    env = _environment_threads()
    if env is not None:
        return ThreadChoice(env, "from OMP_NUM_THREADS")
    choice, _ = _automatic(claim=False)
    return choice


def _automatic(*, claim: bool) -> tuple[ThreadChoice, _Claim | None]:
    """The free usable cores less those other modscope runs claim (and, with ``claim``, this process's claim)."""
    usable = usable_cpus()
    folder = registry_folder()
    with _registry_locked(folder):  # one chooser at a time, so the next one sees this one's claim
        others = _claimed_by_others(folder, own=None)
        idle = idle_cpus()
        wanted = usable if idle is None else max(1, min(usable, _whole_cores(idle)))
        threads = max(1, min(wanted, usable - others))
        held = _Claim.take(folder, threads, wanted, usable) if claim and folder is not None else None
    reason = f"{usable} usable CPUs" if idle is None else f"{wanted} of {usable} usable CPUs free"
    if others:
        reason += f", {others} claimed by other modscope runs"
    return ThreadChoice(threads, f"{reason}; --threads N to change"), held


@contextlib.contextmanager
def limited(explicit: int | None = None, *, announce: bool = True) -> Iterator[ThreadChoice]:
    """Run the block with torch using `choose`'s thread count; torch's previous setting is restored after.

    Nested blocks without an explicit count keep the enclosing block's choice (inside a run, this process's own
    threads would make its cores look busy). With ``announce``, an automatic choice is printed once per process on
    stderr (explicit ones are not).
    """
    global _announced, _active, _held
    if explicit is None and _active is not None:
        yield _active
        return
    automatic = explicit is None and _environment_threads() is None
    choice, held = _automatic(claim=True) if automatic else (choose(explicit), None)
    before = torch.get_num_threads()
    if announce and not _announced and automatic:
        print(f"modscope: {choice}", file=sys.stderr, flush=True)
        _announced = True
    torch.set_num_threads(choice.threads)
    outer, _active = _active, choice
    outer_held, _held = _held, held  # an explicit block inside an automatic one: nothing to rebalance
    if held is not None:
        held.announce = announce
    try:
        yield choice
    finally:
        _active, _held = outer, outer_held
        if held is not None:
            held.release()
        torch.set_num_threads(before)


def rebalance() -> None:
    """Between two steps of a run: match this process's threads to the cores other modscope runs leave it.

    Cheap to call every step: it looks at the claims at most every `REBALANCE_SECONDS`, and only inside an automatic
    `limited` block (an explicit ``threads`` or ``$OMP_NUM_THREADS`` is never changed). When the claims of all runs
    add up to more cores than there are, this run keeps only what the others leave (at least one thread); when they
    end, it takes back up to the cores that are idle, never more than it chose at the start.
    """
    held = _held
    if held is None or time.monotonic() - held.checked < REBALANCE_SECONDS:
        return
    held.checked = time.monotonic()
    with _registry_locked(held.folder):
        target = max(1, min(held.wanted, held.usable - _claimed_by_others(held.folder, own=held.path)))
        if target > held.threads:  # grow only into cores that are idle now (a job that is not modscope may hold them)
            idle = idle_cpus()
            target = min(target, held.threads + _whole_cores(idle)) if idle is not None else held.threads
        if target == held.threads:
            return
        held.write(target)
    torch.set_num_threads(target)
    if held.announce:
        print(f"modscope: now using {target} CPU thread{'s' if target != 1 else ''} "
              "(other modscope runs on this machine changed what is free)", file=sys.stderr, flush=True)


def _environment_threads() -> int | None:
    """``$OMP_NUM_THREADS`` when it is a positive count."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(env) if env.isdigit() and int(env) > 0 else None


def _whole_cores(idle: float) -> int:
    """The idle cores that count as free: a core 75% idle counts."""
    return int(idle + 0.25)


# -- the claims of the runs on this machine ------------------------------------------------------------------------
def registry_folder() -> Path | None:
    """The folder of this user's claim files (made ``0700`` on first use); None where claims cannot work (no
    ``flock``, or the path exists but is not a folder of this user's: it is then not trusted)."""
    try:
        import fcntl  # noqa: F401 - only to know that flock exists
        uid = os.getuid()
    except (ImportError, AttributeError):  # Windows
        return None
    folder = Path(tempfile.gettempdir()) / f"modscope-threads-{uid}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(folder)
    except OSError:
        return None
    return folder if stat.S_ISDIR(info.st_mode) and info.st_uid == uid else None


@contextlib.contextmanager
def _registry_locked(folder: Path | None) -> Iterator[None]:
    if folder is None:
        yield
        return
    import fcntl

    try:
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _claimed_by_others(folder: Path | None, own: Path | None) -> int:
    """The threads claimed by live runs other than ``own`` (a claim nobody holds locked is a dead run's: removed)."""
    if folder is None:
        return 0
    import fcntl

    total = 0
    for path in folder.glob("claim-*"):
        if path == own:
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # its run holds it: alive
                text = os.read(fd, 16).decode("ascii", "replace").strip()
                total += int(text) if text.isdigit() else 1
            else:
                path.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return total


class _Claim:
    """This process's claim file: the number of threads it uses, locked for as long as it holds them."""

    def __init__(self, folder: Path, path: Path, fd: int, threads: int, wanted: int, usable: int):
        self.folder, self.path, self.fd = folder, path, fd
        self.threads, self.wanted, self.usable = threads, wanted, usable
        self.checked = time.monotonic()
        self.announce = False

    @classmethod
    def take(cls, folder: Path, threads: int, wanted: int, usable: int) -> _Claim | None:
        import fcntl

        path = folder / f"claim-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return None
        claim = cls(folder, path, fd, threads, wanted, usable)
        claim.write(threads)
        return claim

    def write(self, threads: int) -> None:
        self.threads = threads
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, str(threads).encode(), 0)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(self.fd)
