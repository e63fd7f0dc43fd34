"""Server-streaming RPCs that report progress: the work runs on a worker thread, the
RPC's thread turns its reports into messages as they come."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

#: What a streaming RPC's work is given to report progress with: one event a call,
#: given as one value or as several (then passed on as their tuple).
Report = Callable[..., None]


def run_streaming(work: Callable[[Report], Any], name: str) -> Iterator[tuple[str, Any]]:
    """Run ``work(report)`` on a worker thread named ``name``; yield
    ``("progress", event)`` for each event it reports, in order (``report(x)`` gives
    ``x``, ``report(done, total)`` gives ``(done, total)``), and ``("result", value)``
    once it returns.

    Its error is raised here, on the RPC's thread, where the interceptor maps it to a
    status; the worker is joined before the result or the error is given.
    """
    events: queue.Queue[Any] = queue.Queue()
    done = object()
    outcome: dict[str, Any] = {}

    def report(*event: Any) -> None:
        events.put(event[0] if len(event) == 1 else event)

    def run() -> None:
        try:
            outcome["result"] = work(report)
        except BaseException as exc:  # handed to the RPC thread below
            outcome["error"] = exc
        finally:
            events.put(done)

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    while (event := events.get()) is not done:
        yield "progress", event
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    yield "result", outcome["result"]
