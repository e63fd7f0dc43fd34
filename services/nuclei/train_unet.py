"""Train the nuclei U-Net of :mod:`services.nuclei.unet` on real annotated H&E.

Reads data sets in the layout of ``../shared/realdata/{monuseg-train,cpm15}`` (an
``index.csv`` with name, organ, image, instances, binary, mpp; instance labels as
16-bit PNG/TIFF, binary masks as 8-bit), brings every image to the network's working
resolution and trains on random crops with flips, rotations, scale and stain jitter.
Images with instance labels teach both maps, the foreground with a one-pixel
background line where two nuclei touch; images with only a binary mask teach the
foreground alone (their touching nuclei merge, so their distance map would be wrong).

Runs on a CPU in about 40 minutes with two threads (seeded: the same data, seed and
thread count give the same weights). To reproduce the shipped weights::

    .venv/bin/python -m services.nuclei.train_unet --threads 2 \\
        --data ../shared/realdata/monuseg-train ../shared/realdata/cpm15 \\
        --out services/nuclei/weights/nuclei_unet.pt

``--holdout a`` (or ``b``) leaves one of two folds out (MoNuSeg by organ, CPM-15 by
image number), so that each image can be scored by a model that never saw it; the
benchmark in ``benchmarks/README.md`` does this.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from scipy import ndimage as ndi

from services.common.objectstore.integrity import file_sha256
from services.inference.augment import hed_stain_matrices
from services.nuclei.annotations import IndexRow, read_index, read_label_image, read_rgb_file
from services.nuclei.unet import RGB_MEAN, RGB_STD, WORK_MPP, build_unet

#: MoNuSeg organs of fold "a" (the rest are fold "b").
FOLD_A_ORGANS = frozenset({"breast", "prostate", "colon"})
#: CPM-15 image numbers of fold "a".
FOLD_A_NUMBERS = frozenset({1, 2, 3, 4, 8, 9, 10, 11})
#: Radius of the contact zone between two nuclei, px at the working resolution.
CONTACT_RADIUS_PX = 3


@dataclass(frozen=True)
class TrainingImage:
    """One annotated image at the working resolution.

    Attributes:
        name: The index's name.
        rgb: uint8 (h, w, 3).
        foreground: uint8 (h, w) 0/1 nucleus mask; where two annotated nuclei touch,
            the pixels on their shared border are background.
        distance: float32 (h, w) normalized distance (0 where unknown).
        has_instances: Whether ``distance`` is known (instance labels given).
        contact: uint8 (h, w) 0/1, pixels where two annotated nuclei touch or nearly
            touch (all 0 without instance labels).
    """

    name: str
    rgb: np.ndarray
    foreground: np.ndarray
    distance: np.ndarray
    has_instances: bool
    contact: np.ndarray


def fold_of(organ: str, name: str) -> str:
    """Fold ``a`` or ``b`` of an index row: MoNuSeg by organ, CPM-15 by image number."""
    digits = "".join(ch for ch in name if ch.isdigit())
    if name.startswith("image") and digits:
        return "a" if int(digits) in FOLD_A_NUMBERS else "b"
    return "a" if organ in FOLD_A_ORGANS else "b"


def normalized_distance(labels: np.ndarray) -> np.ndarray:
    """Per nucleus, the distance to its outline over its largest distance (0-1)."""
    out = np.zeros(labels.shape, np.float32)
    for index, window in enumerate(ndi.find_objects(labels), start=1):
        if window is None:
            continue
        # A one-pixel margin so a nucleus cut by the window's edge still has an outline.
        padded = np.pad(labels[window] == index, 1)
        dist = cv2.distanceTransform(padded.astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
        top = float(dist.max())
        if top > 0:
            mask = labels[window] == index
            out[window][mask] = dist[mask] / top
    return out


def separated_foreground(labels: np.ndarray) -> np.ndarray:
    """0/1 nucleus mask with a one-pixel background line between touching nuclei.

    A pixel is cut when a 4-neighbour belongs to another nucleus (of the two sides of
    a shared border, the one with the higher label). The network learns to leave
    that line out, so the watershed's mask already parts touching nuclei.
    """
    border = np.zeros(labels.shape, bool)
    for axis in (0, 1):
        ahead = np.roll(labels, -1, axis=axis)
        edge = (labels > 0) & (ahead > 0) & (ahead != labels)
        if axis == 0:
            edge[-1, :] = False
        else:
            edge[:, -1] = False
        # The higher label of the pair loses its border pixel.
        higher_here = edge & (labels > ahead)
        higher_ahead = edge & (ahead > labels)
        border |= higher_here
        border |= np.roll(higher_ahead, 1, axis=axis)
    return ((labels > 0) & ~border).astype(np.uint8)


def contact_zone(labels: np.ndarray, radius: int = CONTACT_RADIUS_PX) -> np.ndarray:
    """0/1 mask of the pixels that have two different nuclei within ``radius`` px.

    It covers the line where two nuclei touch, the narrow gap between two that nearly
    do, and their rims beside it: the pixels that decide whether the watershed keeps
    two neighbours apart, and a small share of the image, so the loss weighs them
    more (as the original U-Net's border weights do)."""
    window = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    values = labels.astype(np.float32)
    highest = cv2.dilate(values, window)
    # The lowest label in the window, background left out.
    lowest = cv2.erode(np.where(labels > 0, values, np.float32(np.inf)), window)
    return ((highest > 0) & np.isfinite(lowest) & (highest != lowest)).astype(np.uint8)


def load_image(row: IndexRow) -> TrainingImage:
    """One index row at the working resolution."""
    mpp = row.mpp
    rgb = read_rgb_file(row.image)
    scale = mpp / WORK_MPP
    size = (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale))
    work = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    if row.instances is not None:
        labels = cv2.resize(
            read_label_image(row.instances).astype(np.int32),
            size,
            interpolation=cv2.INTER_NEAREST,
        )
        return TrainingImage(
            row.name,
            work,
            separated_foreground(labels),
            normalized_distance(labels),
            True,
            contact_zone(labels),
        )
    assert row.binary is not None  # read_index refuses rows with neither
    binary = (read_label_image(row.binary) > 0).astype(np.float32)
    mask = cv2.resize(binary, size, interpolation=cv2.INTER_AREA) >= 0.5
    blank = np.zeros(mask.shape, np.float32)
    return TrainingImage(
        row.name, work, mask.astype(np.uint8), blank, False, blank.astype(np.uint8)
    )


