"""Fuzzing every NucleiService RPC over real gRPC: arbitrary messages and raw bytes.

Whatever arrives, the answer is OK or a clear client-side status (never INTERNAL or
UNKNOWN), the reason is readable, the service keeps serving, and every feature table
in the store is whole.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import cv2
import grpc
import numpy as np
import pandas as pd
import pytest
from hypothesis import strategies as st
from protofuzz import (
    check_arbitrary_requests,
    check_unparsable_bytes,
    messages,
    mutations,
)

from services.common.grpc_client import open_channel
from services.common.objectstore import ObjectStore, open_store
from services.common.objectstore.filesystem import TEMP_PREFIX
from services.common.stubs.histomarker.v1 import common_pb2, nuclei_pb2
from services.nuclei.features import FEATURE_NAMES
from services.nuclei.pipeline import TABLE_COLUMNS
from services.nuclei.server import NucleiSettings, create
from services.slide.shards import ShardWriter

SERVICE = nuclei_pb2.DESCRIPTOR.services_by_name["NucleiService"]
SHARD_PREFIX = "tiles/FUZZ-1/0123456789abcdef"


#: Statuses a bad request may get: each names the caller's mistake.
def _patch(side: int, seed: int = 0) -> np.ndarray:
    """A small pink patch with a few dark nuclei."""
    rng = np.random.default_rng(seed)
    rgb = np.full((side, side, 3), (235, 190, 215), np.uint8)
    for _ in range(max(1, side // 24)):
        centre = (int(rng.integers(0, side)), int(rng.integers(0, side)))
        cv2.circle(rgb, centre, 9, (70, 40, 120), -1)
    return rgb


def _png(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[grpc.Channel, ObjectStore, Path, dict[str, object], list[str]]]:
    root = tmp_path_factory.mktemp("nuclei-fuzz")
    store = open_store((root / "store").as_uri())
    writer = ShardWriter(store, SHARD_PREFIX, "40x-fuzz", image_format="png")
    for i in range(2):
        writer.add(_patch(64, i), x=64 * i, y=0)
    rows = writer.close()
    store.put_bytes(f"{SHARD_PREFIX}/junk.tar", b"not a tar")
    settings_ = NucleiSettings(
        host="127.0.0.1", port=0, store_url=(root / "store").as_uri(), max_patches_per_call=8
    )
    server, port = create(settings_)
    server.start()
    channel = open_channel(f"127.0.0.1:{port}")
    shard = rows[0]["shard"]
    image = common_pb2.Image(data=_png(_patch(64)), format=common_pb2.IMAGE_FORMAT_PNG)
    valid: dict[str, object] = {
        "SegmentNuclei": nuclei_pb2.SegmentNucleiRequest(image=image),
        "ExtractFeatures": nuclei_pb2.ExtractFeaturesRequest(patch_id="p0", image=image),
        "ExtractFeaturesForShards": nuclei_pb2.ExtractFeaturesForShardsRequest(
            shards=[common_pb2.ObjectRef(key=shard)],
            patches=[common_pb2.PatchRef(shard=common_pb2.ObjectRef(key=shard), member="0_0.png")],
            output=common_pb2.ObjectRef(key="runs/fuzz/features.parquet"),
        ),
    }
    keys = [shard, f"{SHARD_PREFIX}/junk.tar", "runs/fuzz/features.parquet", "0_0.png"]
    try:
        yield channel, store, root / "store", valid, keys
    finally:
        channel.close()
        server.stop(0).wait()


BLOBS = (
    _png(_patch(8)),
    _png(_patch(64)),
    b"\x89PNG\r\n\x1a\n" + b"\x00" * 30,
    cv2.imencode(".png", np.zeros((16, 16), np.uint8))[1].tobytes(),
)


def _assert_tables_whole(store: ObjectStore, store_dir: Path) -> None:
    """Every parquet object reads whole with the table's columns; no put in flight."""
    for info in store.list(""):
        if info.key.endswith(".parquet"):
            table = pd.read_parquet(io.BytesIO(store.get_bytes(info.key)))
            assert list(table.columns) == [*TABLE_COLUMNS, *FEATURE_NAMES], info.key
    leftovers = [p for p in store_dir.rglob(f"{TEMP_PREFIX}*") if p.is_file()]
    assert not leftovers, leftovers


@pytest.mark.slow
@pytest.mark.parametrize("method_name", [m.name for m in SERVICE.methods])
def test_arbitrary_messages_get_a_clear_answer(service, method_name: str) -> None:
    channel, store, store_dir, valid, keys = service
    method = SERVICE.methods_by_name[method_name]
    one = st.one_of(
        messages(method.input_type, strings=keys, blobs=BLOBS),
        mutations(valid[method_name], strings=keys, blobs=BLOBS),
    )
    requests = st.lists(one, min_size=1, max_size=3)
    check_arbitrary_requests(channel, method, requests, 60, timeout_s=20.0)
    _assert_tables_whole(store, store_dir)


@pytest.mark.parametrize("method_name", [m.name for m in SERVICE.methods])
def test_unparsable_bytes_are_invalid_argument(service, method_name: str) -> None:
    channel = service[0]
    check_unparsable_bytes(channel, SERVICE.methods_by_name[method_name], 60)
