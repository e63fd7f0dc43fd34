"""The bundle's model.json: what serving learns about how a model was trained."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from services.common.errors import InvalidInput
from services.inference.bundle import ModelConfig
from services.inference.preprocess import PreprocessConfig

CONFIG = ModelConfig(
    name="cancer_detector",
    version="2",
    backbone="tiny",
    class_names=("normal", "cancer"),
    preprocess=PreprocessConfig(input_px=32),
    grid_overlap_px=256,
)


def test_the_training_grid_overlap_survives_the_json() -> None:
    loaded = ModelConfig.from_json(CONFIG.to_json())
    assert loaded == CONFIG and loaded.grid_overlap_px == 256
    assert json.loads(CONFIG.to_json())["grid_overlap_px"] == 256


def test_a_model_json_from_before_the_overlap_loads_as_the_plain_grid() -> None:
    older = json.loads(CONFIG.to_json())
    del older["grid_overlap_px"]
    loaded = ModelConfig.from_json(json.dumps(older))
    assert loaded.grid_overlap_px == 0
    assert loaded == replace(CONFIG, grid_overlap_px=0)


@pytest.mark.parametrize("overlap", [-1, 2.5, True])
def test_the_overlap_is_a_whole_number_of_px(overlap: object) -> None:
    with pytest.raises(InvalidInput, match="grid_overlap_px"):
        replace(CONFIG, grid_overlap_px=overlap)
    text = json.dumps({**json.loads(CONFIG.to_json()), "grid_overlap_px": overlap})
    with pytest.raises(InvalidInput, match="grid_overlap_px"):
        ModelConfig.from_json(text)