def load_folder(folder: Path, holdout: str | None) -> list[TrainingImage]:
    """The images of one data set's index, without the held-out fold."""
    return [
        load_image(row)
        for row in read_index(folder / "index.csv")
        if not (holdout and fold_of(row.organ, row.name) == holdout)
    ]


def _stain_jitter(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scale and shift each stain's concentration (HED space), then brightness.

    Wider than the patch classifiers' HED augmentation: the annotated tiles come
    from a few dozen slides, the slides it will meet from many labs."""
    matrix, offset = hed_stain_matrices(rng.uniform(0.7, 1.3, 3), rng.uniform(-0.05, 0.05, 3))
    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0)
    od = np.maximum(od.reshape(-1, 3) @ matrix + offset, 0).reshape(rgb.shape)
    out = np.exp(-od) * 256.0 - 1.0
    out = out * rng.uniform(0.9, 1.1) + rng.uniform(-12, 12)
    return np.clip(out, 0, 255)


def sample_crop(
    image: TrainingImage, side: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A random augmented crop: (rgb float32 0-255, foreground, distance, contact)."""
    scale = float(np.exp(rng.uniform(math.log(0.8), math.log(1.25))))
    source = max(8, round(side / scale))
    height, width = image.foreground.shape
    pad = max(0, source - min(height, width))
    rgb, fg, dist, contact = image.rgb, image.foreground, image.distance, image.contact
    if pad:
        rgb = np.pad(rgb, ((0, pad), (0, pad), (0, 0)), mode="reflect")
        fg = np.pad(fg, ((0, pad), (0, pad)))
        dist = np.pad(dist, ((0, pad), (0, pad)))
        contact = np.pad(contact, ((0, pad), (0, pad)))
        height, width = fg.shape
    y = int(rng.integers(0, height - source + 1))
    x = int(rng.integers(0, width - source + 1))
    window = (slice(y, y + source), slice(x, x + source))
    crop_rgb = cv2.resize(rgb[window], (side, side), interpolation=cv2.INTER_LINEAR)
    crop_fg = cv2.resize(fg[window], (side, side), interpolation=cv2.INTER_NEAREST)
    crop_dist = cv2.resize(dist[window], (side, side), interpolation=cv2.INTER_LINEAR)
    crop_contact = cv2.resize(contact[window], (side, side), interpolation=cv2.INTER_NEAREST)
    turns = int(rng.integers(0, 4))
    flip = bool(rng.integers(0, 2))
    arrays = []
    for array in (crop_rgb, crop_fg, crop_dist, crop_contact):
        array = np.rot90(array, turns)
        arrays.append(np.ascontiguousarray(array[:, ::-1] if flip else array))
    colour = _stain_jitter(arrays[0], rng)
    if rng.random() < 0.25:
        colour = cv2.GaussianBlur(colour, (0, 0), sigmaX=float(rng.uniform(0.4, 1.2)))
    if rng.random() < 0.25:
        colour = colour + rng.normal(0, rng.uniform(2, 8), colour.shape)
    return np.clip(colour, 0, 255).astype(np.float32), arrays[1], arrays[2], arrays[3]


def _batch(
    images: list[TrainingImage], weights: np.ndarray, size: int, side: int, rng: np.random.Generator
) -> tuple[Any, Any, Any, Any, Any]:
    import torch

    picks = rng.choice(len(images), size=size, p=weights)
    rgbs, fgs, dists, contacts, known = [], [], [], [], []
    for i in picks:
        rgb, fg, dist, contact = sample_crop(images[i], side, rng)
        rgbs.append(rgb)
        fgs.append(fg)
        dists.append(dist)
        contacts.append(contact)
        known.append(images[i].has_instances)
    mean = np.array(RGB_MEAN, np.float32) * 255.0
    std = np.array(RGB_STD, np.float32) * 255.0
    x = torch.from_numpy((np.stack(rgbs) - mean) / std).permute(0, 3, 1, 2).contiguous()
    return (
        x,
        torch.from_numpy(np.stack(fgs).astype(np.float32)),
        torch.from_numpy(np.stack(dists)),
        torch.from_numpy(np.stack(contacts).astype(np.float32)),
        torch.tensor(known, dtype=torch.float32),
    )


def training_loss(
    output: Any, fg: Any, dist: Any, contact: Any, known: Any, contact_weight: float
) -> Any:
    """Cross-entropy and Dice on the foreground, squared error on the distance map
    (images with instance labels only); pixels of the contact zone count
    ``1 + contact_weight`` times in the cross-entropy and the squared error."""
    import torch

    logit, predicted = output[:, 0], output[:, 1]
    weight = 1.0 + contact_weight * contact
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logit, fg, weight=weight)
    probability = torch.sigmoid(logit)
    inter = (probability * fg).sum()
    dice = 1 - (2 * inter + 1) / (probability.sum() + fg.sum() + 1)
    per_image = (weight * (predicted - dist) ** 2).mean(dim=(1, 2))
    mse = (per_image * known).sum() / known.sum().clamp(min=1)
    return bce + dice + 2.0 * mse


