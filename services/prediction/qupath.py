"""A prediction's objects as QuPath GeoJSON, stored beside its other outputs (the
``geojson`` option of a prediction).

The objects are those ``histomarker export geojson`` makes of the prediction's
folder (:func:`services.export.predictions.prediction_objects`: heatmap tiles and
CD/BD patches for the paper's pipeline, attention tiles and top patches for MIL),
built from the result and patch table in hand, validated, serialized, then put once:
the store's puts are atomic and nothing is put before the document is complete and
valid, so a failure while building leaves no object behind. Nuclei are not among
them: the pipelines do not segment nuclei (``histomarker export geojson --nuclei``
adds a label image's).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from services.common.errors import InvalidInput
from services.common.objectstore import ObjectStore
from services.export.geojson import feature_collection, geojson_bytes
from services.export.predictions import LoadedPrediction, prediction_objects
from services.prediction.results import STATUS_OK, SlidePredictionResult

#: Media type of the stored document (RFC 7946).
GEOJSON_CONTENT_TYPE = "application/geo+json"


class GeoJsonBuildError(RuntimeError):
    """The GeoJSON of a prediction could not be built or is invalid: a fault of the
    service's own results, not of the caller's request (INTERNAL)."""


def geojson_key(result: SlidePredictionResult) -> str:
    """Where a prediction's GeoJSON goes: ``{prefix}/{slide_id}.geojson``, a file
    name that still says its slide once downloaded and imported into QuPath."""
    return f"{result.prefix}/{result.slide_id}.geojson"


def store_prediction_geojson(
    store: ObjectStore, result: SlidePredictionResult, table: pd.DataFrame
) -> str:
    """Build a prediction's QuPath objects, validate them and store the document.

    Args:
        store: Where the prediction's outputs go.
        result: The prediction, with its calls (status ``ok``).
        table: Its patch table: ``patches.parquet``'s rows (paper) or
            ``attention.parquet``'s (MIL).

    Returns:
        The key of the stored document (:func:`geojson_key`).

    Raises:
        InvalidInput: The result made no calls (nothing to export).
        GeoJsonBuildError: The objects could not be built or fail validation;
            nothing is stored.
    """
    if result.status != STATUS_OK or not result.biomarkers:
        raise InvalidInput(
            f"slide {result.slide_id}: no biomarker calls ({result.status}), nothing to "
            "export as GeoJSON"
        )
    loaded = LoadedPrediction(result, table, Path(result.prefix))
    try:
        objects = prediction_objects(loaded)
        features = [feature for built in objects.values() for feature in built]
        data = geojson_bytes(feature_collection(features))
    except InvalidInput as exc:
        raise GeoJsonBuildError(
            f"the QuPath GeoJSON of slide {result.slide_id} could not be built: {exc}"
        ) from exc
    key = geojson_key(result)
    store.put_bytes(key, data, content_type=GEOJSON_CONTENT_TYPE)
    return key
