"""The comparison page of :mod:`services.analysis.comparison`: ``comparison.json``
with the numbers, the two figure grids (ROC curves and reliability diagrams of both
pipelines per biomarker, PNG files in ``comparison-figures/``) and
``comparison.html``, which inlines them (each image links to its file) so the page
alone is complete. CSS is the analysis report's; no scripts, nothing loaded from the
network; text from the inputs is HTML-escaped. Every file is written to a temporary
name and renamed, the page last, so a page that exists is complete.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from services.analysis.comparison import (
    CONFIDENCE,
    ECE_BINS,
    PIPELINE_LABELS,
    PIPELINE_SHORT,
    PIPELINES,
    RESAMPLES,
    BiomarkerComparison,
    Comparison,
    PairedPredictions,
    compare,
    load_pair,
    scored_slides,
)
from services.analysis.figures import DPI, styled
from services.analysis.metrics import Estimate, roc_curve
from services.analysis.report import write_text_atomically
from services.common.errors import InvalidInput

#: Output names, in the output folder.
COMPARISON_HTML = "comparison.html"
COMPARISON_JSON = "comparison.json"
FIGURES_DIR = "comparison-figures"
#: Line colour of each pipeline in the figures.
PIPELINE_COLOURS: dict[str, str] = {"paper": "tab:blue", "mil": "tab:red"}


# --- figures -----------------------------------------------------------------------


def _grid(count: int) -> tuple[int, int]:
    columns = min(3, max(count, 1))
    return math.ceil(max(count, 1) / columns), columns


def _save_png(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    figure.savefig(partial, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.12)
    os.replace(partial, path)
    return path


def _undefined_panel(axes: Axes, result: BiomarkerComparison) -> None:
    axes.text(
        0.5,
        0.5,
        "\n".join(_wrap(result.note, 30)),
        ha="center",
        va="center",
        fontsize=9,
        color="0.3",
        transform=axes.transAxes,
        bbox={"boxstyle": "round,pad=0.5", "facecolor": "white", "edgecolor": "0.8"},
    )


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width) or [""]


def _panel_title(result: BiomarkerComparison) -> str:
    return (
        f"{result.biomarker.upper()}: {result.slides} slides, {result.patients} patients "
        f"({result.positives}+ / {result.negatives}-)"
    )


def _unit_square(
    axes: Any, result: BiomarkerComparison, xlabel: str, ylabel: str, pad: float
) -> None:
    """A square 0-1 panel with its diagonal, labels and the biomarker's title."""
    axes.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1)
    axes.set_xlim(-pad, 1 + pad)
    axes.set_ylim(-pad, 1 + pad)
    axes.set_aspect("equal")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(_panel_title(result))


def roc_grid_figure(paired: PairedPredictions, comparison: Comparison, path: Path) -> Path:
    """One panel per biomarker: both pipelines' slide ROC curves, AUROC [95% CI] in
    the legend; a biomarker without an AUROC says why."""
    rows, columns = _grid(len(comparison.biomarkers))
    with styled():
        figure = Figure(figsize=(4.2 * columns, 4.3 * rows), layout="constrained")
        panels = figure.subplots(rows, columns, squeeze=False).ravel()
        for axes, result in zip(panels, comparison.biomarkers, strict=False):
            _unit_square(axes, result, "false positive rate", "true positive rate", 0.01)
            if not result.defined:
                _undefined_panel(axes, result)
                continue
            y, scores = scored_slides(paired, result.biomarker)
            for p in PIPELINES:
                curve = roc_curve(y, scores[p])
                estimate = getattr(result, p).auroc
                axes.plot(
                    curve.fpr,
                    curve.tpr,
                    color=PIPELINE_COLOURS[p],
                    linewidth=1.6,
                    label=f"{PIPELINE_SHORT[p]}: {_estimate_text(estimate)}",
                )
            d = result.difference
            axes.plot([], [], " ", label=f"MIL − paper: {_estimate_text(d, signed=True)}")
            axes.legend(loc="lower right", title="AUROC [95% CI]", title_fontsize=8)
        for axes in panels[len(comparison.biomarkers) :]:
            axes.set_visible(False)
        figure.suptitle(
            "Slide ROC on the same held-out slides (CIs: bootstrap over patients)",
            fontsize=11,
            fontweight="bold",
        )
        return _save_png(figure, path)


