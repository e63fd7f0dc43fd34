"""``cohort import`` on the real TCGA-BRCA tables of ``../shared/realdata/tcga``: each
layout alone and merged, over one placeholder slide file per patient (the import reads
names only). Prints a markdown table of the positive share of each label (% of the
known, with the known count) and what each import warned of.

    .venv/bin/python benchmarks/quality/cohort_import_real.py [--realdata ../shared/realdata]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd

from services.cohort.importer import import_cohort
from services.common.vocabulary import BIOMARKERS

LAYOUTS: dict[str, tuple[list[str], str | None, dict[str, bool]]] = {
    "PanCancer patient + sample": (
        ["pancan/data_clinical_patient.txt", "pancan/data_clinical_sample.txt"],
        None,
        {},
    ),
    "PanCancer export": (["pancan/brca_tcga_pan_can_atlas_2018_clinical_data.tsv"], None, {}),
    "pub2015 patient + sample": (
        ["pub2015/data_clinical_patient.txt", "pub2015/data_clinical_sample.txt"],
        None,
        {},
    ),
    "legacy patient": (["legacy/data_clinical_patient.txt"], None, {}),
    "legacy patient, --strict-her2": (
        ["legacy/data_clinical_patient.txt"],
        None,
        {"strict_her2": True},
    ),
    "GDC Biotab": (["gdc/nationwidechildrens.org_clinical_patient_brca.txt"], None, {}),
    "Firehose MAF (12-character barcodes)": ([], "mutations/firehose_brca_maf.tsv.gz", {}),
    "raw MAF excerpt (aliquot barcodes)": ([], "mutations/wustl_brca_excerpt.maf", {}),
    "PanCancer + legacy + Firehose MAF": (
        [
            "pancan/data_clinical_patient.txt",
            "pancan/data_clinical_sample.txt",
            "legacy/data_clinical_patient.txt",
        ],
        "mutations/firehose_brca_maf.tsv.gz",
        {},
    ),
    "PanCancer export + pub2015 sample + Firehose MAF": (
        [
            "pancan/brca_tcga_pan_can_atlas_2018_clinical_data.tsv",
            "pub2015/data_clinical_sample.txt",
        ],
        "mutations/firehose_brca_maf.tsv.gz",
        {},
    ),
    "PanCancer + GDC Biotab + Firehose MAF": (
        [
            "pancan/data_clinical_patient.txt",
            "gdc/nationwidechildrens.org_clinical_patient_brca.txt",
        ],
        "mutations/firehose_brca_maf.tsv.gz",
        {},
    ),
}


def _slides(tcga: Path, folder: Path) -> int:
    patients: set[str] = set()
    for name in ("pancan/data_clinical_patient.txt", "legacy/data_clinical_patient.txt"):
        table = pd.read_csv(tcga / name, sep="\t", comment="#", dtype=str)
        patients.update(table["PATIENT_ID"].dropna())
    for patient in sorted(patients):
        (folder / f"{patient}-01Z-00-DX1.svs").touch()
    return len(patients)


def _cell(counts: dict[str, int]) -> str:
    known = counts["positive"] + counts["negative"]
    if not known:
        return "-"
    return f"{100 * counts['positive'] / known:.1f} ({known})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[3] / "shared" / "realdata"
    parser.add_argument("--realdata", type=Path, default=default)
    args = parser.parse_args()
    tcga = args.realdata / "tcga"
    with tempfile.TemporaryDirectory(prefix="tcga-") as scratch:
        slides = Path(scratch) / "slides"
        slides.mkdir()
        count = _slides(tcga, slides)
        print(f"{count} placeholder slides, one per patient of the PanCancer and legacy tables\n")
        print("| inputs | " + " | ".join(BIOMARKERS) + " | warnings |")
        print("|---" * (len(BIOMARKERS) + 2) + "|")
        for name, (clinical, maf, options) in LAYOUTS.items():
            summary = import_cohort(
                slides,
                clinical=[tcga / c for c in clinical] or None,
                mutations=tcga / maf if maf else None,
                out=Path(scratch) / "manifest.csv",
                overwrite=True,
                **options,  # type: ignore[arg-type]
            )
            cells = [_cell(summary["labels"][label]) for label in BIOMARKERS]
            warned = []
            if summary["labels_not_supplied"]:
                warned.append(f"not supplied: {', '.join(summary['labels_not_supplied'])}")
            if summary["labels_mostly_unknown"]:
                warned.append(f"mostly unknown: {', '.join(summary['labels_mostly_unknown'])}")
            print(f"| {name} | " + " | ".join(cells) + f" | {'; '.join(warned) or '-'} |")


if __name__ == "__main__":
    main()
