"""The demo's second pipeline: the paper's six biomarker CNNs, trained by the demo,
as one frozen encoder (``biomarker-cnns``), and one attention-MIL head for the six
biomarkers, scored on the same held-out slides.

After ``train_pipeline``, :func:`biomarker_cnn_weights` combines the six stored
biomarker bundles into the encoder's one weights file (an encoder that needs no
external weights: each 40x patch, stain-normalized as the paper's models were trained,
goes through all six; their pooled trunk features and logit margins are its
embedding), and :func:`train_and_serve` runs the ``train_mil`` flow
(``flows.mil.pipeline``) on the training manifest with it: every training slide
embedded into its bag, the head cross-validated and fitted with per-biomarker
temperatures, ``encoder_biomarker-cnns`` and ``mil_demo`` registered on the stack's
TorchServe. Then :func:`predict_heldout` asks the PredictionService for
``pipeline: MIL`` calls on each held-out cancer slide (stored by the paper's
predictions), and :func:`comparison` sets both pipelines' AUROC side by side with the
MIL calls' held-out calibration (ECE before and after the temperatures), and
:func:`side_by_side` writes ``comparison.html`` with patient-bootstrap CIs.

The detector's trunk, the encoder before (4 µm/px), cannot see the synthetic cues'
1-2 µm nuclear detail: MIL on it stayed under the paper's pipeline on all six
biomarkers (``benchmarks/README.md``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from services.common.vocabulary import BIOMARKERS

#: Registry name of the demo's encoder, and the head's served name (``mil_demo``).
DEMO_ENCODER = "biomarker-cnns"
DEMO_HEAD_NAME = "demo"
#: Equal-width bins of the held-out ECE.
ECE_BINS = 10


def biomarker_cnn_weights(store_url: str, results: Sequence[Any], folder: Path) -> Path:
    """The trained biomarker bundles (``train_biomarkers``' results: each with its
    ``biomarker`` and stored ``model.prefix``) copied to ``folder`` and combined into
    the ``biomarker-cnns`` encoder's weights file; returns its path."""
    from services.common.objectstore import open_store
    from services.encoders.biomarker_cnns import combine_bundles
    from services.inference.bundle import CONFIG_FILE, WEIGHTS_FILE

    store = open_store(store_url)
    bundles = {}
    for result in results:
        bundle = folder / result.biomarker
        bundle.mkdir(parents=True, exist_ok=True)
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            (bundle / name).write_bytes(store.get_bytes(f"{result.model.prefix}/{name}"))
        bundles[result.biomarker] = bundle
    return combine_bundles(bundles, folder / "biomarker_cnns.pt")


