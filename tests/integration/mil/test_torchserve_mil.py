"""A real TorchServe (Java 17) on 127.0.0.1 serving tiny encoders as
``encoder_resnet50_trunc``, ``encoder_detector`` (a 64 px detector bundle's
trunk) and ``encoder_biomarker_cnns`` (two 48 px biomarker bundles combined) and a
small fitted MIL head as ``mil_brca``: the served
answers equal the in-process models, bad requests get clear errors while the server
keeps answering, and the archives and their cards go to a real S3 store."""

from __future__ import annotations

import shutil
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from services.common.errors import (
    FailedPrecondition,
    InvalidInput,
    NotFound,
    Unavailable,
)
from services.common.objectstore import ObjectStore, open_store
from services.common.vocabulary import BIOMARKERS
from services.encoders import build_encoder, load_encoder
from services.encoders.biomarker_cnns import combine_bundles
from services.encoders.loading import LoadedEncoder
from services.inference.backbones import build_backbone
from services.inference.bundle import ModelConfig, save_bundle
from services.inference.preprocess import PreprocessConfig
from services.inference.registry import archive_key, stored_versions
from services.inference.torchserve import TorchServe, TorchServeConfig, TorchServeGrpcClient
from services.mil.archive import (
    ENCODER_HANDLER_FILE,
    MIL_HANDLER_FILE,
    build_encoder_mar,
    build_mil_mar,
    encoder_card,
    encoder_model_name,
    mil_card,
    packed_modules,
    publish_encoder,
    publish_mil,
)
from services.mil.model import FittedMIL
from services.mil.remote import (
    TorchServeBagPredictor,
    TorchServeEmbedder,
    load_card,
)
from services.mil.serving_io import (
    decode_bag,
    decode_embeddings,
    encode_bag,
    encode_patches,
    mil_output,
)
from services.mil.train import train_mil

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java 17"),
]

ENCODER = "resnet50-trunc"
ENCODER_MODEL = "encoder_resnet50_trunc"
MIL_MODEL = "mil_brca"
VERSION = "1"
DIM = 1024  # the tiny resnet50-trunc keeps the published width
THRESHOLDS = {"tp53": 0.4, "er": 0.65}
DETECTOR_PX = 64
CNNS_PX = 48
BATCH_SIZE = 4


@dataclass(frozen=True)
class Models:
    """The in-process models and their archives (in one model-store folder)."""

    encoder: LoadedEncoder
    mil: FittedMIL
    encoder_mar: Path
    mil_mar: Path
    detector: LoadedEncoder
    detector_mar: Path
    cnns: LoadedEncoder
    cnns_mar: Path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    state = build_encoder(ENCODER, tiny=True).state_dict()
    # Random weights and BatchNorm statistics, so eval mode matters.
    state = {
        key: torch.randn_like(value) * 0.1 + (1.0 if key.endswith("running_var") else 0.0)
        if value.is_floating_point()
        else value
        for key, value in state.items()
    }
    weights = folder / "r50.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    encoder = load_encoder(ENCODER, weights, tiny=True)

    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(int(rng.integers(8, 20)), DIM)).astype(np.float32) for _ in range(8)]
    labels = (rng.random((8, len(BIOMARKERS))) < 0.5).astype(np.float64)
    mil = train_mil(
        bags[:5],
        labels[:5],
        bags[5:],
        labels[5:],
        epochs=2,
        head_options={"hidden_dim": 16, "attention_dim": 8},
        seed=0,
    )
    mil_file = mil.save(folder / "brca.pt")

    # A CPU demo's detector: 64 px inputs and its own normalisation, which its
    # bundle's model.json gives the detector encoder.
    torch.manual_seed(1)
    config = ModelConfig(
        name="cancer_detector",
        version="1",
        backbone="tiny",
        preprocess=PreprocessConfig(DETECTOR_PX, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2)),
    )
    bundle = save_bundle(folder / "detector", build_backbone("tiny", 2), config)
    detector = load_encoder("detector", bundle / "weights.pt", tiny=True)

    store = tmp_path_factory.mktemp("model-store")
    encoder_mar = build_encoder_mar(ENCODER, weights, store, version=VERSION, tiny=True)
    mil_mar = build_mil_mar(mil_file, store, name="brca", version=VERSION)
    detector_mar = build_encoder_mar(
        "detector", bundle / "weights.pt", store, version=VERSION, tiny=True
    )

    # Two biomarker bundles of a CPU demo, combined into one biomarker-cnns file.
    biomarker_bundles = {}
    for seed, biomarker in enumerate(("er", "tp53"), start=2):
        torch.manual_seed(seed)
        biomarker_config = ModelConfig(
            name=f"biomarker_{biomarker}",
            version="1",
            backbone="tiny",
            preprocess=PreprocessConfig(CNNS_PX),
            stain_reference="none",
        )
        biomarker_bundles[biomarker] = save_bundle(
            folder / biomarker, build_backbone("tiny", 2), biomarker_config
        )
    cnns_weights = combine_bundles(biomarker_bundles, folder / "cnns" / "cnns.pt")
    cnns = load_encoder("biomarker-cnns", cnns_weights)
    cnns_mar = build_encoder_mar("biomarker-cnns", cnns_weights, store, version=VERSION)
    return Models(
        encoder,
        FittedMIL.load(mil_file),
        encoder_mar,
        mil_mar,
        detector,
        detector_mar,
        cnns,
        cnns_mar,
    )


