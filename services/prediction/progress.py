"""How far a prediction has got, and where its time went: the progress reporter
(stage fractions that never go back), the per-stage thread clock and the scorer's
busy meter."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from services.prediction.results import ProgressEvent, ProgressFn

#: Progress fractions at which the pipeline's stages start.
STAGE_START = {
    "tissue": 0.0,
    "grid": 0.04,
    "stain": 0.06,
    "cancer_detection": 0.1,
    "biomarkers": 0.1,
    "aggregate": 0.9,
    "heatmaps": 0.92,
    "geojson": 0.99,
}
SCORING_SPAN = 0.8


class BusyMeter:
    """When the scorer had at least one request in flight.

    ``busy_fraction`` = busy time / the inference window (first request sent to
    last answer received): 1.0 means the scorer never waited for patches.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight = 0
        self._busy_since = 0.0
        self._busy_s = 0.0
        self._first: float | None = None
        self._last = 0.0
        self._requests = 0
        self._request_s = 0.0

    @contextmanager
    def request(self) -> Iterator[None]:
        """Wrap one request."""
        with self._lock:
            started = self._clock()
            if self._in_flight == 0:
                self._busy_since = started
            if self._first is None:
                self._first = started
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                now = self._clock()
                self._in_flight -= 1
                self._requests += 1
                self._request_s += now - started
                if self._in_flight == 0:
                    self._busy_s += now - self._busy_since
                self._last = max(self._last, now)

    def summary(self) -> dict[str, float]:
        """``requests``, ``busy_s``, ``window_s``, ``busy_fraction`` (0-1),
        ``mean_in_flight`` (requests) and ``idle_s`` of the inference window."""
        with self._lock:
            window = self._last - self._first if self._first is not None else 0.0
            return {
                "requests": float(self._requests),
                "busy_s": round(self._busy_s, 4),
                "window_s": round(window, 4),
                "busy_fraction": round(self._busy_s / window, 4) if window > 0 else 0.0,
                "mean_in_flight": round(self._request_s / window, 3) if window > 0 else 0.0,
                "idle_s": round(max(window - self._busy_s, 0.0), 4),
            }


class Clock:
    """Summed seconds per named piece of work (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            with self._lock:
                self.seconds[name] = self.seconds.get(name, 0.0) + elapsed


class Reporter:
    """Turns stage counts into monotonic ProgressEvents, at most every 0.1 s."""

    def __init__(self, callback: ProgressFn | None) -> None:
        self._callback = callback
        self._fraction = 0.0
        self._last_emit = float("-inf")
        self._last_stage = ""

    def __call__(
        self, stage: str, done: int, total: int, fraction: float, message: str = ""
    ) -> None:
        if self._callback is None:
            return
        self._fraction = max(self._fraction, min(1.0, fraction))
        now = time.monotonic()
        if stage == self._last_stage and now - self._last_emit < 0.1 and done < total:
            return
        self._last_emit, self._last_stage = now, stage
        self._callback(
            ProgressEvent(stage, done, total, round(self._fraction, 4), message or stage)
        )
