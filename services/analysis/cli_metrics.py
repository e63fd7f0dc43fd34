"""``histomarker metrics TABLE``: AUROC, AUPRC and MCC-F1 at patch and slide level.

The table (CSV, TSV or parquet, told apart by the extension; ``.gz`` etc. allowed for
the text forms) has one row per patch with ``slide_id``, ``label`` (0/1) and
``probability`` (0-1; ``score`` is accepted as its other name) and optionally
``patient_id``. Slide scores are aggregated from patch scores; intervals come from a
seeded bootstrap over patients (slides when there is no ``patient_id``).
"""

from __future__ import annotations

import argparse
from typing import Any

from services.analysis.aggregate import patch_and_slide_metrics
from services.analysis.curves import with_probability
from services.analysis.metrics import Estimate, MetricReport
from services.analysis.tables import read_table
from services.common.errors import InvalidInput


def _estimate_text(estimate: Estimate) -> str:
    if estimate.confidence == 0:
        return f"{estimate.value:.3f}"
    if estimate.ci_low != estimate.ci_low:  # NaN: no usable resample
        return f"{estimate.value:.3f} (no interval)"
    return (
        f"{estimate.value:.3f} ({estimate.confidence:.0%} CI "
        f"{estimate.ci_low:.3f}-{estimate.ci_high:.3f})"
    )


def _readable(patch: MetricReport, slide: MetricReport) -> dict[str, str]:
    def line(p: str, s: str) -> str:
        return f"patch {p:<30} slide {s}"

    rows = {
        "auroc": line(_estimate_text(patch.auroc), _estimate_text(slide.auroc)),
        "auprc": line(_estimate_text(patch.auprc), _estimate_text(slide.auprc)),
        "mcc_f1": line(_estimate_text(patch.mcc_f1), _estimate_text(slide.mcc_f1)),
        "best_threshold": line(f"{patch.best_threshold:.3f}", f"{slide.best_threshold:.3f}"),
    }
    # Pad after "key: " so the patch and slide columns line up under each other.
    width = max(map(len, rows))
    return {key: " " * (width - len(key)) + value for key, value in rows.items()}


def run_metrics(args: argparse.Namespace) -> dict[str, Any]:
    """Compute the metrics of ``args.table`` and return the CLI's result.

    With ``--json``: ``{"table", "patches", "slides", "patients", "aggregation",
    "top_k", "bootstrap": {"resamples", "seed", "confidence"}, "patch_level",
    "slide_level"}``, each level shaped like ``histomarker.v1.MetricSet`` (count,
    positive_count, auroc, auprc, mcc_f1 {metric, best_threshold, best_mcc, best_f1})
    plus ``at_threshold``, ``ece`` and ``bootstrap`` (resamples used, skipped, unit).
    Without it, a short table of the same numbers.

    Raises:
        NotFound: No such table file.
        InvalidInput: Bad arguments or a bad table (the message says which).
    """
    if args.bootstrap < 0:
        raise InvalidInput(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if args.top_k < 1:
        raise InvalidInput(f"--top-k must be >= 1, got {args.top_k}")
    table = with_probability(read_table(args.table))
    result = patch_and_slide_metrics(
        table, args.aggregate, args.top_k, resamples=args.bootstrap, seed=args.seed
    )
    summary: dict[str, Any] = {
        "table": str(args.table),
        "patches": result.patch.count,
        "slides": result.slide.count,
        "patients": result.patient_count,
        "aggregation": result.aggregation,
        "top_k": result.top_k,
    }
    if getattr(args, "json", False):
        summary["bootstrap"] = {
            "resamples": args.bootstrap,
            "seed": args.seed,
            "confidence": result.patch.auroc.confidence,
        }
        summary["patch_level"] = result.patch.as_dict()
        summary["slide_level"] = result.slide.as_dict()
        return summary
    if result.top_k is None:
        del summary["top_k"]
    summary.update(_readable(result.patch, result.slide))
    summary["bootstrap"] = (
        f"{args.bootstrap} resamples of {result.patch.bootstrap.unit}, seed {args.seed}; "
        f"used patch {result.patch.bootstrap.used}, slide {result.slide.bootstrap.used}"
    )
    return summary
