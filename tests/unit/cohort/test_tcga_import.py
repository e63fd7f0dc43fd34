"""Import of a TCGA-BRCA cohort from fixture slides and cBioPortal-format tables."""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pytest

from services.cohort import tcga
from services.cohort.importer import import_cohort
from services.cohort.manifest import MANIFEST_COLUMNS, Manifest
from services.cohort.tcga import (
    build_manifest,
    find_slide_files,
    merge_clinical,
    read_clinical,
    read_immune,
    read_mutations,
    read_sequenced,
    select_slides,
)
from services.common.errors import AlreadyExists, InvalidInput, NotFound

# ----------------------------------------------------------------- fixture writers

CLINICAL_COLUMNS = (
    "PATIENT_ID",
    "SUBTYPE",
    "ER_STATUS_BY_IHC",
    "PR_STATUS_BY_IHC",
    "IHC_HER2",
    "HER2_FISH_STATUS",
)
CLINICAL_PREAMBLE = (
    "#Patient Identifier\tSubtype\tER Status By IHC\tPR status by ihc\tIHC-HER2\tHER2 fish status",
    "#Identifier to uniquely identify a patient.\tPAM50 subtype\tER status\tPR status"
    "\tHER2 by IHC\tHER2 by FISH",
    "#STRING\tSTRING\tSTRING\tSTRING\tSTRING\tSTRING",
    "#1\t1\t1\t1\t1\t1",
)
MAF_COLUMNS = (
    "Hugo_Symbol",
    "Entrez_Gene_Id",
    "Center",
    "NCBI_Build",
    "Chromosome",
    "Start_Position",
    "End_Position",
    "Strand",
    "Variant_Classification",
    "Variant_Type",
    "Reference_Allele",
    "Tumor_Seq_Allele1",
    "Tumor_Seq_Allele2",
    "Tumor_Sample_Barcode",
    "HGVSp_Short",
)
GENE_IDS = {"TP53": "7157", "PIK3CA": "5290", "GATA3": "2625", "CDH1": "999"}


