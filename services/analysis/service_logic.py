"""Glue between the AnalysisService and the analysis logic, without gRPC.

Tables travel as object-store keys: this module reads them (CSV, TSV or parquet by
the key's extension), shapes them for :mod:`metrics`, :mod:`aggregate`,
:mod:`ablation`, :mod:`statistics` and :mod:`report`, and writes results back. The
server only converts messages; every check of the caller's data lives here and
raises :class:`~services.common.errors.InvalidInput` naming what is wrong.
"""

from __future__ import annotations

import io
import json
import math
import re
import tarfile
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from services.analysis.ablation import FEATURE_GROUPS, run_ablation
from services.analysis.aggregate import (
    TOP_K,
    LevelMetrics,
    aggregate_slides,
    check_aggregation,
    patch_and_slide_metrics,
    validate_patch_table,
)
from services.analysis.cli_metrics import read_table
from services.analysis.figures import decode_image
from services.analysis.metrics import (
    MetricReport,
    compute_metrics,
    mcc_f1,
    pr_curve,
    roc_curve,
)
from services.analysis.report import (
    FIGURES_DIR,
    CurveSet,
    PatchExample,
    PatchMontage,
    ReliabilitySet,
    SlideHeatmap,
    build_report,
)
from services.analysis.statistics import compare_groups
from services.common.cancellation import WorkBudget
from services.common.errors import InvalidInput, NotFound
from services.common.objectstore import ObjectInfo, ObjectStore, validate_prefix

#: Most bootstrap resamples one request may ask for (a count).
MAX_BOOTSTRAP = 10_000
#: Most trees per forest one ablation may ask for (a count).
MAX_TREES = 1000
#: Cross-validation folds allowed (a count).
MIN_FOLDS, MAX_FOLDS = 2, 20
#: Seeds must fit numpy's and scikit-learn's generators.
MAX_SEED = 2**32 - 1
#: Largest side of a thumbnail or patch image, px.
MAX_IMAGE_SIDE_PX = 4096
#: Most patches in all montages of one report (a count).
MAX_MONTAGE_PATCHES = 64
#: Most heatmaps in one report (a count).
MAX_HEATMAPS = 32
#: Name of the curves when the predictions table has no ``biomarker`` column.
ALL_SCORES = "scores"
#: Table formats by extension.
_TABLE_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv"}
_CONTENT_TYPES = {
    "parquet": "application/vnd.apache.parquet",
    "csv": "text/csv",
    "tsv": "text/tab-separated-values",
}
_RUN_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


# --- object keys, reading and writing tables -----------------------------------------


def check_seed(seed: int) -> int:
    """``seed`` if numpy and scikit-learn accept it (0 to 2**32 - 1)."""
    if not 0 <= seed <= MAX_SEED:
        raise InvalidInput(f"seed must be within 0-{MAX_SEED}, got {seed}")
    return seed


def check_count(value: int, name: str, default: int, high: int, low: int = 0) -> int:
    """``value``, or ``default`` for 0, after checking it lies in [low, high]."""
    if value == 0:
        return default
    if not low <= value <= high:
        raise InvalidInput(f"{name} must be within {low}-{high} (0 for {default}), got {value}")
    return value


def run_prefix(run_id: str) -> str:
    """``runs/{run_id}/analysis``, after checking the run id."""
    if not _RUN_ID.match(run_id) or run_id in (".", ".."):
        raise InvalidInput(f"run_id {run_id[:80]!r} must be 1-128 letters, digits, '.', '_' or '-'")
    return f"runs/{run_id}/analysis"


def output_key(given: str, run_id: str, name: str) -> str | None:
    """Where a result goes: the key given, else under the run's prefix, else nowhere."""
    if given:
        return given
    if run_id:
        return f"{run_prefix(run_id)}/{name}"
    return None


def table_format(key: str) -> str:
    """``parquet``, ``csv`` or ``tsv`` from the key's extension."""
    suffix = PurePosixPath(key).suffix.lower()
    if suffix not in _TABLE_FORMATS:
        raise InvalidInput(f"cannot tell the table format of {key!r}: use .parquet, .csv or .tsv")
    return _TABLE_FORMATS[suffix]