def _reliability_bins(labels: np.ndarray, probabilities: np.ndarray) -> pd.DataFrame:
    """Mean probability, observed share of positives and slide count per equal-width
    bin of the predicted probability (empty bins dropped)."""
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    which = np.clip(np.searchsorted(edges, probabilities, side="right") - 1, 0, ECE_BINS - 1)
    frame = pd.DataFrame({"bin": which, "p": probabilities, "y": labels})
    return frame.groupby("bin").agg(mean_p=("p", "mean"), share=("y", "mean"), n=("y", "size"))


def reliability_grid_figure(paired: PairedPredictions, comparison: Comparison, path: Path) -> Path:
    """One panel per biomarker: observed share of positives against the mean
    predicted probability in each of :data:`ECE_BINS` equal-width bins, both
    pipelines; marker area grows with the slides in the bin."""
    rows, columns = _grid(len(comparison.biomarkers))
    with styled():
        figure = Figure(figsize=(4.2 * columns, 4.3 * rows), layout="constrained")
        panels = figure.subplots(rows, columns, squeeze=False).ravel()
        for axes, result in zip(panels, comparison.biomarkers, strict=False):
            _unit_square(
                axes, result, "mean predicted probability", "observed share positive", 0.02
            )
            if result.slides == 0:
                _undefined_panel(axes, result)
                continue
            y, scores = scored_slides(paired, result.biomarker)
            for p in PIPELINES:
                bins = _reliability_bins(y, scores[p])
                scores_p = getattr(result, p)
                colour = PIPELINE_COLOURS[p]
                axes.plot(
                    bins["mean_p"],
                    bins["share"],
                    color=colour,
                    linewidth=1.2,
                    marker="o",
                    markersize=4,
                    alpha=0.85,
                    label=(
                        f"{PIPELINE_SHORT[p]}: ECE {scores_p.ece:.3f}, Brier {scores_p.brier:.3f}"
                    ),
                )
                axes.scatter(
                    bins["mean_p"],
                    bins["share"],
                    s=10 + 400 * bins["n"] / max(result.slides, 1),
                    color=colour,
                    alpha=0.35,
                    edgecolors=colour,
                    linewidths=0.8,
                )
            axes.legend(loc="upper left")
        for axes in panels[len(comparison.biomarkers) :]:
            axes.set_visible(False)
        figure.suptitle(
            f"Reliability on the same held-out slides ({ECE_BINS} equal-width bins)",
            fontsize=11,
            fontweight="bold",
        )
        return _save_png(figure, path)


def _estimate_text(estimate: Estimate | None, signed: bool = False) -> str:
    if estimate is None:
        return "undefined"
    value = f"{estimate.value:+.3f}" if signed else f"{estimate.value:.3f}"
    if math.isnan(estimate.ci_low) or math.isnan(estimate.ci_high):
        return f"{value} [no interval]"
    low, high = (f"{v:+.3f}" if signed else f"{v:.3f}" for v in (estimate.ci_low, estimate.ci_high))
    return f"{value} [{low}, {high}]"


# --- the page ----------------------------------------------------------------------


