"""`histomarker cohort import` from the command line, on fixture tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from test_tcga_import import maf_row, touch, write_clinical, write_maf

from services.cli import main


def test_import_prints_a_summary_and_writes_the_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    slides = tmp_path / "slides"
    touch(slides, "a/TCGA-A1-A0SB-01Z-00-DX1.svs")
    touch(slides, "b/TCGA-A1-A0SB-11A-00-DX1.svs")
    touch(slides, "c/TCGA-BH-A0B3-01Z-00-DX1.svs")
    clinical = write_clinical(
        tmp_path / "data_clinical_patient.txt",
        [
            ["TCGA-A1-A0SB", "BRCA_Basal", "Negative", "Negative", "Negative", ""],
            ["TCGA-BH-A0B3", "BRCA_LumA", "Positive", "Positive", "Equivocal", "Positive"],
        ],
    )
    maf = write_maf(
        tmp_path / "data_mutations.txt",
        [
            maf_row("TP53", "Missense_Mutation", "TCGA-A1-A0SB-01"),
            maf_row("PIK3CA", "Silent", "TCGA-BH-A0B3-01"),
        ],
    )
    out = tmp_path / "manifest.csv"
    monkeypatch.chdir(tmp_path)
    argv = ["cohort", "import", str(slides), "--clinical", str(clinical)]
    argv += ["--mutations", str(maf), "--out", str(out), "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert isinstance(summary, dict) and out.is_file()
    with out.open() as handle:
        rows = {row["slide_id"]: row for row in csv.DictReader(handle)}
    basal = rows["TCGA-A1-A0SB-01Z-00-DX1"]
    assert (basal["kind"], basal["tp53"], basal["basal"], basal["er"]) == ("cancer", "1", "1", "0")
    luminal = rows["TCGA-BH-A0B3-01Z-00-DX1"]
    assert (luminal["tp53"], luminal["pik3ca"], luminal["her2"]) == ("0", "0", "1")
    assert rows["TCGA-A1-A0SB-11A-00-DX1"]["kind"] == "normal"
    # A second run refuses to overwrite, in one line, exit 2.
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "histomarker cohort" in err[0]
