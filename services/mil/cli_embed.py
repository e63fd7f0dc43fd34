"""``histomarker encoders`` and ``histomarker embed``: a slide's bag from a local encoder.

    histomarker encoders
    histomarker embed SLIDE OUT.h5 --encoder uni --weights ~/models/uni/pytorch_model.bin

``embed`` prepares the slide as tiling and prediction do (QC masks, ink, blur and
folds left out), tiles it at the encoder's resolution and input side, embeds every
patch and writes the bag (:mod:`services.mil.bags`); interrupted, it continues from
``OUT.h5.partial``.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from services.common.errors import InvalidInput


def run_encoders(args: argparse.Namespace) -> dict[str, Any]:
    """Every named encoder with its input, resolution, width and licence."""
    from services.encoders.registry import ENCODERS

    return {"encoders": [asdict(spec) for spec in ENCODERS.values()]}


def print_encoders(result: dict[str, Any]) -> None:
    """The encoder list as a readable table."""
    print(f"{'name':<16}{'width':>6}{'input':>7}{'µm/px':>7}  licence / source")
    for spec in result["encoders"]:
        print(
            f"{spec['name']:<16}{spec['embed_dim']:>6}{spec['input_px']:>7}{spec['mpp']:>7.2f}"
            f"  {spec['licence']}: {spec['source']}"
        )


def run_embed(args: argparse.Namespace) -> dict[str, Any]:
    """Embed one slide into a bag file."""
    import time

    from services.common.progress import ProgressBar
    from services.encoders.loading import load_encoder
    from services.mil.extract import embed_slide
    from services.slide.prepare import PrepParams
    from services.slide.reader import open_slide

    out = Path(args.out)
    if out.suffix.lower() not in (".h5", ".hdf5"):
        raise InvalidInput(f"the bag file must end in .h5, got {out.name}")
    if args.batch < 1:
        raise InvalidInput(f"--batch must be at least 1, got {args.batch}")
    if args.max_patches < 0:
        raise InvalidInput(f"--max-patches must be >= 0, got {args.max_patches}")
    encoder = load_encoder(args.encoder, args.weights, device=args.device)
    slide_id = args.slide_id or Path(args.slide).stem
    bar = None if args.json else ProgressBar(f"embed {slide_id}", "patches")
    counted = [0]

    def progress(done: int, total: int) -> None:
        counted[0] = total  # the bag's patch count, without reading the bag back
        if bar is not None:
            bar(done, total)

    began = time.perf_counter()
    with open_slide(args.slide, mpp=args.mpp) as reader:
        path = embed_slide(
            reader,
            slide_id,
            encoder,
            out,
            params=PrepParams(max_patches=args.max_patches),
            batch_size=args.batch,
            progress=progress,
        )
    return {
        "bag": str(path),
        "slide_id": slide_id,
        "patches": counted[0],
        "embed_dim": encoder.spec.embed_dim,
        "encoder": encoder.model_card_entry(),
        "seconds": round(time.perf_counter() - began, 2),
    }
