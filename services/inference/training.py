"""Training a patch classifier: balanced epochs, augmentation, AdamW, mixed precision,
checkpoints and resume, then temperature calibration into a model bundle.

One call of :func:`train` does the method's recipe end to end:

1. Split the patch table by patient (:func:`~services.inference.dataset.patient_split`;
   no patient in both) and download the shards it needs once.
2. Every epoch: random undersampling with replacement to balance the classes
   (:func:`~services.inference.dataset.balanced_epoch_indices`), one random
   augmentation with a random strength per sampled patch
   (:func:`~services.inference.augment.random_augment`), AdamW steps under autocast
   (bfloat16 on CPU; float16 with a ``GradScaler`` on CUDA) on a one-cycle or a
   warm-up + cosine learning-rate schedule; InceptionV3's auxiliary head adds its
   loss with weight 0.4.
3. After every epoch: the validation loss and AUROC (float32, no augmentation) on a
   progress bar, and a checkpoint (model, optimizer, schedule, scaler, RNG states,
   history) written atomically; ``resume=True`` continues from it, and the resumed
   run ends with the same weights as one never interrupted.
4. After the last epoch: the temperature T fitted on the validation logits, a
   reliability diagram, and the bundle (``weights.pt``, ``model.json`` with T,
   ``metrics.json``, ``reliability.png``) written with ``save_bundle``.

Repeatable: every random draw comes from the seed. Epoch ``e``'s rows come from a
generator seeded by ``(seed, 0, e)``, patch ``j``'s augmentation from one seeded by
``(seed, 1, e, j)`` (independent of DataLoader workers), and torch's generator
(weight init, dropout) is seeded once and saved in each checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from services.common.errors import InvalidInput
from services.common.objectstore import ObjectStore
from services.common.progress import ProgressBar
from services.inference.backbones import backbone_spec, build_backbone, split_outputs
from services.inference.bundle import ModelConfig, save_bundle
from services.inference.calibration import fit_temperature, reliability_diagram, softmax
from services.inference.dataset import (
    EpochDataset,
    FittedReader,
    PatchCollate,
    PatchReader,
    ShardCache,
    balanced_epoch_indices,
    describe,
    patient_split,
    seed_worker,
    validate_patch_table,
)
from services.inference.preprocess import PreprocessConfig
from services.inference.tta import TRANSFORM_NAMES

log = logging.getLogger(__name__)

SCHEDULES = ("onecycle", "cosine")
CHECKPOINT_FILE = "checkpoint.pt"
RELIABILITY_FILE = "reliability.png"
#: Bump when the checkpoint's content changes; older checkpoints are refused.
CHECKPOINT_FORMAT = 1
#: Config fields that may differ between a run and its resumption (they change
#: where files go, how fast it runs or what the bundle records for serving, not the
#: weights).
#: Memory layout of the network and its input batches during training.
MEMORY_FORMAT = torch.channels_last

_RESUMABLE_CHANGES = (
    "num_workers",
    "checkpoint_dir",
    "cache_dir",
    "device",
    "tta",
    "grid_overlap_px",
    "patch_cache_mb",
)


@dataclass(frozen=True)
class TrainConfig:
    """How to train one patch classifier.

    Attributes:
        backbone: ``inception_v3`` (the method's), ``resnet18`` or ``tiny``.
        input_px: Side of the network input, px; patches are resized to it.
        class_names: One name per class, index order; the last is the positive class
            of a binary task.
        model_name: Bundle / TorchServe model name (``cancer_detector``,
            ``biomarker_tp53``, ...).
        version: Model version string.
        epochs: Passes over a balanced sample of the training patches.
        batch_size: Patches per optimizer step.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW's decoupled weight decay.
        schedule: ``onecycle`` (linear warm-up share ``warmup_fraction``, cosine
            annealing, momentum cycling) or ``cosine`` (linear warm-up, cosine decay
            to 0).
        warmup_fraction: Share of all steps spent warming up, in [0, 1).
        seed: Seed of everything random: the split, the epochs, the augmentations,
            the weights' initialization.
        val_fraction: Share of each class's patients held out for validation.
        num_workers: DataLoader worker processes (0 = load in this process).
        patches_per_class: Patches per class and epoch (drawn with replacement);
            None for the minority class's count.
        max_patches_per_epoch: Cap on an epoch's patches (all classes together).
        max_val_patches: Cap on the validation patches (a seeded random subset).
        aux_loss_weight: Weight of the auxiliary head's loss (InceptionV3 at >= 299
            px); 0 ignores it.
        augment: One random augmentation per training patch (the method's); off for
            ablations.
        mixed_precision: ``auto``, ``on`` or ``off``: autocast in bfloat16 on CPU or
            float16 with a GradScaler on CUDA. ``auto`` turns it on for CUDA, and on
            CPU only where the CPU multiplies bfloat16 matrices in hardware (AMX):
            elsewhere bfloat16 on CPU is 2-4x slower than float32
            (benchmarks/speed/train_speed.py).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        weights_path: Local ImageNet weights for the body (never downloaded).
        checkpoint_dir: Where the epoch checkpoint goes; None for
            ``{output_dir}/checkpoints``.
        cache_dir: Local shard cache; None for a temporary folder removed afterwards.
        tta: The bundle's test-time views (``tta.TRANSFORM_NAMES``, all eight by
            default; fewer make serving cheaper).
        grid_overlap_px: Overlap of the 20x grid the training slides were tiled on,
            px at 20x (0 = plain grid); recorded in the bundle's ``model.json`` for
            prediction to tile new slides the same way. It does not change training.
        threads: CPU threads torch computes with while training (0: torch's default,
            the machine's cores). The weights depend on it (a reduction split over
            more threads adds in another order): the same seed and settings give
            the same weights on the same platform with the same threads, so pin it
            to reproduce a run on a machine with another core count.
        patch_cache_mb: Memory for training and validation patches kept decoded at
            the input size between epochs (MiB each; 0 decodes every time). Patches
            are resized to the input before they are augmented.
    """

    backbone: str = "inception_v3"
    input_px: int = 512
    class_names: tuple[str, ...] = ("negative", "positive")
    model_name: str = "biomarker"
    version: str = "1"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 1e-2
    schedule: str = "onecycle"
    warmup_fraction: float = 0.1
    seed: int = 0
    val_fraction: float = 0.2
    num_workers: int = 0
    patches_per_class: int | None = None
    max_patches_per_epoch: int | None = None
    max_val_patches: int | None = None
    aux_loss_weight: float = 0.4
    augment: bool = True
    mixed_precision: str = "auto"
    device: str = "auto"
    weights_path: str | None = None
    checkpoint_dir: Path | None = None
    cache_dir: Path | None = None
    tta: tuple[str, ...] = TRANSFORM_NAMES
    grid_overlap_px: int = 0
    patch_cache_mb: int = 1024
    threads: int = 0

    def __post_init__(self) -> None:
        spec = backbone_spec(self.backbone)  # InvalidInput for an unknown name
        if self.input_px < spec.min_input_px:
            raise InvalidInput(
                f"{self.backbone} needs input_px >= {spec.min_input_px}, got {self.input_px}"
            )
        PreprocessConfig(self.input_px)
        self.model_config()  # checks the name, version and classes
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise InvalidInput("lr must be > 0 and weight_decay >= 0")
        if self.mixed_precision not in ("auto", "on", "off"):
            raise InvalidInput(
                f"mixed_precision must be auto, on or off; got {self.mixed_precision!r}"
            )
        if self.schedule not in SCHEDULES:
            raise InvalidInput(
                f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}"
            )
        if not 0 <= self.warmup_fraction < 1:
            raise InvalidInput(f"warmup_fraction must be within [0, 1), got {self.warmup_fraction}")
        if not 0 < self.val_fraction < 1:
            raise InvalidInput(f"val_fraction must be within (0, 1), got {self.val_fraction}")
        if min(self.num_workers, self.aux_loss_weight, self.patch_cache_mb, self.threads) < 0:
            raise InvalidInput(
                "num_workers, aux_loss_weight, patch_cache_mb and threads must be >= 0"
            )
        for name in ("patches_per_class", "max_patches_per_epoch", "max_val_patches"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidInput(f"{name} must be at least 1 (or None), got {value}")
        if self.device != "auto":
            resolve_device(self.device)

    def model_config(self, temperature: float = 1.0) -> ModelConfig:
        """The bundle's config for this training (InvalidInput for bad names)."""
        return ModelConfig(
            name=self.model_name,
            version=self.version,
            backbone=self.backbone,
            class_names=tuple(self.class_names),
            preprocess=PreprocessConfig(self.input_px),
            temperature=temperature,
            tta=tuple(self.tta),
            grid_overlap_px=self.grid_overlap_px,
        )

    def fingerprint(self) -> dict[str, Any]:
        """The fields that decide the result, as JSON-ready values (resume checks them)."""
        out = {}
        for f in fields(self):
            if f.name not in _RESUMABLE_CHANGES:
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass
class TrainResult:
    """What :func:`train` produced.

    Attributes:
        bundle_dir: The model bundle folder.
        model: The trained model (eval mode, on the training device).
        model_config: Its config, with the fitted temperature.
        history: One record per epoch: epoch, train_loss, val_loss, val_auroc,
            val_accuracy, lr, seconds, patches_per_s.
        temperature: The fitted T.
        val_auroc: Validation AUROC after the last epoch (NaN if one class only).
        val_table: The validation patches, in the order of ``val_logits``.
        val_logits: Uncalibrated validation logits, (N, classes), float32.
        metrics: What ``metrics.json`` holds.
        checkpoint_path: The last epoch's checkpoint.
        resumed_from_epoch: Epochs done before this call (0 for a fresh run).
    """

    bundle_dir: Path
    model: nn.Module
    model_config: ModelConfig
    history: list[dict[str, float]]
    temperature: float
    val_auroc: float
    val_table: pd.DataFrame
    val_logits: np.ndarray
    metrics: dict[str, Any]
    checkpoint_path: Path
    resumed_from_epoch: int = 0