def train(
    folders: list[Path],
    out: Path,
    *,
    holdout: str | None = None,
    steps: int = 3000,
    batch: int = 8,
    side: int = 256,
    seed: int = 0,
    threads: int = 1,
    lr: float = 3e-3,
    contact_weight: float = 0.0,
) -> dict[str, Any]:
    """Train and write the weights (atomically) with a JSON record beside them."""
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(seed)
    began = time.perf_counter()
    images = [image for folder in folders for image in load_folder(folder, holdout)]
    if not images:
        raise SystemExit("no annotated images to train on")
    areas = np.array([image.foreground.size for image in images], np.float64)
    weights = areas / areas.sum()
    model = build_unet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=steps, pct_start=0.1
    )
    model.train()
    running = 0.0
    for step in range(1, steps + 1):
        x, fg, dist, contact, known = _batch(images, weights, batch, side, rng)
        loss = training_loss(model(x), fg, dist, contact, known, contact_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        value = float(loss.detach())
        running = 0.98 * running + 0.02 * value if step > 1 else value
        if step % 50 == 0 or step == steps:
            spent = time.perf_counter() - began
            eta = spent / step * (steps - step)
            print(
                f"step {step}/{steps}  loss {running:.4f}  {spent:.0f} s  eta {eta:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Serialized in memory: a file's archive is named after the file, and the same
    # weights should give the same bytes whatever the file is called.
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, out)
    record = {
        "weights": out.name,
        "sha256": file_sha256(out),
        "images": [image.name for image in images],
        "holdout": holdout,
        "steps": steps,
        "batch": batch,
        "crop_px": side,
        "contact_weight": contact_weight,
        "work_mpp": WORK_MPP,
        "seed": seed,
        "threads": threads,
        "seconds": round(time.perf_counter() - began, 1),
        "torch": torch.__version__,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="data set folders")
    parser.add_argument("--out", type=Path, required=True, help="weights file to write (.pt)")
    parser.add_argument("--holdout", choices=["a", "b"], help="leave this fold out")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=256, help="crop side at the working mpp")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--contact-weight",
        type=float,
        default=0.0,
        help="extra loss weight of the pixels where two nuclei (nearly) touch",
    )
    args = parser.parse_args(argv)
    for folder in args.data:
        if not (folder / "index.csv").is_file():
            print(f"error: no index.csv in {str(folder)!r}", file=sys.stderr)
            return 2
    record = train(
        args.data,
        args.out,
        holdout=args.holdout,
        steps=args.steps,
        batch=args.batch,
        side=args.crop,
        seed=args.seed,
        threads=args.threads,
        contact_weight=args.contact_weight,
    )
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
