"""``histomarker export geojson [RESULT] OUT.geojson``: results as one QuPath GeoJSON.

The options are declared with the subcommand in ``services/cli.py`` (the parser
stays free of numpy and pandas). Parts
(``--what``, comma-separated; by default every part whose input is given):

- ``heatmap``, ``cd-bd``: from RESULT, a prediction (:func:`load_prediction`); for
  a MIL prediction, its attention tiles and its top patches (it has no cancer
  detector, so no CD/BD patches);
- ``nuclei``: from ``--nuclei LABELS.tif`` (``histomarker nuclei --labels``), placed
  with ``--nuclei-origin X,Y`` and ``--nuclei-downsample D``, with measurements from
  ``--features``: a per-nucleus table (CSV, TSV or parquet with a ``label`` column)
  or the ``histomarker nuclei --json`` answer (the patch's 75 features, on one
  annotation covering the label image);
- ``attention``: from ``--attention TABLE``: columns ``x``, ``y`` (level-0 px of each
  patch's top-left corner), optional ``width``/``height`` (else ``--patch-size``),
  and one numeric column per value (attention per biomarker...).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from services.common.errors import InvalidInput, NotFound
from services.common.progress import ProgressBar
from services.common.vocabulary import check_biomarker
from services.export.geojson import (
    Colour,
    ProgressFn,
    check_output_path,
    feature_collection,
    patch_tiles,
    qupath_feature,
    rectangle,
    stable_id,
    write_geojson,
)
from services.export.predictions import (
    ATTENTION_CLASS,
    ATTENTION_COLOUR,
    BD_CONFIDENCE,
    BIOMARKER_COLOURS,
    LoadedPrediction,
    attention_tiles,
    bd_patches,
    biomarker_label,
    cd_patches,
    heatmap_tiles,
    load_prediction,
    top_patches,
)
from services.prediction.results import PIPELINE_MIL

PARTS = ("heatmap", "cd-bd", "nuclei", "attention")
NUCLEI_PATCH_CLASS = "Nuclei patch"
NUCLEI_PATCH_COLOUR: Colour = (120, 120, 120)
_PLACEMENT = ("x", "y", "width", "height")
_TIFF_SUFFIXES = (".tif", ".tiff")


def _parts(args: argparse.Namespace) -> list[str]:
    """The parts to export: ``--what``, or every part whose input is given."""
    given = {
        "heatmap": args.result is not None,
        "cd-bd": args.result is not None,
        "nuclei": args.nuclei is not None,
        "attention": args.attention is not None,
    }
    if args.what is None:
        parts = [part for part in PARTS if given[part]]
        if not parts:
            raise InvalidInput("nothing to export: give RESULT, --nuclei or --attention")
        return parts
    parts = [part.strip() for part in args.what.split(",") if part.strip()]
    unknown = [part for part in parts if part not in PARTS]
    if unknown or not parts:
        raise InvalidInput(f"--what takes {', '.join(PARTS)} (comma-separated), got {args.what!r}")
    needs = {
        "heatmap": "RESULT",
        "cd-bd": "RESULT",
        "nuclei": "--nuclei",
        "attention": "--attention",
    }
    for part in parts:
        if not given[part]:
            raise InvalidInput(f"--what {part} needs {needs[part]}")
    for part, option in (("nuclei", "--nuclei"), ("attention", "--attention")):
        if given[part] and part not in parts:
            raise InvalidInput(f"{option} is given but --what leaves {part} out")
    return list(dict.fromkeys(parts))


def _bar(quiet: bool, label: str, unit: str) -> ProgressFn | None:
    return None if quiet else ProgressBar(f"export {label}", unit)


def run_export(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``histomarker export geojson``; returns the summary (the file written, the
    objects per kind, notes on what could not be exported)."""
    out = check_output_path(args.out)
    parts = _parts(args)
    biomarker = check_biomarker(args.biomarker) if args.biomarker else None
    quiet = bool(getattr(args, "json", False))
    loaded = load_prediction(args.result) if args.result is not None else None
    slide_id = args.slide_id or (loaded.slide_id if loaded else "")
    if not slide_id:
        slide_id = Path(args.nuclei or args.attention).stem
    features: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    notes: list[str] = []

    def add(kind: str, built: list[dict[str, Any]]) -> None:
        features.extend(built)
        counts[kind] = counts.get(kind, 0) + len(built)

    # A result without a patch table (a `predict --json` answer) still has its top
    # patches: by default export those (cd-bd says why) rather than refuse.
    tiled = loaded is not None and (loaded.patches is not None or args.what is not None)
    if loaded is not None and tiled and "heatmap" in parts:
        progress = _bar(quiet, "heatmap", "tiles")
        if loaded.result.pipeline == PIPELINE_MIL:
            add("attention tiles", attention_tiles(loaded, biomarker, progress))
        else:
            add("heatmap tiles", heatmap_tiles(loaded, biomarker, progress))
    if loaded is not None and "cd-bd" in parts:
        confidence = BD_CONFIDENCE if args.bd_confidence is None else args.bd_confidence
        _add_cd_bd(loaded, biomarker, confidence, add, notes)
    if "nuclei" in parts:
        add_nuclei = _nuclei_objects(args, slide_id, _bar(quiet, "nuclei", "nuclei"))
        for kind, built in add_nuclei.items():
            add(kind, built)
    if "attention" in parts:
        add("attention tiles", _attention_tiles(args, slide_id, biomarker, quiet))
    write_geojson(out, feature_collection(features))
    summary: dict[str, Any] = {"out": str(out), "slide_id": slide_id, "features": len(features)}
    summary["objects"] = counts
    if notes:
        summary["notes"] = notes
    return summary


