"""``histomarker qc SLIDE OUT``: quality control of a slide, an image, or a folder of them.

One slide writes its files into OUT (see :mod:`services.slide.qc`); a folder writes
one sub-folder per slide (named after the file) and ``OUT/qc.csv`` with one row per
slide. A slide that cannot be read is a row with verdict ``error`` and the reason in
a folder run, and exit status 2 for a single slide.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from pathlib import Path
from typing import Any

from services.common.errors import HistomarkerError, InvalidInput, NotFound
from services.common.progress import ProgressBar
from services.slide.qc import ARTIFACTS, QC_JSON, run_qc, write_report
from services.slide.reader import open_slide

#: File endings taken as slides or images when OUT is given a folder.
SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif",
    ".svslide", ".png", ".jpg", ".jpeg",
)  # fmt: skip
CSV_COLUMNS = (
    "slide",
    "verdict",
    "tissue_area_mm2",
    "usable_area_mm2",
    "usable_fraction",
    *(f"{name}_over_tissue" for name in ARTIFACTS),
    "reasons",
    "folder",
)


def _one(path: Path, out: Path, mpp: float | None) -> dict[str, Any]:
    with open_slide(path, mpp=mpp) as reader:
        result = run_qc(reader)
    write_report(result, out)
    report = dict(result.report)
    report["out"] = str(out)
    return report


def _row(report: dict[str, Any]) -> dict[str, Any]:
    row = {key: report.get(key, "") for key in CSV_COLUMNS[:5]}
    for name in ARTIFACTS:
        row[f"{name}_over_tissue"] = report.get("fraction_of_tissue", {}).get(name, "")
    row["reasons"] = "; ".join(report.get("reasons", []))
    row["folder"] = report.get("out", "")
    return row


def _slides(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)


def run_qc_command(args: argparse.Namespace) -> dict[str, Any]:
    """The CLI's QC of one slide or a folder; its JSON-able summary."""
    source, out = Path(args.slide), Path(args.out)
    if not source.exists():
        raise NotFound(f"no slide or folder at {str(source)!r}")
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"the output {str(out)!r} exists and is not a folder")
    if args.mpp is not None and not (args.mpp > 0):
        raise InvalidInput(f"--mpp must be a positive number, got {args.mpp}")
    if source.is_file():
        return _one(source, out, args.mpp)
    slides = _slides(source)
    if not slides:
        raise InvalidInput(f"no slide or image files in {str(source)!r}")
    out.mkdir(parents=True, exist_ok=True)
    bar = None if args.json else ProgressBar("qc", "slides")
    rows = []
    for done, path in enumerate(slides, start=1):
        target = out / path.name.split(".")[0]
        try:
            rows.append(_row(_one(path, target, args.mpp)))
        except HistomarkerError as exc:
            reason = " ".join(str(exc).split())
            rows.append({"slide": path.name, "verdict": "error", "reasons": reason})
        if bar is not None:
            bar(done, len(slides))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    table = out / "qc.csv"
    tmp = table.with_name(f".{table.name}.tmp")
    tmp.write_text(buffer.getvalue())
    os.replace(tmp, table)
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("pass", "warn", "fail", "error")}
    return {"out": str(out), "table": str(table), "slides": len(rows), **counts}


def print_qc(result: dict[str, Any]) -> None:
    """The human-readable summary of a QC run."""
    if "table" in result:
        print(
            f"{result['slides']} slides: {result['pass']} pass, {result['warn']} warn, "
            f"{result['fail']} fail, {result['error']} unreadable; table {result['table']}"
        )
        return
    print(f"{result['slide']}: {result['verdict'].upper()}")
    for reason in result["reasons"]:
        print(f"  - {reason}")
    print(
        f"  tissue {result['tissue_area_mm2']:.3g} mm², usable {result['usable_area_mm2']:.3g} mm² "
        f"({result['usable_fraction']:.0%})"
    )
    shares = ", ".join(
        f"{name} {share:.1%}" for name, share in result["fraction_of_tissue"].items() if share > 0
    )
    print(f"  artifacts (area over tissue): {shares or 'none'}")
    print(f"  files in {result['out']} ({QC_JSON}, overlay.png, masks/, qc.geojson)")
    sys.stdout.flush()
