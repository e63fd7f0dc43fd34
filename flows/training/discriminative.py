"""``select_discriminative``: cancer-discriminative (CD) patches of the biomarker set.

Every 20x patch of a biomarker-set slide is scored by ``cancer_detector`` on
TorchServe (calibrated, as served); a patch is CD when it is called cancer with
calibrated confidence above the threshold (0.9). TilingService's ``UpsampleTo40x``
then makes the four 40x patches of each CD patch (the native 40x level when the
slide has one, else Lanczos x2). The scores go to
``{run}/cancer_scores/{slide_id}.parquet``.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
from prefect import flow
from prefect.artifacts import create_table_artifact

from flows.runtime.clients import service_errors, tiling_stub, torchserve_inference
from flows.runtime.fanout import submit_bounded
from flows.runtime.policy import pipeline_task
from flows.runtime.records import CdSlide, ModelRef, TiledSlide
from flows.runtime.settings import FlowSettings
from flows.training.config import Selection
from services.common.objectstore import ObjectStore
from services.common.stubs.histomarker.v1 import common_pb2, tiling_pb2
from services.inference.bundle import CONFIG_FILE, ModelConfig
from services.inference.preprocess import shrink_to_input
from services.inference.serving_io import encode_npy
from services.slide.shards import iter_shard

CANCER_LABEL = "cancer"


def read_parquet(store: ObjectStore, key: str) -> pd.DataFrame:
    """A parquet table from the store."""
    return pd.read_parquet(io.BytesIO(store.get_bytes(key)))


def write_parquet(store: ObjectStore, key: str, table: pd.DataFrame) -> str:
    """Store a table as parquet; returns the key."""
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    store.put_bytes(key, buffer.getvalue())
    return key


def choose_cd(scores: pd.DataFrame, selection: Selection) -> tuple[pd.DataFrame, bool]:
    """The CD patches of one slide's scores, most confident first.

    Args:
        scores: One row per 20x patch with ``label`` and ``cancer_probability``.
        selection: Threshold, fallback minimum and cap.

    Returns:
        The chosen rows, and whether the fallback chose them (fewer than
        ``min_patches_per_slide`` passed the threshold, so the most probably
        cancerous ones were kept instead).
    """
    ranked = scores.sort_values(["cancer_probability", "x", "y"], ascending=[False, True, True])
    passed = ranked[
        (ranked["label"] == CANCER_LABEL) & (ranked["cancer_probability"] > selection.threshold)
    ]
    fallback = len(passed) < selection.min_patches_per_slide
    chosen = ranked.head(selection.min_patches_per_slide) if fallback else passed
    if selection.max_patches_per_slide:
        chosen = chosen.head(selection.max_patches_per_slide)
    return chosen, fallback


def shard_batches(
    store: ObjectStore, shard: str, batch_size: int
) -> Iterator[tuple[list[str], np.ndarray]]:
    """The (member names, uint8 patches) of one shard, ``batch_size`` at a time."""
    members: list[str] = []
    patches: list[np.ndarray] = []
    for member, rgb in iter_shard(store, shard):
        members.append(member)
        patches.append(rgb)
        if len(patches) == batch_size:
            yield members, np.stack(patches)
            members, patches = [], []
    if patches:
        yield members, np.stack(patches)


def score_slide(
    store: ObjectStore, grid: pd.DataFrame, model: ModelRef, batch_size: int
) -> pd.DataFrame:
    """Every patch of a slide's grid scored by the served model, in grid order.

    Patches go shrunk to the model's input, as its handler would shrink them (the
    same answer for a fraction of the bytes).
    """
    config = ModelConfig.from_json(store.get_bytes(f"{model.prefix}/{CONFIG_FILE}").decode())
    side = config.preprocess.input_px
    outputs: dict[tuple[str, str], dict[str, Any]] = {}
    with torchserve_inference(FlowSettings()) as client:
        for shard in sorted(set(grid["shard"].astype(str))):
            for members, patches in shard_batches(store, shard, batch_size):
                data = encode_npy(shrink_to_input(patches, side))
                answer = client.predict(model.name, data, model.version)
                for member, output in zip(members, answer, strict=True):
                    outputs[(shard, member)] = output
    rows = [outputs[(str(s), str(m))] for s, m in zip(grid["shard"], grid["member"], strict=True)]
    return grid.assign(
        cancer_probability=[float(r["probabilities"][-1]) for r in rows],
        label=[str(r["label"]) for r in rows],
        confidence=[float(r["confidence"]) for r in rows],
    )


@pipeline_task(task_run_name="cd-{tiled.slide_id}")
def select_slide(
    tiled: TiledSlide, model: ModelRef, selection: Selection, run_prefix: str
) -> CdSlide:
    """Score one slide's 20x patches, choose its CD patches and make their 40x ones."""
    settings = FlowSettings()
    with settings.open_store() as store:
        grid = read_parquet(store, tiled.grid_key)
        grid = grid[grid["shard"].astype(str) != ""].reset_index(drop=True)
        scores = score_slide(store, grid, model, selection.batch_size)
        chosen, fallback = choose_cd(scores, selection)
        scores = scores.assign(cd=scores.index.isin(chosen.index))
        scores_key = write_parquet(
            store, f"{run_prefix}/cancer_scores/{tiled.slide_id}.parquet", scores
        )
    record = CdSlide(
        slide_id=tiled.slide_id,
        scores_key=scores_key,
        patches_20x=len(scores),
        cd_20x=len(chosen),
        fallback=fallback,
        index_key="",
        shards=(),
        patches_40x=0,
        source_40x="",
    )
    if chosen.empty:
        return record
    request = tiling_pb2.UpsampleTo40xRequest(
        slide=common_pb2.SlideRef(
            slide_id=tiled.slide_id, object=common_pb2.ObjectRef(key=tiled.slide_key)
        ),
        params_hash=tiled.params_hash,
        patches=[
            common_pb2.PatchRef(
                slide_id=tiled.slide_id,
                x=int(row.x),
                y=int(row.y),
                width=int(row.width),
                height=int(row.height),
                mpp=tiled.patch_mpp,
                size_px=tiled.patch_px,
            )
            for row in chosen.sort_values(["y", "x"]).itertuples(index=False)
        ],
        policy=common_pb2.HIGH_RES_POLICY_AUTO,
    )
    with service_errors("TilingService"), tiling_stub(settings) as stub:
        response = stub.UpsampleTo40x(request, timeout=settings.rpc_timeout_s)
    source = "native" if response.source == common_pb2.HIGH_RES_SOURCE_NATIVE else "upsampled"
    return record.model_copy(
        update={
            "index_key": response.index.key,
            "shards": tuple(ref.key for ref in response.shards),
            "patches_40x": int(response.patch_count),
            "source_40x": source,
        }
    )


@flow(name="select_discriminative", log_prints=True)
def select_discriminative(
    tiled: list[TiledSlide],
    slide_ids: tuple[str, ...],
    model: ModelRef,
    selection: Selection,
    run_prefix: str,
    max_concurrent_slides: int = 2,
) -> list[CdSlide]:
    """CD patches and their 40x patches for the given (biomarker-set) slides."""
    wanted = set(slide_ids)
    calls = [
        {"tiled": t, "model": model, "selection": selection, "run_prefix": run_prefix}
        for t in tiled
        if t.slide_id in wanted and t.patch_count > 0
    ]
    slides = submit_bounded(select_slide, calls, max_concurrent_slides)
    create_table_artifact(
        [
            {
                "slide_id": s.slide_id,
                "patches_20x": s.patches_20x,
                "cd_20x": s.cd_20x,
                "cd_share": round(s.cd_20x / max(s.patches_20x, 1), 3),
                "fallback": s.fallback,
                "patches_40x": s.patches_40x,
                "source_40x": s.source_40x,
            }
            for s in slides
        ],
        key="cancer-discriminative-patches",
        description="Cancer-discriminative patches per slide (calibrated confidence above "
        f"{selection.threshold}).",
    )
    return slides
