"""Progress of long runs on stderr: a live bar on a terminal, plain periodic lines in a log.

On a terminal the bar is tqdm's. Anywhere else (CI logs, ``nohup``, notebooks, a redirected stderr) modscope writes
one plain line every ``interval`` seconds (default 10, or ``$MODSCOPE_PROGRESS_INTERVAL``) with the step, the rate,
the time left and the figures per task, and no control characters, so that a log file reads as text.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from typing import Literal, TextIO

from .. import threads

Mode = Literal["bar", "lines", "off"]

#: seconds between two plain progress lines, unless $MODSCOPE_PROGRESS_INTERVAL says otherwise.
DEFAULT_INTERVAL = 10.0


def default_interval() -> float:
    """$MODSCOPE_PROGRESS_INTERVAL if it is a positive number, else `DEFAULT_INTERVAL`."""
    try:
        value = float(os.environ.get("MODSCOPE_PROGRESS_INTERVAL", DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL
    return value if value > 0 else DEFAULT_INTERVAL


def duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s``.

    Example:
        >>> duration(3725), duration(185), duration(42.4)
        ('1h02m', '3m05s', '42s')
    """
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Shows how far a run of ``n_steps`` steps is.

    Args:
        n_steps: the run's length.
        enabled: False for silence; True or None for a bar on a terminal and plain lines elsewhere (None is the
            default of every entry point: progress is shown unless asked not to be).
        what: what is being trained, the first word of each line ("masks", "base network").
        stream: where to write; stderr by default.
        interval: seconds between plain lines (`default_interval` by default).

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> p = Progress(100, enabled=True, stream=out, interval=1e-9)
        >>> p.start(0); p.update(50, {"a": 0.5}, {"a": 0.9}); p.close()
        >>> print(out.getvalue().split(" | ")[0])
        masks 50/100 (50%)
    """

    def __init__(self, n_steps: int, *, enabled: bool | None, what: str = "masks", stream: TextIO | None = None,
                 interval: float | None = None):
        self.n_steps, self.what = n_steps, what
        self.stream = stream or sys.stderr
        self.interval = interval if interval is not None else default_interval()
        self.mode: Mode = "off" if enabled is False else ("bar" if _is_terminal(self.stream) else "lines")
        self._bar = None
        self._start = self._last = time.perf_counter()
        self._start_step = self._step = 0

    def start(self, step: int) -> None:
        """The run starts (or resumes) at ``step``."""
        self._start, self._start_step, self._step = time.perf_counter(), step, step
        self._last = self._start
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=self.n_steps, initial=step, desc=self.what, file=self.stream, unit="step",
                             dynamic_ncols=True, leave=True)

    def update(self, step: int, losses: Mapping[str, float], densities: Mapping[str, float] | None = None) -> None:
        """The run has reached ``step``; ``losses`` (and ``densities``) per task, or per anything.

        Also where a long run adjusts its CPU threads to other modscope runs that started or ended (`threads.rebalance`).
        """
        threads.rebalance()
        now = time.perf_counter()
        if self.mode == "bar" and self._bar is not None:
            self._bar.update(step - self._step)
            self._bar.set_postfix_str(self._figures(losses, densities), refresh=False)
        elif self.mode == "lines" and (now - self._last >= self.interval or step >= self.n_steps):
            self._last = now
            rate = (step - self._start_step) / max(now - self._start, 1e-9)
            left = duration((self.n_steps - step) / rate) if rate > 0 else "?"
            self.stream.write(f"{self.what} {step}/{self.n_steps} ({step / max(self.n_steps, 1):.0%}) | "
                              f"{rate:.1f} steps/s | {left} left | {self._figures(losses, densities)}\n")
            self.stream.flush()
        self._step = step

    def close(self) -> None:
        """The run is over (or interrupted)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    @staticmethod
    def _figures(losses: Mapping[str, float], densities: Mapping[str, float] | None) -> str:
        def one(name: str) -> str:
            density = f" density {densities[name]:.3f}" if densities and name in densities else ""
            return f"{name}: loss {losses[name]:.3f}{density}"

        return "; ".join(one(name) for name in losses)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
