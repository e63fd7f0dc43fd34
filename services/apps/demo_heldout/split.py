"""Which patients the demo holds out of training altogether.

The held-out slides are put aside before the training pipeline sees the cohort: they
train no model, calibrate none and choose no threshold. The draw is by patient
(every slide of a drawn patient goes together), stratified by slide kind so that
both cancer and normal slides are held out, and seeded.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from services.common.errors import InvalidInput


def heldout_patients(table: pd.DataFrame, fraction: float, seed: int) -> set[str]:
    """The patients held out: ``fraction`` of the patients of each slide kind.

    Args:
        table: Manifest rows with ``patient_id`` and ``kind``.
        fraction: Share of each kind's patients to hold out, strictly between 0 and 1.
        seed: Seed of the draw.

    Returns:
        Patient ids; at least one patient of each kind, and at least one of each
        kind left for training.

    Raises:
        InvalidInput: A fraction outside (0, 1), or a kind with fewer than two
            patients (it cannot be both trained on and held out).
    """
    if not 0.0 < fraction < 1.0:
        raise InvalidInput(f"the held-out fraction must be within (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    for kind in sorted(table["kind"].astype(str).unique()):
        patients = sorted(table.loc[table["kind"] == kind, "patient_id"].astype(str).unique())
        if len(patients) < 2:
            raise InvalidInput(
                f"{len(patients)} {kind} patient(s): holding some out needs at least two"
            )
        count = min(max(1, round(fraction * len(patients))), len(patients) - 1)
        order = rng.permutation(len(patients))[:count]
        chosen.update(patients[i] for i in order)
    return chosen


def split_by_patient(
    table: pd.DataFrame, fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The rows to train on and the held-out rows (see :func:`heldout_patients`)."""
    held = table["patient_id"].astype(str).isin(heldout_patients(table, fraction, seed))
    return table[~held].reset_index(drop=True), table[held].reset_index(drop=True)
