"""Fault tests: a tiny synthetic cohort (Prefect's harness is the integration
conftest's ``prefect_home``)."""

from __future__ import annotations

from pathlib import Path

import pytest

#: Slides of the fault tests' cohort (``tiny`` preset, 4096x3072 px).
COHORT_SLIDES = 3


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The manifest of a three-slide synthetic cohort (no ground-truth crops)."""
    from services.synth.cohort import generate_cohort

    root = tmp_path_factory.mktemp("fault-cohort")
    generate_cohort(root, COHORT_SLIDES, seed=5, preset="tiny", truth_crops=0)
    return root / "manifest.csv"