@pytest.fixture(scope="module")
def server(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    work = tmp_path_factory.mktemp("torchserve")
    config = TorchServeConfig.with_free_ports(models.encoder_mar.parent, work)
    with TorchServe(config) as instance:
        for mar in (models.encoder_mar, models.mil_mar, models.detector_mar, models.cnns_mar):
            instance.register(mar, batch_size=BATCH_SIZE, max_batch_delay_ms=20)
        yield instance
        pids = instance.processes()
    alive = [pid for pid in pids if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
    assert alive == [], f"processes left after stop: {alive}"


@pytest.fixture(scope="module")
def client(server: TorchServe) -> Iterator[TorchServeGrpcClient]:
    with server.grpc_client(timeout_s=60) as grpc_client:
        yield grpc_client


@pytest.fixture(scope="module")
def store(s3_endpoint: str, s3_credentials: dict[str, str]) -> Iterator[ObjectStore]:
    with open_store(f"s3://{s3_endpoint}/mil-serving", **s3_credentials) as opened:
        yield opened


@pytest.fixture(scope="module")
def published(models: Models, store: ObjectStore) -> dict[str, dict[str, Any]]:
    """Both archives published; their cards as read back from the store."""
    publish_encoder(store, models.encoder_mar)
    publish_mil(store, models.mil_mar, thresholds=THRESHOLDS)
    return {name: load_card(store, name, VERSION) for name in (ENCODER_MODEL, MIL_MODEL)}


@pytest.fixture(scope="module")
def embedder(
    client: TorchServeGrpcClient, published: dict[str, dict[str, Any]]
) -> TorchServeEmbedder:
    card = published[ENCODER_MODEL]
    return TorchServeEmbedder(client, ENCODER_MODEL, VERSION, card, max_patches_per_request=16)


@pytest.fixture(scope="module")
def predictor(
    client: TorchServeGrpcClient, published: dict[str, dict[str, Any]]
) -> TorchServeBagPredictor:
    return TorchServeBagPredictor(client, MIL_MODEL, VERSION, published[MIL_MODEL])


def _patches(count: int, side: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, side, side, 3), dtype=np.uint8)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


# --- archives ---------------------------------------------------------------------------


def test_archives_hold_their_handler_files_and_every_module_they_import(models: Models) -> None:
    assert encoder_model_name("uni2-h") == "encoder_uni2_h"
    assert models.encoder_mar.name == f"{ENCODER_MODEL}.mar"
    assert models.mil_mar.name == f"{MIL_MODEL}.mar"
    with zipfile.ZipFile(models.encoder_mar) as archive:
        encoder_files = set(archive.namelist())
    with zipfile.ZipFile(models.mil_mar) as archive:
        mil_files = set(archive.namelist())
    assert {"handler.py", "encoder.json", "r50.safetensors"} <= encoder_files
    assert {"handler.py", "mil.pt"} <= mil_files
    for handler, files in ((ENCODER_HANDLER_FILE, encoder_files), (MIL_HANDLER_FILE, mil_files)):
        packed = packed_modules(handler)
        assert {"services/mil/serving_io.py", "services/mil/model.py"} <= set(packed)
        assert set(packed) <= files
    assert "services/encoders/loading.py" in encoder_files


# --- served answers -----------------------------------------------------------------------


def test_served_embeddings_equal_the_in_process_encoder(
    server: TorchServe, embedder: TorchServeEmbedder, models: Models
) -> None:
    assert server.describe(ENCODER_MODEL)["batchSize"] == BATCH_SIZE
    assert (embedder.encoder, embedder.embed_dim, embedder.input_px) == (ENCODER, DIM, 32)
    assert embedder.sha256 == models.encoder.sha256
    patches = _patches(40, 32, seed=1)  # three requests of at most 16
    np.testing.assert_allclose(
        embedder.embed(patches), models.encoder.embed(patches), rtol=1e-5, atol=1e-5
    )
    # Larger patches are shrunk by the client as the encoder would shrink them.
    large = _patches(3, 64, seed=2)
    np.testing.assert_allclose(
        embedder.embed(large), models.encoder.embed(large), rtol=1e-5, atol=1e-5
    )
    assert embedder.embed(_patches(0, 32, seed=3)).shape == (0, DIM)
    # Concurrent calls: TorchServe batches their requests; each answer stays its own.
    groups = [_patches(5, 32, seed=10 + i) for i in range(BATCH_SIZE)]
    with ThreadPoolExecutor(len(groups)) as pool:
        answers = list(pool.map(embedder.embed, groups))
    for answer, group in zip(answers, groups, strict=True):
        np.testing.assert_allclose(answer, models.encoder.embed(group), rtol=1e-5, atol=1e-5)


def test_served_mil_calls_equal_predict_bag(
    predictor: TorchServeBagPredictor, models: Models
) -> None:
    assert predictor.tasks == tuple(BIOMARKERS) and predictor.in_dim == DIM
    assert predictor.thresholds == {t: THRESHOLDS.get(t, 0.5) for t in BIOMARKERS}
    assert predictor.card["training_data"] == models.mil.training_data
    rng = np.random.default_rng(4)
    bags = [rng.normal(size=(n, DIM)).astype(np.float32) for n in (1, 7, 30, 200)]
    with ThreadPoolExecutor(len(bags)) as pool:
        served = list(pool.map(predictor.predict, bags))
    for bag, answer in zip(bags, served, strict=True):
        local = models.mil.predict_bag(bag)
        for task in BIOMARKERS:
            assert answer.probabilities[task] == pytest.approx(local.probabilities[task], abs=1e-6)
            assert answer.logits[task] == pytest.approx(local.logits[task], abs=1e-5)
            np.testing.assert_allclose(answer.attention[task], local.attention[task], atol=1e-6)
            assert answer.attention[task].shape == (len(bag),)


def test_a_served_detector_takes_its_bundles_input_side_and_normalisation(
    client: TorchServeGrpcClient, models: Models
) -> None:
    card = encoder_card(models.detector_mar)
    assert card["model_name"] == "encoder_detector"
    assert (card["input_px"], card["mpp"], card["mean"]) == (DETECTOR_PX, 4.0, [0.5] * 3)
    assert models.detector.spec.input_px == DETECTOR_PX
    with zipfile.ZipFile(models.detector_mar) as archive:
        assert {"weights.pt", "model.json", "encoder.json"} <= set(archive.namelist())
    embedder = TorchServeEmbedder(client, "encoder_detector", VERSION, card)
    patches = _patches(6, DETECTOR_PX, seed=9)
    np.testing.assert_allclose(
        embedder.embed(patches), models.detector.embed(patches), rtol=1e-5, atol=1e-5
    )


def test_served_biomarker_cnns_equal_the_local_embedding(
    client: TorchServeGrpcClient, models: Models
) -> None:
    card = encoder_card(models.cnns_mar)
    assert card["model_name"] == "encoder_biomarker_cnns"
    assert (card["input_px"], card["embed_dim"]) == (CNNS_PX, 2 * (128 + 1))
    assert card["mpp"] == 0.25 * 512 / CNNS_PX and card["stain_reference"] is None
    with zipfile.ZipFile(models.cnns_mar) as archive:
        assert {"cnns.pt", "cnns.bundles.json", "encoder.json"} <= set(archive.namelist())
    embedder = TorchServeEmbedder(client, "encoder_biomarker_cnns", VERSION, card)
    assert embedder.stain_reference is None
    patches = _patches(6, 96, seed=11)  # shrunk to 48 px by the client, as locally
    np.testing.assert_allclose(
        embedder.embed(patches), models.cnns.embed(patches), rtol=1e-5, atol=1e-5
    )


def test_the_encoder_and_mil_chain_like_the_pipeline(
    embedder: TorchServeEmbedder, predictor: TorchServeBagPredictor, models: Models
) -> None:
    patches = _patches(12, 32, seed=5)
    served = predictor.predict(embedder.embed(patches))
    local = models.mil.predict_bag(models.encoder.embed(patches))
    for task in BIOMARKERS:
        assert served.probabilities[task] == pytest.approx(local.probabilities[task], abs=1e-5)


# --- bad requests -------------------------------------------------------------------------


def test_bad_requests_get_clear_errors_and_the_server_keeps_answering(
    server: TorchServe,
    client: TorchServeGrpcClient,
    embedder: TorchServeEmbedder,
    predictor: TorchServeBagPredictor,
) -> None:
    good = np.random.default_rng(6).normal(size=(9, DIM)).astype(np.float32)
    with pytest.raises(InvalidInput, match=r"send one \.npy file of float32"):
        client.predict(MIL_MODEL, b"not a bag")
    with pytest.raises(InvalidInput, match="1025 wide; this head reads 1024"):
        client.predict(MIL_MODEL, encode_bag(np.zeros((3, DIM + 1), np.float32)))
    nan = good.copy()
    nan[4, 7] = np.nan
    with pytest.raises(InvalidInput, match="1 NaN or infinite values"):
        client.predict(MIL_MODEL, encode_bag(nan))
    with pytest.raises(InvalidInput, match=r"the bag is empty \(N = 0\)"):
        server.predict_rest(MIL_MODEL, encode_bag(np.zeros((0, DIM), np.float32)))
    wrong_kind = client.predict_raw(ENCODER_MODEL, encode_bag(good), VERSION)
    with pytest.raises(InvalidInput, match="patches must be uint8, got float32"):
        decode_embeddings(wrong_kind, len(good), DIM)
    # The clients check before sending.
    with pytest.raises(InvalidInput, match="NaN"):
        predictor.predict(nan)
    with pytest.raises(InvalidInput, match="uint8"):
        embedder.embed(np.zeros((2, 32, 32, 3), np.float32))

    # Good and bad requests in one batch: each bad one alone is refused.
    payloads = [encode_bag(good), b"junk", encode_bag(good), encode_bag(nan)]

    def send(data: bytes) -> Any:
        try:
            return client.predict(MIL_MODEL, data)
        except InvalidInput as exc:
            return exc

    with ThreadPoolExecutor(len(payloads)) as pool:
        answers = list(pool.map(send, payloads))
    assert isinstance(answers[1], InvalidInput) and isinstance(answers[3], InvalidInput)
    assert answers[0] == answers[2] and answers[0]["tasks"] == list(BIOMARKERS)

    # Both models still answer, on their one worker each.
    assert predictor.predict(good).probabilities.keys() == set(BIOMARKERS)
    assert embedder.embed(_patches(2, 32, seed=7)).shape == (2, DIM)
    raw = client.predict_raw(ENCODER_MODEL, encode_patches(_patches(2, 32, seed=7)))
    assert decode_embeddings(raw, 2, DIM).shape == (2, DIM)
    for name in (ENCODER_MODEL, MIL_MODEL):
        assert [w["status"] for w in server.describe(name)["workers"]] == ["READY"]


def test_a_request_failed_by_a_dead_worker_is_sent_again(
    published: dict[str, dict[str, Any]], models: Models
) -> None:
    # No server: a stand-in client fails as TorchServe does while it replaces a
    # worker that died, then answers as MilHandler would.
    bag = np.random.default_rng(8).normal(size=(5, DIM)).astype(np.float32)
    card = published[MIL_MODEL]
    flaky = _FlakyMil(models.mil, failures=2)
    predictor = TorchServeBagPredictor(
        flaky,  # type: ignore[arg-type]
        MIL_MODEL,
        VERSION,
        card,
        retry_delays_s=(0.0, 0.0),
    )
    assert predictor.predict(bag).probabilities == models.mil.predict_bag(bag).probabilities
    assert flaky.calls == 3
    hopeless = _FlakyMil(models.mil, failures=3)
    predictor = TorchServeBagPredictor(
        hopeless,  # type: ignore[arg-type]
        MIL_MODEL,
        VERSION,
        card,
        retry_delays_s=(0.0, 0.0),
    )
    with pytest.raises(Unavailable, match="Worker died"):
        predictor.predict(bag)
    assert hopeless.calls == 3


class _FlakyMil:
    """Stands in for TorchServeGrpcClient: fails the first ``failures`` calls as
    TorchServe does when a worker dies, then answers as MilHandler would."""

    def __init__(self, model: FittedMIL, failures: int) -> None:
        self.model, self.failures, self.calls = model, failures, 0

    def predict(self, model_name: str, data: bytes, model_version: str = "") -> Any:
        self.calls += 1
        if self.calls <= self.failures:
            raise Unavailable("TorchServe gRPC INTERNAL: Worker died.")
        bag = decode_bag(data, self.model.in_dim)
        return mil_output(self.model.predict_bag(bag), self.model.tasks)


# --- the store ----------------------------------------------------------------------------


def test_publish_puts_the_archives_and_their_cards_in_the_store(
    store: ObjectStore, published: dict[str, dict[str, Any]], models: Models
) -> None:
    for name, mar in ((ENCODER_MODEL, models.encoder_mar), (MIL_MODEL, models.mil_mar)):
        assert stored_versions(store, name) == [VERSION]
        assert store.get_bytes(archive_key(name, VERSION)) == mar.read_bytes()
    encoder = published[ENCODER_MODEL]
    assert encoder == encoder_card(models.encoder_mar)
    assert encoder["kind"] == "encoder" and encoder["tiny"] is True
    assert encoder["sha256"] == models.encoder.sha256
    assert encoder["licence"] == "BSD-3-Clause"
    assert (encoder["embed_dim"], encoder["input_px"], encoder["mpp"]) == (DIM, 32, 0.5)
    mil = published[MIL_MODEL]
    assert mil == mil_card(models.mil_mar, THRESHOLDS)
    assert mil["kind"] == "mil" and mil["thresholds"] == THRESHOLDS
    assert mil["tasks"] == list(BIOMARKERS) and mil["head"]["in_dim"] == DIM
    assert {k: mil[k] for k in models.mil.model_card()} == models.mil.model_card()

    with pytest.raises(NotFound, match="has no model card"):
        load_card(store, MIL_MODEL, "2")
    with pytest.raises(FailedPrecondition, match="kind 'mil', not 'encoder'"):
        TorchServeEmbedder(None, MIL_MODEL, VERSION, mil)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="unknown tasks"):
        mil_card(models.mil_mar, {"brca1": 0.5})
    with pytest.raises(InvalidInput, match=r"\[0, 1\]"):
        mil_card(models.mil_mar, {"tp53": 1.5})
    with pytest.raises(InvalidInput, match=r"holds no encoder\.json"):
        publish_encoder(store, models.mil_mar)
