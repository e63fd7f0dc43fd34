"""Fault: a TorchServe worker is killed while a slide is being predicted.

A real TorchServe (its own folder, free ports on 127.0.0.1) serves a tiny
``cancer_detector`` and ``biomarker_tp53`` with one worker each; the
PredictionService runs in this process. An undisturbed PredictSlide gives the
reference. Then PredictSlideStream runs the same slide and, at its first progress
event of the biomarker stage (batches of 40x patches in flight on
``biomarker_tp53``'s only worker), the test SIGKILLs that worker's Python process — by PID,
checked to belong to the TorchServe this test started. TorchServe starts a new
worker; the prediction must complete with the same slide probabilities (within
1e-6) and the same patch counts.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pandas as pd
import pytest
from tiny_models import CANCER_DETECTOR, publish_models, train_tiny, training_cohort

from services.common.grpc_client import open_channel
from services.common.objectstore import open_store
from services.common.stubs.histomarker.v1 import common_pb2, prediction_pb2, prediction_pb2_grpc

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(420),
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java 17"),
]

MODELS = (CANCER_DETECTOR, "biomarker_tp53")
#: The model whose only worker is killed (scored last: its stage is mid-run at the
#: first progress event of it).
VICTIM = "biomarker_tp53"
#: Small batches: many requests, so the worker is busy when it is killed.
BATCH_SIZE = 2
RPC_TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def serving(
    tmp_path_factory: pytest.TempPathFactory, tiny_cohort: Path
) -> Iterator[dict[str, Any]]:
    """TorchServe with the two tiny models, a PredictionService, one stored slide."""
    from services.inference.torchserve import TorchServe, TorchServeConfig
    from services.prediction.server import PredictionSettings, create

    root = tmp_path_factory.mktemp("worker-killed")
    store = open_store((root / "store").as_uri())
    manifest = training_cohort(store, 4)
    bundles = {name: train_tiny(store, manifest, name, root / "train" / name) for name in MODELS}
    mars = publish_models(store, bundles, root / "model-store")

    slides = pd.read_csv(tiny_cohort)
    row = slides[slides["kind"] == "cancer"].iloc[0]
    slide_key = f"slides/{row['slide_id']}.tiff"
    store.put_file(slide_key, tiny_cohort.parent / row["slide_path"])

    config = TorchServeConfig.with_free_ports(root / "model-store", root / "torchserve")
    torchserve = TorchServe(config).start()
    try:
        for mar in mars.values():
            torchserve.register(mar, initial_workers=1)
        settings = PredictionSettings(
            port=0,
            store_url=store.url,
            slide_cache_dir=root / "slide-cache",
            torchserve_grpc_target=torchserve.grpc_inference_target,
            torchserve_management_url=torchserve.management_url,
            torchserve_key_file=config.work_dir / "key_file.json",
            batch_size=BATCH_SIZE,
            max_in_flight=2,
            model_cache_s=0.0,
        )
        server, port = create(settings)
        server.start()
        channel = open_channel(f"127.0.0.1:{port}")
        try:
            yield {
                "torchserve": torchserve,
                "stub": prediction_pb2_grpc.PredictionServiceStub(channel),
                "slide": common_pb2.SlideRef(
                    slide_id=str(row["slide_id"]), object=common_pb2.ObjectRef(key=slide_key)
                ),
            }
        finally:
            channel.close()
            server.stop(0).wait()
    finally:
        torchserve.stop()
    assert not torchserve.processes(), "TorchServe left processes behind"


def _options() -> prediction_pb2.PredictionOptions:
    # Every tissue patch counts as cancer: the tiny detector never saw these slides.
    return prediction_pb2.PredictionOptions(
        biomarkers=[common_pb2.BIOMARKER_TP53], cancer_confidence=0.0, skip_heatmaps=True
    )


def _summary(prediction: Any) -> dict[str, Any]:
    assert prediction.status == prediction_pb2.PREDICTION_STATUS_OK, prediction.status_message
    return {
        "tissue": prediction.tissue_patch_count,
        "cancer": prediction.cancer_patch_count,
        "probabilities": {b.biomarker: b.probability for b in prediction.biomarkers},
    }


def _worker_pid(torchserve: Any, model: str) -> int:
    """PID of the model's one READY worker (TorchServe's describe)."""
    workers = torchserve.describe(model)["workers"]
    ready = [w for w in workers if w.get("status") == "READY"]
    assert len(ready) == 1, workers
    return int(ready[0]["pid"])


def test_prediction_completes_alike_when_a_worker_is_killed(serving: dict[str, Any]) -> None:
    torchserve, stub = serving["torchserve"], serving["stub"]
    request = prediction_pb2.PredictSlideRequest(slide=serving["slide"], options=_options())
    calm = _summary(stub.PredictSlide(request, timeout=RPC_TIMEOUT_S).prediction)
    # Several requests to the victim, or there is no "mid-run".
    assert 4 * calm["cancer"] > 3 * BATCH_SIZE

    victim = _worker_pid(torchserve, VICTIM)
    assert victim in torchserve.processes()  # a worker of the TorchServe we started
    stream = stub.PredictSlideStream(
        prediction_pb2.PredictSlideStreamRequest(slide=serving["slide"], options=_options()),
        timeout=RPC_TIMEOUT_S,
    )
    killed_at: common_pb2.Progress | None = None
    result = None
    try:
        for message in stream:
            if message.HasField("result"):
                result = message.result
            elif killed_at is None and message.progress.stage == "biomarkers":
                killed_at = message.progress
                os.kill(victim, signal.SIGKILL)
    except grpc.RpcError as error:
        pytest.fail(
            f"PredictSlideStream failed after the worker was killed: {error.code()}: "
            f"{error.details()}"
        )
    assert killed_at is not None and killed_at.done < killed_at.total, killed_at
    assert result is not None

    disturbed = _summary(result)
    assert disturbed["tissue"] == calm["tissue"] and disturbed["cancer"] == calm["cancer"]
    assert disturbed["probabilities"].keys() == calm["probabilities"].keys()
    for biomarker, probability in calm["probabilities"].items():
        assert disturbed["probabilities"][biomarker] == pytest.approx(probability, abs=1e-6)

    # TorchServe replaced the worker; the killed one is gone.
    deadline = time.monotonic() + 120.0
    while time.monotonic() < deadline:
        try:
            replacement = _worker_pid(torchserve, VICTIM)
        except AssertionError:
            replacement = victim
        if replacement != victim:
            break
        time.sleep(0.5)
    assert replacement != victim and replacement in torchserve.processes()
    assert victim not in torchserve.processes()
