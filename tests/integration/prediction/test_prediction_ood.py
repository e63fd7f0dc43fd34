"""PredictSlide knows when not to answer: a real PredictionService on 127.0.0.1 over
real gRPC, its models found in a file:// store with an ``ood.json`` beside the cancer
detector (as training stores it), a real Aperio slide refused as out of distribution,
a new synthetic slide answered, and each answer naming what the models were trained on.

TorchServe is left out: the models are tiny untrained networks scored in process
(``LocalScorer``), and TorchServe's management API is a stand-in that lists them, so
what is checked is the service's own path: the registry reading ``ood.json``, the
pipeline refusing, the messages. The reference is fitted on interleaved thirds of
seven generated slides' patches (five fit, two set the threshold); the eighth slide is
the new one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from realdata import realdata
from tiny_models import ALL_MODELS, untrained_scorer

from services.common.grpc_client import open_channel
from services.common.grpc_server import ServiceBinding, create_server
from services.common.objectstore import ObjectStore, open_store
from services.common.stubs.histomarker.v1 import common_pb2, prediction_pb2, prediction_pb2_grpc
from services.common.vocabulary import CANCER_DETECTOR
from services.inference.ood import OodDetector
from services.inference.registry import ood_key, publish_bundle
from services.prediction.models import ModelRegistry
from services.prediction.ood_check import PATCHES_PER_SLIDE_KEY, grid_descriptors
from services.prediction.server import SERVICE_NAME, PredictionServicer, PredictionSettings
from services.slide.grid import GridParams
from services.slide.prepare import PrepParams, prepare_slide
from services.slide.reader import open_slide
from services.synth.cohort import generate_cohort
from services.synth.slide import QC_MIN_USABLE_MM2

pytestmark = pytest.mark.slow

TRAINED_ON = {"cohort": "demo", "synthetic": True, "sites": ["SD", "SE", "SF"], "n_slides": 7}
#: The demo's grid: 512 px at 20x, half-overlapping; the models record the overlap.
OVERLAP_PX = 256
#: Keeps every 20x patch as cancer: the untrained detector's scores do not matter.
KEEP_ALL = 0.0


class Management:
    """TorchServe's management API as the registry reads it: every model at version 1
    with one READY worker."""

    def json(self, method: str, path: str) -> Any:
        if path.startswith("/models?"):
            return {"models": [{"modelName": name} for name in ALL_MODELS]}
        return [{"modelVersion": "1", "workers": [{"status": "READY"}]}]


@dataclass
class Stack:
    store: ObjectStore
    stub: prediction_pb2_grpc.PredictionServiceStub
    reference: OodDetector
    synthetic_key: str
    real_key: str


def _reference(slides: list[Path]) -> OodDetector:
    params = PrepParams(grid=GridParams(overlap_px=OVERLAP_PX))
    described = []
    for path in slides[:7]:
        with open_slide(path) as reader:
            grid = prepare_slide(reader, path.stem, params).grid
            described.append(grid_descriptors(reader, grid, 256.0, 32))
    thirds = [[desc[i::3] for i in range(3)] for desc in described]
    fit = [part for parts in thirds[:5] for part in parts]
    calibration = [part for parts in thirds[5:] for part in parts]
    reference = OodDetector().fit(fit, calibration, description="five tiny synthetic slides")
    reference.training[PATCHES_PER_SLIDE_KEY] = 32
    return reference


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    cmu1 = realdata("qc/slides") / "CMU-1-Small-Region.svs"
    root = tmp_path_factory.mktemp("prediction-ood")
    store = open_store((root / "store").as_uri())
    scorer = untrained_scorer(
        root / "bundles", 32, training_data=TRAINED_ON, grid_overlap_px=OVERLAP_PX
    )
    for name in ALL_MODELS:
        publish_bundle(store, root / "bundles" / name)
    generate_cohort(root / "cohort", 8, seed=5, preset="tiny", truth_crops=0, workers=2)
    slides = sorted((root / "cohort" / "slides").glob("*.tiff"))
    reference = _reference(slides)
    store.put_bytes(ood_key(CANCER_DETECTOR, "1"), reference.to_json().encode())
    synthetic_key, real_key = f"slides/{slides[7].name}", "slides/CMU-1-Small-Region.svs"
    store.put_file(synthetic_key, slides[7])
    store.put_file(real_key, cmu1)

    settings = PredictionSettings(
        port=0,
        store_url=store.url,
        slide_cache_dir=root / "slide-cache",
        qc_min_usable_mm2=QC_MIN_USABLE_MM2,
        batch_size=8,
        max_in_flight=2,
        model_cache_s=0.0,
    )
    servicer = PredictionServicer(
        settings,
        scorer=scorer,
        registry=ModelRegistry(store, Management(), ttl_s=0.0),  # type: ignore[arg-type]
        mil_models=object(),  # type: ignore[arg-type]
    )
    binding = ServiceBinding(
        SERVICE_NAME, servicer, prediction_pb2_grpc.add_PredictionServiceServicer_to_server
    )
    server, port = create_server(settings, [binding])
    server.start()
    channel = open_channel(f"127.0.0.1:{port}")
    try:
        yield Stack(
            store=store,
            stub=prediction_pb2_grpc.PredictionServiceStub(channel),
            reference=reference,
            synthetic_key=synthetic_key,
            real_key=real_key,
        )
    finally:
        channel.close()
        server.stop(0).wait()


def _predict(stack: Stack, key: str, **options: Any) -> prediction_pb2.SlidePrediction:
    request = prediction_pb2.PredictSlideRequest(
        slide=common_pb2.SlideRef(object=common_pb2.ObjectRef(key=key)),
        options=prediction_pb2.PredictionOptions(
            cancer_confidence=KEEP_ALL,
            skip_heatmaps=True,
            biomarkers=[common_pb2.BIOMARKER_TP53],
            **options,
        ),
    )
    return stack.stub.PredictSlide(request, timeout=120).prediction


def test_a_real_aperio_slide_is_refused_with_its_distance(stack: Stack) -> None:
    prediction = _predict(stack, stack.real_key)
    assert prediction.status == prediction_pb2.PREDICTION_STATUS_OUT_OF_DISTRIBUTION
    assert len(prediction.biomarkers) == 0
    ood = prediction.out_of_distribution
    print(f"CMU-1-Small-Region over gRPC: {ood}")
    assert ood.out_of_distribution and ood.distance > ood.threshold
    assert ood.threshold == pytest.approx(stack.reference.threshold, abs=1e-3)
    assert ood.patch_count == 32 and "stain" in ood.basis
    assert f"{ood.distance:.3g}" in prediction.status_message
    assert prediction.training_data.cohort == "demo" and prediction.training_data.synthetic


def test_a_new_synthetic_slide_is_answered_and_says_how_far_it_is(stack: Stack) -> None:
    prediction = _predict(stack, stack.synthetic_key)
    assert prediction.status == prediction_pb2.PREDICTION_STATUS_OK
    assert [b.biomarker for b in prediction.biomarkers] == [common_pb2.BIOMARKER_TP53]
    ood = prediction.out_of_distribution
    assert not ood.out_of_distribution and 0 < ood.distance <= ood.threshold
    assert list(prediction.training_data.sites) == ["SD", "SE", "SF"]
    assert prediction.training_data.slide_count == 7


def test_list_models_states_what_the_models_were_trained_on(stack: Stack) -> None:
    models = stack.stub.ListModels(prediction_pb2.ListModelsRequest(), timeout=30).models
    assert [m.name for m in models] == list(ALL_MODELS)
    for model in models:
        assert model.training_data.cohort == "demo" and model.training_data.synthetic
        assert model.training_data.slide_count == 7


def test_a_broken_reference_is_a_failed_precondition_naming_it(stack: Stack) -> None:
    key = ood_key(CANCER_DETECTOR, "1")
    good = stack.store.get_bytes(key)
    stack.store.put_bytes(key, b"{}")
    try:
        with pytest.raises(grpc.RpcError) as info:
            _predict(stack, stack.synthetic_key)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "ood.json" in (info.value.details() or "")
    finally:
        stack.store.put_bytes(key, good)
