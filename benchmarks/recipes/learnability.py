"""How learnable the synthetic biomarker rules are, by cohort size.

Generates a cohort (or reuses one), takes tumour patches of every cancer slide where
the generator's own tumour mask says tumour (an oracle stand-in for the detector's
CD patches), stain-normalizes them to the first one, and trains a small patch
classifier (``TinyCNN``; ``--backbone small`` for the demo's ``SmallCNN``) per
biomarker in k-fold cross-validation by slide. The slide score is the mean patch
probability; it prints the pooled slide-level AUROC of each biomarker. Run it at
two cohort sizes to see what more slides buy:

    .venv/bin/python benchmarks/recipes/learnability.py --slides 240 --preset tiny
    .venv/bin/python benchmarks/recipes/learnability.py --slides 40 --preset demo

With ``--store demo-out/store --cohort demo-out/cohort`` it trains on the patches a
``histomarker demo`` run chose instead (its detector's BD patches).

It sizes ``histomarker demo``'s cohort: the models must see enough slides, not
enough patches.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

TASKS = ("tp53", "pik3ca", "er", "pr", "her2", "basal")
PATCH_PX = 512


def tumour_patches(
    cohort: Path, per_slide: int, input_px: int, stain: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(patches uint8 (n, input_px, input_px, 3), slide id of each) of every cancer
    slide: 512 px level-0 windows whose layout block is at least 70% tumour."""
    import cv2
    import pandas as pd
    import tifffile

    from services.slide.stain import get_normalizer

    manifest = pd.read_csv(cohort / "manifest.csv")
    rng = np.random.default_rng(seed)
    normalizer = get_normalizer(stain) if stain != "none" else None
    fitted = False
    patches, slides = [], []
    cancer = manifest[manifest.kind == "cancer"]
    for done, row in enumerate(cancer.itertuples(), start=1):
        tumour = cv2.imread(str(cohort / row.tumour_mask), cv2.IMREAD_GRAYSCALE) > 0
        level0 = tifffile.imread(cohort / row.slide_path, key=0)[..., :3]
        step = level0.shape[0] / tumour.shape[0]
        side = max(1, round(PATCH_PX / step))
        share = cv2.blur(tumour.astype(np.float32), (side, side))
        ys, xs = np.nonzero(share > 0.7)
        if len(ys) == 0:
            continue
        for i in rng.choice(len(ys), size=min(per_slide, len(ys)), replace=False):
            y0 = int(np.clip(ys[i] * step - PATCH_PX // 2, 0, level0.shape[0] - PATCH_PX))
            x0 = int(np.clip(xs[i] * step - PATCH_PX // 2, 0, level0.shape[1] - PATCH_PX))
            patch = np.ascontiguousarray(level0[y0 : y0 + PATCH_PX, x0 : x0 + PATCH_PX])
            if normalizer is not None:
                if not fitted:
                    normalizer.fit(patch)
                    fitted = True
                patch = normalizer.transform(patch)
            patches.append(cv2.resize(patch, (input_px, input_px), interpolation=cv2.INTER_AREA))
            slides.append(row.slide_id)
        print(f"\rpatches: {done}/{len(cancer)} slides", end="", flush=True)
    print()
    return np.stack(patches), np.array(slides)


def stored_patches(store: Path, input_px: int) -> tuple[np.ndarray, np.ndarray]:
    """The 40x patches a training run kept in a file store (``tiles/<slide>/<key>/
    shards/40x-*.tar``, already stain-normalized by the pipeline), resized."""
    import cv2

    from services.common.objectstore import open_store
    from services.slide.shards import iter_shard

    objects = open_store(store.resolve().as_uri())
    patches, slides = [], []
    for info in sorted(objects.list("tiles/"), key=lambda info: info.key):
        parts = info.key.split("/")
        if len(parts) != 5 or parts[3] != "shards" or not parts[4].startswith("40x-"):
            continue
        for _, rgb in iter_shard(objects, info.key):
            patches.append(cv2.resize(rgb, (input_px, input_px), interpolation=cv2.INTER_AREA))
            slides.append(parts[1])
    return np.stack(patches), np.array(slides)


def cross_validated_auroc(
    patches: np.ndarray,
    slides: np.ndarray,
    labels: dict[str, int],
    folds: int,
    epochs: int,
    lr: float,
    seed: int,
    backbone: str = "tiny",
) -> float:
    """Pooled slide-level AUROC of k-fold cross-validation by slide."""
    import pandas as pd
    import torch
    from sklearn.metrics import roc_auc_score
    from torch import nn

    from services.inference.backbones import build_backbone

    inputs = (torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.25
    targets = torch.tensor([labels[s] for s in slides])
    names = np.array(sorted(set(slides)))
    order = np.random.default_rng(seed).permutation(len(names))
    scores, truths = [], []
    for fold in range(folds):
        test = np.isin(slides, names[order[fold::folds]])
        train = np.flatnonzero(~test)
        torch.manual_seed(seed + fold)
        generator = np.random.default_rng(seed + fold)
        model = build_backbone(backbone, 2, input_px=patches.shape[1])
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        steps = epochs * int(np.ceil(len(train) / 32))
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
        positive = float(targets[train].float().mean())
        weights = torch.tensor([1.0 / max(1e-6, 1 - positive), 1.0 / max(1e-6, positive)])
        loss_of = nn.CrossEntropyLoss(weight=weights / weights.sum() * 2)
        model.train()
        for _ in range(epochs):
            generator.shuffle(train)
            for start in range(0, len(train), 32):
                batch = train[start : start + 32]
                x = inputs[batch]
                if generator.random() < 0.5:
                    x = x.flip(3)
                x = torch.rot90(x, int(generator.integers(4)), (2, 3))
                loss = loss_of(model(x), targets[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
        model.eval()
        with torch.no_grad():
            probability = torch.cat(
                [
                    torch.softmax(model(inputs[rows]), 1)[:, 1]
                    for rows in np.array_split(np.flatnonzero(test), max(1, test.sum() // 64))
                ]
            ).numpy()
        per_slide = pd.Series(probability).groupby(slides[test]).mean()
        scores += list(per_slide.values)
        truths += [labels[s] for s in per_slide.index]
    if len(set(truths)) < 2:
        return float("nan")
    return float(roc_auc_score(truths, scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slides", type=int, default=240)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--cohort", type=Path, default=None, help="cohort folder to reuse")
    parser.add_argument(
        "--store",
        type=Path,
        default=None,
        help="a demo run's file store: train on the 40x patches it kept instead "
        "(with --cohort set to that run's cohort, for the labels)",
    )
    parser.add_argument("--patches-per-slide", type=int, default=24)
    parser.add_argument("--input-px", type=int, default=96)
    parser.add_argument("--backbone", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--stain", default="macenko", help="macenko, vahadane, reinhard, none")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    import pandas as pd
    import torch

    from services.synth.cohort import generate_cohort

    torch.set_num_threads(2)
    cohort = args.cohort or Path(f"/tmp/learnability-{args.preset}-{args.slides}-{args.seed}")
    started = time.perf_counter()
    if not (cohort / "manifest.csv").exists():
        generate_cohort(
            cohort,
            args.slides,
            args.seed,
            args.preset,
            truth_crops=0,
            normal_fraction=0.05,
            workers=2,
        )
    generated = time.perf_counter() - started
    if args.store is not None:
        patches, slides = stored_patches(args.store, args.input_px)
    else:
        patches, slides = tumour_patches(
            cohort, args.patches_per_slide, args.input_px, args.stain, args.seed
        )
    manifest = pd.read_csv(cohort / "manifest.csv").set_index("slide_id")
    print(
        f"cohort {cohort} ({len(set(slides))} cancer slides, {len(patches)} patches of "
        f"{args.input_px} px; generated in {generated:.0f} s), {args.backbone} CNN, "
        f"{args.epochs} epochs, "
        f"{args.folds}-fold by slide"
    )
    print("| biomarker | positives | slide AUROC | seconds |")
    print("|---|---|---|---|")
    for task in TASKS:
        labels = {s: int(manifest.loc[s, task]) for s in set(slides)}
        began = time.perf_counter()
        auroc = cross_validated_auroc(
            patches, slides, labels, args.folds, args.epochs, args.lr, args.seed, args.backbone
        )
        print(
            f"| {task} | {sum(labels.values())} | {auroc:.3f} | "
            f"{time.perf_counter() - began:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
