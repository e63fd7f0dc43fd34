"""The layouts TCGA-BRCA tables come in, and the vocabularies in them: what a user
downloads must import with the documented labels, or say loudly why it cannot."""

from __future__ import annotations

from pathlib import Path

import pytest

from services import cli
from services.cohort.importer import import_cohort
from services.cohort.tcga import read_clinical, read_mutations, subtype_key
from services.common.errors import InvalidInput

A, B, C, D = "TCGA-A1-A0SB", "TCGA-A2-A0CM", "TCGA-A7-A0CE", "TCGA-BH-A0B3"


def _slides(folder: Path, *patients: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for patient in patients:
        (folder / f"{patient}-01Z-00-DX1.svs").touch()
    return folder


@pytest.mark.parametrize(
    ("value", "basal"),
    [
        # TCGA PanCancer Atlas
        ("BRCA_Basal", 1),
        ("BRCA_LumA", 0),
        ("BRCA_LumB", 0),
        ("BRCA_Her2", 0),
        ("BRCA_Normal", 0),
        # Nature 2012 paper / UCSC Xena long forms
        ("Basal-like", 1),
        ("Luminal A", 0),
        ("Luminal B", 0),
        ("HER2-enriched", 0),
        ("Her2 enriched", 0),
        ("Normal-like", 0),
        ("Normal breast-like", 0),
        ("Claudin low", 0),
        ("claudin-low", 0),
        # PAM50Call_RNAseq
        ("Basal", 1),
        ("LumA", 0),
        ("LumB", 0),
        ("Her2", 0),
        ("Normal", 0),
        # case and separators
        ("BASAL_LIKE", 1),
        ("basal like", 1),
        ("brca.luma", 0),
        (" luminal_a ", 0),
    ],
)
def test_every_pam50_spelling_maps_to_basal_or_not(tmp_path: Path, value: str, basal: int) -> None:
    path = tmp_path / "subtypes.tsv"
    path.write_text(f"PATIENT_ID\tPAM50Call_RNAseq\n{A}\t{value}\n{B}\tNA\n")
    table = read_clinical(path)
    assert table.patients[A]["basal"].value == basal
    assert "basal" not in table.patients[B] and table.unrecognised_values == {}


def test_xena_spellings_do_not_make_every_known_subtype_basal(tmp_path: Path) -> None:
    names = ["Luminal A", "Luminal B", "Her2 enriched", "Claudin low", "Basal-like"]
    patients = [f"TCGA-A1-A{i:03d}" for i in range(len(names))]
    path = tmp_path / "xena.tsv"
    rows = [f"{p}-01\t{n}" for p, n in zip(patients, names, strict=True)]
    # UCSC Xena's clinical matrix: its ``sampleID`` column and its receptor columns.
    receptors = ["Positive", "Negative", "Positive", "Indeterminate", "Negative"]
    path.write_text(
        "sampleID\tPAM50_mRNA_nature2012\tbreast_carcinoma_estrogen_receptor_status\n"
        + "\n".join(f"{r}\t{e}" for r, e in zip(rows, receptors, strict=True))
        + "\n"
    )
    table = read_clinical(path)
    values = [table.patients[p]["basal"].value for p in patients]
    assert values == [0, 0, 0, 0, 1]
    assert [table.patients[p].get("er") is not None for p in patients] == [1, 1, 1, 0, 1]


def test_subtype_key_drops_prefix_case_and_separators() -> None:
    assert subtype_key(" BRCA_Basal-like ") == "basallike"
    assert subtype_key("HER2-enriched") == "her2enriched"


def test_a_table_without_label_columns_gives_ids_and_merges(tmp_path: Path) -> None:
    slides = _slides(tmp_path / "slides", A, B)
    patient = tmp_path / "data_clinical_patient.txt"
    patient.write_text(f"#x\n#x\n#x\n#1\nPATIENT_ID\tSUBTYPE\n{A}\tBRCA_Basal\n{B}\tBRCA_LumA\n")
    sample = tmp_path / "data_clinical_sample.txt"
    sample.write_text(
        f"#x\n#x\n#x\n#1\nPATIENT_ID\tSAMPLE_ID\tGRADE\n{A}\t{A}-01\t3\n{B}\t{B}-01\t2\n"
    )
    summary = import_cohort(slides, clinical=[patient, sample], out=tmp_path / "m.csv")
    assert summary["labels"]["basal"] == {"positive": 1, "negative": 1, "unknown": 0}
    ids_only = next(r for r in summary["inputs"] if r["path"].endswith("sample.txt"))
    assert ids_only["labels"] == [] and ids_only["patients"] == 2
    assert any("data_clinical_sample.txt: no label column" in w for w in summary["warnings"])
    # No input supplies receptors or mutations: said, with where to get them.
    assert summary["labels_not_supplied"] == ["tp53", "pik3ca", "er", "pr", "her2"]
    assert any("no ER, PR or HER2" in w for w in summary["warnings"])


def test_gdc_biotab_header_rows_and_its_short_patient_id_column(tmp_path: Path) -> None:
    path = tmp_path / "nationwidechildrens.org_clinical_patient_brca.txt"
    header = (
        "bcr_patient_uuid\tbcr_patient_barcode\tpatient_id\ter_status_by_ihc\ther2_status_by_ihc"
    )
    cde = "\t".join(
        [
            "bcr_patient_uuid",
            "bcr_patient_barcode",
            "patient_id",
            "breast_carcinoma_estrogen_receptor_status",
            "lab_proc_her2_neu_immunohistochemistry_receptor_status",
        ]
    )
    ids = "CDE_ID:\tCDE_ID:2673794\tCDE_ID:\tCDE_ID:2957359\tCDE_ID:2957563"
    rows = [
        f"6E7D5EC6\t{A}\tA0SB\tPositive\tNegative",
        f"55262FCB\t{B}\tA0CM\tNegative\tPositive",
    ]
    path.write_text("\n".join([header, cde, ids, *rows]) + "\n")
    table = read_clinical(path)
    assert set(table.patients) == {A, B}  # bcr_patient_barcode, not the 4-character codes
    assert table.patients[A]["er"].value == 1 and table.patients[B]["her2"].value == 1
    assert table.inputs[0].rows == 2


def test_a_semicolon_table_is_read(tmp_path: Path) -> None:
    path = tmp_path / "receptors.csv"
    path.write_text(f"PATIENT_ID;ER_STATUS;PR_STATUS\n{A};Positive;Negative\n")
    table = read_clinical(path)
    assert table.patients[A]["er"].value == 1 and table.patients[A]["pr"].value == 0


@pytest.mark.parametrize(
    ("ihc", "fish", "default", "strict"),
    [
        ("Equivocal", "Positive", 1, 1),
        ("[Not Available]", "Positive", 1, None),
        ("Indeterminate", "Negative", 0, None),
        ("", "Negative", 0, None),
        ("Negative", "Positive", 0, 0),  # IHC's call stands
        ("Equivocal", "[Not Available]", None, None),
    ],
)
def test_fish_decides_her2_without_an_ihc_call(
    tmp_path: Path, ihc: str, fish: str, default: int | None, strict: int | None
) -> None:
    path = tmp_path / "her2.tsv"
    path.write_text(f"PATIENT_ID\tIHC_HER2\tHER2_FISH_STATUS\n{A}\t{ihc}\t{fish}\n")

    def her2(table: object) -> int | None:
        found = table.patients[A].get("her2")  # type: ignore[attr-defined]
        return None if found is None else found.value

    assert her2(read_clinical(path)) == default
    assert her2(read_clinical(path, strict_her2=True)) == strict


def test_a_maf_with_patient_barcodes_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "maftools.maf"
    path.write_text(
        "Hugo_Symbol\tVariant_Classification\tTumor_Sample_Barcode\n"
        f"TP53\tMissense_Mutation\t{A}\n"
        f"GATA3\tSilent\t{B}\n"
        f"PIK3CA\tMissense_Mutation\t{C}-01A-11D-A142-09\n"
    )
    table = read_mutations(path)
    assert table.sequenced == {A, B, C}
    assert table.mutated["tp53"] == {A} and table.mutated["pik3ca"] == {C}
    assert table.report is not None and "2 rows name a patient" in table.report.notes[0]


def test_non_tcga_rows_are_skipped_with_a_count(tmp_path: Path) -> None:
    slides = _slides(tmp_path / "slides", A, B)
    path = tmp_path / "clinical.tsv"
    path.write_text(f"PATIENT_ID\tER_STATUS\n{A}\tPositive\nTEST-ROW\tNegative\n{B}\tNegative\n")
    summary = import_cohort(slides, clinical=path, out=tmp_path / "m.csv")
    assert summary["labels"]["er"] == {"positive": 1, "negative": 1, "unknown": 0}
    assert summary["inputs"][0]["ignored_rows"] == {"PATIENT_ID not a TCGA barcode": 1}
    assert any("1 rows skipped" in w and "TEST-ROW" in w for w in summary["warnings"])


def test_a_whole_maf_ignored_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "normals.maf"
    path.write_text(
        "Hugo_Symbol\tVariant_Classification\tTumor_Sample_Barcode\n"
        f"TP53\tMissense_Mutation\t{A}-11A-11D-A142-09\n"
        f"TP53\tMissense_Mutation\t{B}-06A-11D-A142-09\n"
    )
    with pytest.raises(InvalidInput, match=r"no row of the mutation table .* can be used"):
        read_mutations(path)


def test_labels_unknown_for_most_slides_are_named(tmp_path: Path) -> None:
    slides = _slides(tmp_path / "slides", A, B, C, D)
    maf = tmp_path / "m.maf"
    maf.write_text(
        f"Hugo_Symbol\tVariant_Classification\tTumor_Sample_Barcode\nTP53\tSilent\t{A}\n"
    )
    summary = import_cohort(slides, mutations=maf, out=tmp_path / "m.csv")
    assert summary["labels_mostly_unknown"] == {"tp53": 0.75, "pik3ca": 0.75}
    assert any(w.startswith("tp53 is unknown for 3 of 4") for w in summary["warnings"])


def test_the_readable_summary_is_short(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    patients = [f"TCGA-A1-A{i:03d}" for i in range(400)]
    slides = _slides(tmp_path / "slides", *patients[:5])
    path = tmp_path / "clinical.tsv"
    path.write_text("PATIENT_ID\tER_STATUS\n" + "".join(f"{p}\tPositive\n" for p in patients))
    argv = ["cohort", "import", str(slides), "--clinical", str(path), "--out"]
    assert cli.main([*argv, str(tmp_path / "m.csv")]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) < 400
    assert "patients: 5 with slides, 395 named by a table without a slide" in out
    assert cli.main([*argv, str(tmp_path / "m2.csv"), "--json"]) == 0
    assert "TCGA-A1-A399" in capsys.readouterr().out  # every id is in --json


def test_a_clinical_table_of_other_samples_only_is_a_warning(tmp_path: Path) -> None:
    slides = _slides(tmp_path / "slides", A)
    receptors = tmp_path / "receptors.tsv"
    receptors.write_text(f"PATIENT_ID\tER_STATUS\n{A}\tPositive\n")
    metastases = tmp_path / "metastases.tsv"
    metastases.write_text(f"SAMPLE_ID\tPR_STATUS\n{A}-06\tNegative\n")
    summary = import_cohort(slides, clinical=[receptors, metastases], out=tmp_path / "m.csv")
    assert summary["labels"]["er"]["positive"] == 1 and summary["labels"]["pr"]["unknown"] == 1
    assert "metastases.tsv: every row was left out" in summary["warnings"]
