"""A slide's bag: its QC'd patch grid embedded by one encoder.

:func:`embed_slide` prepares the slide exactly as tiling and prediction do
(:func:`services.slide.prepare.prepare_slide`: masks, QC, usable area with ink, blur
and folds left out, the grid), with the grid at the encoder's own resolution and
input side (a UNI patch is 224 px at 0.5 µm/px, the detector's 512 px), reads the
patches in batches, embeds them (:meth:`LoadedEncoder.embed`) and appends them to a
:class:`~services.mil.bags.BagWriter`. Colours stay as scanned: foundation encoders
learned from unnormalized slides of many sites.

Resumable: the partial bag (``<bag>.partial``) records how many grid patches are
done; a second call with the same output continues after them. The grid is a pure
function of the slide and the parameters, so the patches after a restart are the
ones that were left. :func:`store_bag` puts the finished bag into the object store
under :func:`bag_key`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from services.common.objectstore import ObjectStore
from services.encoders.loading import LoadedEncoder
from services.mil.bags import BagWriter
from services.mil.scoring import Embedder, LocalEmbedder
from services.slide.grid import GridParams
from services.slide.prepare import PrepParams, prepare_slide
from services.slide.reader import SlideReader

#: Patches read and embedded together.
READ_BATCH = 32


def bag_key(encoder: str, slide_id: str) -> str:
    """Object-store key of a slide's bag for one encoder."""
    return f"bags/{encoder}/{slide_id}.h5"


def encoder_grid(encoder: LoadedEncoder | Embedder, base: GridParams | None = None) -> GridParams:
    """``base`` (default grid) at the encoder's resolution and input side."""
    mpp, px = (
        (encoder.spec.mpp, encoder.spec.input_px)
        if isinstance(encoder, LoadedEncoder)
        else (encoder.mpp, encoder.input_px)
    )
    return replace(base or GridParams(), magnification=10.0 / mpp, patch_px=px)


def embed_slide(
    reader: SlideReader,
    slide_id: str,
    encoder: LoadedEncoder | Embedder,
    out: Path | str,
    *,
    params: PrepParams | None = None,
    batch_size: int = READ_BATCH,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Embed a slide's usable patches into the bag file ``out`` (module docstring).

    Args:
        reader: The open slide.
        slide_id: Its id (stored in the bag).
        encoder: The loaded encoder, or any :class:`~services.mil.scoring.Embedder`
            (e.g. one served on TorchServe).
        out: The bag file to write; its ``.partial`` file is continued if present.
        params: Slide preparation; its grid's magnification and patch side are
            replaced by the encoder's.
        batch_size: Patches read and embedded at once.
        progress: Called as ``progress(done, total)`` after each batch.

    Returns:
        The finished bag's path. A slide without usable tissue gives an empty bag.
    """
    embedder = LocalEmbedder(encoder, batch_size) if isinstance(encoder, LoadedEncoder) else encoder
    prep = params or PrepParams()
    prep = replace(prep, grid=encoder_grid(embedder, prep.grid))
    prepared = prepare_slide(reader, slide_id, prep)
    return embed_grid(
        reader,
        prepared.grid,
        embedder,
        out,
        slide_id=slide_id,
        grid_params=prep.grid,
        batch_size=batch_size,
        progress=progress,
    )


def embed_grid(
    reader: SlideReader,
    grid: pd.DataFrame,
    embedder: Embedder,
    out: Path | str,
    *,
    slide_id: str,
    grid_params: GridParams,
    batch_size: int = READ_BATCH,
    progress: Callable[[int, int], None] | None = None,
    check: Callable[[], None] | None = None,
) -> Path:
    """Embed the patches of a prepared grid (one row per patch, level-0 ``x``, ``y``)
    into the bag file ``out``, resuming its partial file; ``check`` is called before
    each batch (a deadline or cancellation raises there)."""
    total = len(grid)
    mpp0 = float(reader.mpp[0])
    with BagWriter(
        out,
        feature_dim=embedder.embed_dim,
        slide_id=slide_id,
        encoder=embedder.encoder,
        encoder_sha256=embedder.sha256,
        patch_px=embedder.input_px,
        patch_mpp=grid_params.target_mpp,
        level0_mpp=mpp0,
    ) as writer:
        done = writer.done
        if progress is not None:
            progress(done, total)
        xs = grid["x"].to_numpy(np.int64) if total else np.zeros(0, np.int64)
        ys = grid["y"].to_numpy(np.int64) if total else np.zeros(0, np.int64)
        while done < total:
            if check is not None:
                check()
            stop = min(total, done + batch_size)
            patches = np.stack(
                [
                    reader.read_patch(
                        int(xs[i]),
                        int(ys[i]),
                        embedder.input_px,
                        grid_params.target_mpp,
                        allow_upsample=grid_params.allow_upsample,
                    )
                    for i in range(done, stop)
                ]
            )
            features = np.asarray(embedder.embed(patches), np.float32)
            coords = np.stack([xs[done:stop], ys[done:stop]], axis=1)
            done = writer.append(coords, features)
            if progress is not None:
                progress(done, total)
        return writer.finish()


def store_bag(store: ObjectStore, path: Path | str, encoder: str, slide_id: str) -> str:
    """Put a finished bag into the object store; returns its key."""
    key = bag_key(encoder, slide_id)
    store.put_file(key, Path(path))
    return key
