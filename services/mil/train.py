"""Training a multi-task MIL head on bags, with early stopping and calibration.

:func:`train_mil` fits one head for all tasks at once:

1. Labels are a float array (bags, T): 1, 0, or NaN for unknown. The loss of a bag
   is the binary cross-entropy averaged over its known tasks only
   (:func:`masked_bce`); a bag with no known label is skipped.
2. One bag per step (gradients summed over ``accumulate`` bags before each AdamW
   step), bags in a fresh random order each epoch. Each step sees a random subset
   of the bag's instances: a fraction drawn uniformly from
   [``min_instance_keep``, 1], at most ``max_train_instances`` (an augmentation, and
   a bound on a step's cost for very large bags).
3. After each epoch, the validation loss (every instance, no dropout) over all known
   (bag, task) entries; the weights of the best epoch are kept, and training stops
   after ``patience`` epochs without improvement.
4. Per-task temperatures are fitted on the validation logits
   (:mod:`services.mil.calibration`).

Repeatable: the head's initialization, dropout and the transformer's sampling come
from torch's generator seeded with ``seed`` (the caller's generator state is
restored afterwards); bag order and instance subsets from a numpy generator seeded
with ``seed``; torch runs ``threads`` intra-op threads and deterministic kernels.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from services.common.errors import InvalidInput
from services.common.vocabulary import BIOMARKERS
from services.inference.training import deterministic, torch_threads
from services.mil.bags import Bag
from services.mil.calibration import fit_task_temperatures
from services.mil.heads import build_head
from services.mil.model import BagInput, FittedMIL, TrainingData

#: Called after each epoch with (epochs done, epochs planned); a ProgressBar fits.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class MilTrainingConfig:
    """The settings of :func:`train_mil` (see its arguments), kept in the model file."""

    head: str = "abmil"
    head_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 40
    lr: float = 2e-4
    weight_decay: float = 1e-4
    patience: int = 8
    accumulate: int = 1
    min_instance_keep: float = 0.5
    max_train_instances: int = 4096
    seed: int = 0
    threads: int = 1
    device: str = "cpu"

    def check(self) -> None:
        """InvalidInput naming the first setting out of range."""
        for name in ("epochs", "patience", "accumulate", "max_train_instances"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InvalidInput(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise InvalidInput(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.min_instance_keep <= 1:
            raise InvalidInput(f"min_instance_keep must be in (0, 1], got {self.min_instance_keep}")
        if self.threads < 0:
            raise InvalidInput(f"threads must be >= 0 (0 = leave torch's), got {self.threads}")


def masked_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy averaged over the known entries (labels not NaN).

    Unknown entries add nothing to the loss or its gradient, whatever their logits.

    Args:
        logits: (T,) or (n, T).
        labels: Same shape: 1, 0 or NaN.

    Returns:
        A scalar; 0 (with a zero gradient) when no entry is known.
    """
    known = ~torch.isnan(labels)
    targets = torch.where(known, labels, torch.zeros_like(labels))
    # Unknown logits are cut out of the graph, so not even a NaN logit leaks in.
    safe_logits = torch.where(known, logits, torch.zeros_like(logits))
    losses = F.binary_cross_entropy_with_logits(safe_logits, targets, reduction="none")
    return (losses * known).sum() / known.sum().clamp_min(1)