def load_table(store: ObjectStore, key: str, what: str) -> pd.DataFrame:
    """Read the table ``key`` from the store (CSV, TSV or parquet by extension).

    Raises:
        NotFound: No such object (the message names ``what`` and the key).
        InvalidInput: An unknown extension or content that does not parse.
    """
    suffixes = "".join(PurePosixPath(key).suffixes[-2:])[-24:]
    try:
        data = store.get_bytes(key)
    except NotFound:
        raise NotFound(f"{what}: no table {key!r} in the store") from None
    with tempfile.TemporaryDirectory(prefix="histomarker-table-") as folder:
        path = Path(folder) / f"table{suffixes}"
        path.write_bytes(data)
        try:
            table = read_table(path)
        except InvalidInput as exc:
            # The server's temporary path never reaches the caller: name the key.
            message = f"{what} ({key}): {exc}".replace(str(path), key)
            raise InvalidInput(message.replace(path.name, key)) from None
        except Exception as exc:  # parsers raise many kinds on corrupt files
            raise InvalidInput(
                f"{what} ({key}): cannot read the table ({type(exc).__name__})"
            ) from None
    table.columns = [str(c) for c in table.columns]
    return table


def store_table(store: ObjectStore, key: str, table: pd.DataFrame) -> ObjectInfo:
    """Write ``table`` to ``key`` as parquet, CSV or TSV by the key's extension."""
    kind = table_format(key)
    table = table.copy()
    table.attrs = {}  # pandas stores attrs as JSON, which numpy scalars are not
    if kind == "parquet":
        buffer = io.BytesIO()
        table.to_parquet(buffer, index=False)
        data = buffer.getvalue()
    else:
        data = table.to_csv(index=False, sep="\t" if kind == "tsv" else ",").encode()
    return store.put_bytes(key, data, content_type=_CONTENT_TYPES[kind])


def store_json(store: ObjectStore, key: str, value: Mapping[str, Any]) -> ObjectInfo:
    """Write ``value`` as indented JSON to ``key``."""
    data = json.dumps(value, indent=2, default=str).encode()
    return store.put_bytes(key, data, content_type="application/json")


# --- patch scores ----------------------------------------------------------------------


def inline_patches(
    slide_ids: Sequence[str],
    probabilities: Sequence[float],
    labels: Sequence[bool],
    patient_ids: Sequence[str],
) -> pd.DataFrame:
    """A patch table from columns given inline; every given list must be as long as
    ``slide_ids`` (empty ``labels`` / ``patient_ids`` mean not given)."""
    n = len(slide_ids)
    if n == 0:
        raise InvalidInput("scores: no patches given (slide_ids is empty)")
    for name, values, optional in (
        ("probabilities", probabilities, False),
        ("labels", labels, True),
        ("patient_ids", patient_ids, True),
    ):
        if (len(values) or not optional) and len(values) != n:
            raise InvalidInput(
                f"scores: slide_ids and {name} differ in length ({n} vs {len(values)})"
            )
    table = pd.DataFrame({"slide_id": list(slide_ids), "probability": list(probabilities)})
    if labels:
        table["label"] = np.asarray(list(labels), dtype=np.int64)
    if patient_ids:
        table["patient_id"] = list(patient_ids)
    return table


def with_probability(table: pd.DataFrame) -> pd.DataFrame:
    """``score`` renamed ``probability`` when only the former is present."""
    if "probability" not in table.columns and "score" in table.columns:
        return table.rename(columns={"score": "probability"})
    return table


def select_biomarker(table: pd.DataFrame, biomarker: str | None, what: str) -> pd.DataFrame:
    """The rows of ``biomarker`` when the table has a ``biomarker`` column."""
    if "biomarker" not in table.columns:
        return table
    names = table["biomarker"].astype(str).str.lower()
    if not biomarker:
        present = sorted(set(names))
        if len(present) > 1:
            raise InvalidInput(
                f"{what} holds several biomarkers ({', '.join(present[:6])}): say which"
            )
        return table
    chosen = table.loc[names == biomarker].reset_index(drop=True)
    if chosen.empty:
        raise InvalidInput(f"{what} has no rows of biomarker {biomarker!r}")
    return chosen


