"""What a model was trained on, on its card (``ModelConfig.training_data``): the JSON
round trip, a ``model.json`` from before the field, and what is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common.errors import InvalidInput
from services.inference.bundle import (
    CONFIG_FILE,
    ModelConfig,
    load_config,
    training_data_of,
    write_config,
)

CARD = ModelConfig(name="biomarker_tp53", version="7", backbone="tiny")
TRAINED_ON = {
    "cohort": "demo",
    "synthetic": True,
    "sites": ["SC", "SA", "SB", "SA"],
    "n_slides": 120,
    "n_patients": 118,
}


def test_training_data_survives_the_json_in_canonical_form() -> None:
    card = CARD.with_training_data(TRAINED_ON)
    loaded = ModelConfig.from_json(card.to_json())
    assert loaded == card
    assert loaded.training_data == {
        "cohort": "demo",
        "synthetic": True,
        "sites": ["SA", "SB", "SC"],  # sorted, each once
        "n_slides": 120,
        "n_patients": 118,
    }
    assert json.loads(card.to_json())["training_data"]["n_slides"] == 120
    assert hash(loaded) == hash(card)  # a config stays hashable with its dict


def test_a_model_json_without_training_data_loads_as_unknown() -> None:
    older = json.loads(CARD.to_json())
    del older["training_data"]
    loaded = ModelConfig.from_json(json.dumps(older))
    assert loaded.training_data == {}
    assert loaded == CARD


def test_real_and_unknown_cohorts_and_partial_cards() -> None:
    real = training_data_of({"cohort": "TCGA-BRCA", "synthetic": False, "sites": ["A2"]})
    assert real == {
        "cohort": "TCGA-BRCA",
        "synthetic": False,
        "sites": ["A2"],
        "n_slides": 0,
        "n_patients": 0,
    }
    assert training_data_of({"cohort": "in-house"})["synthetic"] is None
    assert training_data_of(None) == {} and training_data_of({}) == {}
    assert training_data_of({"n_slides": 12.0})["n_slides"] == 12


def test_the_card_does_not_share_the_callers_dict() -> None:
    given = dict(TRAINED_ON, sites=["SA"])
    card = CARD.with_training_data(given)
    given["sites"].append("SZ")
    assert card.training_data["sites"] == ["SA"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"cohort": "x", "scanner": "GT450"}, "unknown keys"),
        ({"cohort": 3}, "cohort must be text"),
        ({"synthetic": "yes"}, "synthetic must be"),
        ({"sites": "A2"}, "sites must be a list"),
        ({"sites": ["A2", ""]}, "non-empty text"),
        ({"n_slides": -1}, "n_slides must be a count"),
        ({"n_patients": True}, "n_patients must be a count"),
        ({"n_slides": 2.5}, "n_slides must be a count"),
        (["demo"], "must be an object"),
    ],
)
def test_malformed_training_data_is_refused(value: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        CARD.with_training_data(value)  # type: ignore[arg-type]
    text = json.dumps({**json.loads(CARD.to_json()), "training_data": value})
    with pytest.raises(InvalidInput, match=message):
        ModelConfig.from_json(text)


def test_write_config_replaces_a_bundles_model_json(tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE).write_text(CARD.to_json())
    write_config(tmp_path, CARD.with_training_data(TRAINED_ON))
    assert load_config(tmp_path).training_data["cohort"] == "demo"
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE]
