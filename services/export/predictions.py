"""A slide's prediction as QuPath objects: heatmap tiles and CD/BD patches, or MIL
attention tiles.

What is read (see :func:`load_prediction`): the prediction's folder in the store
(``runs/predictions/{slide_id}/{params_hash}/``: ``prediction.json`` and the patch
table, ``patches.parquet`` as :func:`services.prediction.pipeline.predict_slide`
writes it or ``attention.parquet`` of the MIL pipeline), its ``prediction.json``
alone, or the answer ``histomarker predict --json`` prints (the proto's
SlidePrediction; it names the patch table but does not hold it). The prediction
service builds the same objects from the result in hand when a client asks for
GeoJSON (:func:`prediction_objects`).

What is built, in level-0 px:

- heatmap tiles (:func:`heatmap_tiles`): one tile per scored 40x patch, its
  probabilities as measurements (``cancer probability`` of its 20x patch, ``TP53
  probability``...), to colour with QuPath's measurement maps;
- CD patches (:func:`cd_patches`): the 20x patches the detector called cancer with
  calibrated confidence above the threshold (each 40x patch is a quadrant of one);
- BD patches (:func:`bd_patches`): per biomarker, the 40x patches the model calls
  the way the slide was called with calibrated confidence above 0.9. The method's BD
  rule asks for a correct call with that confidence; at prediction time the true
  label is unknown, so the slide's call stands in for it;
- top patches (:func:`top_patches`): the strongest support of each call, the only
  patches a ``predict --json`` answer carries;
- attention tiles (:func:`attention_tiles`, MIL pipeline): one tile per bag patch,
  the MIL head's attention on it per biomarker as measurements (``TP53
  attention``...; each biomarker's attention sums to 1 over the slide).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from services.common.errors import InvalidInput, NotFound
from services.common.vocabulary import BIOMARKERS
from services.export.geojson import Colour, ProgressFn, patch_tiles
from services.prediction.results import (
    PIPELINE_MIL,
    PIPELINE_PAPER,
    BiomarkerResult,
    SlidePredictionResult,
    TopPatch,
    attention_column,
)

#: The result file of a prediction folder (``services.prediction.pipeline`` writes it;
#: not imported from there, which loads torch).
PREDICTION_JSON = "prediction.json"
#: The method's calibrated confidence of a discriminative patch.
BD_CONFIDENCE = 0.9
#: Columns a patch table needs besides one per biomarker.
PATCH_COLUMNS = ("x", "y", "width", "height", "parent_x", "parent_y", "cancer_probability")
#: Columns a MIL attention table needs besides one ``attention_<biomarker>`` per call.
ATTENTION_COLUMNS = ("x", "y", "width", "height")
CANCER_CLASS = "Cancer"
CANCER_COLOUR: Colour = (220, 40, 40)
CD_CLASS = "CD patch"
CD_COLOUR: Colour = (255, 140, 0)
ATTENTION_CLASS = "Attention"
ATTENTION_COLOUR: Colour = (160, 32, 240)
#: One colour per biomarker (Okabe-Ito: told apart with any colour vision).
BIOMARKER_COLOURS: dict[str, Colour] = dict(
    zip(
        BIOMARKERS,
        [
            (0, 114, 178),
            (230, 159, 0),
            (0, 158, 115),
            (204, 121, 167),
            (86, 180, 233),
            (213, 94, 0),
        ],
        strict=True,
    )
)


def biomarker_label(biomarker: str) -> str:
    """How a biomarker is written in QuPath: ``TP53``, ``PIK3CA``, ``ER``, ``PR``,
    ``HER2``, ``Basal``."""
    return "Basal" if biomarker == "basal" else biomarker.upper()


@dataclass(frozen=True)
class LoadedPrediction:
    """A prediction read back.

    Attributes:
        result: The slide's result.
        patches: Its patch table (one row per 40x patch scored); None when the
            result has none (see ``missing``).
        source: The file the result came from.
        missing: Why there is no patch table ("" when there is one).
    """

    result: SlidePredictionResult
    patches: pd.DataFrame | None
    source: Path
    missing: str = ""

    @property
    def slide_id(self) -> str:
        return self.result.slide_id

    def calls(self, biomarker: str | None = None) -> list[BiomarkerResult]:
        """The biomarker calls, or the one of ``biomarker``.

        Raises:
            InvalidInput: ``biomarker`` was not predicted.
        """
        if biomarker is None:
            return list(self.result.biomarkers)
        chosen = [call for call in self.result.biomarkers if call.biomarker == biomarker]
        if not chosen:
            predicted = ", ".join(c.biomarker for c in self.result.biomarkers) or "none"
            raise InvalidInput(
                f"{biomarker} was not predicted for this slide (predicted: {predicted})"
            )
        return chosen

    def table(self) -> pd.DataFrame:
        """The patch table.

        Raises:
            InvalidInput: The result has none, saying why.
        """
        if self.patches is None:
            raise InvalidInput(f"{self.source}: {self.missing}")
        return self.patches


# --- reading -----------------------------------------------------------------------------


def load_prediction(path: str | Path) -> LoadedPrediction:
    """A prediction from a prediction folder, its ``prediction.json``, or a saved
    ``histomarker predict --json`` answer.

    Raises:
        NotFound: No such file or folder, or a folder without ``prediction.json``.
        InvalidInput: A file that is not one of those, or a malformed patch table.
    """
    given = Path(path)
    if given.is_dir():
        file = given / PREDICTION_JSON
        if not file.is_file():
            raise NotFound(
                f"no {PREDICTION_JSON} in {str(given)!r}: give a prediction's folder "
                "(runs/predictions/<slide>/<hash>/ in the service's store), its "
                f"{PREDICTION_JSON}, or a saved `histomarker predict --json` answer"
            )
    elif given.is_file():
        file = given
    else:
        raise NotFound(f"no prediction result {str(given)!r}")
    try:
        document = json.loads(file.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{file} is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidInput(f"{file} is not a prediction result")
    if isinstance(document.get("prediction"), dict) or "status_message" in document:
        return _from_answer(document.get("prediction", document), file)
    if {"slide_id", "status", "biomarkers", "prefix"} <= set(document):
        return _from_pipeline(document, file)
    raise InvalidInput(
        f"{file} is not a prediction result: expected a prediction's {PREDICTION_JSON} "
        "or a `histomarker predict --json` answer"
    )


def _known(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def _from_pipeline(document: dict[str, Any], file: Path) -> LoadedPrediction:
    try:
        calls = [
            BiomarkerResult(
                **{
                    **_known(BiomarkerResult, item),
                    "top_patches": [TopPatch(**t) for t in item.get("top_patches", [])],
                }
            )
            for item in document["biomarkers"]
        ]
        result = SlidePredictionResult(
            **{**_known(SlidePredictionResult, document), "biomarkers": calls}
        )
    except (TypeError, KeyError) as exc:
        raise InvalidInput(f"{file} is not a complete prediction result: {exc}") from None
    if not result.patch_table_key:
        why = f"the prediction's status is {result.status} ({result.message}): no patch was scored"
        return LoadedPrediction(result, None, file, why)
    table_path = file.parent / Path(result.patch_table_key).name
    if not table_path.is_file():
        raise NotFound(
            f"{file} names the patch table {Path(result.patch_table_key).name}, "
            f"which is not beside it in {str(file.parent)!r}"
        )
    try:
        table = pd.read_parquet(table_path)
    except (ValueError, OSError) as exc:
        raise InvalidInput(f"cannot read the patch table {table_path}: {exc}") from None
    biomarkers = [call.biomarker for call in calls]
    if result.pipeline == PIPELINE_MIL:
        needed = (*ATTENTION_COLUMNS, *(attention_column(b) for b in biomarkers))
    else:
        needed = (*PATCH_COLUMNS, *biomarkers)
    absent = [c for c in needed if c not in table.columns]
    if absent:
        raise InvalidInput(f"the patch table {table_path} lacks the columns {', '.join(absent)}")
    return LoadedPrediction(result, table, file)


def _from_answer(prediction: dict[str, Any], file: Path) -> LoadedPrediction:
    """The proto's SlidePrediction (JSON with proto field names) as a result."""
    from google.protobuf.json_format import ParseDict, ParseError

    from services.common.stubs.histomarker.v1 import common_pb2, prediction_pb2
    from services.common.vocabulary import BIOMARKER_NAMES

    try:
        message = ParseDict(
            prediction, prediction_pb2.SlidePrediction(), ignore_unknown_fields=True
        )
    except ParseError as exc:
        raise InvalidInput(f"{file} is not a SlidePrediction answer: {exc}") from None
    status = prediction_pb2.PredictionStatus.Name(message.status)
    source = common_pb2.HighResSource.Name(message.high_res_source)
    mil = message.pipeline == prediction_pb2.PREDICTION_PIPELINE_MIL
    calls = [
        BiomarkerResult(
            biomarker=BIOMARKER_NAMES.get(item.biomarker, str(item.biomarker)),
            model_name=item.model_name,
            model_version=item.model_version,
            probability=item.probability,
            threshold=item.threshold,
            positive=item.call == prediction_pb2.BIOMARKER_CALL_POSITIVE,
            patch_count=item.patch_count,
            top_patches=[
                TopPatch(
                    t.patch.x,
                    t.patch.y,
                    t.patch.width,
                    t.patch.height,
                    t.probability,
                    t.attention,
                )
                for t in item.top_patches
            ],
            heatmap_key=item.heatmap.key,
        )
        for item in message.biomarkers
    ]
    result = SlidePredictionResult(
        slide_id=message.slide_id,
        status=status.removeprefix("PREDICTION_STATUS_").lower(),
        message=message.status_message,
        biomarkers=calls,
        tissue_patch_count=message.tissue_patch_count,
        cancer_patch_count=message.cancer_patch_count,
        cancer_patch_fraction=message.cancer_patch_fraction,
        cancer_confidence=message.cancer_confidence,
        high_res_source=source.removeprefix("HIGH_RES_SOURCE_").lower().replace("unspecified", ""),
        cancer_model_name=message.cancer_model_name,
        cancer_model_version=message.cancer_model_version,
        params_hash=message.params_hash,
        prefix=message.tissue_mask.key.rsplit("/", 1)[0],
        tissue_mask_key=message.tissue_mask.key,
        patch_table_key=message.patch_table.key,
        elapsed_s=message.elapsed_seconds,
        pipeline=PIPELINE_MIL if mil else PIPELINE_PAPER,
        geojson_key=message.geojson.key,
    )
    table = Path(result.patch_table_key).name or "patches.parquet"
    why = (
        f"a `histomarker predict --json` answer holds the top patches, not every patch's "
        f"{'attention' if mil else 'probabilities'}: give the prediction's folder "
        f"{result.prefix or 'runs/predictions/...'}/ from the service's store, which "
        f"holds {table}"
    )
    return LoadedPrediction(result, None, file, why)


