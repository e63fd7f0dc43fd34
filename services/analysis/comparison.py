"""The paper's patch CNN and attention MIL side by side on the same held-out patients.

Input: two per-slide prediction tables of the same held-out slides, one per pipeline
(the demo's ``predictions.csv`` and ``predictions_mil.csv``, or any table with the
columns below). This module pairs them and computes the numbers;
:mod:`services.analysis.comparison_report` writes ``comparison.json`` and the
``comparison.html`` page with its figures (``histomarker analysis compare``).

The CSV contract, one row per slide (other columns are ignored):

- ``slide_id``, ``patient_id``: required, never empty; a slide id appears once.
- ``site``: the tissue source site; optional (else taken from the other table, a
  manifest, or ``unknown``).
- ``kind``: optional; when present only ``cancer`` rows are scored (biomarkers are
  called on cancer slides, as the demo does).
- per biomarker ``<name>`` (``tp53`` ... ``basal``): the true label, 0 or 1, empty
  when unknown; and ``<name>_probability``: the pipeline's calibrated slide
  probability in [0, 1], empty when the pipeline gave none. A biomarker is compared
  when both tables have both of its columns.

What is computed, per biomarker, on the slides both tables hold with a known label
and a probability from both pipelines (so both pipelines are scored on exactly the
same slides, hence the same patients):

- slide-level AUROC of each pipeline (trapezoidal, ties half; ``metrics.auroc``),
  with a 95% percentile bootstrap interval that resamples *patients* with
  replacement (all slides of a drawn patient come along), 2000 resamples, seeded;
- the AUROC difference MIL − paper with its *paired* interval: each resample scores
  both pipelines on the same drawn patients; resamples with one class only are
  skipped and counted, as in ``metrics.bootstrap``;
- ECE as the demo reports it (top-class confidence, 10 equal-width bins,
  ``services.inference.calibration.expected_calibration_error``) and the Brier
  score, mean (p − y)², both point values;
- slides, patients, sites, positives and negatives.

A biomarker with one class only (or no usable slide) has no AUROC: it is reported
as undefined with the reason, never an error. A bootstrap resample weights each slide
by how often its patient was drawn; the AUROC of a weighted sample is the weighted
Mann-Whitney statistic, which equals ``metrics.auroc`` on the sample with the rows
repeated, and lets all resamples be scored with two matrix products.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from services.analysis.metrics import Estimate, auroc
from services.analysis.tables import read_table
from services.common.errors import InvalidInput
from services.common.vocabulary import BIOMARKERS

#: The two pipelines, in the order of every table and figure.
PIPELINES: tuple[str, ...] = ("paper", "mil")
#: How the page names each pipeline.
PIPELINE_LABELS: dict[str, str] = {
    "paper": "paper (patch CNN, mean of patches)",
    "mil": "MIL (encoder + attention MIL)",
}
#: Short names in legends and table headers.
PIPELINE_SHORT: dict[str, str] = {"paper": "paper", "mil": "MIL"}
#: Equal-width bins of the ECE and of the reliability diagrams.
ECE_BINS = 10
#: Bootstrap resamples of patients by default.
RESAMPLES = 2000
#: Confidence level of the intervals.
CONFIDENCE = 0.95
#: Site given to slides whose site no input names.
UNKNOWN_SITE = "unknown"
#: Resamples scored at once (bounds the memory of the weight matrices).
_CHUNK = 250


# --- the input contract ------------------------------------------------------------


@dataclass(frozen=True)
class PairedPredictions:
    """Both pipelines' calls on the slides the two tables have in common.

    Attributes:
        table: One row per common slide: ``slide_id``, ``patient_id``, ``site`` (text),
            and per biomarker ``<name>`` (0.0 / 1.0, NaN unknown), ``<name>_paper`` and
            ``<name>_mil`` (probabilities, NaN when that pipeline gave none).
        biomarkers: Biomarkers both tables carry, in :data:`BIOMARKERS` order.
        paper_slides: Slides (cancer rows) in the paper's table.
        mil_slides: Slides (cancer rows) in the MIL table.
    """

    table: pd.DataFrame = field(repr=False)
    biomarkers: tuple[str, ...]
    paper_slides: int
    mil_slides: int


def _numeric(table: pd.DataFrame, column: str, what: str) -> pd.Series:
    try:
        return pd.to_numeric(table[column], errors="raise").astype(np.float64)
    except (TypeError, ValueError):
        raise InvalidInput(f"{what}: column {column!r} is not numeric") from None


def _prepared(table: pd.DataFrame, what: str) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """One pipeline's table checked against the contract: cancer rows, text ids,
    numeric labels and probabilities; and the biomarkers it carries."""
    missing = [c for c in ("slide_id", "patient_id") if c not in table.columns]
    if missing:
        raise InvalidInput(f"{what} lacks column(s) {', '.join(missing)}")
    biomarkers = tuple(
        name for name in BIOMARKERS if {name, f"{name}_probability"} <= set(table.columns)
    )
    if not biomarkers:
        raise InvalidInput(
            f"{what} has no biomarker columns (a label <name> and <name>_probability for "
            f"one of {', '.join(BIOMARKERS)})"
        )
    if "kind" in table.columns:
        table = table[table["kind"].astype(str) == "cancer"]
    for column in ("slide_id", "patient_id"):
        empty = table[column].isna() | (table[column].astype(str).str.strip() == "")
        if empty.any():
            raise InvalidInput(f"{what}: {column} is empty in {int(empty.sum())} row(s)")
    out = pd.DataFrame(
        {
            "slide_id": table["slide_id"].astype(str).to_numpy(),
            "patient_id": table["patient_id"].astype(str).to_numpy(),
        }
    )
    repeated = out["slide_id"][out["slide_id"].duplicated()].unique()
    if len(repeated):
        raise InvalidInput(f"{what}: slide_id repeated: {', '.join(map(str, repeated[:5]))}")
    given = table["site"] if "site" in table.columns else pd.Series([None] * len(table))
    out["site"] = [None if pd.isna(s) or not str(s).strip() else str(s).strip() for s in given]
    for name in biomarkers:
        labels = _numeric(table, name, what).to_numpy()
        if ((labels != 0) & (labels != 1) & ~np.isnan(labels)).any():
            raise InvalidInput(f"{what}: labels in {name!r} must be 0, 1 or empty")
        probabilities = _numeric(table, f"{name}_probability", what).to_numpy()
        if ((probabilities < 0) | (probabilities > 1)).any():
            raise InvalidInput(f"{what}: {name}_probability holds values outside [0, 1]")
        out[name] = labels
        out[f"{name}_probability"] = probabilities
    return out, biomarkers


def pair_tables(
    paper: pd.DataFrame,
    mil: pd.DataFrame,
    sites: Mapping[str, str] | pd.Series | None = None,
) -> PairedPredictions:
    """The two pipelines' tables joined on ``slide_id`` (see the module doc).

    Args:
        paper: The paper pipeline's per-slide table (the CSV contract).
        mil: The MIL pipeline's per-slide table, same contract.
        sites: Slide id -> tissue source site, for tables without a ``site`` column
            (e.g. from the cohort manifest).

    Raises:
        InvalidInput: A table breaks the contract, no slide is in both, a slide's
            patient or a known label differs between the tables.
    """
    a, names_a = _prepared(paper, "the paper's table")
    b, names_b = _prepared(mil, "the MIL table")
    biomarkers = tuple(name for name in names_a if name in names_b)
    if not biomarkers:
        raise InvalidInput(
            f"no biomarker in both tables (paper: {', '.join(names_a)}; MIL: {', '.join(names_b)})"
        )
    joined = a.merge(b, on="slide_id", how="inner", suffixes=("_a", "_b"))
    if joined.empty:
        raise InvalidInput(
            f"no slide is in both tables ({len(a)} cancer slides in the paper's, "
            f"{len(b)} in the MIL one)"
        )
    differs = joined["patient_id_a"] != joined["patient_id_b"]
    if differs.any():
        raise InvalidInput(
            f"slide {joined['slide_id'][differs].iloc[0]} has another patient in each table"
        )
    out = pd.DataFrame({"slide_id": joined["slide_id"], "patient_id": joined["patient_id_a"]})
    # A site from the paper's table, else the MIL table, else ``sites``.
    lookup = {str(k): str(v) for k, v in dict(sites or {}).items() if not pd.isna(v)}
    site = (
        joined["site_a"]
        .combine_first(joined["site_b"])
        .combine_first(joined["slide_id"].map(lookup))
        .fillna(UNKNOWN_SITE)
    )
    out["site"] = site.astype(str).to_numpy()
    for name in biomarkers:
        y_a, y_b = joined[f"{name}_a"].to_numpy(), joined[f"{name}_b"].to_numpy()
        clash = ~np.isnan(y_a) & ~np.isnan(y_b) & (y_a != y_b)
        if clash.any():
            slide = joined["slide_id"].to_numpy()[clash][0]
            raise InvalidInput(f"slide {slide} has another {name} label in each table")
        out[name] = np.where(np.isnan(y_a), y_b, y_a)
        out[f"{name}_paper"] = joined[f"{name}_probability_a"].to_numpy()
        out[f"{name}_mil"] = joined[f"{name}_probability_b"].to_numpy()
    return PairedPredictions(out.reset_index(drop=True), biomarkers, len(a), len(b))


def manifest_sites(path: str | Path) -> dict[str, str]:
    """Slide id -> site from a cohort manifest (CSV, TSV or parquet).

    Raises:
        NotFound: No such file.
        InvalidInput: It lacks ``slide_id`` or ``site``.
    """
    table = read_table(path)
    missing = [c for c in ("slide_id", "site") if c not in table.columns]
    if missing:
        raise InvalidInput(f"the manifest {path} lacks column(s) {', '.join(missing)}")
    known = table[table["site"].notna()]
    return dict(zip(known["slide_id"].astype(str), known["site"].astype(str), strict=True))


def load_pair(
    paper_path: str | Path, mil_path: str | Path, manifest: str | Path | None = None
) -> PairedPredictions:
    """:func:`pair_tables` of two prediction files, sites from ``manifest`` when given.

    Raises:
        NotFound: A file does not exist.
        InvalidInput: As :func:`pair_tables`, or a file that does not parse.
    """
    sites = manifest_sites(manifest) if manifest is not None else None
    return pair_tables(read_table(paper_path), read_table(mil_path), sites)


# --- the numbers -------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineScores:
    """One pipeline on one biomarker: AUROC with its interval (None when undefined),
    ECE (top-class, :data:`ECE_BINS` bins) and Brier score (None with no slide)."""

    auroc: Estimate | None
    ece: float | None
    brier: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "auroc": None if self.auroc is None else self.auroc.as_dict(),
            "ece": self.ece,
            "brier": self.brier,
        }


@dataclass(frozen=True)
class BiomarkerComparison:
    """Both pipelines on one biomarker, on the same slides.

    Attributes:
        biomarker: The biomarker name.
        slides, patients, sites: What was scored.
        positives, negatives: Slides of each class.
        unlabelled: Common slides left out for an unknown label.
        unscored: Labelled slides left out because a pipeline gave no probability,
            per pipeline (a slide missing from both counts in both).
        paper, mil: Each pipeline's scores.
        difference: AUROC MIL − paper with its paired interval; None when undefined.
        resamples_used, skipped_single_class: How the bootstrap went.
        note: Why the AUROC is undefined, else empty.
    """

    biomarker: str
    slides: int
    patients: int
    sites: int
    positives: int
    negatives: int
    unlabelled: int
    unscored: dict[str, int]
    paper: PipelineScores
    mil: PipelineScores
    difference: Estimate | None
    resamples_used: int
    skipped_single_class: int
    note: str = ""

    @property
    def defined(self) -> bool:
        return self.difference is not None

    def better(self, metric: str) -> str | None:
        """Which pipeline is better on ``auroc`` (higher), ``ece`` or ``brier``
        (lower); None when tied or undefined."""
        a, b = (self._value(p, metric) for p in (self.paper, self.mil))
        if a is None or b is None or a == b:
            return None
        higher_is_better = metric == "auroc"
        return "mil" if (b > a) == higher_is_better else "paper"

    @staticmethod
    def _value(scores: PipelineScores, metric: str) -> float | None:
        if metric == "auroc":
            return None if scores.auroc is None else scores.auroc.value
        value: float | None = getattr(scores, metric)
        return value

    @property
    def verdict(self) -> str:
        """What the paired interval says about the AUROC difference."""
        d = self.difference
        if d is None:
            return "undefined"
        if math.isnan(d.ci_low) or math.isnan(d.ci_high):
            return "no interval"
        if d.ci_low > 0:
            return "MIL higher"
        if d.ci_high < 0:
            return "paper higher"
        return "no clear difference"

    def as_dict(self) -> dict[str, Any]:
        return {
            "biomarker": self.biomarker,
            "defined": self.defined,
            "note": self.note,
            "slides": self.slides,
            "patients": self.patients,
            "sites": self.sites,
            "positives": self.positives,
            "negatives": self.negatives,
            "unlabelled": self.unlabelled,
            "unscored": dict(self.unscored),
            "paper": self.paper.as_dict(),
            "mil": self.mil.as_dict(),
            "difference_mil_minus_paper": (
                None if self.difference is None else self.difference.as_dict()
            ),
            "verdict": self.verdict,
            "better": {m: self.better(m) for m in ("auroc", "ece", "brier")},
            "bootstrap": {
                "used": self.resamples_used,
                "skipped_single_class": self.skipped_single_class,
            },
        }


@dataclass(frozen=True)
class Comparison:
    """The whole comparison: what was paired and one entry per biomarker."""

    slides: int
    patients: int
    site_slides: dict[str, int]
    paper_slides: int
    mil_slides: int
    resamples: int
    seed: int
    confidence: float
    biomarkers: tuple[BiomarkerComparison, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "pipelines": dict(PIPELINE_LABELS),
            "common_slides": self.slides,
            "common_patients": self.patients,
            "sites": len(self.site_slides),
            "slides_per_site": dict(self.site_slides),
            "paper_slides": self.paper_slides,
            "mil_slides": self.mil_slides,
            "bootstrap": {
                "unit": "patient",
                "resamples": self.resamples,
                "seed": self.seed,
                "confidence": self.confidence,
                "interval": "percentile",
            },
            "ece": {"bins": ECE_BINS, "binning": "equal-width", "confidence": "top class"},
            "biomarkers": [b.as_dict() for b in self.biomarkers],
        }


def brier_score(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean squared difference of probability and 0/1 label (0 best, 1 worst)."""
    return float(np.mean((np.asarray(probabilities) - np.asarray(labels)) ** 2))


