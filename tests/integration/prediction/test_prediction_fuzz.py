"""Fuzzing every PredictionService RPC over real gRPC: arbitrary messages and raw bytes.

The service runs in this process with the seven models as tiny untrained networks
scored locally (no TorchServe: the fuzz is about the messages, not the models), on a
store holding one small tiled slide. Whatever arrives, the answer is OK or a clear
client-side status (never INTERNAL or UNKNOWN), the reason is readable, the service
keeps serving, every stored prediction is whole and no upload is left half-written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from badinputs import tiled_slide
from hypothesis import strategies as st
from protofuzz import check_arbitrary_requests, check_unparsable_bytes, messages, mutations
from tiny_mil import tiny_embedder, tiny_head
from tiny_models import untrained_scorer

from services.common.grpc_client import open_channel
from services.common.grpc_server import ServiceBinding, create_server
from services.common.objectstore import ObjectStore, open_store
from services.common.objectstore.filesystem import TEMP_PREFIX
from services.common.stubs.histomarker.v1 import common_pb2, prediction_pb2, prediction_pb2_grpc
from services.mil.bags import write_bag
from services.prediction.mil_models import LocalMilModels
from services.prediction.server import PredictionServicer, PredictionSettings

SERVICE = prediction_pb2.DESCRIPTOR.services_by_name["PredictionService"]
SLIDE_KEY = "slides/FUZZ-1.tiff"
#: Requests that predict take seconds each: fewer examples than the other services.
EXAMPLES = {
    "ListModels": 60,
    "PredictSlide": 25,
    "PredictSlideStream": 25,
    "UploadAndPredict": 25,
    "PredictFromBag": 40,
}
BAG_KEY = "bags/uni/FUZZ-1.h5"


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[grpc.Channel, ObjectStore, Path, dict[str, object], list[str], bytes]]:
    root = tmp_path_factory.mktemp("prediction-fuzz")
    store = open_store((root / "store").as_uri())
    slide = tiled_slide()
    store.put_bytes(SLIDE_KEY, slide)
    scorer = untrained_scorer(root / "bundles")
    settings = PredictionSettings(
        host="127.0.0.1",
        port=0,
        store_url=store.url,
        slide_cache_dir=root / "cache",
        max_upload_mb=1,
        max_concurrent_predictions=1,
        max_queued_predictions=2,
    )
    embedder = tiny_embedder(root)
    head = tiny_head(embedder)
    rng = np.random.default_rng(0)
    bag = write_bag(
        root / "bag.h5",
        rng.normal(size=(12, embedder.embed_dim)).astype(np.float32),
        np.arange(24, dtype=np.int64).reshape(12, 2) * 64,
        slide_id="FUZZ-1",
        encoder=embedder.encoder,
        encoder_sha256=embedder.sha256,
        patch_px=embedder.input_px,
        patch_mpp=embedder.mpp,
        level0_mpp=0.25,
    )
    store.put_file(BAG_KEY, bag)
    servicer = PredictionServicer(
        settings,
        scorer=scorer,
        registry=scorer,  # type: ignore[arg-type]
        mil_models=LocalMilModels({"mil_unit": head}, {"uni": embedder}),
    )
    binding = ServiceBinding(
        SERVICE.full_name, servicer, prediction_pb2_grpc.add_PredictionServiceServicer_to_server
    )
    server, port = create_server(settings, [binding])
    server.start()
    channel = open_channel(f"127.0.0.1:{port}")
    options = prediction_pb2.PredictionOptions(biomarkers=[common_pb2.BIOMARKER_TP53])
    ref = common_pb2.SlideRef(object=common_pb2.ObjectRef(key=SLIDE_KEY))
    valid: dict[str, object] = {
        "PredictSlide": prediction_pb2.PredictSlideRequest(slide=ref, options=options),
        "PredictSlideStream": prediction_pb2.PredictSlideStreamRequest(slide=ref, options=options),
        "UploadAndPredict": prediction_pb2.UploadAndPredictRequest(
            metadata=prediction_pb2.UploadMetadata(
                filename="up.tiff",
                size_bytes=len(slide),
                sha256=hashlib.sha256(slide).hexdigest(),
                options=options,
            )
        ),
        "ListModels": prediction_pb2.ListModelsRequest(),
        "PredictFromBag": prediction_pb2.PredictFromBagRequest(
            bag=common_pb2.ObjectRef(key=BAG_KEY), options=options
        ),
    }
    keys = [SLIDE_KEY, "up.tiff", "FUZZ-1", "slides/none.svs", "cancer_detector", BAG_KEY]
    keys += ["mil_unit", "bags/uni/none.h5"]
    try:
        yield channel, store, root, valid, keys, slide
    finally:
        channel.close()
        server.stop(0).wait()


def _assert_nothing_half_written(store: ObjectStore, root: Path) -> None:
    """Every stored prediction parses whole; no put or upload is left in flight."""
    for info in store.list("runs/predictions/"):
        if info.key.endswith("prediction.json"):
            json.loads(store.get_bytes(info.key))
    leftovers = [p for p in (root / "store").rglob(f"{TEMP_PREFIX}*") if p.is_file()]
    assert not leftovers, leftovers
    uploads = root / "cache"
    partial = [p for p in uploads.rglob("*") if p.is_file() and ".part" in p.name]
    assert not partial, partial


@pytest.mark.slow
@pytest.mark.parametrize("method_name", [m.name for m in SERVICE.methods])
def test_arbitrary_messages_get_a_clear_answer(service, method_name: str) -> None:
    channel, store, root, valid, keys, slide = service
    method = SERVICE.methods_by_name[method_name]
    blobs = (slide[:4096], slide, b"II*\x00" + b"\x00" * 60, b"")
    one = st.one_of(
        messages(method.input_type, strings=keys, blobs=blobs),
        mutations(valid[method_name], strings=keys, blobs=blobs),
    )
    requests = st.lists(one, min_size=1, max_size=3)
    check_arbitrary_requests(channel, method, requests, EXAMPLES[method_name], timeout_s=60.0)
    _assert_nothing_half_written(store, root)


@pytest.mark.parametrize("method_name", [m.name for m in SERVICE.methods])
def test_unparsable_bytes_are_invalid_argument(service, method_name: str) -> None:
    check_unparsable_bytes(service[0], SERVICE.methods_by_name[method_name], 60)