@dataclass(frozen=True)
class ComparisonOutputs:
    """Where :func:`write_comparison` wrote, and what."""

    html: Path
    json: Path
    figures: tuple[Path, ...]
    comparison: Comparison


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _figure_html(path: Path, alt: str, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    relative = f"{FIGURES_DIR}/{path.name}"
    return (
        f'<figure><a href="{_e(relative)}"><img src="data:image/png;base64,{data}" '
        f'alt="{_e(alt)}" data-file="{_e(relative)}"></a>'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _cell(text: str, best: bool = False, title: str = "") -> str:
    css = ' class="best"' if best else ""
    hover = f' title="{_e(title)}"' if title else ""
    return f"<td{css}{hover}>{_e(text)}</td>"


def _table_html(comparison: Comparison) -> str:
    head = (
        '<tr><th class="label" rowspan="2">biomarker</th><th rowspan="2">slides</th>'
        '<th rowspan="2">patients</th><th rowspan="2">sites</th>'
        '<th rowspan="2">positive / negative</th>'
        '<th colspan="3">slide AUROC [95% CI]</th><th rowspan="2">AUROC verdict</th>'
        f'<th colspan="2">ECE ({ECE_BINS} bins)</th><th colspan="2">Brier score</th></tr>'
        "<tr><th>paper</th><th>MIL</th><th>MIL − paper</th>"
        "<th>paper</th><th>MIL</th><th>paper</th><th>MIL</th></tr>"
    )
    rows = []
    for r in comparison.biomarkers:
        best = {m: r.better(m) for m in ("auroc", "ece", "brier")}
        cells = [
            f'<td class="label">{_e(r.biomarker.upper())}</td>',
            _cell(str(r.slides)),
            _cell(str(r.patients)),
            _cell(str(r.sites)),
            _cell(f"{r.positives} / {r.negatives}"),
            *(
                _cell(_estimate_text(getattr(r, p).auroc), best["auroc"] == p, r.note)
                for p in PIPELINES
            ),
            _cell(_estimate_text(r.difference, signed=True), title=r.note),
            _cell(r.verdict if r.defined else r.note.split(";")[0]),
            *(_cell(_number(getattr(r, p).ece), best["ece"] == p) for p in PIPELINES),
            *(_cell(_number(getattr(r, p).brier), best["brier"] == p) for p in PIPELINES),
        ]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def summary_text(comparison: Comparison) -> str:
    """What was compared, on whom, and how the intervals were made, in two sentences."""
    sites = comparison.site_slides
    named = ", ".join(f"{site} {n}" for site, n in sites.items())
    return (
        f"{comparison.slides} held-out cancer slides of {comparison.patients} patients from "
        f"{len(sites)} site(s) ({named} slides) are in both tables (the paper's table has "
        f"{comparison.paper_slides}, the MIL one {comparison.mil_slides}); each biomarker is "
        "scored on those with a known label and a probability from both pipelines, so both "
        "pipelines are measured on the same patients. 95% intervals are percentiles of "
        f"{comparison.resamples} bootstrap resamples of patients (seed {comparison.seed}; all "
        "slides of a drawn patient come along); the difference MIL − paper uses the same "
        "paired resamples, so an interval that excludes 0 is a difference the held-out "
        f"patients support. ECE: top-class confidence in {ECE_BINS} equal-width bins (as the "
        "demo's results.md); Brier: mean squared error of the probability. Bold: the better "
        "pipeline per metric."
    )


def _page(comparison: Comparison, figures_html: str) -> str:
    from services.analysis.report import CSS

    undefined = [r for r in comparison.biomarkers if not r.defined]
    notes = "".join(f"<li>{_e(r.biomarker.upper())}: {_e(r.note)}</li>" for r in undefined)
    undefined_html = f'<ul class="note">{notes}</ul>' if undefined else ""
    sections = [
        (
            "summary",
            "Same held-out patients, two pipelines",
            (
                f'<p class="note">{_e(summary_text(comparison))}</p>'
                f"{_table_html(comparison)}{undefined_html}"
            ),
        ),
        ("figures", "ROC curves and reliability", figures_html),
    ]
    nav = "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t, _ in sections)
    content = "".join(
        f'<section id="{a}"><h2>{_e(t)}</h2>{body}</section>' for a, t, body in sections
    )
    title = "Paper patch CNN vs MIL on the same held-out patients"
    labels = "; ".join(f"{PIPELINE_SHORT[p]}: {PIPELINE_LABELS[p]}" for p in PIPELINES)
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{_e(title)} — histomarker'
        f"</title><style>{CSS}</style></head><body>"
        f"<header><h1>{_e(title)}</h1><p>{_e(labels)}</p></header>"
        f"<nav>{nav}</nav><main>{content}</main></body></html>\n"
    )


def write_comparison(
    paired: PairedPredictions,
    out_dir: str | Path,
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> ComparisonOutputs:
    """Compare both pipelines and write ``comparison.json``, the PNG figures in
    ``comparison-figures/`` and ``comparison.html`` (last, so a page that exists is
    complete); each file is written to a temporary name and renamed.

    Raises:
        InvalidInput: Bad bootstrap arguments (see :func:`compare`).
    """
    comparison = compare(paired, resamples=resamples, seed=seed, confidence=confidence)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    folder = out / FIGURES_DIR
    roc = roc_grid_figure(paired, comparison, folder / "roc.png")
    reliability = reliability_grid_figure(paired, comparison, folder / "reliability.png")
    document = comparison.as_dict()
    json_path = out / COMPARISON_JSON
    write_text_atomically(json_path, json.dumps(document, indent=1) + "\n")
    figures_html = _figure_html(
        roc,
        "ROC curves of both pipelines per biomarker",
        "Slide ROC curves of both pipelines on the same slides; legend: AUROC [95% CI, "
        "bootstrap over patients] and the paired difference.",
    ) + _figure_html(
        reliability,
        "reliability diagrams of both pipelines per biomarker",
        f"Observed share of positives against the mean predicted probability in {ECE_BINS} "
        "equal-width bins of the probability (marker area: slides in the bin); the diagonal "
        "is perfect calibration. Legend ECE as in the table (top-class confidence).",
    )
    html_path = out / COMPARISON_HTML
    write_text_atomically(html_path, _page(comparison, figures_html))
    return ComparisonOutputs(html_path, json_path, (roc, reliability), comparison)


def run_compare(
    paper_path: str | Path,
    mil_path: str | Path,
    out_dir: str | Path,
    *,
    manifest: str | Path | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
    as_json: bool = False,
) -> dict[str, Any]:
    """``histomarker analysis compare``: pair the two prediction files, write the page.

    Returns:
        With ``as_json``, ``comparison.json``'s document plus the written paths
        (``html``, ``json``, ``figures``); else readable lines: the paths, what was
        compared, and per biomarker both AUROCs, the paired difference and its verdict.

    Raises:
        NotFound: A file does not exist.
        InvalidInput: Bad tables or arguments (the message says which).
    """
    if resamples < 1:
        raise InvalidInput(f"--bootstrap must be >= 1, got {resamples}")
    outputs = write_comparison(
        load_pair(paper_path, mil_path, manifest), out_dir, resamples=resamples, seed=seed
    )
    if as_json:
        return {
            "html": str(outputs.html),
            "json": str(outputs.json),
            "figures": [str(p) for p in outputs.figures],
            **outputs.comparison.as_dict(),
        }
    return readable(outputs)


def readable(outputs: ComparisonOutputs) -> dict[str, str]:
    """The CLI's summary without ``--json``, keys padded so the values line up."""
    c = outputs.comparison
    lines = {
        "html": str(outputs.html),
        "json": str(outputs.json),
        "compared": (
            f"{c.slides} slides, {c.patients} patients, {len(c.site_slides)} site(s); "
            f"{c.resamples} patient resamples, seed {c.seed}"
        ),
    }
    for r in c.biomarkers:
        lines[r.biomarker] = (
            f"AUROC paper {_estimate_text(r.paper.auroc)}, MIL {_estimate_text(r.mil.auroc)}; "
            f"MIL - paper {_estimate_text(r.difference, signed=True)} ({r.verdict}); "
            f"{r.slides} slides"
            if r.defined
            else r.note
        )
    width = max(map(len, lines))
    return {key: " " * (width - len(key)) + value for key, value in lines.items()}
