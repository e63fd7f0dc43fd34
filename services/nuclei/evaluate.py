"""``histomarker evaluate nuclei INDEX.csv``: how well a segmentation method does on a
lab's own annotated tiles.

Every row of the index (see :mod:`services.nuclei.annotations`) is segmented at its
own mpp and scored against its annotations: rows with instance labels get detection
F1 (IoU > 0.5), AJI, pixel Dice and PQ with the counts; rows with only a binary mask
get pixel Dice. The means are over the rows that have each score, also per organ.
All rows are read and checked before the first is segmented, so a bad row costs no
time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from services.common.errors import InvalidInput
from services.nuclei.accuracy import foreground_dice, instance_scores
from services.nuclei.annotations import AnnotatedImage, load_annotated, read_index
from services.nuclei.methods import check_method, segment_batch

#: Scores averaged over rows.
SCORES = ("f1", "aji", "dice", "pq")

#: Called with (done, total) as rows are scored.
RowProgress = Callable[[int, int], None]


def score_image(image: AnnotatedImage, labels: np.ndarray) -> dict[str, Any]:
    """The scores of one row's predicted labels."""
    row = image.row
    record: dict[str, Any] = {"name": row.name, "organ": row.organ, "mpp": row.mpp}
    record["predicted"] = int(len(np.unique(labels)) - (1 if (labels == 0).any() else 0))
    if image.instances is not None:
        scores = instance_scores(image.instances, labels)
        record.update(
            f1=scores.f1,
            aji=scores.aji,
            dice=scores.dice,
            pq=scores.pq,
            annotated=scores.true_count,
            matched=scores.matched,
        )
        if image.binary is not None:
            record["dice_binary"] = foreground_dice(image.binary, labels)
    else:
        assert image.binary is not None  # read_index refuses rows with neither
        record["dice"] = foreground_dice(image.binary, labels)
    return record


def _means(records: list[dict[str, Any]]) -> dict[str, Any]:
    means: dict[str, Any] = {"images": len(records)}
    for score in SCORES:
        values = [r[score] for r in records if score in r]
        if values:
            means[score] = float(np.mean(values))
            means[f"{score}_images"] = len(values)
    return means


def evaluate_index(
    index: str | Path,
    method: str = "",
    weights: Path | None = None,
    progress: RowProgress | None = None,
) -> dict[str, Any]:
    """Segment and score every row of an index.

    Args:
        index: The index CSV.
        method: A name of :data:`services.nuclei.methods.METHODS`; '' for the default.
        weights: Another U-Net weights file (``unet`` only).
        progress: Called with (rows done, rows) after each row.

    Returns:
        ``{"index", "method", "images": [per-row records], "mean": {...},
        "by_organ": {organ: {...}}, "seconds"}`` (seconds spent segmenting).

    Raises:
        InvalidInput: A bad index, row or file (naming the row), or an unknown method.
    """
    method = check_method(method)
    if weights is not None and method != "unet":
        raise InvalidInput("--weights applies to the unet method only")
    rows = read_index(index)
    images = [load_annotated(row) for row in rows]  # every row checked before any work
    records = []
    spent = 0.0
    for done, image in enumerate(images, start=1):
        began = time.perf_counter()
        labels = segment_batch([image.rgb], [image.row.mpp], method, weights=weights)[0]
        spent += time.perf_counter() - began
        records.append(score_image(image, labels))
        if progress is not None:
            progress(done, len(images))
    organs = sorted({r["organ"] for r in records if r["organ"]})
    return {
        "index": str(index),
        "method": method,
        "images": records,
        "mean": _means(records),
        "by_organ": {o: _means([r for r in records if r["organ"] == o]) for o in organs},
        "seconds": round(spent, 2),
    }


def format_table(result: dict[str, Any]) -> str:
    """The per-image and mean scores as a readable table."""
    lines = [
        f"method {result['method']} on {result['index']}",
        f"{'image':<28} {'organ':<12} {'F1':>6} {'AJI':>6} {'Dice':>6} {'PQ':>6} "
        f"{'true':>5} {'found':>5}",
    ]

    def cell(record: dict[str, Any], key: str) -> str:
        return f"{record[key]:6.3f}" if key in record else f"{'-':>6}"

    for record in result["images"]:
        lines.append(
            f"{record['name'][:28]:<28} {record['organ'][:12]:<12} {cell(record, 'f1')} "
            f"{cell(record, 'aji')} {cell(record, 'dice')} {cell(record, 'pq')} "
            f"{record.get('annotated', '-'):>5} {record['predicted']:>5}"
        )
    mean = result["mean"]
    lines.append(
        f"{'mean':<28} {'':<12} {cell(mean, 'f1')} {cell(mean, 'aji')} {cell(mean, 'dice')} "
        f"{cell(mean, 'pq')}"
    )
    return "\n".join(lines)
