from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.cohort.tcga import TcgaBarcode, sample_type_name
from services.common.errors import InvalidInput


def test_slide_barcode_fields() -> None:
    barcode = TcgaBarcode.parse("TCGA-A1-A0SB-01Z-00-DX1")
    assert barcode.tss == "A1"
    assert barcode.site == "A1"
    assert barcode.participant == "A0SB"
    assert barcode.patient_id == "TCGA-A1-A0SB"
    assert barcode.sample_type == "01"
    assert barcode.sample_id == "TCGA-A1-A0SB-01"
    assert barcode.vial == "Z"
    assert barcode.portion == "00"
    assert (barcode.section, barcode.section_number) == ("DX", "1")
    assert barcode.is_slide


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("TCGA-A1-A0SB", "TCGA-A1-A0SB"),
        ("tcga-a1-a0sb-01", "TCGA-A1-A0SB-01"),
        ("  TCGA-E2-A15K-06A \n", "TCGA-E2-A15K-06A"),
        ("TCGA-A7-A0CE-11A-01-TS1", "TCGA-A7-A0CE-11A-01-TS1"),
        ("TCGA-A1-A0SB-01A-11D-A142-09", "TCGA-A1-A0SB-01A-11D-A142-09"),
    ],
)
def test_parse_accepts_every_level_ignoring_case(text: str, canonical: str) -> None:
    barcode = TcgaBarcode.parse(text)
    assert str(barcode) == canonical
    assert TcgaBarcode.parse(canonical) == barcode


def test_aliquot_barcode_has_plate_and_center_but_no_section() -> None:
    barcode = TcgaBarcode.parse("TCGA-A1-A0SB-01A-11D-A142-09")
    assert (barcode.analyte, barcode.plate, barcode.center) == ("D", "A142", "09")
    assert not barcode.is_slide


def test_patient_level_barcode_has_no_sample() -> None:
    barcode = TcgaBarcode.parse("TCGA-A1-A0SB")
    assert barcode.sample_type is None
    assert barcode.sample_id is None


@pytest.mark.parametrize(
    "text",
    ["", "TCGA", "TCGA-A1", "TCGA-A1-A0S", "TCGA-A1-A0SB-1", "TCGA-A1-A0SB-01Z-00-DX1.svs", "x"],
)
def test_parse_rejects_non_barcodes_with_invalid_input(text: str) -> None:
    with pytest.raises(InvalidInput, match="not a TCGA barcode"):
        TcgaBarcode.parse(text)


@pytest.mark.parametrize(
    ("name", "barcode"),
    [
        (
            "TCGA-A1-A0SB-01Z-00-DX1.2D7E8B5F-5F2C-4A3B-8B41-0E2D7B6F6C39.svs",
            "TCGA-A1-A0SB-01Z-00-DX1",
        ),
        ("tcga-a2-a0cm-01z-00-dx2.svs", "TCGA-A2-A0CM-01Z-00-DX2"),
        ("scan_TCGA-A1-A0SB-11A-01-TS1_v2.ndpi", "TCGA-A1-A0SB-11A-01-TS1"),
        # A slide part that runs on into letters is not a section: stop before it.
        ("TCGA-A1-A0SB-01Z-00-DX1A.svs", "TCGA-A1-A0SB-01Z-00"),
    ],
)
def test_find_locates_a_barcode_in_a_file_name(name: str, barcode: str) -> None:
    found = TcgaBarcode.find(name)
    assert found is not None
    assert str(found) == barcode


@pytest.mark.parametrize(
    "name", ["slide_001.svs", "XTCGA-A1-A0SB-01Z-00-DX1.svs", "TCGA-A1-A0S.svs", "tcga.svs"]
)
def test_find_returns_none_without_a_delimited_barcode(name: str) -> None:
    assert TcgaBarcode.find(name) is None


def test_non_ascii_look_alikes_are_not_barcodes() -> None:
    # "ſ" (long s) upper-cases to "S"; it must not make a barcode.
    assert TcgaBarcode.find("TCGA-A1-A0ſB-01Z-00-DX1.svs") is None
    with pytest.raises(InvalidInput):
        TcgaBarcode.parse("TCGA-A1-A0ſB")


def test_sample_type_names() -> None:
    assert sample_type_name("06") == "06 (metastatic)"
    assert sample_type_name("11") == "11 (solid tissue normal)"
    assert sample_type_name("99") == "99"
    assert sample_type_name(None) == "no sample type"


@given(st.text())
def test_parse_never_crashes(text: str) -> None:
    try:
        barcode = TcgaBarcode.parse(text)
    except InvalidInput:
        return
    assert TcgaBarcode.parse(str(barcode)) == barcode


@given(st.text())
def test_find_never_crashes(text: str) -> None:
    found = TcgaBarcode.find(text)
    assert found is None or TcgaBarcode.parse(str(found)) == found


_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_code = st.text(alphabet=_ALNUM, min_size=2, max_size=2)
_participant = st.text(alphabet=_ALNUM, min_size=4, max_size=4)
_digits2 = st.text(alphabet="0123456789", min_size=2, max_size=2)
_letter = st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


@given(
    tss=_code,
    participant=_participant,
    sample_type=_digits2,
    vial=_letter,
    portion=_digits2,
    section=st.sampled_from(["DX", "TS", "BS", "MS"]),
    number=st.integers(min_value=1, max_value=999),
    lower=st.booleans(),
    uuid=st.one_of(st.none(), st.uuids()),
)
def test_generated_slide_file_names_round_trip(
    tss: str,
    participant: str,
    sample_type: str,
    vial: str,
    portion: str,
    section: str,
    number: int,
    lower: bool,
    uuid: object,
) -> None:
    text = f"TCGA-{tss}-{participant}-{sample_type}{vial}-{portion}-{section}{number}"
    name = (text.lower() if lower else text) + (f".{uuid}" if uuid else "") + ".svs"
    found = TcgaBarcode.find(name)
    assert found is not None
    assert str(found) == text
    assert found.patient_id == f"TCGA-{tss}-{participant}"
    assert (found.sample_type, found.section, found.section_number) == (
        sample_type,
        section,
        str(number),
    )
