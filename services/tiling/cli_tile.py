"""``histomarker tile SLIDE OUT``: the tiling pipeline on a local file, into a folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from services.common.errors import InvalidInput, NotFound
from services.common.objectstore import open_store
from services.common.progress import ProgressBar
from services.common.settings import ServiceSettings
from services.slide.grid import GridParams
from services.slide.images import read_image
from services.slide.reader import open_slide
from services.slide.stain import LabStats, StainMatrix, get_normalizer
from services.tiling.pipeline import TileParams, tile_slide


def resolve_reference(value: str, method: str) -> StainMatrix | LabStats | None:
    """The target stains named by ``--reference``.

    ``none`` means no normalization; an existing image file is fitted on the spot; any
    other value names a reference stored by FitStainReference in the configured
    object store (``references/{name}/stain.json``).
    """
    if value.lower() == "none":
        return None
    path = Path(value)
    if path.is_file():
        normalizer = get_normalizer(method)
        normalizer.fit(read_image(path), name=path.stem)
        return normalizer.target
    key = f"references/{value}/stain.json"
    store = ServiceSettings().open_store()
    if not store.exists(key):
        raise NotFound(
            f"no stain reference {value!r}: give an image file, 'none', or a name stored "
            f"in {store.url} under {key}"
        )
    text = store.get_bytes(key).decode()
    return LabStats.from_json(text) if method == "reinhard" else StainMatrix.from_json(text)


def run_tile(args: argparse.Namespace) -> dict[str, Any]:
    """Run the CLI's tiling and return its JSON-able summary."""
    params = TileParams(
        grid=GridParams(
            magnification=args.magnification,
            patch_px=args.patch_size,
            min_tissue=args.min_tissue,
            overlap_px=args.overlap,
        ),
        stain_method=args.method,
        image_format=args.image_format,
    )
    reference = resolve_reference(args.reference, args.method)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"the output {str(out)!r} exists and is not a folder")
    with open_slide(args.slide, mpp=args.mpp) as reader:
        out.mkdir(parents=True, exist_ok=True)
        store = open_store(out.resolve().as_uri())
        slide_id = Path(args.slide).name.split(".")[0]
        result = tile_slide(
            reader,
            slide_id,
            store,
            "",
            params,
            reference,
            progress=None if args.json else ProgressBar(slide_id, "patches"),
        )
    summary = result.as_dict()
    summary["out"] = str(out)
    return summary