# --- objects -----------------------------------------------------------------------------


def probability_measurements(table: pd.DataFrame) -> dict[str, np.ndarray]:
    """The probability columns of a patch table as measurement name -> values:
    ``cancer probability`` and one per biomarker present (``TP53 probability``...)."""
    values = {"cancer probability": table["cancer_probability"].to_numpy(np.float64)}
    for biomarker in BIOMARKERS:
        if biomarker in table.columns:
            name = f"{biomarker_label(biomarker)} probability"
            values[name] = table[biomarker].to_numpy(np.float64)
    return values


def _paper_table(loaded: LoadedPrediction, what: str) -> pd.DataFrame:
    """The patch table of a paper-pipeline prediction.

    Raises:
        InvalidInput: A MIL prediction (no cancer detector, no patch probabilities),
            or no patch table.
    """
    if loaded.result.pipeline == PIPELINE_MIL:
        raise InvalidInput(
            f"{loaded.source}: a MIL prediction has no {what} (no cancer detector or patch "
            "probabilities): export its attention tiles and top patches"
        )
    return loaded.table()


def _origins(table: pd.DataFrame) -> np.ndarray:
    return table[["x", "y"]].to_numpy(np.float64)


def _sizes(table: pd.DataFrame) -> np.ndarray:
    return table[["width", "height"]].to_numpy(np.float64)


