"""The TrainConfig the training flows build: the bundle records the tiling's grid."""

from __future__ import annotations

from flows.config import ModelTraining
from flows.training import train_config


def test_the_model_json_records_the_overlap_of_the_training_grid() -> None:
    training = ModelTraining(backbone="tiny", input_px=32, epochs=1, tta=("rot0",))
    config = train_config("cancer_detector", ("normal", "cancer"), training, "abc", 256)
    model = config.model_config()
    assert model.grid_overlap_px == 256
    assert (model.name, model.version, model.tta) == ("cancer_detector", "abc", ("rot0",))
    plain = train_config("biomarker_er", ("negative", "positive"), training, "abc", 0)
    assert plain.model_config().grid_overlap_px == 0
