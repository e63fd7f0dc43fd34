"""GeoJSON for QuPath: objects of a whole-slide image as a FeatureCollection.

Coordinates are level-0 pixels (x right, y down), what QuPath expects for a
whole-slide image. Every feature has QuPath's shape::

    {"type": "Feature", "id": "<uuid>", "geometry": {"type": "Polygon", ...},
     "properties": {"objectType": "annotation" | "detection" | "tile",
                    "classification": {"name": "TP53", "color": [r, g, b]},
                    "measurements": {"TP53 probability": 0.93, ...},
                    "isLocked": true}}

``measurements`` is a dict of finite numbers (QuPath 0.4+ reads it so). Rings are
closed and oriented by RFC 7946's right-hand rule taken on the coordinates as
written: an exterior ring has a positive shoelace area, a hole a negative one (the
rule ``histomarker qc`` has always followed). Feature ids are UUIDs derived from the
slide and the object (uuid5), so exporting the same result twice gives the same ids.

Builders here are generic (no prediction or nuclei logic): :func:`qupath_feature`
makes one object, :func:`patch_tiles` turns per-patch arrays (probabilities, MIL
attention...) into square tiles; :mod:`services.export.nuclei` outlines nuclei.
:func:`validate_geojson` checks a document against the spec and QuPath's shape;
:func:`geojson_bytes` validates and serializes it, :func:`write_geojson` writes it
to a file atomically.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.common.errors import InvalidInput

Colour = tuple[int, int, int]
Ring = list[list[float]]
#: Called with (done, total) as a long export advances.
ProgressFn = Callable[[int, int], None]

#: QuPath's object types a feature may carry.
OBJECT_TYPES = frozenset({"annotation", "detection", "tile", "cell", "tma_core"})
#: File extensions QuPath imports as GeoJSON.
SUFFIXES = (".geojson", ".json")
#: Namespace of the features' uuid5 ids.
_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "histomarker/qupath-export")
#: Objects built between two progress calls.
_PROGRESS_EVERY = 1000
#: GeoJSON geometry types with coordinates (GeometryCollection holds geometries).
_GEOMETRIES = frozenset(
    {"Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon"}
)


# --- building ----------------------------------------------------------------------------


def stable_id(*parts: object) -> str:
    """A UUID (as text) that depends only on ``parts``: the same object of the same
    slide gets the same id in every export."""
    return str(uuid.uuid5(_ID_NAMESPACE, "\x1f".join(str(part) for part in parts)))


def signed_area(points: Sequence[Sequence[float]] | np.ndarray) -> float:
    """Shoelace area of a ring, open or closed: positive when it turns
    counter-clockwise with y up (RFC 7946's exterior), negative the other way."""
    xy = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(xy) < 3:
        return 0.0
    x, y = xy[:, 0], xy[:, 1]
    return float(0.5 * (np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))


def oriented_ring(points: Any, exterior: bool = True, decimals: int = 2) -> Ring | None:
    """A closed GeoJSON ring through ``points`` (level-0 px), rounded to ``decimals``
    and turned the RFC 7946 way: exterior rings positive, holes negative.

    Args:
        points: (n, 2) x, y positions, open or already closed.
        exterior: An exterior ring (True) or a hole (False).
        decimals: Decimals kept of each coordinate.

    Returns:
        The ring, its first position repeated at the end; None when it has fewer than
        three positions or no area.
    """
    xy = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(xy) >= 2 and np.array_equal(xy[0], xy[-1]):
        xy = xy[:-1]
    if len(xy) < 3:
        return None
    ring = [[round(float(x), decimals), round(float(y), decimals)] for x, y in xy]
    area = signed_area(ring)
    if area == 0:
        return None
    if (area > 0) != exterior:
        ring.reverse()
    ring.append(list(ring[0]))
    return ring


def rectangle(x: float, y: float, width: float, height: float) -> dict[str, Any]:
    """A Polygon geometry covering [x, x + width] x [y, y + height] (level-0 px)."""
    if not (width > 0 and height > 0):
        raise InvalidInput(f"a rectangle needs a positive size, got {width} x {height}")
    ring = oriented_ring([(x, y), (x + width, y), (x + width, y + height), (x, y + height)])
    return {"type": "Polygon", "coordinates": [ring]}


def finite_measurements(values: Mapping[Any, Any]) -> dict[str, float]:
    """The finite numbers of ``values`` as QuPath measurements (name -> float); NaN,
    infinities, booleans and anything not a number are left out."""
    out = {}
    for name, value in values.items():
        if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
            continue
        number = float(value)
        if math.isfinite(number):
            out[str(name)] = number
    return out


def qupath_feature(
    geometry: Mapping[str, Any],
    *,
    object_type: str,
    classification: str,
    colour: Colour,
    measurements: Mapping[str, Any] | None = None,
    feature_id: str | None = None,
    name: str | None = None,
    locked: bool | None = None,
) -> dict[str, Any]:
    """One QuPath object as a GeoJSON Feature (see the module docstring).

    Args:
        geometry: Its GeoJSON geometry in level-0 px.
        object_type: ``annotation``, ``detection``, ``tile``...
        classification: Name of its class in QuPath.
        colour: RGB 0-255 of the class.
        measurements: Name -> number; non-finite values are dropped.
        feature_id: Its id (see :func:`stable_id`); none when None.
        name: Its name in QuPath; none when None.
        locked: Whether QuPath locks it against edits; unset when None.
    """
    properties: dict[str, Any] = {"objectType": object_type}
    if name is not None:
        properties["name"] = name
    properties["classification"] = {"name": classification, "color": [int(c) for c in colour]}
    if measurements is not None:
        properties["measurements"] = finite_measurements(measurements)
    if locked is not None:
        properties["isLocked"] = bool(locked)
    feature: dict[str, Any] = {"type": "Feature"}
    if feature_id is not None:
        feature["id"] = feature_id
    feature["geometry"] = dict(geometry)
    feature["properties"] = properties
    return feature


def feature_collection(features: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """A FeatureCollection of ``features``."""
    return {"type": "FeatureCollection", "features": list(features)}


def _patch_sizes(size_px: Any, count: int) -> np.ndarray:
    """Level-0 (width, height) of each patch from a side, (N,) sides or (N, 2) sizes."""
    sizes = np.asarray(size_px, dtype=np.float64)
    if sizes.ndim == 0:
        sizes = np.full((count, 2), float(sizes))
    elif sizes.shape == (count,):
        sizes = np.repeat(sizes[:, None], 2, axis=1)
    elif sizes.shape != (count, 2):
        raise InvalidInput(
            f"patch sizes must be one side, {count} sides or {count} (width, height) "
            f"pairs, got shape {sizes.shape}"
        )
    if not np.all(np.isfinite(sizes)) or np.any(sizes <= 0):
        raise InvalidInput("patch sizes must be finite and positive (level-0 px)")
    return sizes


def patch_tiles(
    coords: Any,
    size_px: Any,
    values: Mapping[str, Any],
    *,
    slide_id: str,
    layer: str,
    classification: str,
    colour: Colour,
    object_type: str = "tile",
    locked: bool | None = None,
    progress: ProgressFn | None = None,
) -> list[dict[str, Any]]:
    """One square (or rectangular) object per patch, its per-patch values as
    measurements: a heatmap of patch probabilities, MIL attention, CD/BD patches.

    Args:
        coords: (N, 2) level-0 px (x, y) of each patch's top-left corner.
        size_px: Level-0 side of every patch, or (N,) sides, or (N, 2) widths and
            heights.
        values: Measurement name -> (N,) numbers (a patch's NaN is left out of its
            measurements).
        slide_id: The slide (part of the ids).
        layer: What the objects are, e.g. ``heatmap`` (part of the ids: the same
            patch in two layers gets two ids).
        classification: QuPath class of every object.
        colour: Its RGB colour.
        object_type: ``tile`` (QuPath's tile detections), ``detection`` or
            ``annotation``.
        locked: Whether QuPath locks them; unset when None.
        progress: Called with (done, total) every thousand objects and at the end.

    Returns:
        The features, in the order of ``coords``.
    """
    xy = np.asarray(coords, dtype=np.float64)
    if xy.size == 0:
        xy = xy.reshape(0, 2)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise InvalidInput(f"patch coords must be (N, 2) x, y, got shape {xy.shape}")
    if not np.all(np.isfinite(xy)):
        raise InvalidInput("patch coords must be finite level-0 px")
    count = len(xy)
    sizes = _patch_sizes(size_px, count)
    columns = {}
    for name, column in values.items():
        array = np.asarray(column, dtype=np.float64).reshape(-1)
        if array.shape != (count,):
            raise InvalidInput(f"{name!r} has {array.size} values for {count} patches")
        columns[name] = array
    features = []
    for i, ((x, y), (width, height)) in enumerate(zip(xy, sizes, strict=True)):
        features.append(
            qupath_feature(
                rectangle(x, y, width, height),
                object_type=object_type,
                classification=classification,
                colour=colour,
                measurements={name: array[i] for name, array in columns.items()},
                feature_id=stable_id(slide_id, layer, round(x, 2), round(y, 2)),
                locked=locked,
            )
        )
        if progress is not None and (i + 1) % _PROGRESS_EVERY == 0:
            progress(i + 1, count)
    if progress is not None:
        progress(count, count)
    return features


# --- checking and writing ----------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


class _Checker:
    """Walks a GeoJSON document; raises InvalidInput at the first problem, naming
    where it is (``features[3].geometry.coordinates[0]``)."""

    def __init__(self, check_winding: bool) -> None:
        self.check_winding = check_winding

    def document(self, obj: Any) -> None:
        kind = self._type(obj, "document")
        if kind == "FeatureCollection":
            features = obj.get("features")
            if not isinstance(features, list):
                raise InvalidInput("FeatureCollection: 'features' must be a list")
            for i, feature in enumerate(features):
                self.feature(feature, f"features[{i}]")
        elif kind == "Feature":
            self.feature(obj, "feature")
        else:
            self.geometry(obj, "geometry")

    def _type(self, obj: Any, where: str) -> str:
        if not isinstance(obj, dict):
            raise InvalidInput(f"{where}: a GeoJSON object must be a JSON object")
        kind = obj.get("type")
        if kind not in ("FeatureCollection", "Feature", "GeometryCollection", *_GEOMETRIES):
            raise InvalidInput(f"{where}: unknown GeoJSON type {kind!r}")
        return str(kind)

    def feature(self, obj: Any, where: str) -> None:
        if self._type(obj, where) != "Feature":
            raise InvalidInput(f"{where}: type must be 'Feature', got {obj['type']!r}")
        if "id" in obj and not (isinstance(obj["id"], str) or _is_number(obj["id"])):
            raise InvalidInput(f"{where}.id must be a string or a number")
        if obj.get("geometry") is None:
            raise InvalidInput(f"{where}: no geometry (QuPath needs one per object)")
        self.geometry(obj["geometry"], f"{where}.geometry")
        if "properties" not in obj:
            raise InvalidInput(f"{where}: no 'properties' member")
        properties = obj["properties"]
        if properties is None:
            return
        if not isinstance(properties, dict):
            raise InvalidInput(f"{where}.properties must be an object or null")
        self.properties(properties, f"{where}.properties")

    def properties(self, props: dict[str, Any], where: str) -> None:
        if "objectType" in props and props["objectType"] not in OBJECT_TYPES:
            raise InvalidInput(
                f"{where}.objectType {props['objectType']!r} is not one of "
                f"{', '.join(sorted(OBJECT_TYPES))}"
            )
        if "classification" in props:
            self.classification(props["classification"], f"{where}.classification")
        if "measurements" in props:
            measurements = props["measurements"]
            if not isinstance(measurements, dict):
                raise InvalidInput(f"{where}.measurements must be an object of name: number")
            for name, value in measurements.items():
                if not isinstance(name, str) or not _is_number(value):
                    raise InvalidInput(f"{where}.measurements[{name!r}] must be a number")
                if not math.isfinite(value):
                    raise InvalidInput(f"{where}.measurements[{name!r}] is {value} (not finite)")
        if "isLocked" in props and not isinstance(props["isLocked"], bool):
            raise InvalidInput(f"{where}.isLocked must be true or false")
        if "name" in props and not isinstance(props["name"], str):
            raise InvalidInput(f"{where}.name must be a string")

    def classification(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise InvalidInput(f"{where} must be an object with 'name' and 'color'")
        name = value.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"{where}.name must be a non-empty string")
        colour = value.get("color")
        if colour is None:
            raise InvalidInput(f"{where} has no 'color' (QuPath wants [r, g, b])")
        if not (
            isinstance(colour, list)
            and len(colour) == 3
            and all(isinstance(c, int) and not isinstance(c, bool) for c in colour)
            and all(0 <= c <= 255 for c in colour)
        ):
            raise InvalidInput(f"{where}.color must be three integers 0-255, got {colour!r}")

    def geometry(self, obj: Any, where: str) -> None:
        kind = self._type(obj, where)
        if kind == "GeometryCollection":
            members = obj.get("geometries")
            if not isinstance(members, list):
                raise InvalidInput(f"{where}: 'geometries' must be a list")
            for i, member in enumerate(members):
                self.geometry(member, f"{where}.geometries[{i}]")
            return
        if kind not in _GEOMETRIES:
            raise InvalidInput(f"{where}: {kind!r} is not a geometry")
        coordinates = obj.get("coordinates")
        where = f"{where}.coordinates"
        if kind == "Point":
            self.position(coordinates, where)
        elif kind in ("MultiPoint", "LineString"):
            self.positions(coordinates, where, 2 if kind == "LineString" else 0)
        elif kind == "MultiLineString":
            for i, line in enumerate(self.sequence(coordinates, where)):
                self.positions(line, f"{where}[{i}]", 2)
        elif kind == "Polygon":
            self.polygon(coordinates, where)
        else:
            for i, polygon in enumerate(self.sequence(coordinates, where)):
                self.polygon(polygon, f"{where}[{i}]")

    def sequence(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            raise InvalidInput(f"{where} must be a list")
        return value

    def position(self, value: Any, where: str) -> None:
        if not isinstance(value, list) or not 2 <= len(value) <= 3:
            raise InvalidInput(f"{where}: a position is a list of 2 or 3 numbers, got {value!r}")
        for number in value:
            if not _is_number(number):
                raise InvalidInput(f"{where}: a position holds numbers only, got {number!r}")
            if not math.isfinite(number):
                raise InvalidInput(f"{where}: position {value!r} is not finite")

    def positions(self, value: Any, where: str, least: int) -> list[Any]:
        positions = self.sequence(value, where)
        if len(positions) < least:
            raise InvalidInput(f"{where}: needs at least {least} positions, has {len(positions)}")
        for i, position in enumerate(positions):
            self.position(position, f"{where}[{i}]")
        return positions

    def polygon(self, value: Any, where: str) -> None:
        rings = self.sequence(value, where)
        if not rings:
            raise InvalidInput(f"{where}: a polygon needs an exterior ring")
        for i, ring in enumerate(rings):
            here = f"{where}[{i}]"
            positions = self.positions(ring, here, 4)
            if positions[0] != positions[-1]:
                raise InvalidInput(
                    f"{here}: ring is not closed (first position {positions[0]} differs "
                    f"from the last {positions[-1]})"
                )
            if self.check_winding:
                area = signed_area([p[:2] for p in positions])
                if area == 0:
                    raise InvalidInput(f"{here}: ring has no area")
                if (area > 0) != (i == 0):
                    turn = "counter-clockwise" if i == 0 else "clockwise"
                    what = "exterior ring" if i == 0 else "hole"
                    raise InvalidInput(f"{here}: {what} must turn {turn} (RFC 7946 3.1.6)")


def validate_geojson(obj: Any, *, check_winding: bool = True) -> None:
    """Check a GeoJSON document (RFC 7946) and QuPath's object properties.

    Checks the types (FeatureCollection, Feature, every geometry), that positions
    are 2 or 3 finite numbers, polygon rings closed with at least 4 positions (and,
    with ``check_winding``, exterior rings counter-clockwise and holes clockwise),
    every feature's geometry and properties; of QuPath's properties: ``objectType``
    one of :data:`OBJECT_TYPES`, ``classification`` an object with a string
    ``name`` and a ``color`` of three integers 0-255, ``measurements`` an object of
    name -> finite number, ``isLocked`` a boolean; and that the document serializes
    as JSON without NaN or Infinity.

    Raises:
        InvalidInput: The first problem, naming where it is.
    """
    _Checker(check_winding).document(obj)
    try:
        json.dumps(obj, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"not valid JSON: {exc}") from None


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """``path`` if a GeoJSON file can be written there.

    Raises:
        InvalidInput: Not a .geojson or .json name, a folder, or in a folder that does
            not exist.
    """
    target = Path(path)
    if target.suffix.lower() not in SUFFIXES:
        raise InvalidInput(f"the output must be a .geojson or .json file, got {target.name!r}")
    if target.is_dir():
        raise InvalidInput(f"the output {str(target)!r} is a folder")
    if not target.parent.is_dir():
        raise InvalidInput(f"the output's folder {str(target.parent)!r} does not exist")
    return target


def geojson_bytes(collection: Mapping[str, Any], *, validate: bool = True) -> bytes:
    """A GeoJSON document as compact UTF-8 JSON without NaN or Infinity: what
    :func:`write_geojson` writes to a file and the prediction service puts in the
    object store.

    Args:
        collection: The document.
        validate: Check it with :func:`validate_geojson` first.

    Raises:
        InvalidInput: An invalid document.
    """
    if validate:
        validate_geojson(collection)
    try:
        return json.dumps(collection, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"not valid JSON: {exc}") from None


def write_geojson(
    path: str | os.PathLike[str], collection: Mapping[str, Any], *, validate: bool = True
) -> Path:
    """Write a GeoJSON document atomically (a hidden temporary file beside it, then a
    rename), without NaN or Infinity.

    Args:
        path: A .geojson or .json file in an existing folder.
        collection: The document.
        validate: Check it with :func:`validate_geojson` first.

    Returns:
        The path written.

    Raises:
        InvalidInput: A bad path or an invalid document (nothing is written).
    """
    target = check_output_path(path)
    data = geojson_bytes(collection, validate=validate)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
