"""Fault: a gRPC service crashes and is started again in the middle of a flow.

``ingest_cohort`` then ``preprocess`` on a file:// store, the TilingService a child
process (``python -m services.cli serve tiling``, settings from the environment).
Once the first slide's first output is in the store, the service is killed
(SIGKILL: a crash, mid-write for all it knows) and started again on the same port.
The calls in flight fail UNAVAILABLE; the tile tasks are retried with back-off and
the flow ends as an undisturbed run does: same records, same objects with the same
checksums, nothing partial listed.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from fault_checks import comparable_outputs, task_runs_of, wait_until, whole_objects
from service_process import ServiceProcess

from flows.training.config import TilingConfig
from services.common.objectstore import open_store
from services.common.processes import free_ports

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TILING = TilingConfig(patch_px=128, max_patches=8)


def _run_flows(manifest: Path) -> tuple[list[dict[str, Any]], Any]:
    """``ingest_cohort`` then ``preprocess``; the tiling records and the flow run id."""
    from flows.training.ingest import ingest_cohort
    from flows.training.preprocess import preprocess

    cohort = ingest_cohort(str(manifest), "tiny")
    state = preprocess(cohort, TILING, max_concurrent_slides=2, return_state=True)
    return [t.model_dump() for t in state.result()], state.state_details.flow_run_id


def _tiling(root: Path, store_url: str) -> ServiceProcess:
    env = {"HISTOMARKER_STORE_URL": store_url, "HISTOMARKER_SLIDE_CACHE_DIR": str(root / "cache")}
    return ServiceProcess("tiling", free_ports(1)[0], env, root / "tiling.log")


def _use(
    monkeypatch: pytest.MonkeyPatch, store_url: str, service: ServiceProcess, work: Path
) -> None:
    monkeypatch.setenv("HISTOMARKER_STORE_URL", store_url)
    monkeypatch.setenv("HISTOMARKER_TILING_TARGET", service.target)
    monkeypatch.setenv("HISTOMARKER_WORK_DIR", str(work))


def test_preprocess_resumes_after_the_tiling_service_restarts(
    prefect_home: Path, tiny_cohort: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The undisturbed run.
    calm_url = (tmp_path / "calm" / "store").as_uri()
    with _tiling(tmp_path / "calm", calm_url) as service:
        _use(monkeypatch, calm_url, service, tmp_path / "calm" / "flows")
        calm_records, _ = _run_flows(tiny_cohort)

    # The disturbed run: killed once the first tiling output is stored.
    url = (tmp_path / "restart" / "store").as_uri()
    store = open_store(url)
    service = _tiling(tmp_path / "restart", url)
    restarted: dict[str, int | None] = {}

    def crash_mid_run() -> None:
        wait_until(lambda: any(True for _ in store.list("tiles/")), "the first tiling output")
        restarted["killed"] = service.pid
        service.kill()
        service.start()  # same port, as a supervisor would
        restarted["started"] = service.pid

    try:
        service.start()
        _use(monkeypatch, url, service, tmp_path / "restart" / "flows")
        fault = threading.Thread(target=crash_mid_run, name="tiling-crash")
        fault.start()
        try:
            records, flow_run_id = _run_flows(tiny_cohort)
        finally:
            fault.join()
    finally:
        service.stop()
    assert service.starts == 2 and restarted["killed"] != restarted["started"]

    # The crash hit calls in flight: their tasks failed UNAVAILABLE and were retried.
    retried = [run.name for run in task_runs_of(flow_run_id) if run.run_count > 1]
    assert retried, "no task was retried: the crash missed the run"

    assert records == calm_records
    calm = open_store(calm_url)
    calm_objects = whole_objects(calm)
    objects = whole_objects(store)
    assert sorted(objects) == sorted(calm_objects)
    assert comparable_outputs(store, objects) == comparable_outputs(calm, calm_objects)
