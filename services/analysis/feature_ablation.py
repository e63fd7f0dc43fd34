"""RunFeatureAblation's inputs and run, without gRPC.

The patch sets come as two feature tables (BD and CD) or as one table whose
``patch_set`` column tells them apart (the training flow's ``patch_sets.parquet``);
labels and patients come from a cohort manifest or from the tables themselves. Then
:func:`ablation.run_ablation` scores every feature group on each set, and a set that
cannot be scored is either refused or, when asked, skipped with a note.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from services.analysis.ablation import FEATURE_GROUPS, PATCH_SET_ORDER, run_ablation
from services.common.cancellation import WorkBudget
from services.common.errors import InvalidInput

#: Column naming each row's patch set in a table of several sets.
PATCH_SET_COLUMN = "patch_set"


def _few_nuclei(values: pd.Series) -> np.ndarray:
    return values.astype(str).str.strip().str.lower().isin({"true", "1", "1.0"}).to_numpy()


def split_patch_sets(table: pd.DataFrame, what: str) -> dict[str, pd.DataFrame]:
    """The BD and CD rows of a table of several sets, keyed ``BD`` and ``CD`` (a set
    without rows maps to no rows: the ablation says what is missing).

    Raises:
        InvalidInput: No ``patch_set`` column, or sets other than BD and CD.
    """
    if PATCH_SET_COLUMN not in table.columns:
        raise InvalidInput(f"{what} lacks the column {PATCH_SET_COLUMN}")
    names = table[PATCH_SET_COLUMN]
    unknown = sorted(set(names.dropna().astype(str)) - set(PATCH_SET_ORDER))
    if unknown:
        raise InvalidInput(f"{what}: patch_set must be BD or CD, got {unknown[:5]}")
    return {name: table[names == name] for name in PATCH_SET_ORDER}


def ablation_sets(
    sets: Mapping[str, pd.DataFrame],
    manifest: pd.DataFrame | None,
    biomarker: str,
    *,
    include_few_nuclei: bool = False,
    allow_empty: bool = False,
) -> dict[str, pd.DataFrame]:
    """Feature tables ready for ``run_ablation``: each patch takes its slide's
    ``patient_id`` and ``biomarker`` label from the manifest (slides with an empty
    label are left out), and patches with few nuclei are dropped unless included.

    Args:
        sets: Feature table per patch set name.
        manifest: The cohort manifest; None when the tables carry labels and patients.
        biomarker: The label column the manifest gives.
        include_few_nuclei: Keep patches flagged with fewer than three nuclei.
        allow_empty: Keep a set with no patch left (the ablation then skips or
            refuses it) instead of refusing it here.

    Raises:
        InvalidInput: Missing columns, or (unless allowed) no patch left with a label.
    """
    if not sets:
        raise InvalidInput("give bd_features, cd_features or both")
    labels = None
    if manifest is not None:
        missing = [c for c in ("slide_id", "patient_id", biomarker) if c not in manifest.columns]
        if missing:
            raise InvalidInput(f"manifest lacks column(s) {', '.join(missing)}")
        labels = manifest.loc[:, ["slide_id", "patient_id", biomarker]].copy()
        labels["slide_id"] = labels["slide_id"].astype(str)
        if labels["slide_id"].duplicated().any():
            duplicated = labels.loc[labels["slide_id"].duplicated(), "slide_id"].tolist()[:5]
            raise InvalidInput(f"manifest lists slide(s) {duplicated} more than once")
        labels = labels.loc[labels[biomarker].notna()]
    prepared = {}
    for name, table in sets.items():
        what = f"{name} features"
        if "few_nuclei" in table.columns and not include_few_nuclei:
            table = table.loc[~_few_nuclei(table["few_nuclei"])]
        if labels is not None:
            if "slide_id" not in table.columns:
                raise InvalidInput(f"{what} lack column slide_id")
            table = table.drop(columns=[c for c in ("patient_id", biomarker) if c in table])
            table = table.assign(slide_id=table["slide_id"].astype(str)).merge(
                labels, on="slide_id", how="inner"
            )
        if table.empty and not allow_empty:
            raise InvalidInput(
                f"{what}: no patch left with a {biomarker} label"
                + (" (after leaving out patches with few nuclei)" if not include_few_nuclei else "")
            )
        prepared[name] = table.reset_index(drop=True)
    return prepared


def ablation(
    sets: Mapping[str, pd.DataFrame],
    biomarker: str,
    groups: Sequence[str],
    *,
    label_column: str = "",
    folds: int,
    trees: int,
    bootstrap: int,
    confidence: float,
    seed: int,
    skip_unusable: bool = False,
    progress: Callable[[int, int], None] | None = None,
    budget: WorkBudget | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """``run_ablation`` over the prepared patch sets; the budget is checked per cell.

    Args:
        sets: Patch set name -> its rows (``ablation_sets``).
        biomarker: Named in the result.
        groups: Feature groups to score (names of ``FEATURE_GROUPS``); all when empty.
        label_column: The 0/1 label; the biomarker's own column when empty.
        folds, trees, bootstrap, confidence, seed: As ``run_ablation``'s ``folds``,
            ``n_estimators``, ``bootstrap``, ``confidence`` and ``seed``.
        skip_unusable: Score each set on its own and skip one that cannot be scored,
            with a note ``{biomarker} {set}: {why}``, instead of refusing the call.
        progress: Called with (cells done, cells total) of the set being scored.
        budget: Checked before and after every cell.

    Returns:
        The cells (``ablation.RESULT_COLUMNS``; an empty frame when every set was
        skipped) and the notes of the sets skipped.
    """
    chosen = {name: FEATURE_GROUPS[name] for name in (groups or FEATURE_GROUPS)}
    budget = budget or WorkBudget.unlimited()

    def report(done: int, total: int) -> None:
        budget.check()
        if progress is not None:
            progress(done, total)

    def run(table: pd.DataFrame | Mapping[str, pd.DataFrame]) -> pd.DataFrame:
        return run_ablation(
            table,
            label_column or biomarker,
            biomarker=biomarker,
            groups=chosen,
            folds=folds,
            seed=seed,
            n_estimators=trees,
            bootstrap=bootstrap,
            confidence=confidence,
            progress=report,
        )

    budget.check()
    if not skip_unusable:
        return run(dict(sets)), []
    results, notes = [], []
    for name, rows in sets.items():
        try:
            # One set per call, as a table with its set named: an empty set is
            # refused by the ablation itself, and its reason becomes the note.
            results.append(run(rows.assign(**{PATCH_SET_COLUMN: name})))
        except InvalidInput as exc:
            notes.append(f"{biomarker} {name}: {exc}")
    return (pd.concat(results, ignore_index=True) if results else pd.DataFrame()), notes
