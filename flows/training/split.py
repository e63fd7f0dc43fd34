"""The paper's split of a cohort (docs/method.md, stage 1), and which biomarkers a set of
slides can train.

The cancer detector trains on every normal slide plus an equal number of cancer
slides; the remaining cancer slides form the biomarker set. Cancer slides are drawn
by patient (all slides of a drawn patient go together, so no patient is in both
sets) in a seeded random order.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from flows.runtime.records import Record
from services.common.errors import InvalidInput

#: Patients each class needs for a patient split with validation patients of both.
MIN_PATIENTS_PER_CLASS = 2


class CohortSplit(Record):
    """Slide ids of the two sets, sorted."""

    detector: tuple[str, ...]
    biomarker: tuple[str, ...]


def paper_split(table: pd.DataFrame, seed: int) -> CohortSplit:
    """All normal slides and as many cancer slides for the detector; the rest for the
    biomarkers.

    Args:
        table: Manifest rows with ``slide_id``, ``patient_id`` and ``kind``.
        seed: Seed of the draw of cancer patients.

    Returns:
        The two sets. The detector gets the first drawn cancer patients until it has
        at least as many cancer slides as normal ones.

    Raises:
        InvalidInput: No normal slide, or no cancer slide left for the biomarkers.
    """
    normal = sorted(table.loc[table["kind"] == "normal", "slide_id"].astype(str))
    cancer = table[table["kind"] == "cancer"]
    if not normal:
        raise InvalidInput("the cohort has no normal slide: the cancer detector needs them")
    patients = sorted(cancer["patient_id"].astype(str).unique())
    order = np.random.default_rng(seed).permutation(len(patients))
    chosen: list[str] = []
    for index in order:
        if len(chosen) >= len(normal):
            break
        rows = cancer[cancer["patient_id"].astype(str) == patients[index]]
        chosen += rows["slide_id"].astype(str).tolist()
    rest = sorted(set(cancer["slide_id"].astype(str)) - set(chosen))
    if len(chosen) < len(normal) or not rest:
        raise InvalidInput(
            f"{len(cancer)} cancer slide(s) for {len(normal)} normal one(s): the detector "
            "takes as many cancer slides as normal ones and the biomarkers need the rest; "
            "add cancer slides"
        )
    return CohortSplit(detector=tuple(sorted(normal + chosen)), biomarker=tuple(rest))


def untrainable_reason(labels: pd.DataFrame, biomarker: str) -> str | None:
    """Why a biomarker cannot be trained on these slides, or None when it can.

    Args:
        labels: Rows with ``patient_id`` and the biomarker's column (0, 1 or NA).
        biomarker: The label column.

    Returns:
        A sentence naming the counts when some class has fewer than
        :data:`MIN_PATIENTS_PER_CLASS` patients (the patient split then cannot hold
        out both classes), else None.
    """
    known = labels[labels[biomarker].notna()]
    per_patient = known.groupby(known["patient_id"].astype(str))[biomarker].max()
    positives = int((per_patient == 1).sum())
    negatives = int((per_patient == 0).sum())
    if min(positives, negatives) < MIN_PATIENTS_PER_CLASS:
        return (
            f"{positives} positive and {negatives} negative patient(s) with patches: each "
            f"class needs {MIN_PATIENTS_PER_CLASS}"
        )
    return None
