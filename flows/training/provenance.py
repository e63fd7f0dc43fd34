"""What a model was trained on, for its model card (``ModelConfig.training_data``).

From the stored cohort manifest (``services.cohort.manifest``) and the slides a model
trained and validated on:

- ``cohort``: the cohort's name in the store;
- ``synthetic``: True for a cohort of histomarker's synthetic generator, recognised by
  the ground-truth columns it writes (:data:`SYNTHETIC_COLUMNS`) or by every patient
  id being a synthetic one (``SYN-SA-0007``); False when every patient id is a TCGA
  barcode (``histomarker cohort import``: real slides); None otherwise (an in-house
  cohort the manifest does not say about);
- ``sites``: the tissue source sites of those slides: the manifest's ``site`` column
  where filled, else the site code of a TCGA or synthetic id
  (:func:`services.mil.folds.site_of`); ids without one add no site;
- ``n_slides``, ``n_patients``: how many slides and patients those are.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import pandas as pd

from services.common.errors import InvalidInput
from services.inference.bundle import training_data_of
from services.mil.folds import site_of

#: Columns only the synthetic generator writes (its ground truth).
SYNTHETIC_COLUMNS = ("truth_masks", "tissue_mask", "tumour_mask", "nuclei_truth")
_SYNTHETIC_PATIENT = re.compile(r"^SYN-[A-Z0-9]{2}-[0-9]+$", re.IGNORECASE)
_TCGA_PATIENT = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}$", re.IGNORECASE)


def is_synthetic(table: pd.DataFrame) -> bool | None:
    """Whether a manifest's slides are synthetic (True), real (False) or unknown (None)."""
    if any(column in table.columns for column in SYNTHETIC_COLUMNS):
        return True
    patients = table["patient_id"].astype(str).str.strip()
    if len(patients) and patients.str.match(_SYNTHETIC_PATIENT).all():
        return True
    if len(patients) and patients.str.match(_TCGA_PATIENT).all():
        return False
    return None


def slide_sites(rows: pd.DataFrame) -> list[str]:
    """The sites of manifest rows (sorted, distinct): the ``site`` column where filled,
    else the site code in the patient id; rows with neither add none."""
    sites: set[str] = set()
    given = rows["site"] if "site" in rows.columns else pd.Series([""] * len(rows))
    for patient, site in zip(rows["patient_id"].astype(str), given, strict=True):
        text = "" if pd.isna(site) else str(site).strip()
        if not text:
            try:
                text = site_of(patient)
            except InvalidInput:
                continue
        sites.add(text)
    return sorted(sites)


def training_data(table: pd.DataFrame, cohort: str, slide_ids: Iterable[str]) -> dict[str, Any]:
    """The ``training_data`` of a model trained (and validated) on ``slide_ids``.

    Args:
        table: The cohort's manifest (``flows.training.ingest.read_cohort``).
        cohort: The cohort's name.
        slide_ids: The slides behind the model's training and validation patches.

    Returns:
        cohort, synthetic, sites, n_slides, n_patients (see the module doc).
    """
    wanted = {str(s) for s in slide_ids}
    rows = table[table["slide_id"].astype(str).isin(wanted)]
    return training_data_of(
        {
            "cohort": cohort,
            "synthetic": is_synthetic(table),
            "sites": slide_sites(rows),
            "n_slides": len(rows),
            "n_patients": int(rows["patient_id"].astype(str).nunique()),
        }
    )