def _add_cd_bd(
    loaded: LoadedPrediction,
    biomarker: str | None,
    confidence: float,
    add: Callable[[str, list[dict[str, Any]]], None],
    notes: list[str],
) -> None:
    """CD and BD patches, or the top patches of a result without a patch table or of
    the MIL pipeline (no cancer detector, no patch probabilities)."""
    if loaded.result.pipeline == PIPELINE_MIL and loaded.patches is not None:
        add("top patches", top_patches(loaded, biomarker))
        notes.append("a MIL prediction has no CD/BD patches: its top patches by attention")
        return
    if loaded.patches is None:
        top = top_patches(loaded, biomarker)
        if not top:
            raise InvalidInput(f"{loaded.source}: nothing to export: {loaded.missing}")
        add("top patches", top)
        notes.append(f"only the top patches: {loaded.missing}")
        return
    add("CD patches", cd_patches(loaded))
    without = []
    for name, built in bd_patches(loaded, biomarker, confidence).items():
        add(f"{biomarker_label(name)} BD patches", built)
        if not built:
            without.append(biomarker_label(name))
    if without:
        notes.append(
            f"no BD patch for {', '.join(without)}: no 40x patch agrees with the slide's "
            f"call with calibrated confidence above {confidence:g}"
        )


def _labels(path: str) -> np.ndarray:
    """The instance labels of a ``histomarker nuclei --labels`` TIFF."""
    from services.nuclei.pipeline import decode_labels_tiff

    file = Path(path)
    if file.suffix.lower() not in _TIFF_SUFFIXES:
        raise InvalidInput(f"--nuclei must name a .tif or .tiff label image, got {file.name!r}")
    if not file.is_file():
        raise NotFound(f"no label image {path!r}")
    try:
        labels = decode_labels_tiff(file.read_bytes())
    except Exception as exc:  # tifffile raises many kinds on a bad file
        raise InvalidInput(f"cannot read the label image {file.name}: {exc}") from None
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise InvalidInput(
            f"{file.name} is not an instance label image (2-D integers), got "
            f"{labels.dtype} {labels.shape}"
        )
    return labels


