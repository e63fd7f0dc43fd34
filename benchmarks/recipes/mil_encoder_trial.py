"""Trial of a MIL encoder trained in the demo: the paper pipeline's six biomarker CNNs.

The demo's MIL pipeline embeds with the cancer detector's trunk, which sees 4 µm/px,
while the synthetic cues are 1-2 µm nuclear detail (benchmarks/README.md). This script
tries the encoder the demo has already trained at 1 µm/px: each 40x patch (512 px at
0.25 µm/px, the paper's biomarker input) goes through the six biomarker bundles the
demo's ``train_pipeline`` stored, and the pooled trunk features of all six (6 x 128)
plus their six logits make one embedding. Every training and held-out slide of a
finished ``histomarker demo`` run is embedded on its QC'd 40x grid (colours as
scanned, as the MIL pipeline embeds), ``histomarker mil train`` fits the head
(site-aware CV on the training slides, per-biomarker temperatures), and the held-out
cancer slides are called with it; the AUROC and ECE are printed beside the paper
pipeline's from the demo's ``results.json``.

    .venv/bin/python benchmarks/recipes/mil_encoder_trial.py --demo-out demo-out --work /tmp/trial

Nothing here is used by the services; it sizes what the demo's MIL encoder could be.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sklearn.metrics import roc_auc_score as auroc  # noqa: E402

from services.common.vocabulary import BIOMARKERS  # noqa: E402
from services.inference.bundle import load_bundle  # noqa: E402
from services.inference.calibration import expected_calibration_error  # noqa: E402
from services.inference.preprocess import to_input  # noqa: E402
from services.mil.extract import embed_grid, embed_slide, encoder_grid  # noqa: E402
from services.slide.prepare import PrepParams, prepare_slide  # noqa: E402
from services.slide.reader import open_slide  # noqa: E402
from services.slide.stain import builtin_reference  # noqa: E402

ECE_BINS = 10


class PaperModelsEmbedder:
    """The six biomarker bundles as one frozen encoder (the ``Embedder`` protocol)."""

    encoder = "paper-biomarkers"
    model_name = "local:paper-biomarkers"
    version = "local"
    input_px = 512
    mpp = 0.25

    def __init__(self, bundles: dict[str, Path], threads: int) -> None:
        torch.set_num_threads(threads)
        self.models = {name: load_bundle(folder) for name, folder in sorted(bundles.items())}
        self.sha256 = "-".join(folder.parent.name[:8] for folder in bundles.values())
        width = 0
        for model, _ in self.models.values():
            width += model.fc.in_features + 1
        self.embed_dim = width

    stains = None

    def embed(self, patches: np.ndarray) -> np.ndarray:
        if self.stains is not None:
            patches = np.stack([self.stains.transform(p) for p in patches])
        parts = []
        with torch.inference_mode():
            for model, config in self.models.values():
                x = to_input(patches, config.preprocess)
                pooled = torch.flatten(model.pool(model.features(x)), 1)
                logits = model.fc(pooled)
                margin = (logits[:, 1] - logits[:, 0]).unsqueeze(1)
                parts += [pooled, margin]
        return torch.cat(parts, dim=1).numpy().astype(np.float32)


def find_bundles(store: Path) -> dict[str, Path]:
    """The newest stored bundle of each biomarker model (``models/<name>/<v>/``)."""
    found = {}
    for name in BIOMARKERS:
        folders = sorted(
            (p.parent for p in (store / "models").glob(f"biomarker_{name}/*/weights.pt")),
            key=lambda p: p.stat().st_mtime,
        )
        if not folders:
            raise SystemExit(f"no bundle of {name} under {store / 'models'}")
        found[name] = folders[-1]
    return found


def ece(p: np.ndarray, y: np.ndarray) -> float:
    """The demo's held-out ECE (top-class confidence, 10 equal-width bins)."""
    return expected_calibration_error(p, y, bins=ECE_BINS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-out", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--head", default="abmil")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--stain", action="store_true", help="normalize as the paper does")
    args = parser.parse_args(argv)
    demo = args.demo_out
    bundles = find_bundles(demo / "store")
    print("bundles:", {k: str(v.relative_to(demo)) for k, v in bundles.items()}, flush=True)
    embedder = PaperModelsEmbedder(bundles, args.threads)
    cohort = demo / "cohort"
    full = pd.read_csv(cohort / "manifest.csv")
    full["slide_path"] = [str(cohort / p) for p in full["slide_path"]]
    train_ids = set(pd.read_csv(cohort / "train.csv")["slide_id"].astype(str))
    full["slide_id"] = full["slide_id"].astype(str)
    train = full[full["slide_id"].isin(train_ids)]
    heldout = full[~full["slide_id"].isin(train_ids)]
    bags = args.work / "bags"
    bags.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    slides = pd.concat([train, heldout])
    for number, row in enumerate(slides.itertuples(index=False), start=1):
        out = bags / f"{row.slide_id}.h5"
        if out.exists():
            continue
        with open_slide(str(row.slide_path)) as reader:
            if not args.stain:
                embed_slide(reader, str(row.slide_id), embedder, out)
                continue
            # As the paper's pipeline: the slide's stains onto the built-in reference.
            prep = PrepParams()
            prep = PrepParams(grid=encoder_grid(embedder, prep.grid))
            prepared = prepare_slide(
                reader, str(row.slide_id), prep, reference=builtin_reference("vahadane")
            )
            embedder.stains = prepared.stains
            embed_grid(
                reader,
                prepared.grid,
                embedder,
                out,
                slide_id=str(row.slide_id),
                grid_params=prep.grid,
            )
        if number % 20 == 0:
            print(
                f"embedded {number}/{len(slides)}  {time.perf_counter() - began:.0f} s", flush=True
            )
    embed_s = time.perf_counter() - began
    train_bags = args.work / "train-bags"
    train_bags.mkdir(exist_ok=True)
    for slide_id in train["slide_id"]:
        link = train_bags / f"{slide_id}.h5"
        if not link.exists():
            link.symlink_to(bags / f"{slide_id}.h5")
    model_dir = args.work / f"model-{args.head}"
    began = time.perf_counter()
    if not list(model_dir.glob("mil_*.pt")):  # a model already trained is reused
        subprocess.run(
            [
                str(ROOT / ".venv/bin/histomarker"),
                "mil",
                "train",
                str(cohort / "train.csv"),
                str(train_bags),
                str(model_dir),
                "--head",
                args.head,
                "--folds",
                "5",
                "--epochs",
                str(args.epochs),
                "--threads",
                str(args.threads),
                "--synthetic",
                "--json",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    train_s = time.perf_counter() - began
    model = next(model_dir.glob("mil_*.pt"))
    rows = []
    cancer = heldout[heldout["kind"] == "cancer"]
    for row in cancer.itertuples(index=False):
        result = subprocess.run(
            [
                str(ROOT / ".venv/bin/histomarker"),
                "mil",
                "predict",
                str(model),
                str(bags / f"{row.slide_id}.h5"),
                "--json",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        answer = json.loads(result.stdout)
        rows.append(
            {"slide_id": row.slide_id, **{b: answer["calls"][b]["probability"] for b in BIOMARKERS}}
        )
    calls = pd.DataFrame(rows).merge(cancer, on="slide_id", suffixes=("_p", ""))
    # The same columns as the demo's predictions CSVs: `histomarker analysis compare`.
    calls.rename(columns={f"{b}_p": f"{b}_probability" for b in BIOMARKERS}).to_csv(
        args.work / "predictions_trial.csv", index=False
    )
    paper = json.loads((demo / "results.json").read_text())
    paper_calls = pd.read_csv(demo / "predictions.csv")
    paper_calls["slide_id"] = paper_calls["slide_id"].astype(str)
    print(f"embedding {embed_s:.0f} s, training {train_s:.0f} s")
    print("| biomarker | paper AUROC | trial MIL AUROC | paper ECE | trial MIL ECE | ECE floor |")
    print("|---|---|---|---|---|---|")
    for b in BIOMARKERS:
        known = calls[calls[b].notna()]
        y = known[b].to_numpy(np.int64)
        p = known[f"{b}_p"].to_numpy(np.float64)
        theirs = paper_calls[paper_calls["slide_id"].isin(known["slide_id"])]
        theirs = theirs[theirs[f"{b}_probability"].notna() & theirs[b].notna()]
        paper_ece = ece(theirs[f"{b}_probability"].to_numpy(float), theirs[b].to_numpy(int))
        print(
            f"| {b} | {paper_auroc(paper, b)} | {auroc(y, p):.3f} | {paper_ece:.3f} | "
            f"{ece(p, y):.3f} | {ece_floor(p):.3f} |"
        )
    return 0


def ece_floor(p: np.ndarray, draws: int = 2000, seed: int = 0) -> float:
    """Mean ECE of labels drawn from ``p`` itself: what a perfectly calibrated model
    with these probabilities scores on this many slides (the metric's noise)."""
    rng = np.random.default_rng(seed)
    return float(np.mean([ece(p, (rng.random(len(p)) < p).astype(int)) for _ in range(draws)]))


def paper_auroc(results: dict, biomarker: str) -> str:
    for row in results["results"]:
        if row["task"] == biomarker:
            return f"{row['auroc']:.3f}"
    return "?"


if __name__ == "__main__":
    raise SystemExit(main())
