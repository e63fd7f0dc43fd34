"""What the PredictionService learns from the store about its models: the training
data on each model card (ListModels) and the OOD reference beside the detector
(``ModelRegistry.deployment``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.common.errors import FailedPrecondition
from services.common.objectstore import ObjectStore, open_store
from services.common.stubs.histomarker.v1 import prediction_pb2
from services.common.vocabulary import BIOMARKERS, CANCER_DETECTOR, model_name_of
from services.inference.bundle import CONFIG_FILE, ModelConfig
from services.inference.ood import PATCH_FEATURES, OodDetector
from services.inference.registry import model_prefix, ood_key
from services.prediction.models import DeployedModel, ModelRegistry
from services.prediction.server import PredictionServicer, PredictionSettings

TRAINED_ON = {"cohort": "demo", "synthetic": True, "sites": ["SA", "SB"], "n_slides": 40}
MODELS = (CANCER_DETECTOR, *(model_name_of(b) for b in BIOMARKERS))


class Management:
    """TorchServe's management API as the registry reads it: every model, version 1,
    one READY worker."""

    def json(self, method: str, path: str) -> Any:
        if path.startswith("/models?"):
            return {"models": [{"modelName": name} for name in MODELS]}
        return [{"modelVersion": "1", "workers": [{"status": "READY"}]}]


def _config(name: str, **changes: Any) -> ModelConfig:
    classes = ("normal", "cancer") if name == CANCER_DETECTOR else ("negative", "positive")
    return ModelConfig(name=name, version="1", backbone="tiny", class_names=classes, **changes)


@pytest.fixture()
def store(tmp_path: Path) -> ObjectStore:
    store = open_store((tmp_path / "store").as_uri())
    for name in MODELS:
        card = _config(name, training_data=TRAINED_ON if name == CANCER_DETECTOR else {})
        store.put_bytes(f"{model_prefix(name, '1')}/{CONFIG_FILE}", card.to_json().encode())
    return store


@pytest.fixture(scope="module")
def reference() -> OodDetector:
    rng = np.random.default_rng(0)
    slides = [rng.normal(size=(6, len(PATCH_FEATURES))) for _ in range(15)]
    return OodDetector().fit(slides[:10], slides[10:])


def test_list_models_states_what_each_model_was_trained_on(
    store: ObjectStore, tmp_path: Path
) -> None:
    class Registry:
        def deployed(self) -> tuple[dict[str, DeployedModel], list[str]]:
            models = {
                CANCER_DETECTOR: _config(CANCER_DETECTOR, training_data=TRAINED_ON),
                "biomarker_tp53": _config("biomarker_tp53"),
            }
            return {n: DeployedModel(n, "1", None, c) for n, c in models.items()}, []

    settings = PredictionSettings(store_url=(tmp_path / "other").as_uri(), port=0)
    servicer = PredictionServicer(
        settings,
        scorer=object(),  # type: ignore[arg-type]
        registry=Registry(),  # type: ignore[arg-type]
        mil_models=object(),  # type: ignore[arg-type]
    )
    detector, tp53 = servicer.ListModels(prediction_pb2.ListModelsRequest(), None).models
    assert detector.HasField("training_data")
    data = detector.training_data
    assert (data.cohort, data.synthetic, list(data.sites)) == ("demo", True, ["SA", "SB"])
    assert (data.slide_count, data.patient_count) == (40, 0)
    assert not tp53.HasField("training_data")  # its card does not say


def test_the_deployment_carries_the_reference_stored_beside_the_detector(
    store: ObjectStore, reference: OodDetector
) -> None:
    registry = ModelRegistry(store, Management())  # type: ignore[arg-type]
    plain = registry.deployment()
    assert plain.ood is None
    assert plain.cancer.training_data["cohort"] == "demo"
    assert plain.biomarkers["tp53"].training_data == {}

    key = ood_key(CANCER_DETECTOR, "1")
    store.put_bytes(key, reference.to_json().encode())
    first = registry.deployment().ood
    assert first is not None and first.threshold == reference.threshold
    assert registry.deployment().ood is first  # parsed once per stored content

    changed = OodDetector.from_json(reference.to_json())
    changed.threshold = 2 * reference.threshold
    store.put_bytes(key, changed.to_json().encode())
    again = registry.deployment().ood
    assert again is not None and again.threshold == changed.threshold


def test_a_broken_reference_stops_predictions_saying_where(store: ObjectStore) -> None:
    store.put_bytes(ood_key(CANCER_DETECTOR, "1"), b'{"kind": "something else"}')
    registry = ModelRegistry(store, Management())  # type: ignore[arg-type]
    with pytest.raises(FailedPrecondition, match=r"ood\.json is not a valid OOD reference"):
        registry.deployment()
