"""A biomarker recipe judged as the demo judges it: on the demo's held-out slides.

``training_recipe.py`` holds out a third of a run's own biomarker slides and scores
their stored patches. This script instead retrains one biomarker's model on every
CD patch a ``histomarker demo`` run stored (its whole biomarker set, as the run's
training did) with the recipe given, then predicts the demo's held-out cancer slides
(the ``predictions.csv`` rows) with ``services.prediction.pipeline.predict_slide``
in process (``LocalScorer``: the run's stored detector and other biomarker models,
the retrained one in place of the run's) and prints their slide AUROC for every
biomarker. ``--task none`` scores the run's own models only (the baseline, which
should repeat the demo's table). Compare recipes one after the other on a quiet
machine:

    .venv/bin/python benchmarks/recipes/heldout_recipe.py --out demo-out --task none
    .venv/bin/python benchmarks/recipes/heldout_recipe.py --out demo-out --task pik3ca --epochs 24
    .venv/bin/python benchmarks/recipes/heldout_recipe.py --out demo-out --task pik3ca \\
        --epochs 24 --val-fraction 0.1

The models' settings besides those given are the demo's (``small`` at 128 px, batch
32, at most 1000 patches an epoch, two test-time views).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from services.common.vocabulary import model_name_of

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

TASKS = ("tp53", "pik3ca", "er", "pr", "her2", "basal")


def stored_models(out: Path) -> dict[str, Path]:
    """Model name -> bundle folder of the run's stored models (the newest version)."""
    found: dict[str, Path] = {}
    for config in sorted((out / "store" / "models").glob("*/*/model.json")):
        folder = config.parent
        current = found.get(folder.parent.name)
        if current is None or folder.stat().st_mtime > current.stat().st_mtime:
            found[folder.parent.name] = folder
    return found


def retrain(out: Path, task: str, args: argparse.Namespace, folder: Path) -> Path:
    """Train ``task``'s model on every stored CD patch; its bundle folder."""
    from training_recipe import CLASSES, labelled_slides, stored_indexes

    from flows.training.training import patch_table
    from services.common.objectstore import open_store
    from services.inference.training import TrainConfig, train

    store = open_store((out / "store").resolve().as_uri())
    indexes = stored_indexes(store, tissue_rule=False)
    manifest = pd.read_csv(out / "cohort" / "manifest.csv")
    cancer = manifest[(manifest["kind"] == "cancer") & manifest["slide_id"].isin(indexes)]
    slides = labelled_slides(cancer, task, indexes)
    config = TrainConfig(
        backbone="small",
        input_px=128,
        model_name=model_name_of(task),
        version="recipe",
        epochs=args.epochs,
        batch_size=32,
        lr=args.lr,
        val_fraction=args.val_fraction,
        max_patches_per_epoch=1000,
        max_val_patches=args.max_val_patches,
        mixed_precision="off",
        device="cpu",
        seed=args.seed,
        tta=("rot0", "rot180"),
        grid_overlap_px=256,
    )
    result = train(patch_table(store, slides, CLASSES), store, config, folder, progress=False)
    curve = " ".join(f"{h.get('val_auroc', float('nan')):.2f}" for h in result.history)
    print(f"{task}: {len(slides)} training slides; validation AUROC by epoch {curve}")
    return result.bundle_dir


def heldout_aurocs(out: Path, bundles: dict[str, Path]) -> dict[str, float]:
    """Slide AUROC of each biomarker on the demo's held-out cancer slides."""
    from sklearn.metrics import roc_auc_score

    from services.common.objectstore import open_store
    from services.prediction.models import LocalScorer
    from services.prediction.pipeline import PredictionParams, predict_slide
    from services.slide.grid import GridParams
    from services.slide.qc import QcThresholds
    from services.slide.reader import open_slide
    from services.slide.stain import builtin_reference
    from services.synth.slide import QC_MIN_USABLE_MM2

    scorer = LocalScorer(bundles)
    deployment = scorer.deployment()
    overlap = int(deployment.cancer.config.grid_overlap_px)
    # The demo's QC floor for its small synthetic slides, as its services use.
    qc = QcThresholds(min_usable_mm2=QC_MIN_USABLE_MM2)
    params = PredictionParams(grid=GridParams(overlap_px=overlap), heatmaps=False, qc=qc)
    reference = builtin_reference(params.stain_method)
    manifest = pd.read_csv(out / "cohort" / "manifest.csv")
    heldout = pd.read_csv(out / "predictions.csv")[["slide_id"]].merge(manifest, on="slide_id")
    heldout = heldout[heldout["kind"] == "cancer"]
    scores: dict[str, dict[str, float]] = {task: {} for task in TASKS}
    with tempfile.TemporaryDirectory(prefix="heldout-") as scratch:
        store = open_store(Path(scratch).as_uri())
        for row in heldout.itertuples(index=False):
            with open_slide(out / "cohort" / row.slide_path) as reader:
                result = predict_slide(
                    reader, row.slide_id, store, deployment, scorer, params, reference=reference
                )
            for item in result.biomarkers:
                scores[item.biomarker][row.slide_id] = item.probability
    truth = heldout.set_index("slide_id")
    aurocs = {}
    for task, by_slide in scores.items():
        ids = list(by_slide)
        labels = truth.loc[ids, task].to_numpy(dtype=float)
        aurocs[task] = float(roc_auc_score(labels, np.array([by_slide[i] for i in ids])))
    return aurocs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="a demo's folder")
    parser.add_argument("--task", default="none", choices=("none", *TASKS))
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--max-val-patches", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = args.out.resolve()
    bundles = stored_models(out)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="recipe-") as scratch:
        if args.task != "none":
            name = model_name_of(args.task)
            bundles[name] = retrain(out, args.task, args, Path(scratch) / name)
        trained = time.perf_counter()
        aurocs = heldout_aurocs(out, bundles)
    recipe = (
        "the run's own models"
        if args.task == "none"
        else f"{args.task}: {args.epochs} epochs, lr {args.lr:g}, "
        f"val fraction {args.val_fraction:g}, seed {args.seed}"
    )
    print(
        f"{recipe} | training {trained - began:.0f} s, held-out prediction "
        f"{time.perf_counter() - trained:.0f} s | "
        + json.dumps({task: round(value, 3) for task, value in aurocs.items()})
    )


if __name__ == "__main__":
    main()
