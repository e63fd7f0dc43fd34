"""The TrainConfig the training flows build: the bundle records the tiling's grid."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flows.runtime.policy import input_digest
from flows.training.config import Analysis, ModelTraining, PipelineConfig, training_of
from flows.training.training import train_config


def test_the_model_json_records_the_overlap_of_the_training_grid() -> None:
    training = ModelTraining(backbone="tiny", input_px=32, epochs=1, tta=("rot0",))
    config = train_config("cancer_detector", ("normal", "cancer"), training, "abc", 256)
    model = config.model_config()
    assert model.grid_overlap_px == 256
    assert (model.name, model.version, model.tta) == ("cancer_detector", "abc", ("rot0",))
    plain = train_config("biomarker_er", ("negative", "positive"), training, "abc", 0)
    assert plain.model_config().grid_overlap_px == 0


def test_biomarker_epochs_give_one_biomarker_its_own_epochs() -> None:
    shared = ModelTraining(backbone="small", input_px=128, epochs=16, lr=1e-3)
    config = PipelineConfig(biomarker=shared, biomarker_epochs={"pik3ca": 24, "pr": 20})
    pik3ca = training_of("pik3ca", config.biomarker, config.biomarker_epochs)
    assert pik3ca.epochs == 24
    assert pik3ca.model_copy(update={"epochs": 16}) == shared  # nothing else changed
    assert training_of("pr", config.biomarker, config.biomarker_epochs).epochs == 20
    assert training_of("tp53", config.biomarker, config.biomarker_epochs) == shared
    # The overrides are part of the run's configuration, so of its id.
    assert input_digest(config) != input_digest(PipelineConfig(biomarker=shared))
    same = PipelineConfig(biomarker=shared, biomarker_epochs={"pr": 20, "pik3ca": 24})
    assert input_digest(config) == input_digest(same)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"kras": 10}, "unknown biomarkers"), ({"er": 0}, ">= 1")],
)
def test_biomarker_epochs_are_checked(overrides: dict[str, int], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PipelineConfig(biomarker_epochs=overrides)


@pytest.mark.parametrize(
    "overrides",
    [{"folds": 21}, {"n_estimators": 1001}, {"bootstrap": 10_001}, {"seed": -1}, {"seed": 2**32}],
)
def test_analysis_settings_the_service_would_refuse_are_refused_before_training(
    overrides: dict[str, int],
) -> None:
    with pytest.raises(ValidationError):
        Analysis(**overrides)
    assert Analysis(folds=20, n_estimators=1000, bootstrap=10_000, seed=2**32 - 1).folds == 20
