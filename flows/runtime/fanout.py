"""Per-slide fan-out with a bound on the work in flight.

Whatever task runner a flow uses (threads here; a Dask cluster for scale-out), at
most ``limit`` calls of the task run at once, so a 1000-slide cohort does not open
1000 streams to one TilingService.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from prefect import Task
from prefect.futures import PrefectFuture, as_completed

from services.common.errors import InvalidInput

R = TypeVar("R")


def submit_bounded(task: Task[..., R], calls: Sequence[Mapping[str, Any]], limit: int) -> list[R]:
    """Run ``task(**call)`` for every call, at most ``limit`` at once.

    Args:
        task: The Prefect task.
        calls: Keyword arguments of each call.
        limit: Most calls in flight.

    Returns:
        The results, in the order of ``calls``.

    Raises:
        InvalidInput: ``limit`` < 1.
        Exception: The first failed call's error, after the calls in flight ended.
    """
    if limit < 1:
        raise InvalidInput(f"the fan-out limit must be >= 1, got {limit}")
    order: dict[PrefectFuture[R], int] = {}
    results: dict[int, R] = {}
    pending = list(enumerate(calls))
    in_flight: list[PrefectFuture[R]] = []
    failure: BaseException | None = None
    while pending or in_flight:
        while pending and len(in_flight) < limit and failure is None:
            index, call = pending.pop(0)
            future = task.submit(**call)
            order[future] = index
            in_flight.append(future)
        if not in_flight:
            break
        done = next(as_completed(in_flight))
        in_flight.remove(done)
        try:
            results[order[done]] = done.result()
        except BaseException as error:  # finish what runs, then raise the first error
            failure = failure or error
            pending.clear()
    if failure is not None:
        raise failure
    return [results[i] for i in range(len(calls))]