def train_mil(
    train_bags: Sequence[BagInput],
    train_labels: np.ndarray,
    val_bags: Sequence[BagInput],
    val_labels: np.ndarray,
    *,
    head: str = "abmil",
    epochs: int = 40,
    lr: float = 2e-4,
    weight_decay: float = 1e-4,
    seed: int = 0,
    threads: int = 1,
    progress: Progress | None = None,
    tasks: Sequence[str] = BIOMARKERS,
    head_options: dict[str, Any] | None = None,
    patience: int = 8,
    accumulate: int = 1,
    min_instance_keep: float = 0.5,
    max_train_instances: int = 4096,
    data: TrainingData | None = None,
    device: str = "cpu",
) -> FittedMIL:
    """Train a multi-task MIL head and calibrate it on the validation bags.

    Args:
        train_bags: Training bags: :class:`~services.mil.bags.Bag` or (N, D) arrays.
        train_labels: (len(train_bags), T): 1, 0 or NaN (unknown, masked out).
        val_bags: Validation bags (early stopping and temperature fitting).
        val_labels: (len(val_bags), T), as ``train_labels``.
        head: ``abmil`` or ``transmil`` (:func:`~services.mil.heads.build_head`).
        epochs: Most epochs to run.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        seed: Seed of every random draw.
        threads: torch intra-op threads while training (0 leaves torch's setting).
        progress: Called with (epochs done, epochs planned) after each epoch.
        tasks: Task names, one per label column (default: the six biomarkers).
        head_options: Further head arguments (e.g. ``{"hidden_dim": 128}``).
        patience: Epochs without a better validation loss before stopping.
        accumulate: Bags whose gradients are summed per optimizer step.
        min_instance_keep: Least fraction of a bag's instances one step sees.
        max_train_instances: Most instances one step sees.
        data: The model card's description of the training data.
        device: torch device to train on.

    Returns:
        The fitted model, in evaluation mode, with per-task temperatures.

    Raises:
        InvalidInput: Mismatched bags and labels, mixed encoders or widths, no known
            training or validation label, or a setting out of range.
    """
    config = MilTrainingConfig(
        head=head,
        head_options=dict(head_options or {}),
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        patience=patience,
        accumulate=accumulate,
        min_instance_keep=min_instance_keep,
        max_train_instances=max_train_instances,
        seed=seed,
        threads=threads,
        device=device,
    )
    config.check()
    tasks = tuple(tasks)
    y_train = _check_labels("train_labels", train_labels, len(train_bags), len(tasks))
    y_val = _check_labels("val_labels", val_labels, len(val_bags), len(tasks))
    if np.isnan(y_train).all():
        raise InvalidInput("no known training label: every train_labels entry is NaN")
    if np.isnan(y_val).all():
        raise InvalidInput("no known validation label: every val_labels entry is NaN")
    encoder, encoder_sha256 = _common_encoder([*train_bags, *val_bags])
    x_train = [_tensor(b, f"train bag {i}") for i, b in enumerate(train_bags)]
    x_val = [_tensor(b, f"validation bag {i}") for i, b in enumerate(val_bags)]
    widths = {x.shape[1] for x in [*x_train, *x_val]}
    if len(widths) != 1:
        raise InvalidInput(f"bags differ in width: {sorted(widths)}; use one encoder's bags")
    in_dim = widths.pop()

    rng = np.random.default_rng(seed)
    target = torch.device(device)
    trainable = np.flatnonzero(~np.isnan(y_train).all(axis=1))
    with torch_threads(threads), deterministic(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_head(head, in_dim, len(tasks), **config.head_options).to(target)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        yt = torch.as_tensor(y_train, dtype=torch.float32, device=target)
        yv = torch.as_tensor(y_val, dtype=torch.float32, device=target)
        best_loss, best_epoch, best_state = math.inf, -1, copy.deepcopy(model.state_dict())
        history: list[dict[str, float]] = []
        for epoch in range(epochs):
            model.train()
            optimizer.zero_grad(set_to_none=True)
            total, order = 0.0, rng.permutation(trainable)
            for step, i in enumerate(order):
                x = _subsample(x_train[i], rng, min_instance_keep, max_train_instances)
                loss = masked_bce(model(x.to(target)).logits, yt[i])
                (loss / accumulate).backward()
                total += loss.item()
                if (step + 1) % accumulate == 0 or step + 1 == len(order):
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            val_logits = _all_logits(model, x_val, target)
            val_loss = float(masked_bce(val_logits, yv))
            history.append(
                {"epoch": epoch + 1, "train_loss": total / len(order), "val_loss": val_loss}
            )
            if progress is not None:
                progress(epoch + 1, epochs)
            if val_loss < best_loss - 1e-7:
                best_loss, best_epoch = val_loss, epoch + 1
                best_state = copy.deepcopy(model.state_dict())
            elif epoch + 1 - best_epoch >= patience:
                break
        model.load_state_dict(best_state)
        model.eval()
        val_logits_np = _all_logits(model, x_val, target).double().cpu().numpy()
    calibration = fit_task_temperatures(tasks, val_logits_np, y_val)
    facts = (data or TrainingData()).as_dict()
    facts.update(train_bags=len(train_bags), val_bags=len(val_bags))
    return FittedMIL(
        head=model,
        head_name=head,
        head_options=config.head_options,
        in_dim=in_dim,
        tasks=tasks,
        temperatures=tuple(c.temperature for c in calibration),
        encoder=encoder,
        encoder_sha256=encoder_sha256,
        training_data=facts,
        training={
            "config": asdict(config),
            "history": history,
            "best_epoch": best_epoch,
            "best_val_loss": best_loss,
        },
        calibration=calibration,
        validation_logits=val_logits_np,
        validation_labels=y_val,
    )


# --- helpers ---------------------------------------------------------------------------


def _check_labels(name: str, labels: Any, n_bags: int, n_tasks: int) -> np.ndarray:
    y = np.asarray(labels, dtype=np.float64)
    if y.shape != (n_bags, n_tasks):
        raise InvalidInput(f"{name} must be ({n_bags} bags, {n_tasks} tasks), got {y.shape}")
    if n_bags == 0:
        raise InvalidInput(f"{name}: no bags")
    known = y[~np.isnan(y)]
    if ((known != 0) & (known != 1)).any():
        raise InvalidInput(f"{name} must be 1, 0 or NaN (unknown)")
    return y


def _common_encoder(bags: Sequence[BagInput]) -> tuple[str | None, str | None]:
    """The one encoder (name, sha256) of the Bag inputs, or (None, None) if none is a
    Bag; InvalidInput when they differ."""
    found = {(b.encoder, b.encoder_sha256) for b in bags if isinstance(b, Bag)}
    if len(found) > 1:
        shown = ", ".join(f"{name} ({sha[:12] or 'random'})" for name, sha in sorted(found))
        raise InvalidInput(f"bags come from different encoders: {shown}")
    return found.pop() if found else (None, None)


def _tensor(bag: BagInput, what: str) -> torch.Tensor:
    features = bag.features if isinstance(bag, Bag) else bag
    x = torch.as_tensor(features, dtype=torch.float32)
    if x.dim() != 2 or x.shape[0] == 0:
        raise InvalidInput(f"{what} must be (N >= 1, D) features, got {tuple(x.shape)}")
    return x


def _subsample(
    x: torch.Tensor, rng: np.random.Generator, keep_min: float, cap: int
) -> torch.Tensor:
    """A random subset of the rows of ``x``: a fraction in [keep_min, 1], at most cap."""
    n = x.shape[0]
    keep = min(cap, max(1, round(n * rng.uniform(keep_min, 1.0))))
    if keep >= n:
        return x
    rows = np.sort(rng.permutation(n)[:keep])
    return x[torch.from_numpy(rows)]


def _all_logits(
    model: torch.nn.Module, bags: list[torch.Tensor], device: torch.device
) -> torch.Tensor:
    model.eval()
    with torch.inference_mode():
        return torch.stack([model(x.to(device)).logits for x in bags])
