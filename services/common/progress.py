"""A one-line progress bar on standard error, for long CLI work."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """Call with (done, total); redraws at most every ``interval_s`` and at the end.

    Args:
        label: Text before the bar, e.g. ``slide 1/4 SYN-SA-0000``.
        unit: What is counted, e.g. ``tiles`` or ``patches``.
        stream: Where to draw (standard error by default).
        interval_s: Least time between redraws, seconds.
    """

    WIDTH = 30

    def __init__(
        self, label: str, unit: str, stream: TextIO | None = None, interval_s: float = 0.25
    ) -> None:
        self.label = label
        self.unit = unit
        self.stream = stream or sys.stderr
        self.interval_s = interval_s
        self._started = time.perf_counter()
        self._last = float("-inf")

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and now - self._last < self.interval_s:
            return
        self._last = now
        filled = int(self.WIDTH * done / max(total, 1))
        bar = "#" * filled + "." * (self.WIDTH - filled)
        elapsed = now - self._started
        self.stream.write(f"\r{self.label} [{bar}] {done}/{total} {self.unit} {elapsed:5.1f} s")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()