def predict_heldout(
    target: str,
    heldout: pd.DataFrame,
    biomarkers: Sequence[str],
    mil_model: str,
    say: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """MIL calls for the held-out cancer slides already in the store
    (``slides/{slide_id}.{ext}``, put there by the paper's predictions)."""
    from services.prediction.client import PredictionClient, options_of, to_dict

    answers: dict[str, dict[str, Any]] = {}
    cancer = heldout[heldout["kind"] == "cancer"]
    options = options_of(list(biomarkers), pipeline="mil", mil_model=mil_model, skip_heatmaps=True)
    with PredictionClient(target) as client:
        for number, row in enumerate(cancer.itertuples(index=False), start=1):
            began = time.perf_counter()
            extension = Path(str(row.slide_path)).suffix
            prediction = to_dict(
                client.predict_stored(
                    f"slides/{row.slide_id}{extension}", slide_id=str(row.slide_id), options=options
                )
            )
            answers[str(row.slide_id)] = prediction
            say(
                f"[MIL {number}/{len(cancer)}] {row.slide_id}: {prediction.get('status', '')}, "
                f"{prediction.get('tissue_patch_count', 0)} patches, "
                f"{time.perf_counter() - began:.1f} s"
            )
    return answers


def _ece(p: np.ndarray, y: np.ndarray) -> float:
    from services.inference.calibration import expected_calibration_error

    return expected_calibration_error(p, y, bins=ECE_BINS)


def calibration(
    mil_table: pd.DataFrame, temperatures: dict[str, float], biomarkers: Sequence[str]
) -> list[dict[str, Any]]:
    """Held-out ECE of the MIL calls per biomarker, before (T = 1) and after the
    fitted temperature; the raw probability is sigmoid(T logit(p))."""
    rows = []
    cancer = mil_table[mil_table["kind"] == "cancer"]
    for name in biomarkers:
        known = cancer[cancer[name].notna() & cancer[f"{name}_probability"].notna()]
        if known.empty:
            continue
        y = known[name].to_numpy(np.int64)
        p = np.clip(known[f"{name}_probability"].to_numpy(np.float64), 1e-12, 1 - 1e-12)
        t = float(temperatures.get(name, 1.0))
        raw = 1.0 / (1.0 + np.exp(-t * np.log(p / (1 - p))))
        rows.append(
            {
                "biomarker": name,
                "slides": len(y),
                "temperature": round(t, 3),
                "ece_before": round(_ece(raw, y), 4),
                "ece_after": round(_ece(p, y), 4),
            }
        )
    return rows


def comparison(
    paper: Sequence[Any], mil: Sequence[Any], calibrated: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Both pipelines' held-out AUROC per biomarker, which is better, and the MIL
    calibration, as JSON and Markdown."""
    by_task = {r.task: r for r in mil}
    rows = []
    for result in paper:
        if result.task not in BIOMARKERS:
            continue
        other = by_task.get(result.task)
        a = result.auroc
        b = other.auroc if other is not None else math.nan
        rows.append(
            {
                "biomarker": result.task,
                "paper_auroc": None if not math.isfinite(a) else round(a, 4),
                "mil_auroc": None if not math.isfinite(b) else round(b, 4),
                "mil_at_least_paper": bool(math.isfinite(a) and math.isfinite(b) and b >= a),
                "better": None if not (math.isfinite(a) and math.isfinite(b)) else max(a, b),
            }
        )
    wins = sum(r["mil_at_least_paper"] for r in rows)
    lines = [
        "| biomarker | paper (patch CNN, mean) | MIL (biomarker CNNs + ABMIL) | MIL >= paper |",
        "|---|---|---|---|",
    ]
    for r in rows:
        cells = ["n/a" if r[k] is None else f"{r[k]:.3f}" for k in ("paper_auroc", "mil_auroc")]
        lines.append(
            f"| {r['biomarker'].upper()} | {cells[0]} | {cells[1]} | "
            f"{'yes' if r['mil_at_least_paper'] else 'no'} |"
        )
    lines += [
        "",
        f"MIL is at least the paper's pipeline on {wins} of {len(rows)} biomarkers.",
        "",
        "| biomarker | MIL held-out ECE before T | after T | T |",
        "|---|---|---|---|",
    ]
    for c in calibrated:
        lines.append(
            f"| {c['biomarker'].upper()} | {c['ece_before']:.3f} | {c['ece_after']:.3f} | "
            f"{c['temperature']:.2f} |"
        )
    return {
        "rows": rows,
        "mil_at_least_paper": wins,
        "calibration": list(calibrated),
        "markdown": "\n".join(lines),
    }


def side_by_side(
    out: Path, paper_table: pd.DataFrame, mil_table: pd.DataFrame, heldout: pd.DataFrame
) -> Path:
    """``comparison.html`` and ``comparison.json`` in ``out``: both pipelines on the
    same held-out patients, AUROC with 95% CIs from a paired bootstrap over patients,
    ECE, Brier, ROC curves and reliability diagrams (``histomarker analysis compare``
    on the demo's tables); returns the page's path."""
    from services.analysis.comparison import pair_tables
    from services.analysis.comparison_report import write_comparison

    sites = dict(zip(heldout["slide_id"].astype(str), heldout["site"], strict=True))
    return write_comparison(pair_tables(paper_table, mil_table, sites), out).html


def temperatures(card_path: str | Path) -> dict[str, float]:
    """Task -> temperature from a ``mil train`` model card."""
    card = json.loads(Path(card_path).read_text())
    return dict(zip(card["tasks"], (float(t) for t in card["temperatures"]), strict=True))
