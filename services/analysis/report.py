"""One HTML report per run: curves, calibration, ablation, statistics, patches, slides.

``build_report`` writes ``report.html`` and a ``figures/`` folder of PNG files next
to it. Every figure is both a PNG file and inlined in the HTML as a base64 data URI
(each inlined image links to its file), so ``report.html`` alone is complete — it
can be mailed or stored as one object — and the PNGs can go into slides or papers.
CSS is inline; the page has no scripts and loads nothing from the network. All text
from the inputs is HTML-escaped.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from services.analysis.ablation import table2
from services.analysis.figures import (
    CurveSet,
    PatchExample,
    PatchMontage,
    ReliabilitySet,
    SlideHeatmap,
    curves_figure,
    heatmap_figure,
    importance_figure,
    montage_figure,
    reliability_figure,
)
from services.common.errors import InvalidInput

__all__ = [
    "CurveSet",
    "PatchExample",
    "PatchMontage",
    "ReliabilitySet",
    "SlideHeatmap",
    "build_report",
]

#: Folder of the PNG files, relative to ``report.html``.
FIGURES_DIR = "figures"
#: Columns of a statistics table shown in scientific notation.
P_VALUE_COLUMNS = {"p", "q", "p_value", "q_value", "pvalue", "qvalue", "p_adj", "fdr"}
#: Significance level that highlights a statistics row (on q when present, else p).
SIGNIFICANCE = 0.05

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       margin: 0; color: #1d2330; background: #f5f6f8; font-size: 14px; }
header { background: #1f3a5f; color: white; padding: 18px 32px; }
header h1 { margin: 0 0 4px 0; font-size: 22px; }
header p { margin: 0; opacity: 0.85; }
nav { background: #fff; border-bottom: 1px solid #d8dce3; padding: 8px 32px;
      position: sticky; top: 0; z-index: 1; }
nav a { margin-right: 18px; color: #1f3a5f; text-decoration: none; font-weight: 600; }
main { max-width: 1320px; margin: 0 auto; padding: 8px 32px 48px 32px; }
section { background: #fff; border: 1px solid #d8dce3; border-radius: 6px;
          padding: 12px 20px 16px 20px; margin: 18px 0; }
h2 { font-size: 18px; margin: 6px 0 10px 0; color: #1f3a5f; }
h3 { font-size: 15px; margin: 14px 0 6px 0; }
p.note { color: #555; margin: 4px 0 10px 0; }
figure { margin: 8px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eceef2; }
figcaption { font-size: 12px; color: #555; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr));
        gap: 14px; align-items: start; }
table { border-collapse: collapse; margin: 6px 0 10px 0; font-size: 13px; }
th, td { border: 1px solid #d8dce3; padding: 4px 9px; text-align: right;
         white-space: nowrap; }
th { background: #eef1f6; }
thead th { text-align: center; }
td.label, th.label { text-align: left; }
tr.chance td { color: #666; font-style: italic; }
tr.significant td { background: #fff6dd; }
td.best { font-weight: 700; background: #e5f2e5; }
table.summary td { text-align: left; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "figure"


class _Figures:
    """Names figure files uniquely and turns each into an inlined ``<figure>``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.names: set[str] = set()

    def path(self, stem: str) -> Path:
        name = _slug(stem)
        candidate, n = name, 1
        while candidate in self.names:
            n += 1
            candidate = f"{name}-{n}"
        self.names.add(candidate)
        return self.folder / f"{candidate}.png"

    def html(self, path: Path, alt: str, caption: str = "") -> str:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        relative = f"{FIGURES_DIR}/{path.name}"
        caption_html = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
        return (
            f'<figure><a href="{_e(relative)}"><img src="data:image/png;base64,{data}" '
            f'alt="{_e(alt)}" data-file="{_e(relative)}"></a>{caption_html}</figure>'
        )


def _summary_html(summary: Mapping[str, object]) -> str:
    rows = "".join(
        f'<tr><th class="label">{_e(key)}</th><td>{_e(value)}</td></tr>'
        for key, value in summary.items()
    )
    return f'<table class="summary">{rows}</table>'