def heatmap_tiles(
    loaded: LoadedPrediction, biomarker: str | None = None, progress: ProgressFn | None = None
) -> list[dict[str, Any]]:
    """One tile per scored 40x patch with all its probabilities as measurements,
    classified ``Cancer`` (every scored patch is in a CD patch) or, with
    ``biomarker``, by that biomarker."""
    table = _paper_table(loaded, "heatmap tiles")
    if biomarker is not None:
        loaded.calls(biomarker)  # it was predicted
        name, colour = biomarker_label(biomarker), BIOMARKER_COLOURS[biomarker]
    else:
        name, colour = CANCER_CLASS, CANCER_COLOUR
    return patch_tiles(
        _origins(table),
        _sizes(table),
        probability_measurements(table),
        slide_id=loaded.slide_id,
        layer="heatmap",
        classification=name,
        colour=colour,
        progress=progress,
    )


def cd_patches(loaded: LoadedPrediction) -> list[dict[str, Any]]:
    """The cancer-discriminative 20x patches as locked annotations ``CD patch``.

    Each 20x patch is the parent of the 40x patches scored in it (its quadrants), so
    its side is twice theirs (to the pixel: the pipeline rounds a quadrant's side).
    Measurements: its ``cancer probability``, the ``40x patches`` scored in it and
    each biomarker's ``mean probability`` over them.
    """
    table = _paper_table(loaded, "CD patches")
    groups = table.groupby(["parent_x", "parent_y"], sort=False)
    first = groups.first()
    measurements = {
        "cancer probability": first["cancer_probability"].to_numpy(np.float64),
        "40x patches": groups.size().to_numpy(np.float64),
    }
    for call in loaded.calls():
        mean = groups[call.biomarker].mean().to_numpy(np.float64)
        measurements[f"{biomarker_label(call.biomarker)} mean probability"] = mean
    parents = np.array(list(first.index), np.float64).reshape(-1, 2)
    return patch_tiles(
        parents,
        2 * _sizes(first),
        measurements,
        slide_id=loaded.slide_id,
        layer="cd",
        classification=CD_CLASS,
        colour=CD_COLOUR,
        object_type="annotation",
        locked=True,
    )


