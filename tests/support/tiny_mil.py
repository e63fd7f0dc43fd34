"""A tiny real encoder and a MIL head trained on it for two epochs, for the tests of
the MIL pipeline: the ``uni`` architecture's tiny variant with random weights saved to
and loaded from a file, and a gated-attention head fitted on random bags of its width
(its calls are arbitrary; the tests check the wiring, not the biology)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from services.common.vocabulary import BIOMARKERS
from services.encoders import build_encoder, load_encoder
from services.mil.model import TrainingData
from services.mil.scoring import LocalBagPredictor, LocalEmbedder
from services.mil.train import train_mil


def tiny_embedder(folder: Path, seed: int = 0) -> LocalEmbedder:
    """The tiny ``uni`` with seeded random weights, through a safetensors file."""
    torch.manual_seed(seed)
    path = folder / "uni-tiny.safetensors"
    state = build_encoder("uni", tiny=True).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return LocalEmbedder(load_encoder("uni", path, tiny=True))


def tiny_head(
    embedder: LocalEmbedder, name: str = "unit", data: TrainingData | None = None, seed: int = 0
) -> LocalBagPredictor:
    """A head for ``embedder``'s bags, trained two epochs on 16 random bags."""
    rng = np.random.default_rng(seed)
    dim = embedder.embed_dim
    bags = [rng.normal(size=(int(rng.integers(10, 30)), dim)).astype(np.float32) for _ in range(16)]
    labels = (rng.random((16, len(BIOMARKERS))) < 0.5).astype(np.float64)
    model = train_mil(bags[:10], labels[:10], bags[10:], labels[10:], epochs=2, data=data)
    model.encoder, model.encoder_sha256 = embedder.encoder, embedder.sha256
    return LocalBagPredictor(model, name)
