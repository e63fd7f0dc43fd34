"""Work on a worker thread, its progress streamed on the caller's thread."""

from __future__ import annotations

import threading

import pytest

from services.common.errors import InvalidInput
from services.common.streaming import run_streaming


def test_events_come_in_order_then_the_result() -> None:
    threads: set[str] = set()

    def work(report):  # type: ignore[no-untyped-def]
        threads.add(threading.current_thread().name)
        report("one")
        report(2, 10)
        report("stage", 3, 10)
        return "done"

    events = list(run_streaming(work, "worker-x"))
    assert events == [
        ("progress", "one"),
        ("progress", (2, 10)),
        ("progress", ("stage", 3, 10)),
        ("result", "done"),
    ]
    assert threads == {"worker-x"}


def test_the_works_error_is_raised_on_the_callers_thread_after_its_events() -> None:
    def work(report):  # type: ignore[no-untyped-def]
        report(1, 2)
        raise InvalidInput("bad slide")

    seen = []
    with pytest.raises(InvalidInput, match="bad slide"):
        for event in run_streaming(work, "worker-y"):
            seen.append(event)
    assert seen == [("progress", (1, 2))]
    assert not any(t.name == "worker-y" for t in threading.enumerate())
