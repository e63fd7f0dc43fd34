"""The PredictionService's MIL pipeline over real gRPC: PredictSlide choosing the
pipeline, PredictFromBag on the bag it stored, and the errors of both.

The service runs in this process with an in-process encoder (the tiny ``uni``
variant, random weights saved to and loaded from a file) and a head trained for two
epochs (:class:`~services.prediction.mil_models.LocalMilModels`); the slide is a
synthetic ``tiny`` WSI. TorchServe serving of the same models is tested in
``tests/integration/mil/test_torchserve_mil.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import pandas as pd
import pytest
from tiny_mil import tiny_embedder, tiny_head
from tiny_models import untrained_scorer

from services import cli
from services.common.grpc_client import open_channel
from services.common.grpc_server import ServiceBinding, create_server
from services.common.objectstore import ObjectStore, open_store
from services.common.stubs.histomarker.v1 import common_pb2, prediction_pb2, prediction_pb2_grpc
from services.mil.model import TrainingData
from services.prediction.mil_models import LocalMilModels
from services.prediction.server import SERVICE_NAME, PredictionServicer, PredictionSettings
from services.synth.cohort import generate_cohort
from services.synth.slide import QC_MIN_USABLE_MM2

SLIDE_KEY = "slides/MIL-1.tiff"
MIL = prediction_pb2.PREDICTION_PIPELINE_MIL


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, ObjectStore, str]]:
    root = tmp_path_factory.mktemp("prediction-mil")
    store = open_store((root / "store").as_uri())
    generate_cohort(root / "cohort", 2, seed=3, preset="tiny", truth_crops=0)
    manifest = pd.read_csv(root / "cohort" / "manifest.csv")
    store.put_file(
        SLIDE_KEY, root / "cohort" / manifest[manifest["kind"] == "cancer"].iloc[0]["slide_path"]
    )
    embedder = tiny_embedder(root)
    data = TrainingData(cohort="synthetic-seed-3", synthetic=True, sites=("S1",), n_slides=12)
    head = tiny_head(embedder, "unit", data, seed=1)
    models = LocalMilModels({"mil_unit": head}, {"uni": embedder})
    config = PredictionSettings(
        host="127.0.0.1",
        port=0,
        store_url=store.url,
        slide_cache_dir=root / "cache",
        qc_min_usable_mm2=QC_MIN_USABLE_MM2,
    )
    # The paper's models (tiny, untrained) are deployed too: the MIL pipeline takes the
    # out-of-distribution reference beside the cancer detector when there is one.
    registry = untrained_scorer(root / "bundles")
    servicer = PredictionServicer(config, registry=registry, mil_models=models)  # type: ignore[arg-type]
    binding = ServiceBinding(
        SERVICE_NAME, servicer, prediction_pb2_grpc.add_PredictionServiceServicer_to_server
    )
    server, port = create_server(config, [binding])
    server.start()
    channel = open_channel(f"127.0.0.1:{port}")
    try:
        yield prediction_pb2_grpc.PredictionServiceStub(channel), store, f"127.0.0.1:{port}"
    finally:
        channel.close()
        server.stop(0).wait()


def _options(**fields: Any) -> prediction_pb2.PredictionOptions:
    return prediction_pb2.PredictionOptions(pipeline=MIL, skip_heatmaps=True, **fields)


def test_predict_slide_with_the_mil_pipeline_then_from_its_bag(
    stub: tuple[Any, ObjectStore, str],
) -> None:
    client, store, _ = stub
    request = prediction_pb2.PredictSlideRequest(
        slide=common_pb2.SlideRef(object=common_pb2.ObjectRef(key=SLIDE_KEY)),
        options=_options(top_k=3),
    )
    first = client.PredictSlide(request, timeout=300).prediction
    assert first.status == prediction_pb2.PREDICTION_STATUS_OK, first.status_message
    assert first.pipeline == MIL and first.encoder_model_name == "local:uni"
    assert first.mil_model_name == "local:unit" and len(first.encoder_sha256) == 64
    assert first.training_data.cohort == "synthetic-seed-3" and first.training_data.synthetic
    assert list(first.training_data.sites) == ["S1"] and first.training_data.slide_count == 12
    assert first.bag.key == "bags/uni/MIL-1.h5" and store.exists(first.bag.key)
    assert len(first.biomarkers) == 6 and first.tissue_patch_count > 100
    for item in first.biomarkers:
        assert 0.0 < item.probability < 1.0 and item.patch_count == first.tissue_patch_count
        assert len(item.top_patches) == 3 and item.top_patches[0].attention > 0
        assert item.top_patches[0].patch.size_px == 32  # the tiny encoder's input
        assert item.model_name == "local:unit"

    again = client.PredictFromBag(
        prediction_pb2.PredictFromBagRequest(
            bag=common_pb2.ObjectRef(key=first.bag.key),
            options=prediction_pb2.PredictionOptions(biomarkers=[common_pb2.BIOMARKER_HER2]),
        ),
        timeout=60,
    ).prediction
    assert again.status == prediction_pb2.PREDICTION_STATUS_OK and len(again.biomarkers) == 1
    her2 = next(b for b in first.biomarkers if b.biomarker == common_pb2.BIOMARKER_HER2)
    assert again.biomarkers[0].probability == pytest.approx(her2.probability)
    assert again.pipeline == MIL and not again.HasField("tissue_mask")


def test_bad_bags_and_unknown_heads_are_clear_errors(stub: tuple[Any, ObjectStore, str]) -> None:
    client, store, _ = stub
    with pytest.raises(grpc.RpcError) as missing:
        client.PredictFromBag(
            prediction_pb2.PredictFromBagRequest(bag=common_pb2.ObjectRef(key="bags/uni/none.h5")),
            timeout=30,
        )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    store.put_bytes("bags/uni/junk.h5", b"not an hdf5 file")
    with pytest.raises(grpc.RpcError) as junk:
        client.PredictFromBag(
            prediction_pb2.PredictFromBagRequest(bag=common_pb2.ObjectRef(key="bags/uni/junk.h5")),
            timeout=30,
        )
    assert junk.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as unknown:
        client.PredictSlide(
            prediction_pb2.PredictSlideRequest(
                slide=common_pb2.SlideRef(object=common_pb2.ObjectRef(key=SLIDE_KEY)),
                options=_options(mil_model="mil_other"),
            ),
            timeout=30,
        )
    assert unknown.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "mil_other is not deployed (deployed: mil_unit)" in unknown.value.details()
    with pytest.raises(grpc.RpcError) as empty:
        client.PredictFromBag(prediction_pb2.PredictFromBagRequest(), timeout=30)
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_cli_predict_chooses_the_pipeline_and_reads_bags(
    stub: tuple[Any, ObjectStore, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, target = stub
    argv = ["predict", SLIDE_KEY, "--stored", "--target", target, "--pipeline", "mil"]
    assert cli.main([*argv, "--no-heatmaps", "--biomarker", "er"]) == 0
    out = capsys.readouterr().out
    assert "MIL pipeline: " in out and "called by local:unit" in out
    assert "trained on: synthetic-seed-3 (synthetic), 12 slides, 1 sites" in out
    assert cli.main(["predict", "bags/uni/MIL-1.h5", "--bag", "--target", target, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)["prediction"]
    assert answer["pipeline"] == "PREDICTION_PIPELINE_MIL" and len(answer["biomarkers"]) == 6
    assert cli.main(["predict", "bags/uni/none.h5", "--bag", "--target", target]) == 2
    assert "none.h5" in capsys.readouterr().err
