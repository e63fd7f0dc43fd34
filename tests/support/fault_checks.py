"""Checks of the fault tests: a store holds whole objects only, two runs wrote the
same outputs, and a deterministic wait for "mid-run"."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

from services.common.objectstore import ObjectStore

#: Seconds a test waits for the run to reach the point where the fault goes in.
MID_RUN_TIMEOUT_S = 120.0


def whole_objects(store: ObjectStore) -> dict[str, str]:
    """Key -> sha256 of every object listed, each read whole and checked.

    Every listed object must read back completely with its recorded checksum and
    size (a verified read), and its stat must carry that checksum: a half-written
    or partial object fails here.
    """
    found: dict[str, str] = {}
    for info in store.list("", recursive=True):
        data = store.get_bytes(info.key, verify=True)
        sha256 = hashlib.sha256(data).hexdigest()
        stat = store.stat(info.key)
        assert len(data) == info.size_bytes == stat.size_bytes, info.key
        assert stat.sha256 == sha256, f"{info.key}: record {stat.sha256}, bytes {sha256}"
        found[info.key] = sha256
    return found


def comparable_outputs(store: ObjectStore, objects: dict[str, str]) -> dict[str, Any]:
    """What two runs must agree on: every object's sha256, except ``tile.json``
    compared by content without its wall time (``elapsed_s``)."""
    out: dict[str, Any] = {}
    for key, sha256 in objects.items():
        if key.endswith("/tile.json"):
            meta = json.loads(store.get_bytes(key))
            meta.get("result", {}).pop("elapsed_s", None)
            out[key] = meta
        else:
            out[key] = sha256
    return out


def wait_until(
    condition: Callable[[], bool], what: str, timeout_s: float = MID_RUN_TIMEOUT_S
) -> None:
    """Poll ``condition`` every 20 ms until it holds (AssertionError after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def task_runs_of(flow_run_id: Any) -> list[Any]:
    """The task runs of one flow run (Prefect API of the harness)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return list(
            client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                limit=200,
            )
        )
