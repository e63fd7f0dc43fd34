"""Training patches per second on CPU, per backbone and precision.

For each backbone a batch of 512 px uint8 tissue-like patches goes through what a
training step does: one random augmentation per patch, ``to_input`` (resize to the
backbone's input side, normalize), forward under autocast (bfloat16, the CPU mixed
precision of ``training.train``) or in float32, cross-entropy (plus InceptionV3's
auxiliary loss, weight 0.4), backward and an AdamW step. Reported: patches/s of the
whole step ("end to end") and of the model part alone (forward + backward + AdamW);
JPEG decoding (~1-2 ms per patch) is left out. Each row is the median of
``--steps`` timed steps after one warm-up step. Run:

    .venv/bin/python benchmarks/speed/train_speed.py [--steps 3] [--batch 8]
        [--backbone tiny --backbone resnet18 --backbone inception_v3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

#: Input side per backbone, px: ImageNet's 224, InceptionV3's 299 (it keeps its
#: auxiliary head from 299 px).
INPUT_PX = {"tiny": 224, "resnet18": 224, "inception_v3": 299}


def _patches(count: int, seed: int = 0) -> np.ndarray:
    """Pink 512 px patches with purple nuclei-like discs."""
    import cv2

    rng = np.random.default_rng(seed)
    out = np.empty((count, 512, 512, 3), np.uint8)
    for i in range(count):
        patch = np.empty((512, 512, 3), np.uint8)
        patch[:] = (232, 168, 204)
        for _ in range(150):
            centre = (int(rng.integers(0, 512)), int(rng.integers(0, 512)))
            cv2.circle(patch, centre, int(rng.integers(4, 12)), (95, 45, 150), -1)
        out[i] = patch
    return out


def _bench(backbone: str, bf16: bool, batch: int, steps: int, patches: np.ndarray) -> dict:
    import torch
    import torch.nn.functional as F

    from services.inference.augment import random_augment
    from services.inference.backbones import build_backbone, split_outputs
    from services.inference.preprocess import PreprocessConfig, to_input

    input_px = INPUT_PX[backbone]
    preprocess = PreprocessConfig(input_px)
    torch.manual_seed(0)
    model = build_backbone(backbone, 2, input_px=input_px).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    labels = torch.arange(batch) % 2
    step_s, model_s = [], []
    for step in range(steps + 1):
        started = time.perf_counter()
        rows = rng.integers(0, len(patches), batch)
        augmented = np.stack([random_augment(patches[r], rng) for r in rows])
        x = to_input(augmented, preprocess)
        model_started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, aux = split_outputs(model(x))
        loss = F.cross_entropy(logits.float(), labels)
        if aux is not None:
            loss = loss + 0.4 * F.cross_entropy(aux.float(), labels)
        loss.backward()
        optimizer.step()
        ended = time.perf_counter()
        if step > 0:  # the first step warms up the kernels
            step_s.append(ended - started)
            model_s.append(ended - model_started)
    return {
        "backbone": backbone,
        "input_px": input_px,
        "precision": "bfloat16 autocast" if bf16 else "float32",
        "end_to_end": batch / statistics.median(step_s),
        "model": batch / statistics.median(model_s),
        "data_ms": 1e3 * statistics.median(np.subtract(step_s, model_s)) / batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row")
    parser.add_argument("--batch", type=int, default=8, help="patches per step")
    parser.add_argument(
        "--backbone", action="append", choices=tuple(INPUT_PX), help="repeat; default all"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    patches = _patches(8)
    rows = [
        _bench(backbone, bf16, args.batch, args.steps, patches)
        for backbone in args.backbone or tuple(INPUT_PX)
        for bf16 in (True, False)
    ]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, batch {args.batch}, median of {args.steps} steps\n"
    )
    print(
        "| backbone | input px | precision | patches/s end to end | patches/s model only "
        "| augment + preprocess ms / patch |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backbone']} | {r['input_px']} | {r['precision']} | {r['end_to_end']:.1f} "
            f"| {r['model']:.1f} | {r['data_ms']:.1f} |"
        )


if __name__ == "__main__":
    main()
