"""The product's nouns: one list of biomarkers, their model names and enum values."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidInput
from services.common.stubs.histomarker.v1 import common_pb2
from services.common.vocabulary import (
    BIOMARKER_ENUMS,
    BIOMARKER_NAMES,
    BIOMARKERS,
    CANCER_DETECTOR,
    biomarker_name,
    biomarker_of_model,
    model_name_of,
)


def test_every_biomarker_has_its_proto_enum_and_back() -> None:
    proto = [v.name for v in common_pb2.Biomarker.DESCRIPTOR.values if v.number]
    assert [f"BIOMARKER_{b.upper()}" for b in BIOMARKERS] == proto
    for name in BIOMARKERS:
        assert BIOMARKER_NAMES[BIOMARKER_ENUMS[name]] == name
        assert biomarker_name(BIOMARKER_ENUMS[name]) == name


def test_model_names_round_trip() -> None:
    assert model_name_of("tp53") == "biomarker_tp53"
    assert [biomarker_of_model(model_name_of(b)) for b in BIOMARKERS] == list(BIOMARKERS)
    assert biomarker_of_model(CANCER_DETECTOR) is None
    assert biomarker_of_model("biomarker_kras") is None
    with pytest.raises(InvalidInput, match="unknown biomarker 'kras'"):
        model_name_of("kras")


def test_enum_values_that_name_no_biomarker_are_refused() -> None:
    assert biomarker_name(common_pb2.BIOMARKER_UNSPECIFIED, required=False) is None
    with pytest.raises(InvalidInput, match="targets is required"):
        biomarker_name(common_pb2.BIOMARKER_UNSPECIFIED, "targets")
    with pytest.raises(InvalidInput, match="unknown biomarker 99"):
        biomarker_name(99)
