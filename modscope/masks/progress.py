"""A one-line progress display on stderr for long mask-training runs."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Redraws ``step i/n, steps/s, loss and density per task`` at most every ``interval`` seconds."""

    def __init__(self, n_steps: int, *, enabled: bool, stream: TextIO | None = None, interval: float = 0.5):
        self.n_steps, self.enabled, self.interval = n_steps, enabled, interval
        self.stream = stream or sys.stderr
        self._start = self._last = time.perf_counter()
        self._start_step = 0

    def start(self, step: int) -> None:
        self._start, self._start_step = time.perf_counter(), step

    def update(self, step: int, losses: dict[str, float], densities: dict[str, float], *, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self._last < self.interval):
            return
        self._last = now
        rate = (step - self._start_step) / max(now - self._start, 1e-9)
        parts = " ".join(f"{t}: loss {losses[t]:.3f} density {densities[t]:.3f}" for t in losses)
        self.stream.write(f"\rmasks {step}/{self.n_steps} {rate:6.1f} steps/s | {parts}\033[K")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
