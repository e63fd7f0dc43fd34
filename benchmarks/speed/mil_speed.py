"""From a bag to six calibrated calls: in process, through TorchServe's ``mil_<name>``,
and through the PredictionService's PredictFromBag (the path a client takes).

A gated-attention head (``abmil``, the default width) on UNI-wide embeddings (1024) is
fitted for one epoch on random bags (its weights do not change the cost), then one bag
of ``--patches`` patches is called, best of ``--repeats``, side by side in one run:

- ``in process``: ``FittedMIL.predict_bag`` (what ``histomarker mil predict`` runs);
- ``TorchServe``: the bag as one ``.npy`` request to ``mil_bench`` on a real TorchServe
  on 127.0.0.1 (:class:`services.mil.remote.TorchServeBagPredictor`);
- ``PredictFromBag``: the gRPC service in this process, the bag in a ``file://`` store,
  its head found on that TorchServe with its card (``ServedMilModels``), the answer with
  the attention table written to the store.

    .venv/bin/python benchmarks/speed/mil_speed.py [--patches 5000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from services.common.grpc_client import open_channel
from services.common.grpc_server import ServiceBinding, create_server
from services.common.objectstore import open_store
from services.common.stubs.histomarker.v1 import common_pb2, prediction_pb2, prediction_pb2_grpc
from services.common.vocabulary import BIOMARKERS
from services.inference.torchserve import RestClient, TorchServe, TorchServeConfig
from services.mil.archive import build_mil_mar, publish_mil
from services.mil.bags import write_bag
from services.mil.remote import TorchServeBagPredictor, load_card
from services.mil.train import train_mil
from services.prediction.mil_models import ServedMilModels
from services.prediction.server import SERVICE_NAME, PredictionServicer, PredictionSettings

WIDTH = 1024
NAME = "mil_bench"
VERSION = "1"


def best(call: Callable[[], object], repeats: int) -> float:
    call()  # warm: first-call allocations, TorchServe's worker
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=5000, help="patches in the bag")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls; the best counts")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(200, WIDTH)).astype(np.float32) for _ in range(12)]
    labels = (rng.random((12, len(BIOMARKERS))) < 0.5).astype(np.float64)
    model = train_mil(bags[:8], labels[:8], bags[8:], labels[8:], epochs=1)
    model.encoder, model.encoder_sha256 = "uni", "ab" * 32
    features = rng.normal(size=(args.patches, WIDTH)).astype(np.float32)
    coords = np.stack(np.divmod(np.arange(args.patches), 100), axis=1).astype(np.int64) * 448
    rows = []
    rows.append(
        (
            "in process (FittedMIL.predict_bag)",
            best(lambda: model.predict_bag(features), args.repeats),
        )
    )
    with tempfile.TemporaryDirectory(prefix="mil-speed-") as scratch:
        root = Path(scratch)
        store = open_store((root / "store").as_uri())
        mar = build_mil_mar(
            model.save(root / "mil.pt"), root / "model-store", name="bench", version=VERSION
        )
        publish_mil(store, mar)
        bag_path = write_bag(
            root / "bag.h5",
            features,
            coords,
            slide_id="BENCH-1",
            encoder="uni",
            encoder_sha256="ab" * 32,
            patch_px=224,
            patch_mpp=0.5,
            level0_mpp=0.25,
        )
        store.put_file("bags/uni/BENCH-1.h5", bag_path)
        config = TorchServeConfig.with_free_ports(
            root / "model-store", root / "work", token_auth=False
        )
        with TorchServe(config) as server, server.grpc_client() as client:
            server.register(mar, initial_workers=1)
            head = TorchServeBagPredictor(client, NAME, VERSION, load_card(store, NAME, VERSION))
            rows.append(
                (
                    "TorchServe mil_bench (one gRPC request)",
                    best(lambda: head.predict(features), args.repeats),
                )
            )
            management = RestClient("127.0.0.1", config.management_port)
            settings = PredictionSettings(
                host="127.0.0.1", port=0, store_url=store.url, slide_cache_dir=root / "cache"
            )
            servicer = PredictionServicer(
                settings, mil_models=ServedMilModels(store, management, client)
            )
            binding = ServiceBinding(
                SERVICE_NAME, servicer, prediction_pb2_grpc.add_PredictionServiceServicer_to_server
            )
            grpc_server, port = create_server(settings, [binding])
            grpc_server.start()
            channel = open_channel(f"127.0.0.1:{port}")
            stub = prediction_pb2_grpc.PredictionServiceStub(channel)
            request = prediction_pb2.PredictFromBagRequest(
                bag=common_pb2.ObjectRef(key="bags/uni/BENCH-1.h5")
            )
            try:
                answer = stub.PredictFromBag(request, timeout=60).prediction
                assert (
                    answer.status == prediction_pb2.PREDICTION_STATUS_OK
                    and len(answer.biomarkers) == 6
                )
                rows.append(
                    (
                        "PredictFromBag (gRPC service, store, TorchServe)",
                        best(lambda: stub.PredictFromBag(request, timeout=60), args.repeats),
                    )
                )
            finally:
                channel.close()
                grpc_server.stop(0).wait()
    print(
        f"one bag of {args.patches} x {WIDTH} -> six calibrated calls and attention "
        f"(best of {args.repeats}, one torch thread)"
    )
    print("| path | seconds |")
    print("|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
