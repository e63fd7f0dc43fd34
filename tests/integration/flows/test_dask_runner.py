"""The per-slide fan-out on a local Dask cluster gives what the thread runner gives.

A tiny synthetic cohort is ingested, then ``preprocess`` tiles it through a real
TilingService on 127.0.0.1 twice: on threads, then on a Dask cluster of two worker
processes (``prefect_dask.DaskTaskRunner``), with Prefect's cache refresh forced so
the second run's tasks really run on the workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flows.training.config import TilingConfig
from services.common.settings import ServiceSettings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SLIDES = 3
TILING = TilingConfig(patch_px=128, max_patches=8)


@pytest.fixture(scope="module")
def tiling(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from services.synth.cohort import generate_cohort
    from services.tiling.server import create

    root = tmp_path_factory.mktemp("dask-cohort")
    generate_cohort(root / "cohort", SLIDES, 3, "tiny", truth_crops=0)
    store_url = (root / "store").as_uri()
    server, port = create(ServiceSettings(store_url=store_url, port=0))
    server.start()
    try:
        yield {"root": root, "store_url": store_url, "target": f"127.0.0.1:{port}"}
    finally:
        server.stop(0).wait()


def test_preprocess_on_a_local_dask_cluster_matches_the_thread_runner(
    prefect_home: Path, tiling: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from distributed import LocalCluster
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

    from flows.runtime.runners import with_fanout_runner
    from flows.runtime.settings import FlowSettings
    from flows.training.ingest import ingest_cohort
    from flows.training.preprocess import preprocess

    monkeypatch.setenv("HISTOMARKER_STORE_URL", tiling["store_url"])
    monkeypatch.setenv("HISTOMARKER_TILING_TARGET", tiling["target"])
    monkeypatch.setenv("HISTOMARKER_WORK_DIR", str(tiling["root"] / "work"))
    cohort = ingest_cohort(str(tiling["root"] / "cohort" / "manifest.csv"), "dask")
    threads = preprocess(cohort, TILING, 2)
    assert len(threads) == SLIDES and all(t.patch_count > 0 for t in threads)
    # Each slide's QC travels from TileSlide into its record.
    assert all(t.qc_verdict in {"pass", "warn"} and t.usable_area_mm2 > 0 for t in threads)

    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:
        settings = FlowSettings(task_runner="dask", dask_address=cluster.scheduler_address)
        on_dask = with_fanout_runner(preprocess, settings)
        with temporary_settings({PREFECT_TASKS_REFRESH_CACHE: True}):
            dask = on_dask(cohort, TILING, 2)
        ran = cluster.scheduler.task_prefixes  # type: ignore[union-attr]
        assert any(name.startswith("tile_slide") for name in ran), list(ran)
    assert dask == threads
