"""Fault: the S3 server stops and comes back with its data in the middle of a flow.

``ingest_cohort`` then ``preprocess`` (a real TilingService in this process) run
against the tests' S3 server (moto) through a TCP proxy. Once the first slide's
first output is in the bucket, the proxy cuts every connection and refuses new ones
for a few seconds, then listens again on the same port: a MinIO restarted with its
volume. The flow must get through (tasks retried on Unavailable with back-off) and
end as an undisturbed run in another bucket does: same records, same objects with
the same checksums, no partial or temporary object.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fault_checks import comparable_outputs, task_runs_of, wait_until, whole_objects
from tcp_proxy import TcpProxy

from flows.training.config import TilingConfig
from services.common.objectstore import ObjectStore, open_store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TILING = TilingConfig(patch_px=128, max_patches=8)
#: Seconds the S3 server stays down (well inside the tasks' retry back-off).
OUTAGE_S = 4.0


@pytest.fixture()
def proxy(s3_endpoint: str) -> Iterator[TcpProxy]:
    """A proxy in front of the S3 server, stopped at the end."""
    with TcpProxy(s3_endpoint) as running:
        yield running


def _open(endpoint: str, bucket: str, credentials: dict[str, str]) -> ObjectStore:
    return open_store(f"s3://{endpoint}/{bucket}", **credentials)


def _run_flows(
    manifest: Path, store_url: str, monkeypatch: pytest.MonkeyPatch, work: Path
) -> tuple[list[dict[str, Any]], Any]:
    """``ingest_cohort`` then ``preprocess`` on ``store_url`` with a TilingService of
    its own; returns the tiling records and the preprocess flow run's id."""
    from flows.training.ingest import ingest_cohort
    from flows.training.preprocess import preprocess
    from services.tiling.server import TilingSettings, create

    monkeypatch.setenv("HISTOMARKER_STORE_URL", store_url)
    # The S3 credentials come from the environment, as in a deployment.
    server, port = create(TilingSettings(port=0, slide_cache_dir=work / "slide-cache"))
    server.start()
    try:
        monkeypatch.setenv("HISTOMARKER_TILING_TARGET", f"127.0.0.1:{port}")
        monkeypatch.setenv("HISTOMARKER_WORK_DIR", str(work / "flows"))
        cohort = ingest_cohort(str(manifest), "tiny")
        state = preprocess(cohort, TILING, max_concurrent_slides=2, return_state=True)
        tiled = state.result()
    finally:
        server.stop(0).wait()
    return [t.model_dump() for t in tiled], state.state_details.flow_run_id


def test_preprocess_resumes_after_the_s3_server_restarts(
    prefect_home: Path,
    tiny_cohort: Path,
    s3_endpoint: str,
    s3_credentials: dict[str, str],
    proxy: TcpProxy,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("HISTOMARKER_S3_ACCESS_KEY", s3_credentials["access_key"])
    monkeypatch.setenv("HISTOMARKER_S3_SECRET_KEY", s3_credentials["secret_key"])

    # The undisturbed run, in its own bucket.
    calm_url = f"s3://{proxy.address}/faults-s3-calm"
    calm_records, _ = _run_flows(tiny_cohort, calm_url, monkeypatch, tmp_path / "calm")

    # The disturbed run: watched straight at the server, cut at the proxy.
    watcher = _open(s3_endpoint, "faults-s3-restart", s3_credentials)
    outage: dict[str, float] = {}

    def first_output_stored() -> bool:
        return any(True for _ in watcher.list("tiles/", recursive=True))

    def restart_mid_run() -> None:
        wait_until(first_output_stored, "the first tiling output in the bucket")
        proxy.stop()
        outage["down"] = time.monotonic()
        time.sleep(OUTAGE_S)
        proxy.restart()
        outage["up"] = time.monotonic()

    fault = threading.Thread(target=restart_mid_run, name="s3-restart")
    fault.start()
    try:
        url = f"s3://{proxy.address}/faults-s3-restart"
        records, flow_run_id = _run_flows(tiny_cohort, url, monkeypatch, tmp_path / "restart")
    finally:
        fault.join()
    assert set(outage) == {"down", "up"}

    # The outage hit the run: a task failed on it and was retried.
    retried = [run.name for run in task_runs_of(flow_run_id) if run.run_count > 1]
    assert retried, "no task was retried: the outage missed the run"

    # Same records and same objects as the undisturbed run; every object whole.
    assert records == calm_records
    calm = _open(s3_endpoint, "faults-s3-calm", s3_credentials)
    calm_objects = whole_objects(calm)
    objects = whole_objects(watcher)
    assert sorted(objects) == sorted(calm_objects)
    assert comparable_outputs(watcher, objects) == comparable_outputs(calm, calm_objects)