def use_autocast(mode: str, device: torch.device) -> bool:
    """Whether to train under autocast: ``on``/``off`` as said; ``auto`` on CUDA, and
    on CPU only with AMX (bfloat16 matrix tiles) — without it bfloat16 is slower."""
    if mode != "auto":
        return mode == "on"
    if device.type == "cuda":
        return True
    amx = getattr(torch._C._cpu, "_is_amx_tile_supported", None)
    return bool(amx()) if callable(amx) else False


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cpu``, ``cuda``, ``cuda:N`` checked.

    Raises:
        InvalidInput: Unknown device, or CUDA asked for and not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InvalidInput(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from exc
    if device.type not in ("cpu", "cuda"):
        raise InvalidInput(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInput(f"device {name!r} asked for, but CUDA is not available here")
    return device


def auroc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """AUROC of (N, classes) probabilities: the positive (last) class's for a binary
    task, one-vs-rest macro average otherwise; NaN when a class is absent."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    if len(np.unique(labels)) < probabilities.shape[1]:
        return float("nan")
    if probabilities.shape[1] == 2:
        return float(roc_auc_score(labels, probabilities[:, 1]))
    return float(roc_auc_score(labels, probabilities, multi_class="ovr"))


def build_schedule(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule, stepped once per optimizer step.

    One-cycle needs at least a step and a half in each of its two phases (torch
    divides by each phase's length); shorter runs take the cosine schedule.
    """
    if config.schedule == "onecycle" and total_steps >= 3:
        edge = 1.5 / total_steps
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=config.lr,
            total_steps=total_steps,
            pct_start=min(max(config.warmup_fraction, edge), 1.0 - edge),
            anneal_strategy="cos",
        )
    warmup = round(config.warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic kernels while training, restoring the caller's settings after."""
    was = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` (0 leaves them), restored after."""
    was = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(was)


def _save_atomic(state: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file beside ``path``, synced, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _Loop:
    """The state of one training run (model, optimizer, data) and its steps."""

    def __init__(
        self,
        config: TrainConfig,
        device: torch.device,
        train_reader: FittedReader,
        train_labels: np.ndarray,
        val_reader: FittedReader,
        val_labels: np.ndarray,
        per_class: int,
        steps_per_epoch: int,
    ) -> None:
        self.config = config
        self.device = device
        self.train_reader, self.train_labels = train_reader, train_labels
        self.val_reader, self.val_labels = val_reader, val_labels
        self.per_class = per_class
        self.steps_per_epoch = steps_per_epoch
        self.collate = PatchCollate(PreprocessConfig(config.input_px))
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        # Channels-last: oneDNN's convolutions run about a quarter faster on CPUs.
        self.model = build_backbone(
            config.backbone, len(config.class_names), config.weights_path, config.input_px
        ).to(device)
        self.model.to(memory_format=MEMORY_FORMAT)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.schedule = build_schedule(self.optimizer, config, config.epochs * steps_per_epoch)
        self.autocast = use_autocast(config.mixed_precision, device)
        use_scaler = device.type == "cuda" and self.autocast
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        self.autocast_dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
        self.last_val_logits: np.ndarray | None = None

    def loader(self, dataset: EpochDataset, epoch: int) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.config.batch_size,
            shuffle=False,  # the epoch's rows are shuffled already
            num_workers=self.config.num_workers,
            collate_fn=self.collate,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(self.config.seed * 1000 + epoch),
            pin_memory=self.device.type == "cuda",
        )

    def train_epoch(self, epoch: int, report: Callable[[int, float], None]) -> float:
        """One epoch of optimizer steps; returns the mean training loss."""
        config = self.config
        rng = np.random.default_rng((config.seed, 0, epoch))
        rows = balanced_epoch_indices(self.train_labels, rng, self.per_class)
        rows = rows[: self.steps_per_epoch * config.batch_size]
        dataset = EpochDataset(
            self.train_reader, self.train_labels, rows, config.seed, epoch, config.augment
        )
        self.model.train()
        total = 0.0
        for step, (x, y) in enumerate(self.loader(dataset, epoch), start=1):
            x = x.to(self.device, non_blocking=True, memory_format=MEMORY_FORMAT)
            y = y.to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast):
                logits, aux = split_outputs(self.model(x))
            loss = F.cross_entropy(logits.float(), y)
            if aux is not None and config.aux_loss_weight > 0:
                loss = loss + config.aux_loss_weight * F.cross_entropy(aux.float(), y)
            if not torch.isfinite(loss):
                raise InvalidInput(
                    f"the training loss became {loss.item()} at epoch {epoch + 1} step {step}: "
                    f"lower the learning rate (lr={config.lr})"
                )
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.schedule.step()
            total += float(loss.item())
            report(step, total / step)
        return total / max(1, self.steps_per_epoch)

    @torch.inference_mode()
    def validation_logits(self) -> np.ndarray:
        """Logits of every validation patch in float32 (as served), no augmentation."""
        rows = np.arange(len(self.val_labels))
        dataset = EpochDataset(
            self.val_reader, self.val_labels, rows, self.config.seed, 0, augment=False
        )
        self.model.eval()
        out = [
            split_outputs(self.model(x.to(self.device, memory_format=MEMORY_FORMAT)))[0]
            .float()
            .cpu()
            for x, _ in self.loader(dataset, 0)
        ]
        return torch.cat(out).numpy()

    def state(self, epochs_done: int, history: list[dict[str, float]]) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": epochs_done,
            "fingerprint": self.config.fingerprint(),
            "history": history,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python_rng": random.getstate(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        random.setstate(state["python_rng"])


def load_checkpoint(path: Path, config: TrainConfig) -> dict[str, Any]:
    """A checkpoint of a run with this config.

    Raises:
        InvalidInput: Not a checkpoint of ours, or of a run with other settings.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InvalidInput(f"checkpoint {path} cannot be read: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InvalidInput(f"{path} is not a training checkpoint of format {CHECKPOINT_FORMAT}")
    theirs, ours = state["fingerprint"], config.fingerprint()
    changed = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if changed:
        what = ", ".join(f"{k}: {theirs.get(k)!r} -> {ours.get(k)!r}" for k in changed)
        raise InvalidInput(
            f"checkpoint {path} is of a run with other settings ({what}); "
            "resume with the same settings or use another checkpoint_dir"
        )
    return state


def _validation_subset(val: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    if limit is None or len(val) <= limit:
        return val
    rows = np.sort(np.random.default_rng((seed, 2)).choice(len(val), limit, replace=False))
    return val.iloc[rows].reset_index(drop=True)


def _epoch_size(labels: np.ndarray, config: TrainConfig) -> tuple[int, int]:
    """(patches per class, optimizer steps) of every epoch."""
    counts = np.bincount(labels, minlength=len(config.class_names))
    present = counts[counts > 0]
    per_class = int(present.min()) if config.patches_per_class is None else config.patches_per_class
    if config.max_patches_per_epoch is not None:
        per_class = min(per_class, max(1, config.max_patches_per_epoch // len(present)))
    steps = per_class * len(present) // config.batch_size
    if steps < 1:
        raise InvalidInput(
            f"an epoch has {per_class * len(present)} patches, fewer than one batch of "
            f"{config.batch_size}: lower batch_size or add patches"
        )
    return per_class, steps


def train(
    table: pd.DataFrame,
    store: ObjectStore,
    config: TrainConfig,
    output_dir: Path,
    *,
    resume: bool = False,
    progress: bool | TextIO = True,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train, calibrate and write a model bundle (see the module doc for the recipe).

    Args:
        table: The patch table (``dataset.build_patch_table``), all patients.
        store: Where the shards are.
        config: How to train.
        output_dir: The bundle folder to write.
        resume: Continue from the checkpoint in the checkpoint folder when there is
            one (a fresh run otherwise).
        progress: Draw progress bars (True: on standard error; or a stream).
        on_epoch_end: Called with each epoch's record after its checkpoint is written.

    Returns:
        The trained model, its config with T, history and metrics.

    Raises:
        InvalidInput: Bad table (empty, one class, missing patient), a split that
            cannot keep patients apart, an epoch smaller than a batch, a checkpoint of
            other settings, or a diverging loss.
    """
    started = time.perf_counter()
    output_dir = Path(output_dir)
    validate_patch_table(table, len(config.class_names))
    device = resolve_device(config.device)
    stream: TextIO | None = (
        (sys.stderr if progress is True else progress) if progress is not False else None
    )
    checkpoint_dir = config.checkpoint_dir or output_dir / "checkpoints"
    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_FILE

    train_table, val_table = patient_split(table, config.val_fraction, config.seed)
    val_table = _validation_subset(val_table, config.max_val_patches, config.seed)
    per_class, steps = _epoch_size(train_table["label"].to_numpy(), config)

    with contextlib.ExitStack() as stack:
        cache_dir = config.cache_dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="histomarker-shards-"))
        )
        keys = set(train_table["shard"]) | set(val_table["shard"])
        bar = ProgressBar("downloading shards", "shards", stream=stream) if stream else None
        paths = ShardCache(store, Path(cache_dir)).fetch(keys, bar)
        val_labels = val_table["label"].to_numpy(np.int64)
        cache_bytes = config.patch_cache_mb << 20
        stack.enter_context(deterministic())
        stack.enter_context(torch_threads(config.threads))
        threads = torch.get_num_threads()
        loop = _Loop(
            config,
            device,
            FittedReader(PatchReader(train_table, paths), config.input_px, cache_bytes),
            train_table["label"].to_numpy(np.int64),
            FittedReader(PatchReader(val_table, paths), config.input_px, cache_bytes),
            val_labels,
            per_class,
            steps,
        )
        history: list[dict[str, float]] = []
        start_epoch = 0
        if resume and checkpoint_path.is_file():
            state = load_checkpoint(checkpoint_path, config)
            loop.restore(state)
            history, start_epoch = list(state["history"]), int(state["epoch"])
            log.info("resuming from %s after epoch %d", checkpoint_path, start_epoch)

        val_logits: np.ndarray | None = None
        for epoch in range(start_epoch, config.epochs):
            record = _run_epoch(loop, epoch, stream)
            val_logits = loop.last_val_logits
            history.append(record)
            _save_atomic(loop.state(epoch + 1, history), checkpoint_path)
            log.info("epoch %d/%d %s", epoch + 1, config.epochs, record)
            if on_epoch_end is not None:
                on_epoch_end(record)
        if val_logits is None:  # resumed after the last epoch: nothing left to train
            val_logits = loop.validation_logits()
        model = loop.model.eval()

    fit = fit_temperature(val_logits, val_labels)
    model_config = config.model_config(fit.temperature)
    before, after = softmax(val_logits), softmax(val_logits, fit.temperature)
    reliability_diagram(
        {"uncalibrated": before, f"T = {fit.temperature:.2f}": after},
        val_labels,
        output_dir / RELIABILITY_FILE,
        title=f"{config.model_name} {config.version}: validation patches",
    )
    val_auroc = auroc(val_labels, after)
    metrics: dict[str, Any] = {
        "val_auroc": val_auroc,
        "temperature": fit.temperature,
        "calibration": {"before": asdict(fit.before), "after": asdict(fit.after)},
        "epochs": config.epochs,
        "history": history,
        "train": describe(train_table, config.class_names),
        "validation": describe(val_table, config.class_names),
        "val_patients": sorted(str(p) for p in val_table["patient_id"].unique()),
        "patches_per_epoch": per_class * int((np.bincount(loop.train_labels) > 0).sum()),
        "config": config.fingerprint(),
        "device": str(device),
        "threads": threads,
        "seconds": round(time.perf_counter() - started, 3),
    }
    metrics = _json_ready(metrics)
    save_bundle(output_dir, model, model_config, metrics)
    return TrainResult(
        bundle_dir=output_dir,
        model=model,
        model_config=model_config,
        history=history,
        temperature=fit.temperature,
        val_auroc=val_auroc,
        val_table=val_table,
        val_logits=val_logits,
        metrics=metrics,
        checkpoint_path=checkpoint_path,
        resumed_from_epoch=start_epoch,
    )


def _run_epoch(loop: _Loop, epoch: int, stream: TextIO | None) -> dict[str, float]:
    """Train one epoch and validate, drawing the progress bar; the epoch's record."""
    config = loop.config
    steps = loop.steps_per_epoch
    label = f"epoch {epoch + 1}/{config.epochs}"
    bar = ProgressBar(label, "steps", stream=stream) if stream else None

    def report(step: int, loss: float) -> None:
        if bar is not None:
            bar.label = f"{label} loss {loss:.4f}"
            # One more unit than steps: the validation pass ends the bar.
            bar(step, steps + 1)

    started = time.perf_counter()
    train_loss = loop.train_epoch(epoch, report)
    train_s = time.perf_counter() - started
    logits = loop.validation_logits()
    loop.last_val_logits = logits
    probabilities = softmax(logits)
    rows = np.arange(len(loop.val_labels))
    val_loss = float(-np.log(np.clip(probabilities[rows, loop.val_labels], 1e-12, 1)).mean())
    val_auroc = auroc(loop.val_labels, probabilities)
    record = {
        "epoch": epoch + 1,
        "train_loss": round(train_loss, 6),
        "val_loss": round(val_loss, 6),
        "val_auroc": round(val_auroc, 6) if math.isfinite(val_auroc) else float("nan"),
        "val_accuracy": round(float((probabilities.argmax(1) == loop.val_labels).mean()), 6),
        "lr": float(loop.schedule.get_last_lr()[0]),
        "seconds": round(time.perf_counter() - started, 3),
        "patches_per_s": round(steps * config.batch_size / max(train_s, 1e-9), 2),
    }
    if bar is not None:
        bar.label = f"{label} loss {train_loss:.4f} val AUROC {val_auroc:.3f}"
        bar(steps + 1, steps + 1)
    return record


def _json_ready(value: Any) -> Any:
    """Metrics with NaN as None (JSON has no NaN) and numpy scalars as Python ones."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
