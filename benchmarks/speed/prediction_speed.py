"""Seconds per slide of the prediction pipeline through a real TorchServe, by stage.

One synthetic ``small`` slide (12288x8192 px at 0.25 µm/px, a cancer slide) is
predicted by ``services.prediction.pipeline.predict_slide`` with the seven models
(``cancer_detector`` and six ``biomarker_*``) as ResNet-18s with random weights
(timing only), served by TorchServe on 127.0.0.1 and called through its gRPC API,
Vahadane-normalized to a reference fitted on another synthetic slide. Every 20x
tissue patch is kept as cancer (``--cancer-confidence 0``: random weights select
nothing meaningful, and keeping all is the heaviest case).

The configurations run on the same slide:

- ``overlapped`` (the service's defaults): reader threads read and normalize ahead,
  ``--in-flight`` requests at once, 40x batches sent first;
- ``sequential``: one reader, one request at a time, no read-ahead — the same code
  with the overlap switched off;
- ``full-size requests``: the defaults, but the scorer sends the patches as read
  instead of shrunk to the model's input (``TorchServeScorer(shrink=False)``).

A name may be given twice in ``--configs`` to run it again (noise). ``--backbone
small --input-px 128 --tta 2`` are the demo's biomarker models.

The table gives wall seconds per stage, the summed thread seconds inside scoring,
and TorchServe's busy fraction: the share of the inference window (first request to
last answer) with at least one request in flight. Run
``.venv/bin/python benchmarks/speed/prediction_speed.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from services.common.objectstore import open_store
from services.common.vocabulary import BIOMARKERS, CANCER_DETECTOR, model_name_of
from services.inference.archive import build_mar
from services.inference.backbones import build_backbone
from services.inference.bundle import ModelConfig, save_bundle
from services.inference.preprocess import PreprocessConfig
from services.inference.registry import publish_bundle
from services.inference.torchserve import TorchServe, TorchServeConfig
from services.prediction.models import ModelRegistry, TorchServeScorer
from services.prediction.pipeline import PredictionParams, predict_slide
from services.slide.qc import QcThresholds
from services.slide.reader import open_slide
from services.slide.stain import get_normalizer
from services.synth.cohort import generate_cohort
from services.synth.slide import QC_MIN_USABLE_MM2

CONFIGS = {
    "overlapped": {"reader_threads": 2, "read_ahead_batches": 4},
    # The defaults, but patches sent to TorchServe as read (512 px), not shrunk to the
    # model's input first.
    "full-size requests": {"reader_threads": 2, "read_ahead_batches": 4},
    "sequential": {"reader_threads": 1, "read_ahead_batches": 1, "max_in_flight": 1},
}
STAGES = ("tissue", "grid", "stain", "scoring", "aggregate", "heatmaps")
INSIDE = ("read_20x", "read_40x", "normalize", "cancer_requests", "biomarker_requests")


def _bundles(root: Path, input_px: int, tta: tuple[str, ...], backbone: str) -> dict[str, Path]:
    bundles = {}
    for seed, name in enumerate([CANCER_DETECTOR, *(model_name_of(b) for b in BIOMARKERS)]):
        torch.manual_seed(seed)
        config = ModelConfig(
            name=name,
            version="1",
            backbone=backbone,
            class_names=("normal", "cancer") if name == CANCER_DETECTOR else ("neg", "pos"),
            preprocess=PreprocessConfig(input_px=input_px),
            tta=tta,
        )
        model = build_backbone(backbone, 2, input_px=input_px)
        bundles[name] = save_bundle(root / name, model, config)
    return bundles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=("tiny", "small"))
    parser.add_argument("--input-px", type=int, default=224, help="network input side")
    parser.add_argument("--backbone", default="resnet18", help="the seven models' backbone")
    parser.add_argument("--tta", type=int, default=1, help="test-time views (1-8)")
    parser.add_argument("--batch", type=int, default=16, help="patches per request")
    parser.add_argument("--in-flight", type=int, default=4, help="requests at once")
    parser.add_argument("--cancer-confidence", type=float, default=0.0)
    parser.add_argument("--configs", default="overlapped,sequential")
    args = parser.parse_args()
    from services.inference.tta import TRANSFORM_NAMES

    with tempfile.TemporaryDirectory(prefix="prediction-speed-") as scratch:
        root = Path(scratch)
        store = open_store((root / "store").as_uri())
        print("generating the slides and models ...", file=sys.stderr)
        generate_cohort(root / "cohort", 2, seed=7, preset=args.preset, truth_crops=0)
        manifest = pd.read_csv(root / "cohort" / "manifest.csv")
        slide = root / "cohort" / manifest[manifest["kind"] == "cancer"].iloc[0]["slide_path"]
        other = root / "cohort" / manifest[manifest["kind"] != "cancer"].iloc[0]["slide_path"]
        with open_slide(other) as reader:
            level = reader.best_level_for_downsample(8)
            reference = get_normalizer("vahadane").stain_matrix_of(reader.read_level(level))
        bundles = _bundles(
            root / "bundles", args.input_px, TRANSFORM_NAMES[: args.tta], args.backbone
        )
        model_store = root / "model-store"
        with ThreadPoolExecutor(2) as pool:
            mars = list(pool.map(lambda b: build_mar(b, model_store), bundles.values()))
        for bundle, mar in zip(bundles.values(), mars, strict=True):
            publish_bundle(store, bundle, mar)
        config = TorchServeConfig.with_free_ports(model_store, root / "ts", token_auth=False)
        with TorchServe(config) as torchserve:
            with ThreadPoolExecutor(len(mars)) as pool:
                list(pool.map(lambda m: torchserve.register(m), mars))
            registry = ModelRegistry(store, torchserve.management)
            deployment = registry.deployment()
            rows = []
            with torchserve.grpc_client(timeout_s=600) as client:
                scorers = {
                    "shrunk": TorchServeScorer(client),
                    "full-size": TorchServeScorer(client, shrink=False),
                }
                base = PredictionParams(
                    # Synthetic slides are small: the demo's QC floor, not a real slide's.
                    qc=QcThresholds(min_usable_mm2=QC_MIN_USABLE_MM2),
                    cancer_confidence=args.cancer_confidence,
                    batch_size=args.batch,
                    max_in_flight=args.in_flight,
                )
                # Warm-up: every worker answers once.
                with open_slide(slide) as reader:
                    warm = replace(base, heatmaps=False, cancer_confidence=1.0)
                    predict_slide(reader, "warm-up", store, deployment, scorers["shrunk"], warm)
                for name in args.configs.split(","):
                    params = replace(base, **CONFIGS[name])  # type: ignore[arg-type]
                    scorer = scorers["full-size" if name.startswith("full-size") else "shrunk"]
                    print(f"predicting ({name}) ...", file=sys.stderr)
                    started = time.perf_counter()
                    with open_slide(slide) as reader:
                        result = predict_slide(
                            reader,
                            f"bench-{name}",
                            store,
                            deployment,
                            scorer,
                            params,
                            reference=reference,
                        )
                    rows.append((name, time.perf_counter() - started, result))
    _print(rows, args)


def _print(rows: list, args: argparse.Namespace) -> None:
    name, _, first = rows[0]
    print(
        f"\nslide: {args.preset} preset, {first.tissue_patch_count} 20x tissue patches, "
        f"{first.cancer_patch_count} kept, {4 * first.cancer_patch_count} 40x patches x "
        f"{len(first.biomarkers)} biomarker models; {args.backbone} at {args.input_px} px, "
        f"{args.tta} TTA view(s), {args.batch} patches/request\n"
    )
    header = ["config", "s / slide", *STAGES, *INSIDE, "TorchServe busy", "mean in flight"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, seconds, result in rows:
        cells = [name, f"{seconds:.1f}"]
        cells += [f"{result.timings.get(stage, 0.0):.2f}" for stage in STAGES]
        cells += [f"{result.timings.get(stage, 0.0):.1f}" for stage in INSIDE]
        cells += [
            f"{result.utilisation['busy_fraction']:.1%}",
            f"{result.utilisation['mean_in_flight']:.2f}",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
