"""A slide's bag: its QC'd patch grid embedded by one encoder.

:func:`embed_slide` prepares the slide exactly as tiling and prediction do
(:func:`services.slide.prepare.prepare_slide`: masks, QC, usable area with ink, blur
and folds left out, the grid), with the grid at the encoder's own resolution and
input side (a UNI patch is 224 px at 0.5 µm/px, the detector's 512 px), reads the
patches in batches, embeds them (:meth:`LoadedEncoder.embed`) and appends them to a
:class:`~services.mil.bags.BagWriter`. Colours stay as scanned (foundation encoders
learned from unnormalized slides of many sites) unless the encoder was trained on
stain-normalized patches (its spec's ``stain_reference``, e.g. ``biomarker-cnns``):
then the caller passes the reference and each patch is normalized from the slide's
own stains onto it, as the paper's pipeline does before its CNNs.

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

from services.common.errors import InvalidInput
from services.common.objectstore import ObjectStore
from services.encoders.loading import LoadedEncoder
from services.mil.bags import BagWriter
from services.mil.scoring import Embedder, LocalEmbedder
from services.slide.grid import GridParams
from services.slide.prepare import PrepParams, prepare_slide
from services.slide.reader import SlideReader
from services.slide.stain import StainMatrix, builtin_reference

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
    reference: StainMatrix | None = None,
    stain_method: str = "vahadane",
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
        reference: Target stains (a :class:`~services.slide.stain.StainMatrix`) for an
            encoder trained on normalized patches (:func:`encoder_reference`); None
            keeps the colours as scanned.
        stain_method: The normalization method with a reference.

    Returns:
        The finished bag's path. A slide without usable tissue gives an empty bag.
    """
    embedder = LocalEmbedder(encoder, batch_size) if isinstance(encoder, LoadedEncoder) else encoder
    prep = params or PrepParams()
    prep = replace(prep, grid=encoder_grid(embedder, prep.grid))
    prepared = prepare_slide(reader, slide_id, prep, reference=reference, stain_method=stain_method)
    return embed_grid(
        reader,
        prepared.grid,
        embedder,
        out,
        slide_id=slide_id,
        grid_params=prep.grid,
        batch_size=batch_size,
        progress=progress,
        transform=prepared.stains.transform if prepared.stains is not None else None,
    )


def encoder_reference(stain_reference: str | None, method: str = "vahadane") -> StainMatrix | None:
    """The target stains an encoder's patches are normalized to: None for colours as
    scanned (``stain_reference`` None or ``none``), the built-in reference of
    ``method`` for "" (what the paper's models train on by default).

    Raises:
        InvalidInput: A reference kept in an object store (a key): only the
            PredictionService, which has the store, resolves those.
    """
    if stain_reference is None or stain_reference.lower() == "none":
        return None
    if stain_reference == "":
        return builtin_reference(method)
    raise InvalidInput(
        f"the encoder's patches are normalized to the stored stain reference "
        f"{stain_reference!r}; embed them through the PredictionService, which reads it"
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
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Path:
    """Embed the patches of a prepared grid (one row per patch, level-0 ``x``, ``y``)
    into the bag file ``out``, resuming its partial file; ``check`` is called before
    each batch (a deadline or cancellation raises there); ``transform`` maps each
    patch as read (the slide's stain normalization) before it is embedded."""
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
            read = [
                reader.read_patch(
                    int(xs[i]),
                    int(ys[i]),
                    embedder.input_px,
                    grid_params.target_mpp,
                    allow_upsample=grid_params.allow_upsample,
                )
                for i in range(done, stop)
            ]
            if transform is not None:
                read = [transform(patch) for patch in read]
            patches = np.stack(read)
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