def level_metrics(
    table: pd.DataFrame,
    method: str,
    top_k: int,
    *,
    resamples: int,
    confidence: float,
    seed: int,
) -> LevelMetrics:
    """Patch- and slide-level metrics of a patch table (see ``patch_and_slide_metrics``)."""
    table = with_probability(table)
    _check_numeric(table, ("label", "probability"), "table")
    return patch_and_slide_metrics(
        table, method, top_k, resamples=resamples, confidence=confidence, seed=seed
    )


def _check_numeric(table: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    for column in columns:
        if column in table.columns and table[column].dtype == object:
            numbers = pd.to_numeric(table[column], errors="coerce")
            bad = numbers.isna() & table[column].notna()
            if bad.any():
                rows = ", ".join(str(int(r)) for r in np.flatnonzero(bad.to_numpy())[:10])
                raise InvalidInput(f"{what}: {column} is not a number at rows {rows}")


def slide_scores(table: pd.DataFrame, method: str, top_k: int = TOP_K) -> pd.DataFrame:
    """One row per slide (``SLIDE_COLUMNS``; ``label`` only when the patches have one).

    Labelled tables go through ``aggregate.aggregate_slides``; unlabelled ones (e.g.
    fresh predictions) are aggregated the same way after checking the probabilities.
    """
    check_aggregation(method, top_k)
    table = with_probability(table)
    _check_numeric(table, ("label", "probability"), "table")
    if "label" in table.columns:
        return aggregate_slides(table, method, top_k)
    missing = [c for c in ("slide_id", "probability") if c not in table.columns]
    if missing:
        raise InvalidInput(
            f"the table lacks column(s) {', '.join(missing)} "
            f"(it has {', '.join(table.columns) or 'none'})"
        )
    if table.empty:
        raise InvalidInput("no patches to aggregate (the table is empty)")
    probability = pd.to_numeric(table["probability"], errors="coerce").to_numpy(np.float64)
    if np.isnan(probability).any():
        rows = ", ".join(str(int(r)) for r in np.flatnonzero(np.isnan(probability))[:10])
        raise InvalidInput(f"probabilities contain NaN at rows {rows}")
    outside = (probability < 0) | (probability > 1)
    if outside.any():
        rows = ", ".join(str(int(r)) for r in np.flatnonzero(outside)[:10])
        raise InvalidInput(f"probabilities outside [0, 1] at rows {rows}")
    for column in ("slide_id", "patient_id"):
        if column in table.columns and table[column].isna().any():
            raise InvalidInput(f"{column} is missing for some rows")
    slide = table["slide_id"].astype(str)
    patient = table["patient_id"].astype(str) if "patient_id" in table.columns else slide
    patches = pd.DataFrame({"slide_id": slide, "patient_id": patient, "probability": probability})
    if (patches.groupby("slide_id")["patient_id"].nunique() > 1).any():
        raise InvalidInput("some slides belong to more than one patient")
    grouped = patches.groupby("slide_id", sort=True)
    if method == "mean":
        score = grouped["probability"].mean()
    elif method == "median":
        score = grouped["probability"].median()
    else:
        score = grouped["probability"].apply(lambda p: p.nlargest(top_k).mean())
    return pd.DataFrame(
        {
            "slide_id": score.index.astype(str),
            "patient_id": grouped["patient_id"].first().to_numpy(),
            "probability": score.to_numpy(np.float64),
            "patch_count": grouped.size().to_numpy(np.int64),
        }
    )


def metrics_json(result: LevelMetrics, biomarker: str | None) -> dict[str, Any]:
    """The stored metrics document: the CLI's ``--json`` shape plus the biomarker."""
    return {"biomarker": biomarker, **result.as_dict()}


# --- ablation ----------------------------------------------------------------------


def _few_nuclei(values: pd.Series) -> np.ndarray:
    return values.astype(str).str.strip().str.lower().isin({"true", "1", "1.0"}).to_numpy()


def ablation_sets(
    sets: Mapping[str, pd.DataFrame],
    manifest: pd.DataFrame | None,
    biomarker: str,
    *,
    include_few_nuclei: bool = False,
) -> dict[str, pd.DataFrame]:
    """Feature tables ready for ``run_ablation``: each patch takes its slide's
    ``patient_id`` and ``biomarker`` label from the manifest (slides with an empty
    label are left out), and patches with few nuclei are dropped unless included.

    Raises:
        InvalidInput: Missing columns, or no patch left with a label.
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
        if table.empty:
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
    folds: int,
    trees: int,
    bootstrap: int,
    confidence: float,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
    budget: WorkBudget | None = None,
) -> pd.DataFrame:
    """``run_ablation`` over the prepared patch sets; the budget is checked per cell."""
    chosen = {name: FEATURE_GROUPS[name] for name in (groups or FEATURE_GROUPS)}
    budget = budget or WorkBudget.unlimited()

    def report(done: int, total: int) -> None:
        budget.check()
        if progress is not None:
            progress(done, total)

    budget.check()
    return run_ablation(
        dict(sets),
        biomarker,
        biomarker=biomarker,
        groups=chosen,
        folds=folds,
        seed=seed,
        n_estimators=trees,
        bootstrap=bootstrap,
        confidence=confidence,
        progress=report,
    )


# --- statistics ----------------------------------------------------------------------


def compare_table(
    table: pd.DataFrame,
    group_column: str,
    group_a: str,
    value_columns: Sequence[str],
    *,
    alternative: str,
    fdr: float,
) -> pd.DataFrame:
    """``compare_groups`` with group A named as text (matched against the values)."""
    if not group_column:
        raise InvalidInput("table.group_column is required")
    chosen: Any = None
    if group_a:
        if group_column not in table.columns:
            raise InvalidInput(f"the table lacks the group column {group_column!r}")
        matches = [v for v in table[group_column].dropna().unique() if str(v) == group_a]
        if not matches:
            raise InvalidInput(f"group {group_a!r} is not a value of {group_column}")
        chosen = matches[0]
    return compare_groups(
        table,
        group_column,
        list(value_columns) or None,
        group_a=chosen,
        alternative=alternative,
        fdr=fdr,
    )


def compare_inline(
    variables: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    *,
    alternative: str,
    fdr: float,
) -> pd.DataFrame:
    """``compare_groups`` of variables given as (name, group A values, group B values).

    Raises:
        InvalidInput: No variables, a missing or repeated name, or a NaN/infinite value.
    """
    if not variables:
        raise InvalidInput("variables: at least one variable is required")
    names = [name for name, _, _ in variables]
    if any(not name for name in names):
        raise InvalidInput("variables: every variable needs a name")
    if len(set(names)) != len(names) or "_group" in names:
        raise InvalidInput("variables: names must be unique (and not '_group')")
    size_a = max(len(a) for _, a, _ in variables)
    size_b = max(len(b) for _, _, b in variables)
    if size_a == 0 or size_b == 0:
        raise InvalidInput("variables: both groups need values")
    columns: dict[str, np.ndarray] = {"_group": np.r_[np.ones(size_a), np.zeros(size_b)]}
    padding = {}
    for name, a, b in variables:
        values_a, values_b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        for group, values in (("group_a", values_a), ("group_b", values_b)):
            bad = ~np.isfinite(values)
            if bad.any():
                raise InvalidInput(
                    f"variables: {name!r} {group} holds NaN or infinite values at "
                    f"positions {', '.join(str(int(i)) for i in np.flatnonzero(bad)[:10])}"
                )
        columns[name] = np.r_[
            values_a, np.full(size_a - len(values_a), np.nan),
            values_b, np.full(size_b - len(values_b), np.nan),
        ]  # fmt: skip
        padding[name] = size_a - len(values_a) + size_b - len(values_b)
    result = compare_groups(
        pd.DataFrame(columns), "_group", names, group_a=1.0, alternative=alternative, fdr=fdr
    )
    # The padding is not the caller's NaN: take it back out of the count.
    result["nan_dropped"] = result["nan_dropped"] - result["variable"].map(padding)
    result.attrs.update({"group_a": "A", "group_b": "B"})
    return result


# --- the report ----------------------------------------------------------------------


def decode_checked_image(data: bytes, what: str) -> np.ndarray:
    """RGB uint8 pixels of a PNG/JPEG of at most 4096 px a side, read header first."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
    except Exception:  # PIL raises OSError, ValueError, SyntaxError, bomb errors
        raise InvalidInput(f"{what} is not a readable image") from None
    if max(width, height) > MAX_IMAGE_SIDE_PX or min(width, height) < 1:
        raise InvalidInput(f"{what} is {width}x{height} px; at most {MAX_IMAGE_SIDE_PX} a side")
    try:
        return decode_image(bytes(data))
    except InvalidInput as exc:
        raise InvalidInput(f"{what}: {exc}") from None
    except Exception:
        raise InvalidInput(f"{what} cannot be decoded") from None


def shard_member(data: bytes, member: str, shard_key: str) -> bytes:
    """The bytes of ``member`` in a tar shard's content."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            try:
                info = tar.getmember(member)
            except KeyError:
                raise NotFound(f"shard {shard_key!r} has no member {member[:200]!r}") from None
            handle = tar.extractfile(info) if info.isfile() else None
            if handle is None:
                raise InvalidInput(f"shard {shard_key!r}: {member[:200]!r} is not a file")
            return handle.read()
    except tarfile.TarError:
        raise InvalidInput(f"shard {shard_key!r} is not a tar shard") from None


def _curve(name: str, level: str, scored: pd.DataFrame, report: MetricReport) -> CurveSet:
    labels = scored["label"].to_numpy()
    probabilities = scored["probability"].to_numpy()
    roc = roc_curve(labels, probabilities)
    pr = pr_curve(labels, probabilities)
    best = mcc_f1(labels, probabilities)

    def interval(low: float, high: float) -> tuple[float, float] | None:
        return None if report.auroc.confidence == 0 or math.isnan(low) else (low, high)

    return CurveSet(
        name=name,
        level="patch" if level == "patch" else "slide",
        fpr=roc.fpr,
        tpr=roc.tpr,
        precision=pr.precision,
        recall=pr.recall,
        mcc_f1_points=np.column_stack([best.curve.f1, best.curve.normalized_mcc]),
        auroc=report.auroc.value,
        auprc=report.auprc.value,
        mcc_f1=report.mcc_f1.value,
        prevalence=report.positive_count / report.count,
        auroc_ci=interval(report.auroc.ci_low, report.auroc.ci_high),
        auprc_ci=interval(report.auprc.ci_low, report.auprc.ci_high),
    )


def prediction_curves(
    predictions: pd.DataFrame, *, resamples: int, seed: int
) -> tuple[list[CurveSet], list[ReliabilitySet]]:
    """Patch and slide curves per biomarker, and a reliability diagram per biomarker
    (patch level, or slide level when only slides are given).

    Raises:
        InvalidInput: Naming the biomarker and level whose rows are bad.
    """
    table = with_probability(predictions)
    if table.empty:
        raise InvalidInput("predictions: the table is empty")
    if "biomarker" in table.columns:
        if table["biomarker"].isna().any():
            raise InvalidInput("predictions: biomarker is missing for some rows")
        names = table["biomarker"].astype(str)
    else:
        names = pd.Series(ALL_SCORES, index=table.index)
    if "level" in table.columns:
        levels = table["level"].astype(str).str.lower()
        unknown = sorted(set(levels) - {"patch", "slide"})
        if unknown:
            raise InvalidInput(f"predictions: level must be patch or slide, got {unknown[:5]}")
    else:
        levels = pd.Series("patch", index=table.index)
    curves: list[CurveSet] = []
    reliability: list[ReliabilitySet] = []
    for name in dict.fromkeys(names):
        scored: dict[str, pd.DataFrame] = {}
        for level in ("patch", "slide"):
            rows = table.loc[(names == name) & (levels == level)]
            if rows.empty:
                continue
            try:
                _check_numeric(rows.reset_index(drop=True), ("label", "probability"), "rows")
                scored[level] = validate_patch_table(rows)
            except InvalidInput as exc:
                raise InvalidInput(f"predictions, {name}, {level} level: {exc}") from None
        if "slide" not in scored:
            scored["slide"] = aggregate_slides(scored["patch"], "mean")
        for level, rows in scored.items():
            try:
                report = compute_metrics(
                    rows["label"], rows["probability"], rows["patient_id"],
                    resamples=resamples, seed=seed,
                )  # fmt: skip
            except InvalidInput as exc:
                raise InvalidInput(f"predictions, {name}, {level} level: {exc}") from None
            curves.append(_curve(name, level, rows, report))
        first = scored.get("patch", scored["slide"])
        reliability.append(
            ReliabilitySet(
                name=f"{name} ({'patch' if 'patch' in scored else 'slide'} level)",
                probabilities_by_name={"calibrated": first["probability"].to_numpy()},
                labels=first["label"].to_numpy(),
            )
        )
    return curves, reliability


def ablation_for_report(table: pd.DataFrame) -> pd.DataFrame:
    """An ablation table checked so that Table 2 can be drawn from it."""
    needed = ["biomarker", "patch_set", "group", "n_features", "auprc"]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise InvalidInput(f"ablation table lacks column(s) {', '.join(missing)}")
    if table.empty:
        raise InvalidInput("ablation table is empty")
    clean = table.copy()
    for column in ("biomarker", "patch_set", "group", "note"):
        if column in clean.columns:
            text = clean[column].astype(object)
            clean[column] = text.where(text.notna(), "").astype(str)
    for column in ("ci_low", "ci_high", "prevalence"):
        if column not in clean.columns:
            clean[column] = np.nan
    for column in ("n_features", "auprc", "ci_low", "ci_high", "prevalence", "folds"):
        if column not in clean.columns:
            continue
        values = pd.to_numeric(clean[column], errors="coerce")
        required = column in ("n_features", "auprc", "folds")
        if (required and values.isna().any()) or np.isinf(values).any():
            raise InvalidInput(f"ablation table: {column} must be finite numbers")
        clean[column] = values
    if ((clean["auprc"] < 0) | (clean["auprc"] > 1)).any():
        raise InvalidInput("ablation table: auprc must lie in [0, 1]")
    if (clean["n_features"] < 0).any() or (clean["n_features"] > 1e6).any():
        raise InvalidInput("ablation table: n_features must be a count")
    if "folds" in clean.columns and ((clean["folds"] < 0) | (clean["folds"] > 1e6)).any():
        raise InvalidInput("ablation table: folds must be a count")
    clean["n_features"] = clean["n_features"].astype(np.int64)
    return clean


def heatmap_patches(
    table: pd.DataFrame, slide_id: str, biomarker: str | None, downsample: float, what: str
) -> pd.DataFrame:
    """The rows of one slide (and biomarker) with finite level-0 boxes and probabilities
    in [0, 1] that map to finite thumbnail pixels."""
    if not downsample > 0 or not math.isfinite(downsample):
        raise InvalidInput(f"{what}: downsample must be a finite number > 0")
    missing = [c for c in ("x", "y", "width", "height", "probability") if c not in table.columns]
    if missing:
        raise InvalidInput(f"{what}: the patch table lacks column(s) {', '.join(missing)}")
    rows = table
    if "slide_id" in rows.columns and slide_id:
        rows = rows.loc[rows["slide_id"].astype(str) == slide_id]
    if "biomarker" in rows.columns and biomarker:
        rows = rows.loc[rows["biomarker"].astype(str).str.lower() == biomarker]
    if rows.empty:
        raise InvalidInput(f"{what}: no patches of slide {slide_id!r} in the patch table")
    numbers = rows.loc[:, ["x", "y", "width", "height", "probability"]].apply(
        pd.to_numeric, errors="coerce"
    )
    values = numbers.to_numpy(np.float64)
    if not np.isfinite(values).all():
        raise InvalidInput(f"{what}: x, y, width, height and probability must be finite numbers")
    with np.errstate(over="ignore"):
        far = (np.abs(values[:, :2]) + np.abs(values[:, 2:4])) / downsample
    if not np.isfinite(far).all() or (far > 1e12).any():
        raise InvalidInput(f"{what}: patch boxes lie too far outside the thumbnail")
    probability = values[:, 4]
    if ((probability < 0) | (probability > 1)).any():
        raise InvalidInput(f"{what}: probabilities outside [0, 1]")
    return numbers.reset_index(drop=True)


def heatmap(
    slide_id: str,
    biomarker: str,
    thumbnail: np.ndarray,
    downsample: float,
    patches: pd.DataFrame,
    label: str = "",
) -> SlideHeatmap:
    """A slide heatmap; its slide score is the mean patch probability."""
    return SlideHeatmap(
        slide_id=slide_id or "slide",
        biomarker=biomarker,
        thumbnail=thumbnail,
        downsample=downsample,
        patches=patches,
        label=label or None,
        slide_probability=float(patches["probability"].mean()),
    )


def montage(biomarker: str, patches: Sequence[tuple[str, np.ndarray, str]]) -> PatchMontage:
    """A montage from (class name, RGB image, caption) triples, in the given order."""
    classes: dict[str, list[PatchExample]] = {}
    for class_name, image, caption in patches:
        classes.setdefault(class_name or "patches", []).append(PatchExample(image, caption))
    return PatchMontage(biomarker=biomarker, classes=classes)


@dataclass
class ReportInputs:
    """Everything one report is drawn from (see ``report.build_report``)."""

    title: str
    summary: dict[str, object] = field(default_factory=dict)
    curves: list[CurveSet] = field(default_factory=list)
    reliability: list[ReliabilitySet] = field(default_factory=list)
    ablation: pd.DataFrame | None = None
    statistics: pd.DataFrame | None = None
    montages: list[PatchMontage] = field(default_factory=list)
    heatmaps: list[SlideHeatmap] = field(default_factory=list)


def report_prefix(output_prefix: str, run_id: str) -> str:
    """Where the report goes: the prefix given, else ``runs/{run_id}/analysis/report``."""
    if output_prefix:
        prefix = output_prefix.rstrip("/")
        if not prefix:
            raise InvalidInput(f"output_prefix {output_prefix!r} names no folder")
        return validate_prefix(prefix)
    if not run_id:
        raise InvalidInput("give output_prefix or run_id: where to write the report")
    return f"{run_prefix(run_id)}/report"


def write_report(
    store: ObjectStore,
    prefix: str,
    inputs: ReportInputs,
    *,
    progress: Callable[[int, int], None] | None = None,
    budget: WorkBudget | None = None,
) -> tuple[ObjectInfo, list[ObjectInfo]]:
    """Draw the report locally, upload its figures, then ``report.html`` last (so a
    report that exists is complete); figures of an earlier report there are removed.

    Returns:
        The stored HTML and the stored figures.
    """
    budget = budget or WorkBudget.unlimited()

    def report(done: int, total: int) -> None:
        budget.check()
        if progress is not None:
            progress(done, total)

    budget.check()
    with tempfile.TemporaryDirectory(prefix="histomarker-report-") as folder:
        html = build_report(
            Path(folder),
            inputs.title,
            summary=inputs.summary,
            curves=inputs.curves,
            reliability=inputs.reliability,
            ablation=inputs.ablation,
            statistics=inputs.statistics,
            montages=inputs.montages,
            heatmaps=inputs.heatmaps,
            progress=report,
        )
        figures = []
        for path in sorted((Path(folder) / FIGURES_DIR).glob("*.png")):
            key = f"{prefix}/{FIGURES_DIR}/{path.name}"
            figures.append(store.put_bytes(key, path.read_bytes(), content_type="image/png"))
        kept = {info.key for info in figures}
        for stale in list(store.list(f"{prefix}/{FIGURES_DIR}/")):
            if stale.key not in kept and stale.key.endswith(".png"):
                store.delete(stale.key)
        stored = store.put_bytes(
            f"{prefix}/report.html", html.read_bytes(), content_type="text/html; charset=utf-8"
        )
    return stored, figures
