"""Random-forest ablation over the nucleus feature groups (docs/method.md, stage 3).

For each biomarker and patch set (BD, CD), a random forest is trained on each of the
seven feature groups and scored by AUPRC on out-of-fold probabilities of a
patient-grouped, label-stratified k-fold cross-validation: no patient is ever in both
the training and the test fold. Every group of a patch set sees the same folds and
the same bootstrap draws, so the groups are compared on equal terms.

Choices (ours, where the paper is silent):
- Fewer patients than folds: the folds are reduced to the number of patients
  (leave-one-patient-out) and the result's ``note`` says so. Fewer than two patients
  of either class is refused: some training fold would then hold only one class.
- Rows with NaN or infinite features are dropped (counted in ``dropped_rows`` and the
  note) before anything else, once per patch set, so all groups use the same rows.
- Labels are per patient (slide); a patient whose patches carry both labels is
  refused as a join mistake.
- The AUPRC confidence interval is a percentile bootstrap over patients of the
  out-of-fold predictions (the model is not refitted).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.ensemble import RandomForestClassifier
from sklearn.inspection import permutation_importance
from sklearn.metrics import average_precision_score
from sklearn.model_selection import StratifiedGroupKFold

from services.common.errors import InvalidInput
from services.nuclei.features import FEATURE_NAMES

LOGGER = logging.getLogger(__name__)

#: Prefix of each family of the 75 patch features, by the family's name in tables.
FAMILY_PREFIXES: dict[str, str] = {
    "morphology": "morph.",
    "intensity": "intensity.",
    "spatial": "spatial.",
}


def _family(*names: str) -> tuple[str, ...]:
    prefixes = tuple(FAMILY_PREFIXES[name] for name in names)
    return tuple(feature for feature in FEATURE_NAMES if feature.startswith(prefixes))


#: The seven feature groups of the paper's ablation, in the paper's order; each maps
#: to its feature columns in :data:`FEATURE_NAMES` order.
FEATURE_GROUPS: dict[str, tuple[str, ...]] = {
    "all": tuple(FEATURE_NAMES),
    "intensity": _family("intensity"),
    "spatial": _family("spatial"),
    "morphology": _family("morphology"),
    "morphology+spatial": _family("morphology", "spatial"),
    "spatial+intensity": _family("spatial", "intensity"),
    "morphology+intensity": _family("morphology", "intensity"),
}

#: Patch sets listed first, in this order, when a table holds several.
PATCH_SET_ORDER = ("BD", "CD")

#: Columns of :func:`run_ablation`'s result, in order.
RESULT_COLUMNS = (
    "biomarker",
    "patch_set",
    "group",
    "n_features",
    "auprc",
    "ci_low",
    "ci_high",
    "prevalence",
    "n_patches",
    "n_patients",
    "folds",
    "dropped_rows",
    "note",
)


def group_label(group: str, n_features: int) -> str:
    """Row label of a feature group in Table 2, e.g. ``morphology+spatial (60)``."""
    return f"{group} ({n_features})"


def _require_columns(table: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [column for column in dict.fromkeys(columns) if column not in table.columns]
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        raise InvalidInput(f"{what} lacks column(s): {shown}")


def _binary_labels(values: pd.Series, what: str) -> np.ndarray:
    if values.isna().any():
        raise InvalidInput(f"{what}: {int(values.isna().sum())} row(s) have no label")
    labels = values.to_numpy()
    if labels.dtype == bool:
        return labels.astype(np.int64)
    try:
        numeric = labels.astype(np.float64)
    except (TypeError, ValueError):
        raise InvalidInput(f"{what}: labels must be 0/1 or booleans") from None
    if not np.isin(numeric, (0.0, 1.0)).all():
        raise InvalidInput(f"{what}: labels must be 0/1 or booleans, got {np.unique(numeric)[:5]}")
    return numeric.astype(np.int64)


def _drop_nonfinite(table: pd.DataFrame, features: Sequence[str]) -> tuple[pd.DataFrame, int]:
    try:
        values = table[list(features)].to_numpy(np.float64, na_value=np.nan)
    except (TypeError, ValueError):
        raise InvalidInput("feature columns must be numeric") from None
    finite = np.isfinite(values).all(axis=1)
    return table.loc[finite], int((~finite).sum())


def patient_folds(labels: np.ndarray, patients: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold index (0..folds-1) of every row: label-stratified, grouped by patient.

    All rows of a patient share one fold, so a patient is never in both the training
    and the test side of a split.

    Raises:
        RuntimeError: The splitter put a patient on both sides (a bug, never input).
    """
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_of_row = np.full(len(labels), -1, np.int64)
    for fold, (train, test) in enumerate(splitter.split(np.zeros(len(labels)), labels, patients)):
        shared = np.intersect1d(patients[train], patients[test])
        if shared.size:
            raise RuntimeError(f"fold {fold}: patient(s) in train and test: {shared[:5]}")
        fold_of_row[test] = fold
    if (fold_of_row < 0).any():
        raise RuntimeError("some rows were in no test fold")
    return fold_of_row


