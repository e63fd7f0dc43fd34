"""``preprocess``: every slide of a cohort through the TilingService.

One ``TileSlide`` call per slide (tissue, grid, stain matrix, normalized 20x
shards under ``tiles/{slide_id}/{params_hash}/``), at most
``max_concurrent_slides`` at once. Each slide's QC verdict is recorded in its
:class:`~flows.runtime.records.TiledSlide`, logged when it warns or fails, and listed in a
``slide-qc`` table artifact of the flow run. TilingService itself reuses a stored result of
the same parameters, so a task that runs again costs one round trip.
"""

from __future__ import annotations

from collections import Counter

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows.runtime.clients import service_errors, tiling_stub
from flows.runtime.fanout import submit_bounded
from flows.runtime.policy import pipeline_task
from flows.runtime.records import CohortRef, TiledSlide
from flows.runtime.settings import FlowSettings
from flows.training.config import TilingConfig
from flows.training.ingest import read_cohort
from services.common.qc_messages import qc_from_proto
from services.common.stubs.histomarker.v1 import common_pb2, tiling_pb2
from services.tiling.client import tile_slide as call_tile_slide


def tiling_request(
    slide_id: str, slide_key: str, config: TilingConfig
) -> tiling_pb2.TileSlideRequest:
    """The TileSlide request of one slide: 20x, Vahadane to the built-in reference."""
    params = tiling_pb2.TilingParams(
        magnification=20.0,
        patch_size_px=config.patch_px,
        min_tissue_fraction=config.min_tissue_fraction,
        overlap_px=config.overlap_px,
        stain_method=tiling_pb2.STAIN_METHOD_VAHADANE,
        max_patches=config.max_patches,
        seed=config.seed,
    )
    slide = common_pb2.SlideRef(slide_id=slide_id, object=common_pb2.ObjectRef(key=slide_key))
    return tiling_pb2.TileSlideRequest(slide=slide, params=params)


@pipeline_task(task_run_name="tile-{slide_id}")
def tile_slide(
    slide_id: str, slide_key: str, slide_sha256: str, config: TilingConfig
) -> TiledSlide:
    """Tile one slide through TilingService (``slide_sha256`` keys the cache)."""
    settings = FlowSettings()
    request = tiling_request(slide_id, slide_key, config)
    with service_errors("TilingService"), tiling_stub(settings) as stub:
        result = call_tile_slide(stub, request, timeout_s=settings.rpc_timeout_s)
    qc = qc_from_proto(result.qc)
    return TiledSlide(
        slide_id=result.slide_id,
        slide_key=slide_key,
        params_hash=result.params_hash,
        grid_key=result.grid.key,
        patch_count=int(result.patch_count),
        patch_px=int(result.patch_size_px),
        patch_mpp=float(result.patch_resolution.mpp_x),
        qc_verdict=qc.get("verdict", ""),
        qc_reasons=tuple(qc.get("reasons", ())),
        usable_area_mm2=float(qc.get("usable_area_mm2", 0.0)),
        usable_fraction=float(qc.get("usable_fraction", 0.0)),
    )


def qc_rows(tiled: list[TiledSlide]) -> list[dict[str, object]]:
    """One QC row per slide: slide_id, verdict, usable mm² and share, patches, reasons."""
    return [
        {
            "slide_id": t.slide_id,
            "qc_verdict": t.qc_verdict,
            "usable_area_mm2": round(t.usable_area_mm2, 4),
            "usable_fraction": round(t.usable_fraction, 4),
            "patch_count": t.patch_count,
            "qc_reasons": "; ".join(t.qc_reasons),
        }
        for t in tiled
    ]


@flow(name="preprocess", log_prints=True)
def preprocess(
    cohort: CohortRef, tiling: TilingConfig, max_concurrent_slides: int = 2
) -> list[TiledSlide]:
    """Tile every slide of a stored cohort, ``max_concurrent_slides`` at a time.

    Returns:
        One record per slide, in manifest order.
    """
    table = read_cohort(cohort)
    calls = [
        {
            "slide_id": row.slide_id,
            "slide_key": row.slide_key,
            "slide_sha256": row.slide_sha256,
            "config": tiling,
        }
        for row in table.itertuples(index=False)
    ]
    tiled = submit_bounded(tile_slide, calls, max_concurrent_slides)
    logger = get_run_logger()
    logger.info("tiled %d slides, %d patches", len(tiled), sum(t.patch_count for t in tiled))
    verdicts = Counter(t.qc_verdict or "unknown" for t in tiled)
    for t in tiled:
        if t.qc_verdict in ("warn", "fail"):
            logger.warning("slide %s QC %s: %s", t.slide_id, t.qc_verdict, "; ".join(t.qc_reasons))
    create_table_artifact(
        qc_rows(tiled),
        key="slide-qc",
        description=f"QC of the cohort's slides at tiling: {dict(sorted(verdicts.items()))}.",
    )
    return tiled
