"""Which training recipe learns the biomarkers from a demo run's own CD patches.

Takes the 40x patches a ``histomarker demo`` training run stored (its detector's CD
patches, stain-normalized, under ``tiles/<slide>/<hash>/40x-*-index.parquet``) and
the cohort's labels, holds out every third cancer slide (seeded), trains the real
``services.inference.training.train`` on the rest (with its own validation split,
balanced epochs, augmentation and schedule) and scores the held-out slides' patches
in process: slide score = mean patch probability. It prints one row per biomarker:
the held-out slide and patch AUROC, and the validation AUROC of every epoch (how
steadily the recipe learns). Compare recipes in one run of the machine:

    .venv/bin/python benchmarks/recipes/training_recipe.py --out demo-out --epochs 7 --lr 3e-3
    .venv/bin/python benchmarks/recipes/training_recipe.py --out demo-out --epochs 14 --lr 1e-3

With ``--tissue-rule`` the stored 40x windows are first reduced to those the
grid's tissue rule keeps (for stores written before 40x windows followed it).
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from services.common.vocabulary import model_name_of

TASKS = ("tp53", "pik3ca", "er", "pr", "her2", "basal")
CLASSES = ("negative", "positive")


def stored_indexes(store, tissue_rule: bool) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Slide id -> key of its 40x index (a reduced copy with ``tissue_rule``)."""
    import pandas as pd

    from services.slide.highres import quadrant_origins
    from services.tiling.pipeline import load_tissue_rule

    found = {
        info.key.split("/")[1]: info.key
        for info in store.list("tiles/")
        if "/40x-" in info.key and info.key.endswith("-index.parquet")
    }
    if not tissue_rule:
        return found
    for slide_id, key in found.items():
        rule = load_tissue_rule(store, key.rsplit("/", 1)[0])
        table = pd.read_parquet(io.BytesIO(store.get_bytes(key)))
        side = int(table["width"].iat[0])
        kept = []
        for row in table.itertuples():
            origins = quadrant_origins(int(row.parent_x), int(row.parent_y), 2 * side)
            keeps = dict(zip(origins, rule.keeps(origins, side), strict=True))
            kept.append(keeps.get((int(row.x), int(row.y)), False))
        reduced = key.replace("-index.parquet", "-tissue-rule.parquet")
        buffer = io.BytesIO()
        table[kept].to_parquet(buffer, index=False)
        store.put_bytes(reduced, buffer.getvalue())
        found[slide_id] = reduced
    return found


def labelled_slides(cancer: Any, task: str, indexes: dict[str, str]) -> list[Any]:
    """The cancer slides with a ``task`` label, as training's LabelledSlide rows."""
    from flows.training.training import LabelledSlide

    return [
        LabelledSlide(
            slide_id=str(row.slide_id),
            patient_id=str(row.patient_id),
            label=int(getattr(row, task)),
            patches_key=indexes[str(row.slide_id)],
        )
        for row in cancer[cancer[task].notna()].itertuples(index=False)
    ]


def held_out_auroc(store, slides, test_ids, config) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Train on the slides not in ``test_ids``; AUROCs on those in it."""
    import torch
    from sklearn.metrics import roc_auc_score

    from flows.training.training import patch_table
    from services.inference.dataset import PatchReader, ShardCache
    from services.inference.preprocess import to_input
    from services.inference.training import train

    train_table = patch_table(store, [s for s in slides if s.slide_id not in test_ids], CLASSES)
    test_table = patch_table(store, [s for s in slides if s.slide_id in test_ids], CLASSES)
    with tempfile.TemporaryDirectory(prefix="recipe-") as scratch:
        result = train(train_table, store, config, Path(scratch) / "bundle", progress=False)
        cache = ShardCache(store, Path(scratch) / "shards").fetch(test_table["shard"])
        reader = PatchReader(test_table, cache)
        preprocess = config.model_config().preprocess
        probabilities = []
        with torch.inference_mode():
            for start in range(0, len(test_table), 64):
                rows = range(start, min(start + 64, len(test_table)))
                x = to_input(np.stack([reader.read(i) for i in rows]), preprocess)
                probabilities.append(torch.softmax(result.model(x), 1)[:, 1].numpy())
    scored = test_table.assign(probability=np.concatenate(probabilities))
    per_slide = scored.groupby("slide_id").agg(
        probability=("probability", "mean"), label=("label", "first")
    )
    return {
        "slide_auroc": roc_auc_score(per_slide["label"], per_slide["probability"]),
        "patch_auroc": roc_auc_score(scored["label"], scored["probability"]),
        "slides": len(per_slide),
        "positives": int(per_slide["label"].sum()),
        "train_patches": len(train_table),
        "val_aurocs": [h.get("val_auroc", float("nan")) for h in result.history],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="a demo's folder")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--backbone", default="small")
    parser.add_argument("--input-px", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-patches-per-epoch", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tissue-rule", action="store_true")
    args = parser.parse_args()

    import pandas as pd

    from services.common.objectstore import open_store
    from services.inference.training import TrainConfig

    store = open_store((args.out / "store").resolve().as_uri())
    indexes = stored_indexes(store, args.tissue_rule)
    manifest = pd.read_csv(args.out / "cohort" / "manifest.csv")
    cancer = manifest[(manifest["kind"] == "cancer") & manifest["slide_id"].isin(indexes)]
    ids = np.array(sorted(cancer["slide_id"]))
    np.random.default_rng(args.seed).shuffle(ids)
    test_ids = set(ids[::3])
    print(
        f"{len(cancer)} cancer slides with CD patches, {len(test_ids)} held out; "
        f"{args.backbone} at {args.input_px} px, {args.epochs} epochs, lr {args.lr:g}"
    )
    print(
        "| biomarker | held-out slides (positives) | slide AUROC | patch AUROC "
        "| training patches | validation AUROC by epoch | seconds |"
    )
    print("|---|---|---|---|---|---|---|")
    for task in args.tasks.split(","):
        began = time.perf_counter()
        slides = labelled_slides(cancer, task, indexes)
        config = TrainConfig(
            backbone=args.backbone,
            input_px=args.input_px,
            model_name=model_name_of(task),
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            max_patches_per_epoch=args.max_patches_per_epoch,
            max_val_patches=400,
            mixed_precision="off",
            device="cpu",
            seed=args.seed,
            tta=("rot0",),
        )
        r = held_out_auroc(store, slides, test_ids, config)
        curve = " ".join(f"{v:.2f}" for v in r["val_aurocs"])  # type: ignore[attr-defined]
        print(
            f"| {task} | {r['slides']} ({r['positives']}) | {r['slide_auroc']:.3f} "
            f"| {r['patch_auroc']:.3f} | {r['train_patches']} | {curve} "
            f"| {time.perf_counter() - began:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
