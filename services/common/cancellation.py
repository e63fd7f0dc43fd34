"""Stopping long work when its caller's deadline passes or the caller goes away.

Logic never imports gRPC, so servers hand it a :class:`WorkBudget`: long loops call
:meth:`WorkBudget.check` between steps (one patch, one tile) and stop with a typed
error when the time is up or the caller cancelled.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from services.common.errors import Cancelled, DeadlineExceeded


class WorkBudget:
    """A deadline and a cancellation flag for one piece of work.

    Args:
        timeout_s: Seconds from now until the deadline; ``None`` for no deadline.
        is_cancelled: Returns True once the caller has gone away.
        clock: Monotonic clock in seconds (tests pass a fake one).
    """

    def __init__(
        self,
        timeout_s: float | None = None,
        is_cancelled: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._deadline = None if timeout_s is None else clock() + timeout_s
        self._is_cancelled = is_cancelled or (lambda: False)

    @classmethod
    def unlimited(cls) -> WorkBudget:
        """A budget that never runs out (CLI and batch jobs)."""
        return cls()

    def remaining_s(self) -> float | None:
        """Seconds left until the deadline, ``None`` if there is none."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - self._clock())

    def check(self) -> None:
        """Raise if the work must stop now.

        Raises:
            Cancelled: The caller cancelled the call.
            DeadlineExceeded: The deadline has passed.
        """
        if self._is_cancelled():
            raise Cancelled("the caller cancelled the request")
        if self._deadline is not None and self._clock() >= self._deadline:
            raise DeadlineExceeded("the request's deadline passed before the work finished")