def _forest(n_estimators: int, seed: int) -> RandomForestClassifier:
    return RandomForestClassifier(
        n_estimators=n_estimators, class_weight="balanced", n_jobs=1, random_state=seed
    )


def out_of_fold_probabilities(
    features: np.ndarray,
    labels: np.ndarray,
    fold_of_row: np.ndarray,
    n_estimators: int = 200,
    seed: int = 0,
) -> np.ndarray:
    """Probability of class 1 for every row from the forest that did not see its fold.

    Args:
        features: (N, F) float matrix.
        labels: (N,) 0/1.
        fold_of_row: (N,) fold index from :func:`patient_folds`.
        n_estimators: Trees per forest.
        seed: Seed of every forest.
    """
    probabilities = np.empty(len(labels), np.float64)
    for fold in np.unique(fold_of_row):
        test = fold_of_row == fold
        forest = _forest(n_estimators, seed).fit(features[~test], labels[~test])
        probabilities[test] = forest.predict_proba(features[test])[:, 1]
    return probabilities


def bootstrap_auprc_ci(
    labels: np.ndarray,
    probabilities: np.ndarray,
    patients: np.ndarray,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile CI of the AUPRC, resampling patients with replacement.

    A patient drawn k times weighs k; draws with only one class are skipped.
    Returns (NaN, NaN) when ``resamples`` is 0 or no draw had both classes.
    """
    _, codes = np.unique(patients, return_inverse=True)
    n_patients = int(codes.max()) + 1
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        weights = np.bincount(rng.integers(0, n_patients, n_patients), minlength=n_patients)[codes]
        positives = weights[labels == 1].sum()
        if positives == 0 or positives == weights.sum():
            continue
        values.append(average_precision_score(labels, probabilities, sample_weight=weights))
    if not values:
        return math.nan, math.nan
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _split_sets(
    table: pd.DataFrame | Mapping[str, pd.DataFrame],
    patch_set_column: str,
    patch_sets: Sequence[str] | None,
) -> dict[str, pd.DataFrame]:
    if isinstance(table, Mapping):
        sets = dict(table)
    else:
        _require_columns(table, [patch_set_column], "feature table")
        present = [str(name) for name in table[patch_set_column].dropna().unique()]
        ordered = [n for n in PATCH_SET_ORDER if n in present] + sorted(
            n for n in present if n not in PATCH_SET_ORDER
        )
        sets = {name: table[table[patch_set_column].astype(str) == name] for name in ordered}
    if patch_sets is not None:
        absent = [name for name in patch_sets if name not in sets]
        if absent:
            raise InvalidInput(f"no rows for patch set(s) {absent}; have {sorted(sets)}")
        sets = {name: sets[name] for name in patch_sets}
    if not sets:
        raise InvalidInput("no patch sets to analyse: the table is empty")
    return sets


class _PreparedSet:
    """One patch set, validated: finite features, binary per-patient labels, folds."""

    def __init__(
        self,
        name: str,
        table: pd.DataFrame,
        label_column: str,
        patient_column: str,
        features: Sequence[str],
        folds: int,
        seed: int,
    ) -> None:
        self.name = name
        what = f"patch set {name!r}"
        _require_columns(table, [label_column, patient_column, *features], what)
        table, self.dropped_rows = _drop_nonfinite(table, features)
        notes = []
        if self.dropped_rows:
            notes.append(f"dropped {self.dropped_rows} row(s) with NaN/inf features")
            LOGGER.warning("%s: %s", what, notes[-1])
        if table.empty:
            raise InvalidInput(f"{what}: no rows with finite features")
        self.table = table
        self.labels = _binary_labels(table[label_column], what)
        self.patients = table[patient_column].astype(str).to_numpy()
        per_patient = pd.Series(self.labels).groupby(self.patients).agg(["min", "max"])
        mixed = per_patient.index[per_patient["min"] != per_patient["max"]]
        if len(mixed):
            raise InvalidInput(
                f"{what}: labels are per patient, but patient(s) {list(mixed[:5])} have both"
            )
        by_class = per_patient["min"].value_counts()
        if len(by_class) < 2:
            raise InvalidInput(f"{what}: only one class ({int(by_class.index[0])}) present")
        if by_class.min() < 2:
            raise InvalidInput(
                f"{what}: need at least 2 patients of each class, have "
                f"{int(by_class.get(0, 0))} negative and {int(by_class.get(1, 0))} positive"
            )
        self.n_patients = len(per_patient)
        self.folds = min(folds, self.n_patients)
        if self.folds < folds:
            notes.append(f"folds reduced from {folds} to {self.folds}: {self.n_patients} patients")
            LOGGER.warning("%s: %s", what, notes[-1])
        self.note = "; ".join(notes)
        self.fold_of_row = patient_folds(self.labels, self.patients, self.folds, seed)


def run_ablation(
    table: pd.DataFrame | Mapping[str, pd.DataFrame],
    label_column: str,
    *,
    biomarker: str | None = None,
    patient_column: str = "patient_id",
    patch_set_column: str = "patch_set",
    patch_sets: Sequence[str] | None = None,
    groups: Mapping[str, Sequence[str]] = FEATURE_GROUPS,
    folds: int = 5,
    seed: int = 0,
    n_estimators: int = 200,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    progress: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """AUPRC of a random forest per (patch set, feature group) for one biomarker.

    Args:
        table: Patch feature table with the label, patient and feature columns, and
            ``patch_set_column`` naming each row's set (``BD``/``CD``); or a mapping
            from set name to its own table.
        label_column: Column with the biomarker's 0/1 (or boolean) label.
        biomarker: Name in the result; ``label_column`` by default.
        patient_column: Column naming the patient (the CV groups).
        patch_set_column: Column naming the patch set, when ``table`` is one frame.
        patch_sets: Sets to run, in order; all present (BD, CD first) by default.
        groups: Feature group name -> feature columns.
        folds: Cross-validation folds (reduced, with a note, to the patient count).
        seed: Seed of the folds, the forests and the bootstrap.
        n_estimators: Trees per forest.
        bootstrap: Patient bootstrap resamples for the CI (0: no CI).
        confidence: Level of the CI.
        progress: Called with (cells done, cells total), e.g. a ProgressBar.

    Returns:
        One row per (patch set, group) with :data:`RESULT_COLUMNS`.

    Raises:
        InvalidInput: Missing columns, a single class, non-binary labels, fewer than
            two patients of a class, an empty group, bad fold count.
    """
    if folds < 2:
        raise InvalidInput(f"folds must be >= 2, got {folds}")
    if n_estimators < 1:
        raise InvalidInput(f"n_estimators must be >= 1, got {n_estimators}")
    if not 0 < confidence < 1:
        raise InvalidInput(f"confidence must be in (0, 1), got {confidence}")
    if not groups:
        raise InvalidInput("no feature groups given")
    empty = [name for name, features in groups.items() if not features]
    if empty:
        raise InvalidInput(f"feature group(s) without features: {empty}")
    biomarker = biomarker or label_column
    sets = _split_sets(table, patch_set_column, patch_sets)
    all_features = list(dict.fromkeys(f for features in groups.values() for f in features))
    prepared = [
        _PreparedSet(name, frame, label_column, patient_column, all_features, folds, seed)
        for name, frame in sets.items()
    ]
    rows = []
    total = len(prepared) * len(groups)
    for data in prepared:
        for group, features in groups.items():
            x = data.table[list(features)].to_numpy(np.float64)
            probabilities = out_of_fold_probabilities(
                x, data.labels, data.fold_of_row, n_estimators, seed
            )
            low, high = bootstrap_auprc_ci(
                data.labels, probabilities, data.patients, bootstrap, confidence, seed
            )
            rows.append(
                {
                    "biomarker": biomarker,
                    "patch_set": data.name,
                    "group": group,
                    "n_features": len(features),
                    "auprc": float(average_precision_score(data.labels, probabilities)),
                    "ci_low": low,
                    "ci_high": high,
                    "prevalence": float(data.labels.mean()),
                    "n_patches": len(data.labels),
                    "n_patients": data.n_patients,
                    "folds": data.folds,
                    "dropped_rows": data.dropped_rows,
                    "note": data.note,
                }
            )
            if progress is not None:
                progress(len(rows), total)
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS))


def permutation_importances(
    table: pd.DataFrame,
    label_column: str,
    *,
    patient_column: str = "patient_id",
    features: Sequence[str] = FEATURE_NAMES,
    folds: int = 5,
    seed: int = 0,
    n_estimators: int = 200,
    repeats: int = 5,
    top: int | None = 20,
) -> pd.DataFrame:
    """Permutation importance of each feature on held-out folds, scored by AUPRC.

    Each fold's forest is scored on its own test fold (patient-grouped, as in
    :func:`run_ablation`); folds whose test side has one class are skipped. The
    importance is the mean drop of average precision over folds and repeats.

    Args:
        table: One patch set (e.g. the BD patches of one biomarker).
        label_column: 0/1 label column.
        patient_column: Patient column (the CV groups).
        features: Feature columns to rank.
        folds: Cross-validation folds (reduced to the patient count).
        seed: Seed of folds, forests and permutations.
        n_estimators: Trees per forest.
        repeats: Permutations per feature and fold.
        top: Keep the ``top`` most important features; all when None.

    Returns:
        Columns ``rank, feature, family, importance_mean, importance_std``, most
        important first; ``family`` is morphology, intensity, spatial or other.

    Raises:
        InvalidInput: As :func:`run_ablation`; also when no fold has both classes.
    """
    if folds < 2:
        raise InvalidInput(f"folds must be >= 2, got {folds}")
    if not features:
        raise InvalidInput("no features given")
    data = _PreparedSet("input", table, label_column, patient_column, features, folds, seed)
    x = data.table[list(features)].to_numpy(np.float64)
    drops = []
    for fold in np.unique(data.fold_of_row):
        test = data.fold_of_row == fold
        if len(np.unique(data.labels[test])) < 2:
            continue
        forest = _forest(n_estimators, seed).fit(x[~test], data.labels[~test])
        result = permutation_importance(
            forest,
            x[test],
            data.labels[test],
            scoring="average_precision",
            n_repeats=repeats,
            random_state=seed,
            n_jobs=1,
        )
        drops.append(result.importances)
    if not drops:
        raise InvalidInput("no test fold holds both classes: too few patients to rank features")
    importances = np.concatenate(drops, axis=1)
    families = {prefix: family for family, prefix in FAMILY_PREFIXES.items()}
    ranked = pd.DataFrame(
        {
            "feature": list(features),
            "family": [
                next((fam for pre, fam in families.items() if name.startswith(pre)), "other")
                for name in features
            ],
            "importance_mean": importances.mean(axis=1),
            "importance_std": importances.std(axis=1),
        }
    ).sort_values("importance_mean", ascending=False, kind="stable")
    if top is not None:
        ranked = ranked.head(top)
    ranked.insert(0, "rank", np.arange(1, len(ranked) + 1))
    return ranked.reset_index(drop=True)


def format_cell(auprc: float, low: float, high: float) -> str:
    """A Table 2 cell: ``0.83 [0.78, 0.88]``, or just ``0.83`` without a CI."""
    if math.isnan(auprc):
        return "n/a"
    if math.isnan(low) or math.isnan(high):
        return f"{auprc:.2f}"
    return f"{auprc:.2f} [{low:.2f}, {high:.2f}]"


def table2(results: pd.DataFrame) -> pd.DataFrame:
    """The wide table shaped like the paper's Table 2.

    Rows: feature groups labelled ``name (n_features)``, in the results' order.
    Columns: a (biomarker, patch set) MultiIndex, biomarkers in the results' order
    and BD before CD. Cells: ``AUPRC [CI low, CI high]``; ``n/a`` where not run.

    Raises:
        InvalidInput: ``results`` lacks columns of :func:`run_ablation`'s result.
    """
    needed = ["biomarker", "patch_set", "group", "n_features", "auprc", "ci_low", "ci_high"]
    _require_columns(results, needed, "ablation results")
    if results.empty:
        raise InvalidInput("ablation results are empty")
    labels = {
        group: group_label(group, int(n))
        for group, n in results[["group", "n_features"]]
        .drop_duplicates("group")
        .itertuples(index=False)
    }
    biomarkers = list(dict.fromkeys(results["biomarker"]))
    present = list(dict.fromkeys(results["patch_set"]))
    sets = [s for s in PATCH_SET_ORDER if s in present] + [
        s for s in present if s not in PATCH_SET_ORDER
    ]
    columns = pd.MultiIndex.from_product([biomarkers, sets], names=["biomarker", "patch_set"])
    wide = pd.DataFrame(
        "n/a", index=pd.Index(list(labels.values()), name="features"), columns=columns
    )
    for row in results.itertuples(index=False):
        wide.loc[labels[row.group], (row.biomarker, row.patch_set)] = format_cell(
            float(row.auprc), float(row.ci_low), float(row.ci_high)
        )
    return wide