def write_clinical(path: Path, rows: Sequence[Sequence[str]], *, preamble: bool = True) -> Path:
    """A cBioPortal ``data_clinical_patient.txt``: four ``#`` lines, header, rows."""
    lines = [*(CLINICAL_PREAMBLE if preamble else ()), "\t".join(CLINICAL_COLUMNS)]
    lines += ["\t".join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def maf_row(gene: str, variant: str, sample: str) -> list[str]:
    values = {
        "Hugo_Symbol": gene,
        "Entrez_Gene_Id": GENE_IDS.get(gene, "0"),
        "Center": "broad.mit.edu",
        "NCBI_Build": "GRCh37",
        "Chromosome": "17",
        "Start_Position": "7577120",
        "End_Position": "7577120",
        "Strand": "+",
        "Variant_Classification": variant,
        "Variant_Type": "SNP",
        "Reference_Allele": "C",
        "Tumor_Seq_Allele1": "C",
        "Tumor_Seq_Allele2": "T",
        "Tumor_Sample_Barcode": sample,
        "HGVSp_Short": "p.R273H",
    }
    return [values[column] for column in MAF_COLUMNS]


def write_maf(path: Path, rows: Sequence[Sequence[str]]) -> Path:
    """A cBioPortal ``data_mutations.txt``: ``#version`` line, header, rows."""
    lines = ["#version 2.4", "\t".join(MAF_COLUMNS), *("\t".join(row) for row in rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def touch(root: Path, relative: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"II*\x00")  # content is never read
    return path


UUID = "2D7E8B5F-5F2C-4A3B-8B41-0E2D7B6F6C39"

# Patients of the fixture cohort and what makes each one an edge case.
A = "TCGA-A1-A0SB"  # two DX slides (DX2 kept); TP53 silent only -> 0; PIK3CA missense -> 1
B = "TCGA-A2-A0CM"  # a frozen TS1 slide only -> no slide by default
C = "TCGA-A7-A0CE"  # normal (11) and cancer slide; HER2 Equivocal + FISH Positive; Basal
D = "TCGA-E2-A15K"  # metastatic 06 slide (skipped) + lower-case primary slide; all unknown
E = "TCGA-BH-A0B3"  # absent from the MAF: TP53/PIK3CA unknown, ER/PR/HER2 labelled
F = "TCGA-AR-A1AR"  # in the tables, no slide at all
G = "TCGA-OL-A5RW"  # slide, no clinical row; in the MAF with a PIK3CA splice site


@pytest.fixture
def cohort(tmp_path: Path) -> dict[str, Path]:
    slides = tmp_path / "slides"
    touch(slides, f"uuid-1/{A}-01Z-00-DX1.{UUID}.svs")
    touch(slides, f"uuid-2/{A}-01Z-00-DX2.{UUID}.svs")
    touch(slides, f"{B}-01A-01-TS1.{UUID}.svs")
    touch(slides, f"{C}-11A-01-DX1.tif")
    touch(slides, f"{C}-01Z-00-DX1.{UUID}.svs")
    touch(slides, f"{D}-06Z-00-DX1.svs")
    touch(slides, f"{D.lower()}-01z-00-dx1.{UUID.lower()}.svs")
    touch(slides, f"{E}-01Z-00-DX1.ndpi")
    touch(slides, f"{G}-01Z-00-DX1.svs")
    touch(slides, "scan_0001.svs")
    touch(slides, "README.txt")
    touch(slides, ".hidden/TCGA-ZZ-ZZZZ-01Z-00-DX1.svs")

    clinical = write_clinical(
        tmp_path / "data_clinical_patient.txt",
        [
            [A, "BRCA_LumA", "Positive", "Positive", "Negative", "[Not Available]"],
            [B, "BRCA_LumB", "Positive", "Negative", "Positive", ""],
            [C, "BRCA_Basal", "Negative", "Negative", "Equivocal", "Positive"],
            [D, "", "[Not Available]", "[Not Evaluated]", "Equivocal", "[Not Available]"],
            [E, "BRCA_Her2", "Negative", "Indeterminate", "Positive", ""],
            [F, "BRCA_Normal", "Positive", "Positive", "Negative", ""],
        ],
    )
    mutations = write_maf(
        tmp_path / "data_mutations.txt",
        [
            maf_row("TP53", "Silent", f"{A}-01"),
            maf_row("PIK3CA", "Missense_Mutation", f"{A}-01"),
            maf_row("TP53", "Missense_Mutation", f"{C}-01"),
            maf_row("TP53", "3'UTR", f"{C}-01"),
            maf_row("GATA3", "Frame_Shift_Del", f"{F}-01"),
            maf_row("PIK3CA", "Splice_Site", f"{G}-01A-11D-A142-09"),
            maf_row("TP53", "Nonsense_Mutation", f"{E}-06"),  # metastasis: ignored
        ],
    )
    return {"root": tmp_path, "slides": slides, "clinical": clinical, "mutations": mutations}


def _rows(manifest_path: Path) -> dict[str, dict[str, object]]:
    table = Manifest.read(manifest_path).table
    return {
        row["slide_id"]: {key: (None if value is pd.NA else value) for key, value in row.items()}
        for row in table.to_dict("records")
    }


def _labels(row: dict[str, object]) -> tuple[object, ...]:
    return tuple(row[name] for name in ("tp53", "pik3ca", "er", "pr", "her2", "basal"))


# ----------------------------------------------------------------- the whole import


def test_import_maps_barcodes_and_labels(cohort: dict[str, Path]) -> None:
    out = cohort["root"] / "out" / "manifest.csv"
    summary = import_cohort(
        cohort["slides"], clinical=cohort["clinical"], mutations=cohort["mutations"], out=out
    )
    json.dumps(summary)  # JSON-able
    rows = _rows(out)
    assert set(rows) == {
        f"{A}-01Z-00-DX2.{UUID}",
        f"{C}-11A-01-DX1",
        f"{C}-01Z-00-DX1.{UUID}",
        f"{D.lower()}-01z-00-dx1.{UUID.lower()}",
        f"{E}-01Z-00-DX1",
        f"{G}-01Z-00-DX1",
    }
    a = rows[f"{A}-01Z-00-DX2.{UUID}"]
    assert (a["patient_id"], a["kind"], a["site"], a["split"]) == (A, "cancer", "A1", "")
    assert _labels(a) == (0, 1, 1, 1, 0, 0)
    assert a["immune_score"] is None
    assert Path(str(a["slide_path"])).is_absolute()
    assert Path(str(a["slide_path"])) == cohort["slides"] / "uuid-2" / f"{A}-01Z-00-DX2.{UUID}.svs"

    c_cancer = rows[f"{C}-01Z-00-DX1.{UUID}"]
    c_normal = rows[f"{C}-11A-01-DX1"]
    assert _labels(c_cancer) == (1, 0, 0, 0, 1, 1)  # HER2 Equivocal, FISH Positive -> 1
    assert (c_normal["kind"], c_normal["patient_id"]) == ("normal", C)
    assert _labels(c_normal) == (None,) * 6  # normal slides carry no biomarker labels

    d = rows[f"{D.lower()}-01z-00-dx1.{UUID.lower()}"]
    assert (d["patient_id"], d["site"]) == (D, "E2")  # lower-case barcode, stored upper
    assert _labels(d) == (None,) * 6  # not in MAF; [Not Available]; Equivocal w/o FISH

    e = rows[f"{E}-01Z-00-DX1"]
    assert _labels(e) == (None, None, 0, None, 1, 0)  # absent from MAF; PR Indeterminate

    g = rows[f"{G}-01Z-00-DX1"]
    assert _labels(g) == (0, 1, None, None, None, None)  # no clinical row; splice site

    assert summary["manifest"] == str(out)
    assert summary["slides"] == {
        "files": 10,
        "cancer": 5,
        "normal": 1,
        "skipped": 4,
        "other_files": 1,
    }
    assert summary["skipped_by_reason"] == {
        "frozen_section": 1,
        "no_barcode": 1,
        "not_last": 1,
        "sample_type": 1,
    }
    skipped = {item["path"]: item for item in summary["skipped"]}
    assert skipped[f"uuid-1/{A}-01Z-00-DX1.{UUID}.svs"]["reason"] == "not_last"
    assert f"{A}-01Z-00-DX2" in skipped[f"uuid-1/{A}-01Z-00-DX1.{UUID}.svs"]["detail"]
    assert skipped[f"{B}-01A-01-TS1.{UUID}.svs"]["reason"] == "frozen_section"
    assert "06 (metastatic)" in skipped[f"{D}-06Z-00-DX1.svs"]["detail"]
    assert skipped["scan_0001.svs"]["reason"] == "no_barcode"

    assert summary["labels"]["tp53"] == {"positive": 1, "negative": 2, "unknown": 2}
    assert summary["labels"]["pik3ca"] == {"positive": 2, "negative": 1, "unknown": 2}
    assert summary["labels"]["er"] == {"positive": 1, "negative": 2, "unknown": 2}
    assert summary["labels"]["her2"] == {"positive": 2, "negative": 1, "unknown": 2}
    assert summary["labels"]["basal"] == {"positive": 1, "negative": 2, "unknown": 2}
    assert summary["patients"]["with_slides"] == 5
    assert summary["patients"]["without_slide_ids"] == [B, F]
    assert summary["patients"]["with_slide_not_in_clinical"] == 1
    assert summary["patients"]["with_cancer_slide_not_sequenced"] == 2
    assert summary["ignored_rows"] == {"mutations": {"sample type 06 (metastatic)": 1}}
    assert summary["clinical_columns_used"]["her2"] == ["IHC_HER2", "HER2_FISH_STATUS"]


def test_manifest_rows_are_sorted_by_patient_cancer_first(cohort: dict[str, Path]) -> None:
    out = cohort["root"] / "m.csv"
    import_cohort(cohort["slides"], out=out)
    table = Manifest.read(out).table
    assert list(table.columns) == list(MANIFEST_COLUMNS)
    pairs = list(zip(table["patient_id"], table["kind"], strict=True))
    assert pairs == sorted(pairs, key=lambda pair: (pair[0], pair[1] != "cancer"))
    assert pairs.index((C, "cancer")) + 1 == pairs.index((C, "normal"))


def test_without_tables_every_label_is_unknown(cohort: dict[str, Path]) -> None:
    out = cohort["root"] / "m.csv"
    summary = import_cohort(cohort["slides"], out=out)
    assert all(counts["unknown"] == 5 for counts in summary["labels"].values())
    assert summary["patients"]["without_slide_ids"] == []
    assert summary["patients"]["with_slide_not_in_clinical"] is None


def test_include_frozen_uses_a_frozen_only_patient(cohort: dict[str, Path]) -> None:
    out = cohort["root"] / "m.csv"
    summary = import_cohort(
        cohort["slides"], clinical=cohort["clinical"], out=out, include_frozen=True
    )
    rows = _rows(out)
    b = rows[f"{B}-01A-01-TS1.{UUID}"]
    assert (b["kind"], b["er"], b["pr"], b["her2"], b["basal"]) == ("cancer", 1, 0, 1, 0)
    assert "frozen_section" not in summary["skipped_by_reason"]


def test_slide_paths_are_relative_when_the_manifest_sits_above_them(
    cohort: dict[str, Path],
) -> None:
    out = cohort["root"] / "manifest.csv"
    import_cohort(cohort["slides"], out=out)
    manifest = Manifest.read(out)
    paths = list(manifest.table["slide_path"])
    assert f"slides/uuid-2/{A}-01Z-00-DX2.{UUID}.svs" in paths
    assert all(manifest.slide_file(path).is_file() for path in paths)


def test_default_out_is_manifest_csv_in_the_current_directory(
    cohort: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(cohort["root"])
    summary = import_cohort(cohort["slides"])
    assert summary["manifest"] == str(cohort["root"] / "manifest.csv")
    assert (cohort["root"] / "manifest.csv").is_file()


def test_an_existing_manifest_is_kept_unless_overwrite(cohort: dict[str, Path]) -> None:
    out = cohort["root"] / "manifest.csv"
    out.write_text("precious\n", encoding="utf-8")
    with pytest.raises(AlreadyExists, match="exists already"):
        import_cohort(cohort["slides"], out=out)
    assert out.read_text(encoding="utf-8") == "precious\n"
    import_cohort(cohort["slides"], out=out, overwrite=True)
    assert len(Manifest.read(out).table) == 6


def test_sequenced_list_turns_unmutated_unlisted_patients_to_zero(
    cohort: dict[str, Path],
) -> None:
    listing = cohort["root"] / "cases_sequenced.txt"
    listing.write_text(
        "cancer_study_identifier: brca_tcga_pan_can_atlas_2018\n"
        "stable_id: brca_tcga_pan_can_atlas_2018_sequenced\n"
        "case_list_name: Samples with mutation data\n"
        f"case_list_ids: {A}-01\t{E}-01\t{D}-06\n",
        encoding="utf-8",
    )
    out = cohort["root"] / "m.csv"
    import_cohort(cohort["slides"], mutations=cohort["mutations"], sequenced=listing, out=out)
    rows = _rows(out)
    assert _labels(rows[f"{E}-01Z-00-DX1"])[:2] == (0, 0)  # listed, no mutation rows
    assert _labels(rows[f"{D.lower()}-01z-00-dx1.{UUID.lower()}"])[:2] == (None, None)


def test_sequenced_without_mutations_is_refused(cohort: dict[str, Path]) -> None:
    listing = cohort["root"] / "list.txt"
    listing.write_text(f"{A}-01\n", encoding="utf-8")
    with pytest.raises(InvalidInput, match="needs a mutation table"):
        import_cohort(cohort["slides"], sequenced=listing, out=cohort["root"] / "m.csv")


def test_immune_scores_fill_cancer_rows(cohort: dict[str, Path]) -> None:
    immune = cohort["root"] / "immune.csv"
    immune.write_text(
        f"ID,Stromal score,Immune score\n{A}-01,1.5,812.25\n{C}-01,0.1,-40\n{C}-11,0,99\n",
        encoding="utf-8",
    )
    out = cohort["root"] / "m.csv"
    import_cohort(cohort["slides"], immune=immune, out=out)
    rows = _rows(out)
    assert rows[f"{A}-01Z-00-DX2.{UUID}"]["immune_score"] == 812.25
    assert rows[f"{C}-01Z-00-DX1.{UUID}"]["immune_score"] == -40.0
    assert rows[f"{C}-11A-01-DX1"]["immune_score"] is None
    assert rows[f"{E}-01Z-00-DX1"]["immune_score"] is None


def test_two_clinical_tables_are_merged(cohort: dict[str, Path]) -> None:
    subtypes = cohort["root"] / "subtypes.tsv"
    subtypes.write_text(f"PATIENT_ID\tSUBTYPE\n{G}\tBRCA_Basal\n{A}\tBRCA_LumA\n")
    out = cohort["root"] / "m.csv"
    import_cohort(cohort["slides"], clinical=[cohort["clinical"], subtypes], out=out)
    assert _rows(out)[f"{G}-01Z-00-DX1"]["basal"] == 1


def test_import_errors_name_the_bad_table(cohort: dict[str, Path]) -> None:
    bad = cohort["root"] / "bad_clinical.txt"
    bad.write_text("PATIENT_ID\tER_STATUS_BY_IHC\nnot-a-barcode\tPositive\n")
    out = cohort["root"] / "m.csv"
    # Non-TCGA ids are skipped; a table with nothing else left is an error naming it.
    with pytest.raises(InvalidInput, match=r"bad_clinical.txt: no row of the clinical table"):
        import_cohort(cohort["slides"], clinical=bad, out=out)
    assert not out.exists()


# ----------------------------------------------------------------- slides


def test_select_slides_picks_the_last_by_section_vial_then_name(tmp_path: Path) -> None:
    paths = [
        tmp_path / "TCGA-A1-A0SB-01Z-00-DX3.svs",
        tmp_path / "TCGA-A1-A0SB-01Z-00-DX12.svs",  # 12 > 3 as numbers
        tmp_path / "TCGA-A2-A0CM-01A-00-DX1.svs",
        tmp_path / "TCGA-A2-A0CM-01B-00-DX1.svs",  # vial B after A
        tmp_path / "TCGA-A7-A0CE-01Z-00-DX1.aaa.svs",
        tmp_path / "TCGA-A7-A0CE-01Z-00-DX1.BBB.svs",  # same barcode: name decides
    ]
    selection = select_slides(paths)
    assert [slide.path.name for slide in selection.chosen] == [
        "TCGA-A1-A0SB-01Z-00-DX12.svs",
        "TCGA-A2-A0CM-01B-00-DX1.svs",
        "TCGA-A7-A0CE-01Z-00-DX1.BBB.svs",
    ]
    assert {item.reason for item in selection.skipped} == {"not_last"}
    assert len(selection.skipped) == 3


def test_select_slides_prefers_diagnostic_over_frozen_when_frozen_included(
    tmp_path: Path,
) -> None:
    paths = [tmp_path / "TCGA-A1-A0SB-01A-01-TS9.svs", tmp_path / "TCGA-A1-A0SB-01Z-00-DX1.svs"]
    chosen = select_slides(paths, include_frozen=True).chosen
    assert [slide.barcode.section for slide in chosen] == ["DX"]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("TCGA-A1-A0SB-01Z-00-DX1.svs", None),
        ("TCGA-A1-A0SB-11A-01-BS1.svs", "frozen_section"),
        ("TCGA-A1-A0SB-01A-11D-A142-09.svs", "not_a_slide_barcode"),
        ("TCGA-A1-A0SB.svs", "not_a_slide_barcode"),
        ("TCGA-A1-A0SB-10A-01-DX1.svs", "sample_type"),
        ("TCGA-A1-A0SB-01Z-00-QQ1.svs", "unknown_section"),
        ("slide.svs", "no_barcode"),
    ],
)
def test_select_slides_gives_a_reason_for_each_skip(
    tmp_path: Path, name: str, reason: str | None
) -> None:
    selection = select_slides([tmp_path / name])
    assert [item.reason for item in selection.skipped] == ([reason] if reason else [])
    assert len(selection.chosen) == (0 if reason else 1)


def test_find_slide_files_groups_dicom_series(tmp_path: Path) -> None:
    series = "TCGA-A1-A0SB-01Z-00-DX1"
    for level in range(3):
        touch(tmp_path, f"{series}/level-{level}.dcm")
    touch(tmp_path, "flat/TCGA-A2-A0CM-01Z-00-DX1.dcm")
    touch(tmp_path, "flat/TCGA-A7-A0CE-01Z-00-DX1.dcm")
    touch(tmp_path, "x.mrxs")
    touch(tmp_path, "x/Slidedat.ini")
    touch(tmp_path, "x/Data0000.dat")
    touch(tmp_path, "UPPER.SVS")
    scan = find_slide_files(tmp_path)
    names = [path.relative_to(tmp_path).as_posix() for path in scan.slides]
    assert names == [
        "TCGA-A1-A0SB-01Z-00-DX1/level-0.dcm",
        "UPPER.SVS",
        "flat/TCGA-A2-A0CM-01Z-00-DX1.dcm",
        "flat/TCGA-A7-A0CE-01Z-00-DX1.dcm",
        "x.mrxs",
    ]
    assert scan.other_files == 4  # two more DICOM levels, the .ini and the .dat
    chosen = select_slides(scan.slides).chosen
    assert [slide.slide_id for slide in chosen] == [
        series,
        "TCGA-A2-A0CM-01Z-00-DX1",
        "TCGA-A7-A0CE-01Z-00-DX1",
    ]


def test_a_folder_without_slides_is_an_error(tmp_path: Path) -> None:
    touch(tmp_path, "notes.txt")
    with pytest.raises(InvalidInput, match="no slide files under"):
        build_manifest(tmp_path, None, None)


def test_a_folder_with_only_unusable_slides_is_an_error(tmp_path: Path) -> None:
    touch(tmp_path, "a.svs")
    touch(tmp_path, "TCGA-A1-A0SB-06Z-00-DX1.svs")
    with pytest.raises(
        InvalidInput, match=r"none of the 2 slide files .*\(1 no_barcode, 1 sample_type\)"
    ):
        build_manifest(tmp_path, None, None)


def test_a_missing_or_file_slides_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        build_manifest(tmp_path / "absent", None, None)
    with pytest.raises(InvalidInput, match="not a folder"):
        build_manifest(touch(tmp_path, "file.svs"), None, None)


# ----------------------------------------------------------------- clinical tables


def test_clinical_cbioportal_format(tmp_path: Path) -> None:
    path = write_clinical(
        tmp_path / "c.txt",
        [
            [A, "BRCA_Basal", "Positive", "negative", " POSITIVE ", ""],
            [B, "NA", "[Not Evaluated]", "[Not Available]", "Equivocal", "Negative"],
            [C, "brca_lumb", "", "Indeterminate", "Equivocal", "Equivocal"],
        ],
    )
    table = read_clinical(path)
    values = {
        patient: {label: found.value for label, found in labels.items()}
        for patient, labels in table.patients.items()
    }
    assert values == {
        A: {"basal": 1, "er": 1, "pr": 0, "her2": 1},
        B: {"her2": 0},  # Equivocal IHC settled by FISH Negative; PAM50 NA unknown
        C: {"basal": 0},
    }
    assert table.unrecognised_values == {}


def test_clinical_plain_csv_with_alternative_columns(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text(
        "bcr_patient_barcode,ER Status,PR-Status,HER2_STATUS,pam50\n"
        f"{A.lower()},Positive,Positive,Negative,Basal-like\n"
        f'{B},Negative,"Negative",Positive,"Normal-like"\n',
        encoding="utf-8",
    )
    table = read_clinical(path)
    assert {label: found.value for label, found in table.patients[A].items()} == {
        "er": 1,
        "pr": 1,
        "her2": 0,
        "basal": 1,
    }
    assert table.patients[B]["basal"].value == 0
    assert table.columns_used == {
        "er": ("ER Status",),
        "pr": ("PR-Status",),
        "her2": ("HER2_STATUS",),
        "basal": ("pam50",),
    }


def test_clinical_prefers_the_ihc_column_and_falls_back(tmp_path: Path) -> None:
    path = tmp_path / "c.tsv"
    path.write_text(
        "PATIENT_ID\tER_STATUS_BY_IHC\tER_STATUS\n"
        f"{A}\tPositive\tNegative\n"
        f"{B}\t[Not Available]\tNegative\n",
        encoding="utf-8",
    )
    table = read_clinical(path)
    assert table.patients[A]["er"].value == 1
    assert table.patients[B]["er"].value == 0


def test_unrecognised_values_are_unknown_and_reported(tmp_path: Path) -> None:
    path = write_clinical(
        tmp_path / "c.txt",
        [[A, "BRCA_Weird", "Pos", "Positive", "3+", ""], [B, "BRCA_Weird", "", "", "", ""]],
    )
    # Every row of SUBTYPE is unknown to the vocabulary: refused unless allowed.
    with pytest.raises(InvalidInput) as info:
        read_clinical(path)
    assert "column SUBTYPE: 2 of 2 rows hold 'BRCA_Weird' (2)" in str(info.value)
    assert "column ER_STATUS_BY_IHC: 1 of 2 rows hold 'Pos' (1)" in str(info.value)
    table = read_clinical(path, allow_unknown_values=True)
    assert set(table.patients[A]) == {"pr"}
    assert table.unrecognised_values == {
        "SUBTYPE": {"BRCA_Weird": 2},
        "ER_STATUS_BY_IHC": {"Pos": 1},
        "IHC_HER2": {"3+": 1},
    }


def test_sample_table_ignores_non_primary_samples(tmp_path: Path) -> None:
    path = tmp_path / "data_clinical_sample.txt"
    path.write_text(
        "#Patient\tSample\tER\n#x\tx\tx\n#STRING\tSTRING\tSTRING\n#1\t1\t1\n"
        "PATIENT_ID\tSAMPLE_ID\tER_STATUS_BY_IHC\n"
        f"{A}\t{A}-01\tPositive\n"
        f"{A}\t{A}-06\tNegative\n"
        f"\t{B}-01\tNegative\n",
        encoding="utf-8",
    )
    table = read_clinical(path)
    assert table.patients[A]["er"].value == 1
    assert table.patients[B]["er"].value == 0
    assert table.ignored_rows == {"sample type 06 (metastatic)": 1}


def test_duplicate_patient_rows_merge_when_they_agree(tmp_path: Path) -> None:
    path = write_clinical(
        tmp_path / "c.txt",
        [[A, "BRCA_LumA", "Positive", "", "", ""], [A, "", "Positive", "Negative", "", ""]],
    )
    labels = read_clinical(path).patients[A]
    assert {label: found.value for label, found in labels.items()} == {
        "basal": 0,
        "er": 1,
        "pr": 0,
    }


def test_duplicate_patient_rows_that_conflict_are_an_error(tmp_path: Path) -> None:
    path = write_clinical(
        tmp_path / "c.txt",
        [[A, "BRCA_LumA", "Positive", "", "", ""], [A, "BRCA_LumA", "Negative", "", "", ""]],
    )
    with pytest.raises(InvalidInput) as info:
        read_clinical(path)
    assert str(info.value) == (
        f"conflicting er for patient {A}: {path} line 6 says 'Positive', "
        f"{path} line 7 says 'Negative'"
    )


def test_patient_and_sample_ids_that_disagree_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.tsv"
    path.write_text(f"PATIENT_ID\tSAMPLE_ID\tSUBTYPE\n{A}\t{B}-01\tBRCA_LumA\n")
    with pytest.raises(InvalidInput, match=f"line 2: patient {A} does not match sample {B}-01"):
        read_clinical(path)


def test_merge_clinical_fills_gaps_and_refuses_conflicts(tmp_path: Path) -> None:
    first = tmp_path / "a.tsv"
    first.write_text(f"PATIENT_ID\tSUBTYPE\n{A}\tBRCA_Basal\n{B}\tBRCA_LumA\n")
    second = tmp_path / "b.tsv"
    second.write_text(f"PATIENT_ID\tER_STATUS\tSUBTYPE\n{A}\tNegative\tBRCA_Basal\n")
    merged = merge_clinical([read_clinical(first), read_clinical(second)])
    assert {label: found.value for label, found in merged.patients[A].items()} == {
        "basal": 1,
        "er": 0,
    }
    assert merged.columns_used["basal"] == ("SUBTYPE", "SUBTYPE")
    third = tmp_path / "c.tsv"
    third.write_text(f"PATIENT_ID\tSUBTYPE\n{B}\tBRCA_Basal\n")
    with pytest.raises(InvalidInput, match=rf"{first} line 3 says 'BRCA_LumA', {third} line 2"):
        merge_clinical([read_clinical(first), read_clinical(third)])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty clinical table: no header row"),
        ("#only\n#comments\n\n", "empty clinical table: no header row"),
        ("PATIENT_ID\tSUBTYPE\n", "the clinical table has a header but no data rows"),
        ("PATIENT_ID SUBTYPE\nTCGA-A1-A0SB BRCA_LumA\n", "line 1: the clinical table is not tab"),
        ("PATIENT_ID|SUBTYPE\nTCGA-A1-A0SB|BRCA_LumA\n", "is not tab-, comma- or semicolon-"),
        ("NAME\tSUBTYPE\nx\tBRCA_LumA\n", "no patient or sample id column"),
        (f"PATIENT_ID\tSUBTYPE\tSUBTYPE\n{A}\tx\ty\n", "column 'SUBTYPE' appears twice"),
        (f"PATIENT_ID\tSUBTYPE\n{A}\tBRCA_LumA\textra\n", "line 2: 3 fields, the header has 2"),
        ("PATIENT_ID\tSUBTYPE\n\tBRCA_LumA\n", "1 no patient or sample id (e.g. line 2)"),
        ("PATIENT_ID\tSUBTYPE\nMB-0001\tLumA\n", "1 PATIENT_ID not a TCGA barcode (e.g. MB-0001)"),
    ],
)
def test_malformed_clinical_tables_give_readable_errors(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "clinical.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InvalidInput) as info:
        read_clinical(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_trailing_empty_fields_and_short_rows_are_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "c.tsv"
    path.write_text(f"PATIENT_ID\tER_STATUS\tPR_STATUS\n{A}\tPositive\t\t\n{B}\tNegative\n")
    table = read_clinical(path)
    assert table.patients[A]["er"].value == 1
    assert "pr" not in table.patients[B]


def test_unreadable_tables(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"clinical table .* does not exist"):
        read_clinical(tmp_path / "absent.txt")
    with pytest.raises(InvalidInput, match="is a folder, not a table"):
        read_clinical(tmp_path)
    binary = tmp_path / "slide.svs"
    binary.write_bytes(b"II*\x00\xff\xfe\xfa" * 10)
    with pytest.raises(InvalidInput, match="not UTF-8 text; is this really a clinical table"):
        read_clinical(binary)
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"PATIENT_ID\tSUBTYPE\nTCGA\x00\tx\n")
    with pytest.raises(InvalidInput, match="line 2: binary data"):
        read_clinical(nul)


def test_a_file_that_cannot_be_opened_is_invalid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_clinical(tmp_path / "c.txt", [[A, "BRCA_LumA", "", "", "", ""]])

    def refuse(_path: Path) -> None:
        raise PermissionError(13, "Permission denied", str(_path))

    monkeypatch.setattr(tcga, "_open_text", refuse)
    with pytest.raises(InvalidInput, match=r"c.txt: cannot read: Permission denied"):
        read_clinical(path)


# ----------------------------------------------------------------- mutations


def test_mutation_labels_follow_the_non_silent_rule(tmp_path: Path) -> None:
    rows = [
        maf_row("TP53", "Silent", f"{A}-01"),
        maf_row("TP53", "Intron", f"{A}-01"),
        maf_row("PIK3CA", "Missense_Mutation", f"{A}-01"),
        maf_row("TP53", "Splice_Region", f"{B}-01"),
        maf_row("tp53", "nonsense_mutation", f"{C.lower()}-01a-11d-a142-09"),
        maf_row("PIK3CA", "5'Flank", f"{C}-01"),
        maf_row("CDH1", "Frame_Shift_Ins", f"{D}-01"),
        maf_row("PIK3CA", "Missense_Mutation", f"{E}-06"),
    ]
    table = read_mutations(write_maf(tmp_path / "m.txt", rows))
    assert table.rows == 8
    assert table.sequenced == {A, B, C, D}
    assert table.mutated == {"tp53": {B, C}, "pik3ca": {A}}
    assert [table.label("tp53", patient) for patient in (A, B, C, D, E)] == [0, 1, 1, 0, None]
    assert table.label("tp53", E, sequenced={E}) == 0
    assert table.ignored_rows == {"sample type 06 (metastatic)": 1}


def test_a_gzip_maf_is_read(tmp_path: Path) -> None:
    plain = write_maf(tmp_path / "m.txt", [maf_row("TP53", "Missense_Mutation", f"{A}-01")])
    packed = tmp_path / "data_mutations.txt.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert read_mutations(packed).mutated["tp53"] == {A}


@pytest.mark.parametrize(
    ("columns", "row", "message"),
    [
        (
            ("Hugo_Symbol", "Variant_Classification"),
            ("TP53", "Silent"),
            "missing MAF column(s) Tumor_Sample_Barcode; found: Hugo_Symbol, Variant_Class",
        ),
        (("Gene",), ("TP53",), "is not tab-, comma- or semicolon-separated"),
        (MAF_COLUMNS, maf_row("TP53", "", f"{A}-01"), "line 3: empty Variant_Classification"),
        (MAF_COLUMNS, maf_row("TP53", "Silent", ""), "1 empty Tumor_Sample_Barcode (e.g. line 3)"),
        (
            MAF_COLUMNS,
            maf_row("TP53", "Silent", "sample-1"),
            "no row of the mutation table (MAF) can be used: 1 not a TCGA barcode (e.g. sample-1)",
        ),
        (
            MAF_COLUMNS,
            maf_row("TP53", "Silent", f"{A}-11A-01D-A142-09"),
            "1 sample type 11 (solid tissue normal) (e.g. TCGA-",
        ),
    ],
)
def test_malformed_mafs_give_readable_errors(
    tmp_path: Path, columns: Sequence[str], row: Sequence[str], message: str
) -> None:
    path = tmp_path / "data_mutations.txt"
    path.write_text(f"#version 2.4\n{chr(9).join(columns)}\n{chr(9).join(row)}\n")
    with pytest.raises(InvalidInput) as info:
        read_mutations(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


# ----------------------------------------------------------------- sequenced, immune


def test_read_sequenced_formats(tmp_path: Path) -> None:
    panel = tmp_path / "data_gene_panel_matrix.txt"
    panel.write_text(
        f"SAMPLE_ID\tmutations\tgistic\n{A}-01\tWES\tNA\n{B}-01\tNA\tNA\n{C}-06\tWES\tNA\n"
    )
    assert read_sequenced(panel) == {A}
    plain = tmp_path / "list.txt"
    plain.write_text(f"{A}-01\n\n{B.lower()}\n")
    assert read_sequenced(plain) == {A, B}
    with_header = tmp_path / "list.csv"
    with_header.write_text(f"Tumor_Sample_Barcode\n{C}-01A-11D-A142-09\n")
    assert read_sequenced(with_header) == {C}


def test_read_sequenced_errors(tmp_path: Path) -> None:
    bad = tmp_path / "list.txt"
    bad.write_text(f"{A}-01\nnonsense\n")
    with pytest.raises(InvalidInput, match=r"list.txt line 2: 'nonsense' is not a TCGA"):
        read_sequenced(bad)
    no_column = tmp_path / "table.txt"
    no_column.write_text("GENE\tPANEL\nTP53\tWES\n")
    with pytest.raises(InvalidInput, match="no sample id column"):
        read_sequenced(no_column)
    normals = tmp_path / "normals.txt"
    normals.write_text(f"{A}-11\n")
    with pytest.raises(InvalidInput, match="no primary-tumour"):
        read_sequenced(normals)


def test_read_immune(tmp_path: Path) -> None:
    path = tmp_path / "immune.tsv"
    path.write_text(f"PATIENT_ID\tIMMUNE_SCORE\n{A}\t1.5\n{B}\tNA\n{A}\t1.5\n")
    assert read_immune(path) == {A: 1.5}
    two_columns = tmp_path / "two.csv"
    two_columns.write_text(f"sample_id,estimate\n{C}-01,3\n")
    assert read_immune(two_columns) == {C: 3.0}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"PATIENT_ID,IMMUNE_SCORE\n{A},high\n", "line 2: immune score 'high' is not a finite"),
        (f"PATIENT_ID,IMMUNE_SCORE\n{A},1\n{A},2\n", "conflicting immune scores"),
        (f"PATIENT_ID,a,b\n{A},1,2\n", "no immune score column"),
        ("NAME,IMMUNE_SCORE\nx,1\n", "no patient or sample id column"),
    ],
)
def test_read_immune_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "immune.csv"
    path.write_text(text)
    with pytest.raises(InvalidInput, match=message):
        read_immune(path)
