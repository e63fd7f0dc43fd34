"""The MIL pipeline on a synthetic slide with a real (tiny, random) encoder and a head
trained for two epochs: the bag it stores, its calls, attention table, heatmaps, and
PredictFromBag giving the same calls from the stored bag without pixels."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from tiny_mil import tiny_embedder, tiny_head

from services.common.errors import FailedPrecondition, InvalidInput
from services.common.objectstore import ObjectStore, open_store
from services.common.vocabulary import BIOMARKERS
from services.mil.bags import grid_overlap, read_bag
from services.mil.model import TrainingData
from services.mil.scoring import LocalBagPredictor, LocalEmbedder
from services.prediction.mil_pipeline import MilParams, predict_from_bag, predict_slide_mil
from services.prediction.results import ProgressEvent
from services.slide.qc import QcThresholds
from services.slide.reader import open_slide
from services.synth.cohort import generate_cohort
from services.synth.slide import QC_MIN_USABLE_MM2

PARAMS = MilParams(qc=QcThresholds(min_usable_mm2=QC_MIN_USABLE_MM2), max_patches=160, top_k=5)


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> LocalEmbedder:
    return tiny_embedder(tmp_path_factory.mktemp("enc"))


@pytest.fixture(scope="module")
def predictor(embedder: LocalEmbedder) -> LocalBagPredictor:
    data = TrainingData(cohort="unit-test", synthetic=True, sites=("A", "B"), n_slides=16)
    return tiny_head(embedder, "unit", data)


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cohort")
    generate_cohort(folder, 2, seed=3, preset="tiny", truth_crops=0)
    manifest = pd.read_csv(folder / "manifest.csv")
    return folder / manifest[manifest["kind"] == "cancer"].iloc[0]["slide_path"]


@pytest.fixture()
def store(tmp_path: Path) -> ObjectStore:
    return open_store((tmp_path / "store").as_uri())


def test_a_slide_is_embedded_stored_and_called_by_the_head(
    slide_path: Path, embedder: LocalEmbedder, predictor: LocalBagPredictor, store: ObjectStore
) -> None:
    events: list[ProgressEvent] = []
    with open_slide(slide_path) as reader:
        result = predict_slide_mil(
            reader, "s1", store, embedder, predictor, PARAMS, progress=events.append
        )
    assert result.status == "ok", result.message
    assert result.pipeline == "mil" and result.encoder_model_name == "local:uni"
    assert result.encoder_sha256 == embedder.sha256 and result.mil_model_name == "local:unit"
    assert result.training_data["cohort"] == "unit-test"
    assert result.training_data["sites"] == ["A", "B"]
    # The stored bag is the usable grid at the encoder's resolution, and the calls are
    # the head's on exactly that bag.
    bag = read_bag(_local(store, result.bag_key, slide_path.parent / "got.h5"))
    assert result.bag_key == "bags/uni/s1.h5" and bag.n_patches == 160
    assert bag.patch_px == embedder.input_px and bag.patch_mpp == pytest.approx(embedder.mpp)
    expected = predictor.predict(bag.features)
    table = pd.read_parquet(io.BytesIO(store.get_bytes(result.patch_table_key)))
    assert len(table) == 160 and [b.biomarker for b in result.biomarkers] == list(BIOMARKERS)
    for item in result.biomarkers:
        assert item.probability == pytest.approx(expected.probabilities[item.biomarker])
        assert item.positive == (item.probability >= item.threshold) and item.patch_count == 160
        attention = table[f"attention_{item.biomarker}"].to_numpy()
        assert attention.sum() == pytest.approx(1.0, abs=1e-4)
        tops = [p.attention for p in item.top_patches]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert tops[0] == pytest.approx(attention.max())
        assert store.get_bytes(item.heatmap_key)[:8] == b"\x89PNG\r\n\x1a\n"
    assert store.exists(f"{result.prefix}/prediction.json")
    assert store.exists(f"{result.prefix}/tissue.png")
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(e.stage == "embed" for e in events)

    # PredictFromBag: the same calls from the stored bag, no pixels, no heatmaps.
    again = predict_from_bag(bag, store, predictor, replace(PARAMS, biomarkers=("er", "tp53")))
    assert again.status == "ok" and [b.biomarker for b in again.biomarkers] == ["er", "tp53"]
    for item in again.biomarkers:
        assert item.probability == pytest.approx(expected.probabilities[item.biomarker])
        assert item.heatmap_key == ""
    assert again.encoder_model_name == "encoder_uni" and again.tissue_mask_key == ""


def _local(store: ObjectStore, key: str, path: Path) -> Path:
    path.write_bytes(store.get_bytes(key))
    return path


def test_a_bag_or_encoder_the_head_does_not_read_is_refused(
    slide_path: Path, embedder: LocalEmbedder, predictor: LocalBagPredictor, store: ObjectStore
) -> None:
    with open_slide(slide_path) as reader:
        first = predict_slide_mil(
            reader, "s2", store, embedder, predictor, replace(PARAMS, heatmaps=False)
        )
    bag = read_bag(_local(store, first.bag_key, slide_path.parent / "s2.h5"))
    with pytest.raises(InvalidInput, match="holds resnet50-trunc embeddings"):
        predict_from_bag(replace(bag, encoder="resnet50-trunc"), store, predictor)
    with pytest.raises(InvalidInput, match="weights"):
        predict_from_bag(replace(bag, encoder_sha256="0" * 64), store, predictor)
    with pytest.raises(InvalidInput, match="width 8"):
        predict_from_bag(replace(bag, features=bag.features[:, :8]), store, predictor)
    other = LocalEmbedder(embedder.loaded)
    other.sha256 = "f" * 64
    with (
        open_slide(slide_path) as reader,
        pytest.raises(FailedPrecondition, match="trained on uni weights"),
    ):
        predict_slide_mil(reader, "s3", store, other, predictor, PARAMS)
    empty = replace(bag, features=bag.features[:0], coords=bag.coords[:0])
    assert predict_from_bag(empty, store, predictor).status == "no_tissue"


def test_a_slide_is_tiled_with_the_overlap_of_the_heads_training_bags(
    slide_path: Path, embedder: LocalEmbedder, predictor: LocalBagPredictor, store: ObjectStore
) -> None:
    params = replace(PARAMS, max_patches=0, heatmaps=False)
    counts = {}
    for overlap in (0.0, 0.5):
        predictor.card["grid_overlap"] = overlap
        with open_slide(slide_path) as reader:
            result = predict_slide_mil(reader, f"o{overlap}", store, embedder, predictor, params)
        bag = read_bag(_local(store, result.bag_key, slide_path.parent / f"o{overlap}.h5"))
        assert grid_overlap(bag) == overlap
        counts[overlap] = bag.n_patches
    predictor.card.pop("grid_overlap")
    assert counts[0.5] > 3 * counts[0.0]  # half-overlapping: about four times the patches