def _ablation_html(results: pd.DataFrame) -> str:
    """Table 2 as HTML: a two-row header (biomarker, patch set), the best group of
    each column in bold, and a last row with the prevalence (AUPRC by chance)."""
    wide = table2(results)
    columns = list(wide.columns)
    # Numbered afresh: idxmax gives index labels, and a table joined from several
    # (labels repeated) would bold every row that shares the best one's label.
    scored = results.dropna(subset=["auprc"]).reset_index(drop=True)
    best = scored.loc[scored.groupby(["biomarker", "patch_set"])["auprc"].idxmax()]
    best_cells = {
        (row.biomarker, row.patch_set, f"{row.group} ({row.n_features})")
        for row in best.itertuples(index=False)
    }
    biomarkers = list(dict.fromkeys(b for b, _ in columns))
    top = "".join(
        f'<th colspan="{sum(1 for b, _ in columns if b == biomarker)}">{_e(biomarker)}</th>'
        for biomarker in biomarkers
    )
    second = "".join(f"<th>{_e(patch_set)}</th>" for _, patch_set in columns)
    body = []
    for label, cells in wide.iterrows():
        tds = "".join(
            f'<td class="best">{_e(cell)}</td>'
            if (biomarker, patch_set, label) in best_cells
            else f"<td>{_e(cell)}</td>"
            for (biomarker, patch_set), cell in zip(columns, cells, strict=True)
        )
        body.append(f'<tr><td class="label">{_e(label)}</td>{tds}</tr>')
    if "prevalence" in results.columns:
        prevalence = results.groupby(["biomarker", "patch_set"])["prevalence"].first()
        tds = "".join(
            f"<td>{prevalence.get((b, s), math.nan):.2f}</td>" for b, s in columns
        ).replace("<td>nan</td>", "<td>n/a</td>")
        body.append(f'<tr class="chance"><td class="label">chance (prevalence)</td>{tds}</tr>')
    table = (
        f'<table><thead><tr><th class="label" rowspan="2">feature group (n)</th>{top}</tr>'
        f"<tr>{second}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )
    notes = sorted({str(n) for n in results.get("note", pd.Series(dtype=str)) if str(n)})
    notes_html = "".join(f'<p class="note">Note: {_e(note)}</p>' for note in notes)
    return table + notes_html


def _format_value(column: str, value: object) -> str:
    if isinstance(value, float | np.floating):
        if math.isnan(float(value)):
            return "n/a"
        if column.lower() in P_VALUE_COLUMNS:
            return f"{float(value):.2e}"
        return f"{float(value):.3g}"
    return str(value)


def _statistics_html(statistics: pd.DataFrame) -> str:
    """A statistics table as given; rows with q (or p) < 0.05 are highlighted."""
    statistics = statistics.rename(columns=str)
    columns = list(statistics.columns)
    lowered = {c.lower(): c for c in columns}
    test_column = next(
        (lowered[c] for c in ("q", "q_value", "p_adj", "p", "p_value") if c in lowered), None
    )
    head = "".join(
        f'<th class="label">{_e(c)}</th>' if i == 0 else f"<th>{_e(c)}</th>"
        for i, c in enumerate(columns)
    )
    tested = (
        pd.to_numeric(statistics[test_column], errors="coerce").to_numpy() < SIGNIFICANCE
        if test_column is not None
        else np.zeros(len(statistics), bool)
    )
    rows = []
    for record, significant in zip(statistics.itertuples(index=False), tested, strict=True):
        values = dict(zip(columns, record, strict=True))
        cells = "".join(
            f'<td class="label">{_e(_format_value(c, values[c]))}</td>'
            if i == 0
            else f"<td>{_e(_format_value(c, values[c]))}</td>"
            for i, c in enumerate(columns)
        )
        rows.append(f'<tr class="significant">{cells}</tr>' if significant else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a partial file renamed over it."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def build_report(
    out_dir: Path,
    run_name: str,
    *,
    summary: Mapping[str, object] | None = None,
    curves: Sequence[CurveSet] = (),
    reliability: Sequence[ReliabilitySet] = (),
    ablation: pd.DataFrame | None = None,
    importances: Mapping[str, pd.DataFrame] | None = None,
    statistics: pd.DataFrame | None = None,
    montages: Sequence[PatchMontage] = (),
    heatmaps: Sequence[SlideHeatmap] = (),
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``out_dir/report.html`` and its PNG figures in ``out_dir/figures/``.

    Sections without input are left out. The HTML is written last and atomically, so
    a report that exists is complete.

    Args:
        out_dir: Folder of the report (created if needed).
        run_name: Title of the report, e.g. the flow run's name.
        summary: Key facts of the run (cohort, slides, models, ...), shown first.
        curves: ROC/PR/MCC-F1 curves; one figure per biomarker with its patch and
            slide curves.
        reliability: Reliability diagrams, one per entry.
        ablation: The long result of ``ablation.run_ablation`` (several biomarkers
            concatenated), shown as Table 2.
        importances: Title -> ``ablation.permutation_importances`` table, one bar
            chart each.
        statistics: Per-feature test results (e.g. feature, p, q, medians, effect),
            shown as given; rows with q (or p) < 0.05 highlighted.
        montages: Top BD patches per class, one montage per biomarker.
        heatmaps: Slide heatmaps of patch probabilities.
        progress: Called with (figures done, figures total).

    Returns:
        The path of ``report.html``.

    Raises:
        InvalidInput: Malformed section input (see the figure functions).
    """
    if not run_name.strip():
        raise InvalidInput("run_name must not be empty")
    out_dir = Path(out_dir)
    folder = out_dir / FIGURES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    figures = _Figures(folder)
    by_biomarker: dict[str, list[CurveSet]] = {}
    for curve in curves:
        by_biomarker.setdefault(curve.name, []).append(curve)
    importances = dict(importances or {})
    total = len(by_biomarker) + len(reliability) + len(importances) + len(montages) + len(heatmaps)
    done = 0

    def drawn(path: Path) -> Path:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)
        return path

    sections: list[tuple[str, str, str]] = []  # (anchor, title, html)
    facts: dict[str, object] = {"run": run_name, **(summary or {})}
    facts.setdefault("generated (UTC)", dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"))
    sections.append(("summary", "Run summary", _summary_html(facts)))

    if by_biomarker:
        body = "".join(
            figures.html(
                drawn(curves_figure(name, sets, figures.path(f"curves-{name}"))),
                f"ROC, PR and MCC-F1 curves of {name}",
                f"{name}: "
                + "; ".join(
                    f"{c.level} AUROC {c.auroc:.3f}, AUPRC {c.auprc:.3f}, MCC-F1 {c.mcc_f1:.3f}"
                    for c in sets
                ),
            )
            for name, sets in by_biomarker.items()
        )
        note = (
            "Per biomarker: ROC, precision-recall and MCC-F1 curves (Cao et al. 2020) at "
            "patch level (blue) and slide level (orange; slide score = mean patch probability)."
        )
        sections.append(("curves", "Discrimination", _section_body(body, note)))

    if reliability:
        body = (
            '<div class="grid">'
            + "".join(
                figures.html(
                    drawn(reliability_figure(item, figures.path(f"reliability-{item.name}"))),
                    f"reliability diagram of {item.name}",
                )
                for item in reliability
            )
            + "</div>"
        )
        note = "Accuracy against confidence per bin (15 equal bins); the diagonal is perfect."
        sections.append(("calibration", "Calibration", _section_body(body, note)))

    if ablation is not None:
        folds = sorted({int(f) for f in ablation.get("folds", pd.Series(dtype=int))})
        note = (
            "AUPRC of a random forest on each feature group, from out-of-fold probabilities "
            f"of patient-grouped cross-validation ({'/'.join(map(str, folds)) or '?'} folds; "
            "no patient in both training and test); [95% CI] by bootstrap over patients. "
            "Bold: best group per column."
        )
        body = _section_body(_ablation_html(ablation), note)
        sections.append(("ablation", "Feature-group ablation (Table 2)", body))

    if importances:
        body = (
            '<div class="grid">'
            + "".join(
                figures.html(
                    drawn(importance_figure(table, title, figures.path(f"importance-{title}"))),
                    f"permutation importances: {title}",
                )
                for title, table in importances.items()
            )
            + "</div>"
        )
        note = "Permutation importance on held-out folds: mean drop of AUPRC (bars: std)."
        sections.append(("importance", "Feature importance", _section_body(body, note)))

    if statistics is not None:
        note = (
            "Mann-Whitney U test of each feature between classes; highlighted: "
            f"q (or p) < {SIGNIFICANCE}."
        )
        sections.append(
            ("statistics", "Statistics", _section_body(_statistics_html(statistics), note))
        )

    if montages:
        body = "".join(
            figures.html(
                drawn(montage_figure(montage, figures.path(f"montage-{montage.biomarker}"))),
                f"top BD patches of {montage.biomarker}",
            )
            for montage in montages
        )
        note = "Biomarker-discriminative patches with the most confident correct calls."
        sections.append(("patches", "Top BD patches", _section_body(body, note)))

    if heatmaps:
        body = (
            '<div class="grid">'
            + "".join(
                figures.html(
                    drawn(
                        heatmap_figure(
                            item, figures.path(f"heatmap-{item.slide_id}-{item.biomarker}")
                        )
                    ),
                    f"heatmap of {item.slide_id} for {item.biomarker}",
                )
                for item in heatmaps
            )
            + "</div>"
        )
        note = "Patch probabilities over the slide thumbnail (blue 0, red 1)."
        sections.append(("heatmaps", "Slide heatmaps", _section_body(body, note)))

    nav = "".join(f'<a href="#{_e(anchor)}">{_e(title)}</a>' for anchor, title, _ in sections)
    content = "".join(
        f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2>{body}</section>'
        for anchor, title, body in sections
    )
    page = (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{_e(run_name)} — histomarker'
        f"</title><style>{CSS}</style></head><body>"
        f"<header><h1>{_e(run_name)}</h1><p>histomarker analysis report</p></header>"
        f"<nav>{nav}</nav><main>{content}</main></body></html>\n"
    )
    # Figures of an earlier build into the same folder would look like this run's.
    for stale in folder.glob("*.png"):
        if stale.stem not in figures.names:
            stale.unlink()
    path = out_dir / "report.html"
    write_text_atomically(path, page)
    return path


def _section_body(body: str, note: str) -> str:
    return f'<p class="note">{_e(note)}</p>{body}'
