"""A tiny synthetic cohort every biomarker of which can be trained."""

from __future__ import annotations

import pandas as pd

from flows.training.split import MIN_PATIENTS_PER_CLASS, paper_split
from services.common.vocabulary import BIOMARKERS
from services.synth.labels import manifest_rows, sample_cohort


def learnable_seed(slides: int, split_seed: int = 0) -> int:
    """A cohort seed whose biomarker set has two patients of each class for every
    label, so all six models can be held out by patient (a tiny cohort otherwise
    skips some)."""
    for seed in range(2000):
        table = pd.DataFrame(manifest_rows(sample_cohort(slides, seed)))
        biomarker = table[table["slide_id"].isin(paper_split(table, split_seed).biomarker)]
        counts = [
            (pd.to_numeric(biomarker[name]) == value).sum()
            for name in BIOMARKERS
            for value in (0, 1)
        ]
        if min(counts) >= MIN_PATIENTS_PER_CLASS:
            return seed
    raise AssertionError("no cohort seed gives two patients per class")