def _origin(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise InvalidInput(f"--nuclei-origin takes X,Y in level-0 px, got {text!r}") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise InvalidInput(f"--nuclei-origin must be finite, got {text!r}")
    return x, y


def _nuclei_objects(
    args: argparse.Namespace, slide_id: str, progress: ProgressFn | None
) -> dict[str, list[dict[str, Any]]]:
    """Nucleus detections, and the patch annotation when ``--features`` is the
    ``histomarker nuclei --json`` answer."""
    from services.export.nuclei import measurements_by_label, nucleus_detections

    labels = _labels(args.nuclei)
    origin = _origin(args.nuclei_origin)
    downsample = float(args.nuclei_downsample)
    if not (math.isfinite(downsample) and downsample > 0):
        raise InvalidInput(f"--nuclei-downsample must be positive, got {args.nuclei_downsample}")
    per_nucleus: dict[int, dict[str, float]] | None = None
    patch: dict[str, Any] | None = None
    if args.features:
        file = Path(args.features)
        if file.suffix.lower() == ".json":
            patch = _patch_features(file)
        else:
            from services.analysis.tables import read_table

            per_nucleus = measurements_by_label(read_table(file))
    out = {
        "nuclei": nucleus_detections(
            labels,
            slide_id=slide_id,
            origin_px=origin,
            downsample=downsample,
            features=per_nucleus,
            progress=progress,
        )
    }
    if patch is not None:
        height, width = labels.shape
        measurements = {**patch.get("features", {}), "nuclei": patch.get("nuclei")}
        out["nuclei patches"] = [
            qupath_feature(
                rectangle(origin[0], origin[1], width * downsample, height * downsample),
                object_type="annotation",
                classification=NUCLEI_PATCH_CLASS,
                colour=NUCLEI_PATCH_COLOUR,
                measurements=measurements,
                feature_id=stable_id(slide_id, "nuclei-patch", *origin, downsample),
                locked=True,
            )
        ]
    return out


def _patch_features(file: Path) -> dict[str, Any]:
    """The ``histomarker nuclei --json`` answer (its ``features`` are the 75)."""
    if not file.is_file():
        raise NotFound(f"no feature file {str(file)!r}")
    try:
        answer = json.loads(file.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{file.name} is not JSON: {exc}") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("features"), dict):
        raise InvalidInput(
            f"{file.name} is not a `histomarker nuclei --json` answer (no 'features'); a "
            "per-nucleus table is a .csv, .tsv or .parquet with a 'label' column"
        )
    return answer


def _attention_tiles(
    args: argparse.Namespace, slide_id: str, biomarker: str | None, quiet: bool
) -> list[dict[str, Any]]:
    """Tiles of a per-patch value table (MIL attention)."""
    from services.analysis.tables import read_table

    table = read_table(args.attention)
    missing = [c for c in ("x", "y") if c not in table.columns]
    if missing:
        raise InvalidInput(f"the attention table lacks the columns {', '.join(missing)}")
    if {"width", "height"} <= set(table.columns):
        sizes: Any = table[["width", "height"]].to_numpy(np.float64)
    elif args.patch_size is not None:
        sizes = float(args.patch_size)
    else:
        raise InvalidInput(
            "the attention table has no width/height: give --patch-size (level-0 px)"
        )
    values = table.drop(columns=[c for c in _PLACEMENT if c in table.columns])
    values = values.select_dtypes(include="number")
    if values.columns.empty:
        raise InvalidInput("the attention table has no numeric value column besides x, y")
    if biomarker is not None:
        name, colour = biomarker_label(biomarker), BIOMARKER_COLOURS[biomarker]
    else:
        name, colour = ATTENTION_CLASS, ATTENTION_COLOUR
    return patch_tiles(
        table[["x", "y"]].to_numpy(np.float64),
        sizes,
        {str(column): values[column].to_numpy(np.float64) for column in values.columns},
        slide_id=slide_id,
        layer="attention",
        classification=name,
        colour=colour,
        progress=_bar(quiet, "attention", "tiles"),
    )