def _ece(labels: np.ndarray, probabilities: np.ndarray) -> float:
    # Imported here: the calibration module pulls in torch. Called directly rather
    # than through metrics.ece, which refuses one class (where ECE is still defined).
    from services.inference.calibration import expected_calibration_error

    return expected_calibration_error(probabilities, labels.astype(np.int64), bins=ECE_BINS)


def _pair_matrix(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """1 where a positive outranks a negative, 0.5 on a tie, else 0."""
    p, n = positive[:, None], negative[None, :]
    return (p > n).astype(np.float64) + 0.5 * (p == n)


def _patient_counts(groups: int, resamples: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Chunks of (resamples, groups) draw counts: each row draws ``groups`` patients
    with replacement."""
    done = 0
    while done < resamples:
        rows = min(_CHUNK, resamples - done)
        draws = rng.integers(0, groups, (rows, groups))
        flat = (draws + groups * np.arange(rows)[:, None]).ravel()
        yield np.bincount(flat, minlength=rows * groups).reshape(rows, groups).astype(np.float64)
        done += rows


def paired_auroc_bootstrap(
    labels: np.ndarray,
    scores: Mapping[str, np.ndarray],
    groups: np.ndarray,
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], int]:
    """AUROC of each named score on the same patient resamples.

    Args:
        labels: 0/1 per slide, both classes present.
        scores: Name -> probability per slide.
        groups: Patient id per slide.
        resamples: Resamples drawn (seeded by ``seed``).

    Returns:
        Name -> the AUROC of each used resample (same order for every name), and how
        many resamples were skipped for holding one class only.
    """
    codes = np.unique(groups.astype(str), return_inverse=True)[1]
    positive = labels == 1
    matrices = {
        name: _pair_matrix(np.asarray(s)[positive], np.asarray(s)[~positive])
        for name, s in scores.items()
    }
    samples: dict[str, list[np.ndarray]] = {name: [] for name in scores}
    skipped = 0
    for counts in _patient_counts(int(codes.max()) + 1, resamples, np.random.default_rng(seed)):
        weights = counts[:, codes]
        w_pos, w_neg = weights[:, positive], weights[:, ~positive]
        pairs = w_pos.sum(axis=1) * w_neg.sum(axis=1)
        keep = pairs > 0
        skipped += int((~keep).sum())
        for name, matrix in matrices.items():
            wins = ((w_pos[keep] @ matrix) * w_neg[keep]).sum(axis=1)
            samples[name].append(wins / pairs[keep])
    return {name: np.concatenate(parts) for name, parts in samples.items()}, skipped


def scored_slides(
    paired: PairedPredictions, biomarker: str
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Labels and both pipelines' probabilities of the slides ``biomarker`` is scored
    on: a known label and a probability from both pipelines."""
    return _arrays(_scored_rows(paired.table, biomarker), biomarker)


def _arrays(rows: pd.DataFrame, biomarker: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    y = rows[biomarker].to_numpy(np.int64)
    return y, {p: rows[f"{biomarker}_{p}"].to_numpy(np.float64) for p in PIPELINES}


def _scored_rows(table: pd.DataFrame, biomarker: str) -> pd.DataFrame:
    return table[
        table[biomarker].notna()
        & table[f"{biomarker}_paper"].notna()
        & table[f"{biomarker}_mil"].notna()
    ]


def _interval(value: float, samples: np.ndarray, confidence: float) -> Estimate:
    if len(samples) == 0:
        return Estimate(value, math.nan, math.nan, confidence)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    return Estimate(value, float(low), float(high), confidence)


def compare_biomarker(
    paired: PairedPredictions,
    biomarker: str,
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> BiomarkerComparison:
    """Both pipelines on ``biomarker`` (see the module doc for what is computed)."""
    t = paired.table
    labelled = t[t[biomarker].notna()]
    rows = _scored_rows(t, biomarker)
    y, probabilities = _arrays(rows, biomarker)
    positives = int(y.sum())
    common: dict[str, Any] = {
        "biomarker": biomarker,
        "slides": len(y),
        "patients": int(rows["patient_id"].nunique()),
        "sites": int(rows["site"].nunique()),
        "positives": positives,
        "negatives": len(y) - positives,
        "unlabelled": len(t) - len(labelled),
        "unscored": {p: int(labelled[f"{biomarker}_{p}"].isna().sum()) for p in PIPELINES},
    }

    def calibration(p: str) -> tuple[float | None, float | None]:
        if len(y) == 0:
            return None, None
        return _ece(y, probabilities[p]), brier_score(y, probabilities[p])

    if len(y) == 0 or positives in (0, len(y)):
        note = (
            "no slide with a known label and a probability from both pipelines"
            if len(y) == 0
            else f"one class only: all {len(y)} slides are "
            f"{'positive' if positives else 'negative'}; AUROC is undefined"
        )
        return BiomarkerComparison(
            **common,
            paper=PipelineScores(None, *calibration("paper")),
            mil=PipelineScores(None, *calibration("mil")),
            difference=None,
            resamples_used=0,
            skipped_single_class=0,
            note=note,
        )
    samples, skipped = paired_auroc_bootstrap(
        y, probabilities, rows["patient_id"].to_numpy(), resamples=resamples, seed=seed
    )
    point = {p: auroc(y, probabilities[p]) for p in PIPELINES}
    scores = {
        p: PipelineScores(_interval(point[p], samples[p], confidence), *calibration(p))
        for p in PIPELINES
    }
    difference = _interval(
        point["mil"] - point["paper"], samples["mil"] - samples["paper"], confidence
    )
    return BiomarkerComparison(
        **common,
        paper=scores["paper"],
        mil=scores["mil"],
        difference=difference,
        resamples_used=resamples - skipped,
        skipped_single_class=skipped,
    )


def compare(
    paired: PairedPredictions,
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> Comparison:
    """Both pipelines on every biomarker the tables share.

    Raises:
        InvalidInput: ``resamples`` below 1 or ``confidence`` outside (0, 1).
    """
    if resamples < 1:
        raise InvalidInput(f"bootstrap resamples must be >= 1, got {resamples}")
    if not 0 < confidence < 1:
        raise InvalidInput(f"confidence must be strictly between 0 and 1, got {confidence}")
    t = paired.table
    return Comparison(
        slides=len(t),
        patients=int(t["patient_id"].nunique()),
        site_slides={str(k): int(v) for k, v in t["site"].value_counts().sort_index().items()},
        paper_slides=paired.paper_slides,
        mil_slides=paired.mil_slides,
        resamples=resamples,
        seed=seed,
        confidence=confidence,
        biomarkers=tuple(
            compare_biomarker(paired, name, resamples=resamples, seed=seed, confidence=confidence)
            for name in paired.biomarkers
        ),
    )
