"""Fuzzing every TilingService RPC over real gRPC: arbitrary messages and raw bytes.

Whatever arrives, the answer is OK or a clear client-side status (never INTERNAL or
UNKNOWN), the reason is readable, the service keeps serving, and nothing
half-written is left in the store.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from hypothesis import strategies as st
from protofuzz import (
    check_arbitrary_requests,
    check_unparsable_bytes,
    messages,
    mutations,
)

from services.common.grpc_client import open_channel
from services.common.objectstore import open_store
from services.common.stubs.histomarker.v1 import common_pb2, tiling_pb2, tiling_pb2_grpc
from services.synth.cohort import generate_cohort
from services.tiling.client import tile_slide
from services.tiling.server import TilingSettings, create

SERVICE = tiling_pb2.DESCRIPTOR.services_by_name["TilingService"]


#: Statuses a bad request may get: each names the caller's mistake.
@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[grpc.Channel, Path, dict[str, object]]]:
    root = tmp_path_factory.mktemp("tiling-fuzz")
    generate_cohort(root / "cohort", n_slides=1, seed=3, preset="tiny", truth_crops=0)
    slide = next((root / "cohort" / "slides").glob("*.tiff"))
    store = open_store((root / "store").as_uri())
    store.put_file("slides/s.tiff", slide)
    store.put_bytes("slides/garbage.svs", b"II*\x00" + b"\x00" * 200)
    settings_ = TilingSettings(
        host="127.0.0.1", port=0, store_url=(root / "store").as_uri(), slide_cache_dir=root / "c"
    )
    server, port = create(settings_)
    server.start()
    channel = open_channel(f"127.0.0.1:{port}")
    try:
        yield channel, root / "store", _valid_requests(channel)
    finally:
        channel.close()
        server.stop(0).wait()


def _valid_requests(channel: grpc.Channel) -> dict[str, object]:
    """One valid request per RPC, the seeds the mutation fuzzing starts from."""
    stub = tiling_pb2_grpc.TilingServiceStub(channel)
    slide = common_pb2.SlideRef(object=common_pb2.ObjectRef(key="slides/s.tiff"))
    params = tiling_pb2.TilingParams(magnification=10, patch_size_px=256)
    tiled = tile_slide(stub, tiling_pb2.TileSlideRequest(slide=slide, params=params), 120)
    image = common_pb2.Image(data=_png(64), format=common_pb2.IMAGE_FORMAT_PNG)
    reference = stub.FitStainReference(
        tiling_pb2.FitStainReferenceRequest(
            images=[image],
            output=common_pb2.ObjectRef(key="references/fuzz/stain.json"),
        ),
        timeout=30,
    )
    return {
        "GetSlideInfo": tiling_pb2.GetSlideInfoRequest(slide=slide, thumbnail_max_px=64),
        "SegmentTissue": tiling_pb2.SegmentTissueRequest(slide=slide),
        "TileSlide": tiling_pb2.TileSlideRequest(slide=slide, params=params),
        "NormalizePatches": tiling_pb2.NormalizePatchesRequest(
            images=[image], reference_object=reference.stored
        ),
        "FitStainReference": tiling_pb2.FitStainReferenceRequest(images=[image]),
        "UpsampleTo40x": tiling_pb2.UpsampleTo40xRequest(
            slide=slide,
            params_hash=tiled.params_hash,
            patches=[common_pb2.PatchRef(x=0, y=0, width=1024, mpp=1.0, size_px=256)],
        ),
    }


def _png(side: int) -> bytes:
    rng = np.random.default_rng(side)
    image = rng.integers(120, 255, (side, side, 3), np.uint8)
    return cv2.imencode(".png", image)[1].tobytes()


KEYS = ("slides/s.tiff", "slides/garbage.svs", "slides/missing.svs", "refs/none/stain.json")
BLOBS = (_png(8), _png(64), b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)


def _assert_nothing_half_written(store_dir: Path) -> None:
    """Every tiling output folder is finished (its manifest written last) or absent."""
    for folder in (store_dir / "tiles").glob("*/*") if (store_dir / "tiles").exists() else ():
        names = {
            p.name for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".sha256")
        }
        if not names:
            continue
        finished = (
            "tile.json" in names or "tissue.json" in names or folder.name.startswith("tissue-")
        )
        assert finished, f"{folder} holds {sorted(names)} without its manifest"


@pytest.mark.slow
@pytest.mark.parametrize("method_name", [m.name for m in SERVICE.methods])
def test_arbitrary_messages_get_a_clear_answer(service, method_name: str) -> None:
    channel, store_dir, valid = service
    method = SERVICE.methods_by_name[method_name]
    one = st.one_of(
        messages(method.input_type, strings=KEYS, blobs=BLOBS),
        mutations(valid[method_name], strings=KEYS, blobs=BLOBS),
    )
    check_arbitrary_requests(channel, method, st.lists(one, min_size=1, max_size=3), 60)
    _assert_nothing_half_written(store_dir)


@pytest.mark.parametrize("method_name", [m.name for m in SERVICE.methods])
def test_unparsable_bytes_are_invalid_argument(service, method_name: str) -> None:
    channel, _, _ = service
    check_unparsable_bytes(channel, SERVICE.methods_by_name[method_name], 60)