def bd_mask(call: BiomarkerResult, probabilities: np.ndarray, confidence: float) -> np.ndarray:
    """Which patches are biomarker-discriminative for a call: called as the slide was
    (at the model's threshold) with calibrated confidence above ``confidence``."""
    p = np.asarray(probabilities, np.float64)
    if call.positive:
        return (p >= call.threshold) & (p > confidence)
    return (p < call.threshold) & (1.0 - p > confidence)


def bd_patches(
    loaded: LoadedPrediction, biomarker: str | None = None, confidence: float = BD_CONFIDENCE
) -> dict[str, list[dict[str, Any]]]:
    """Per biomarker called (or only ``biomarker``), its BD 40x patches as locked
    annotations ``<biomarker> BD patch`` with all their probabilities.

    Returns:
        Biomarker -> its annotations (an empty list when no patch qualifies).
    """
    if not 0.0 <= confidence < 1.0:
        raise InvalidInput(f"the BD confidence must be within 0-1, got {confidence}")
    table = _paper_table(loaded, "BD patches")
    measurements = probability_measurements(table)
    out = {}
    for call in loaded.calls(biomarker):
        keep = bd_mask(call, table[call.biomarker].to_numpy(np.float64), confidence)
        out[call.biomarker] = patch_tiles(
            _origins(table)[keep],
            _sizes(table)[keep],
            {name: values[keep] for name, values in measurements.items()},
            slide_id=loaded.slide_id,
            layer=f"bd-{call.biomarker}",
            classification=f"{biomarker_label(call.biomarker)} BD patch",
            colour=BIOMARKER_COLOURS.get(call.biomarker, CANCER_COLOUR),
            object_type="annotation",
            locked=True,
        )
    return out


def top_patches(loaded: LoadedPrediction, biomarker: str | None = None) -> list[dict[str, Any]]:
    """Each call's top patches (strongest support first) as locked annotations
    ``<biomarker> top patch`` with their probability (paper) or the head's attention
    (MIL) and ``rank`` (1 = strongest)."""
    mil = loaded.result.pipeline == PIPELINE_MIL
    features = []
    for call in loaded.calls(biomarker):
        patches = call.top_patches
        if not patches:
            continue
        label = biomarker_label(call.biomarker)
        value = (
            {f"{label} attention": [p.attention for p in patches]}
            if mil
            else {f"{label} probability": [p.probability for p in patches]}
        )
        features += patch_tiles(
            [(p.x, p.y) for p in patches],
            [(p.width, p.height) for p in patches],
            {**value, "rank": np.arange(1, len(patches) + 1)},
            slide_id=loaded.slide_id,
            layer=f"top-{call.biomarker}",
            classification=f"{label} top patch",
            colour=BIOMARKER_COLOURS.get(call.biomarker, CANCER_COLOUR),
            object_type="annotation",
            locked=True,
        )
    return features


def attention_measurements(
    table: pd.DataFrame, calls: list[BiomarkerResult]
) -> dict[str, np.ndarray]:
    """The attention columns of a MIL attention table as measurement name -> values,
    one per call (``TP53 attention``...)."""
    return {
        f"{biomarker_label(call.biomarker)} attention": table[
            attention_column(call.biomarker)
        ].to_numpy(np.float64)
        for call in calls
    }


def attention_tiles(
    loaded: LoadedPrediction, biomarker: str | None = None, progress: ProgressFn | None = None
) -> list[dict[str, Any]]:
    """One tile per bag patch of a MIL prediction with the head's attention on it
    per biomarker as measurements, classified ``Attention`` or, with ``biomarker``,
    by that biomarker (its attention alone).

    Raises:
        InvalidInput: Not a MIL prediction, or no attention table.
    """
    if loaded.result.pipeline != PIPELINE_MIL:
        raise InvalidInput(
            f"{loaded.source}: attention tiles need a MIL prediction; this one is the "
            f"{loaded.result.pipeline} pipeline's"
        )
    table = loaded.table()
    calls = loaded.calls(biomarker)
    if biomarker is not None:
        name, colour = biomarker_label(biomarker), BIOMARKER_COLOURS[biomarker]
    else:
        name, colour = ATTENTION_CLASS, ATTENTION_COLOUR
    return patch_tiles(
        _origins(table),
        _sizes(table),
        attention_measurements(table, calls),
        slide_id=loaded.slide_id,
        layer="attention",
        classification=name,
        colour=colour,
        progress=progress,
    )


def prediction_objects(
    loaded: LoadedPrediction, confidence: float = BD_CONFIDENCE
) -> dict[str, list[dict[str, Any]]]:
    """Every object of a prediction with its patch table, by kind, in export order.

    Paper pipeline: ``heatmap tiles`` (every 40x patch scored, all its
    probabilities), ``CD patches`` and ``<biomarker> BD patches`` per call (possibly
    empty). MIL pipeline: ``attention tiles`` (every bag patch, its attention per
    biomarker) and ``top patches`` (each call's, by attention).

    Raises:
        InvalidInput: The prediction has no patch table (no calls were made).
    """
    if loaded.result.pipeline == PIPELINE_MIL:
        return {"attention tiles": attention_tiles(loaded), "top patches": top_patches(loaded)}
    objects = {"heatmap tiles": heatmap_tiles(loaded), "CD patches": cd_patches(loaded)}
    for name, built in bd_patches(loaded, None, confidence).items():
        objects[f"{biomarker_label(name)} BD patches"] = built
    return objects
