"""GPU speed of the paper's pipeline, of an encoder + MIL alternative, and of training.

Four measurements, on CUDA, with random weights and synthetic inputs. Every input is
a pool of random uint8 RGB patches made on the device once, so the figures are
model compute (uint8 -> normalized float, the forward passes, the test-time views),
not slide reading, JPEG decoding or host-to-device copies.

1. **Paper pipeline, s per standard slide.** Seven InceptionV3 networks (torchvision
   ``inception_v3(weights=None, aux_logits=False, init_weights=False)``, 2 classes):
   the cancer detector runs on every tissue patch of the slide at 20x, the six
   biomarker models (TP53, PIK3CA, ER, PR, HER2, Basal) on the cancer patches. As in
   the method (and ``services/slide/highres.py``) each cancer patch at 20x becomes
   ``HIGHRES_TILES_PER_CANCER_PATCH`` = 4 patches of 512 px at 40x, so a biomarker
   model sees 4 x 360 = 1440 patches. Every patch goes through ``--tta-views``
   (default 8) dihedral views (4 quarter turns x optional mirror), softmax averaged.
   fp16 autocast, channels_last, ``--batch`` patches per forward pass. The seven
   models share one architecture, so one model's TTA throughput is timed and the
   slide time is extrapolated from it: (720 + 6 x 1440) x seconds per patch.
2. **Encoder + MIL, s per standard slide.** A ViT-L/16 at 224 px (timm
   ``vit_large_patch16_224``, ``pretrained=False``, ``num_classes=0``: 1024 features)
   embeds the slide's tissue tiled the way TRIDENT and CLAM tile a slide at 20x:
   224 px patches at 0.5 um/px, i.e. 3762 patches for the same tissue area (see
   below), no test-time views; then a gated-attention MIL head (1024 -> 512 ->
   gated attention 256 -> 6 logits, one per biomarker) reads the whole bag. Slide
   time = 3762 x the encoder's seconds per patch (measurement 4) + one pass of the
   head over a bag of 3762 x 1024 features (timed on its own).
3. **Training, patches/s.** InceptionV3 at 512 px, ``--train-batch`` (default 32):
   forward, cross-entropy, backward and an SGD step (momentum 0.9) under
   ``torch.autocast(float16)`` with a ``GradScaler``, channels_last. No auxiliary
   head (``aux_logits=False``), so this is a lower bound on a step with it.
4. **Encoder, patches/s.** The ViT-L/16 at 224 px, ``--encoder-batch`` (default 256)
   patches per forward pass, fp16 autocast, ``torch.inference_mode()``.

The standard slide (the synthetic generator's "standard" preset size): 40960 x 30720
px at 0.25 um/px (40x), 60% of it tissue. At 20x (0.5 um/px) it is 20480 x 15360 px;
512 px patches tile that exactly into 40 x 30 = 1200 grid positions, and 60% of them,
**720 patches**, hold tissue (``STANDARD_SLIDE_PATCHES``). A cancer fraction of 0.5
(``CANCER_FRACTION``) makes 360 cancer patches, 1440 patches at 40x. The same tissue
area in 224 px patches at 20x is 0.6 x 20480 x 15360 / 224^2 = 720 x (512/224)^2 =
3761.6, **3762 patches** (``STANDARD_SLIDE_ENCODER_PATCHES``; a 224 px grid does not divide
the slide evenly, so the count comes from the area).

Timing: cuDNN autotuning on; ``--warmup`` untimed calls; then ``--repeats`` repeats,
each making calls until its share of ``--seconds-per-measure`` has passed (at least
one call), with ``torch.cuda.synchronize`` before reading the clock. A figure is the
**median** of the repeats; the JSON keeps every repeat. Models and inputs are freed
between measurements. Run on the GPU machine (about 3 minutes on an H100 with the
defaults; progress on stderr):

    python3 benchmarks/gpu_bench.py --json gpu_bench.json

Without CUDA (or with ``--tiny``) the same code runs a **tiny mode** that CI can
afford in seconds: InceptionV3 at 75 px (its smallest input), a 2-block ViT of width
64 at 32 px built from timm's ``VisionTransformer``, a few patches per batch, float32
on the CPU; the slide figures are still extrapolated to the standard slide, and the
table says that these numbers are not the GPU figures. Imports only torch,
torchvision, timm (inside the encoder builders) and the standard library, so it runs
with a bare ``python3`` that has those.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: The standard slide at level 0: (width, height) px at 40x.
SLIDE_LEVEL0_PX = (40960, 30720)
#: Its level-0 resolution, um per px (40x).
SLIDE_LEVEL0_MPP = 0.25
#: Resolution the detector and the encoders read, um per px (20x).
ANALYSIS_MPP = 0.5
#: Share of the slide's area that is tissue.
TISSUE_FRACTION = 0.6
#: Share of tissue patches the detector calls cancer.
CANCER_FRACTION = 0.5
#: Patches at 40x per cancer patch at 20x (zoom x2, four 512 px quadrants).
HIGHRES_TILES_PER_CANCER_PATCH = 4
#: Biomarker models run after the detector.
BIOMARKER_MODELS = 6
#: Side of the paper pipeline's patches, px.
PATCH_PX = 512
#: Side of the encoder's patches, px.
ENCODER_PATCH_PX = 224
#: Logits of the MIL head: one per biomarker.
MIL_OUTPUTS = 6

#: The dihedral group D4 as (quarter turns counter-clockwise, mirror left-right first);
#: the identity first, so ``--tta-views 1`` means no test-time augmentation.
DIHEDRAL: tuple[tuple[int, bool], ...] = tuple(
    (turns, mirror) for mirror in (False, True) for turns in range(4)
)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def tissue_patch_count(
    patch_px: int,
    *,
    slide_px: tuple[int, int] = SLIDE_LEVEL0_PX,
    slide_mpp: float = SLIDE_LEVEL0_MPP,
    read_mpp: float = ANALYSIS_MPP,
    tissue_fraction: float = TISSUE_FRACTION,
) -> int:
    """Patches of ``patch_px`` at ``read_mpp`` that cover the slide's tissue area.

    Args:
        patch_px: Patch side at ``read_mpp``, px.
        slide_px: Slide size (width, height) at level 0, px.
        slide_mpp: Level-0 resolution, um per px.
        read_mpp: Resolution the patches are read at, um per px.
        tissue_fraction: Share of the slide's area that is tissue.

    Returns:
        The tissue area divided by one patch's area, rounded.
    """
    scale = slide_mpp / read_mpp
    width_px, height_px = slide_px[0] * scale, slide_px[1] * scale
    return round(tissue_fraction * width_px * height_px / patch_px**2)


#: Tissue patches of 512 px at 20x on the standard slide (720).
STANDARD_SLIDE_PATCHES = tissue_patch_count(PATCH_PX)
#: Its cancer patches at 20x (360).
STANDARD_SLIDE_CANCER_PATCHES = round(STANDARD_SLIDE_PATCHES * CANCER_FRACTION)
#: Patches each biomarker model sees, 512 px at 40x (1440).
STANDARD_SLIDE_BIOMARKER_PATCHES = STANDARD_SLIDE_CANCER_PATCHES * HIGHRES_TILES_PER_CANCER_PATCH
#: Patches one InceptionV3 forward-passes per slide, summed over the 7 models (9360).
STANDARD_SLIDE_PIPELINE_PATCHES = (
    STANDARD_SLIDE_PATCHES + BIOMARKER_MODELS * STANDARD_SLIDE_BIOMARKER_PATCHES
)
#: Tissue patches of 224 px at 20x on the standard slide (3762).
STANDARD_SLIDE_ENCODER_PATCHES = tissue_patch_count(ENCODER_PATCH_PX)


def dihedral_view(x: torch.Tensor, quarter_turns: int, mirror: bool) -> torch.Tensor:
    """One dihedral transform of the last two (spatial) axes of ``x``."""
    if mirror:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, quarter_turns, dims=(-2, -1)) if quarter_turns else x


def dihedral_views(x: torch.Tensor, count: int = 8) -> list[torch.Tensor]:
    """The first ``count`` views of ``x`` in ``DIHEDRAL`` order (1 <= count <= 8)."""
    if not 1 <= count <= len(DIHEDRAL):
        raise ValueError(f"count must be 1 to {len(DIHEDRAL)}, got {count}")
    return [dihedral_view(x, turns, mirror) for turns, mirror in DIHEDRAL[:count]]


class GatedAttentionMIL(nn.Module):
    """Gated-attention MIL head (Ilse et al. 2018): a bag of features -> logits.

    Args:
        in_dim: Features per instance.
        hidden_dim: Width of the instance projection.
        attention_dim: Width of the gated attention branches.
        num_outputs: Logits per bag.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 512,
        attention_dim: int = 256,
        num_outputs: int = MIL_OUTPUTS,
    ) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU())
        self.attention_tanh = nn.Linear(hidden_dim, attention_dim)
        self.attention_gate = nn.Linear(hidden_dim, attention_dim)
        self.attention_score = nn.Linear(attention_dim, 1)
        self.classify = nn.Linear(hidden_dim, num_outputs)

    def forward(self, bag: torch.Tensor) -> torch.Tensor:
        """Logits (num_outputs,) of a bag (instances, in_dim)."""
        h = self.project(bag)
        gated = torch.tanh(self.attention_tanh(h)) * torch.sigmoid(self.attention_gate(h))
        weights = torch.softmax(self.attention_score(gated).squeeze(-1).float(), dim=0)
        pooled = weights.to(h.dtype) @ h
        return self.classify(pooled)


@dataclass(frozen=True)
class Sizes:
    """What one mode runs: input sides (px), batches (patches) and timing counts."""

    inception_px: int
    batch: int
    train_batch: int
    encoder_px: int
    encoder_batch: int
    warmup: int
    repeats: int
    seconds_per_measure: float


#: Full sizes for the GPU.
FULL = Sizes(PATCH_PX, 64, 32, ENCODER_PATCH_PX, 256, 3, 3, 30.0)
#: CI-sized smoke run: InceptionV3's smallest input, a toy ViT, 1-4 patches a batch,
#: one repeat.
TINY = Sizes(75, 1, 2, 32, 4, 1, 1, 0.5)


@dataclass(frozen=True)
class Measurement:
    """One row of the table: the median of ``repeats`` and what was measured."""

    key: str
    what: str
    setting: str
    value: float
    unit: str
    repeats: tuple[float, ...]


def _log(message: str) -> None:
    print(f"[gpu_bench] {message}", file=sys.stderr, flush=True)


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_per_call(
    name: str,
    call: Callable[[], object],
    *,
    sync: Callable[[], None],
    warmup: int,
    repeats: int,
    budget_s: float,
) -> list[float]:
    """Seconds per call of ``call`` in each of ``repeats`` timed repeats.

    ``warmup`` untimed calls first; each repeat then calls ``call`` until
    ``budget_s / repeats`` has passed (at least once) and synchronizes before reading
    the clock. On CUDA the host runs ahead of the device only by the launch queue's
    depth, so a repeat overshoots its share of the budget by little.
    """
    _log(f"{name}: {warmup} warm-up calls")
    for _ in range(warmup):
        call()
    sync()
    share_s = budget_s / repeats
    per_call_s = []
    for repeat in range(repeats):
        calls = 0
        started = time.perf_counter()
        while calls == 0 or time.perf_counter() - started < share_s:
            call()
            calls += 1
        sync()
        per_call_s.append((time.perf_counter() - started) / calls)
        _log(
            f"{name}: repeat {repeat + 1}/{repeats}: {calls} calls, {per_call_s[-1]:.4f} s per call"
        )
    return per_call_s


class Bench:
    """Builds the models and times the four measurements on one device.

    Args:
        device: Where to run.
        sizes: Input sides, batches and timing counts.
        tta_views: Dihedral views per patch in the paper pipeline (1-8).
        tiny: Whether this is the tiny mode (toy encoder, labels in the table).
    """

    def __init__(self, device: torch.device, sizes: Sizes, tta_views: int, tiny: bool) -> None:
        self.device = device
        self.sizes = sizes
        self.tta_views = tta_views
        self.tiny = tiny
        self.sync = _synchronizer(device)
        # fp16 autocast on CUDA; plain float32 on the CPU (the tiny mode's smoke run).
        self.amp = device.type == "cuda"
        self.precision = "fp16 autocast" if self.amp else "float32"
        self.generator = torch.Generator(device=device).manual_seed(0)
        self.mean = torch.tensor(_IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(_IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp)

    def _patches(self, count: int, side_px: int) -> torch.Tensor:
        """Random uint8 RGB patches (count, side, side, 3) on the device."""
        return torch.randint(
            0,
            256,
            (count, side_px, side_px, 3),
            dtype=torch.uint8,
            device=self.device,
            generator=self.generator,
        )

    def _to_input(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> ImageNet-normalized float (N, 3, H, W), channels_last."""
        x = patches.permute(0, 3, 1, 2).float().div_(255.0)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)

    def _time(self, name: str, call: Callable[[], object]) -> list[float]:
        return time_per_call(
            name,
            call,
            sync=self.sync,
            warmup=self.sizes.warmup,
            repeats=self.sizes.repeats,
            budget_s=self.sizes.seconds_per_measure,
        )

    def _inception(self) -> nn.Module:
        from torchvision.models import inception_v3

        torch.manual_seed(0)
        model = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=2)
        return model.to(self.device, memory_format=torch.channels_last)

    def _encoder(self) -> tuple[nn.Module, str]:
        """The encoder in eval mode and its name; timm is imported only here."""
        torch.manual_seed(0)
        if self.tiny:
            from timm.models.vision_transformer import VisionTransformer

            encoder: nn.Module = VisionTransformer(
                img_size=self.sizes.encoder_px,
                patch_size=16,
                embed_dim=64,
                depth=2,
                num_heads=2,
                num_classes=0,
            )
            name = f"toy ViT (depth 2, width 64) at {self.sizes.encoder_px} px"
        else:
            import timm

            encoder = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0)
            name = "ViT-L/16 at 224 px"
        return encoder.to(self.device).eval(), name

    def release(self) -> None:
        """Hands cached device memory back once a measurement's models are gone."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def pipeline(self) -> list[Measurement]:
        """Measurement 1: the 7-model InceptionV3 pipeline with dihedral TTA."""
        s = self.sizes
        _log(f"paper pipeline: InceptionV3 at {s.inception_px} px, batch {s.batch}")
        model = self._inception().eval()
        patches = self._patches(s.batch, s.inception_px)

        @torch.inference_mode()
        def tta_batch() -> torch.Tensor:
            x = self._to_input(patches)
            probabilities = torch.zeros(s.batch, 2, device=self.device)
            with self._autocast():
                for view in dihedral_views(x, self.tta_views):
                    logits = model(view.contiguous(memory_format=torch.channels_last))
                    probabilities += torch.softmax(logits.float(), dim=1)
            return probabilities / self.tta_views

        per_patch_s = [t / s.batch for t in self._time("paper pipeline", tta_batch)]
        setting = (
            f"{s.inception_px} px, {self.tta_views} dihedral views, {self.precision}, "
            f"channels_last, batch {s.batch}"
        )
        slide_s = [t * STANDARD_SLIDE_PIPELINE_PATCHES for t in per_patch_s]
        return [
            Measurement(
                "pipeline_s_per_slide",
                "paper pipeline: detector + 6 biomarker InceptionV3s",
                f"{setting}; {STANDARD_SLIDE_PATCHES} detector + {BIOMARKER_MODELS} x "
                f"{STANDARD_SLIDE_BIOMARKER_PATCHES} biomarker patches (extrapolated)",
                statistics.median(slide_s),
                "s/slide",
                tuple(slide_s),
            ),
            Measurement(
                "pipeline_tta_patches_per_s",
                "InceptionV3 TTA inference (one model)",
                setting,
                statistics.median(1.0 / t for t in per_patch_s),
                "patches/s",
                tuple(1.0 / t for t in per_patch_s),
            ),
        ]

    def training(self) -> list[Measurement]:
        """Measurement 3: InceptionV3 training steps under mixed precision."""
        s = self.sizes
        _log(f"training: InceptionV3 at {s.inception_px} px, batch {s.train_batch}")
        model = self._inception().train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        patches = self._patches(s.train_batch, s.inception_px)
        labels = torch.arange(s.train_batch, device=self.device) % 2

        def step() -> None:
            x = self._to_input(patches)
            optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                logits = model(x)
            loss = F.cross_entropy(logits.float(), labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        per_step_s = self._time("training", step)
        rates = tuple(s.train_batch / t for t in per_step_s)
        scaling = "GradScaler" if self.amp else "no GradScaler"
        return [
            Measurement(
                "train_patches_per_s",
                "InceptionV3 training (forward + backward + SGD step)",
                f"{s.inception_px} px, batch {s.train_batch}, {self.precision}, {scaling}, "
                "channels_last, momentum 0.9",
                statistics.median(rates),
                "patches/s",
                rates,
            )
        ]

    def encoder_and_mil(self) -> list[Measurement]:
        """Measurements 4 and 2: encoder throughput, MIL head, encoder + MIL per slide."""
        s = self.sizes
        encoder, name = self._encoder()
        _log(f"encoder: {name}, batch {s.encoder_batch}")
        patches = self._patches(s.encoder_batch, s.encoder_px)

        @torch.inference_mode()
        def embed() -> torch.Tensor:
            with self._autocast():
                return encoder(self._to_input(patches))

        feature_dim = int(embed().shape[-1])
        per_patch_s = [t / s.encoder_batch for t in self._time("encoder", embed)]

        torch.manual_seed(0)
        head = GatedAttentionMIL(feature_dim).to(self.device).eval()
        bag = torch.randn(
            STANDARD_SLIDE_ENCODER_PATCHES,
            feature_dim,
            device=self.device,
            generator=self.generator,
        )

        @torch.inference_mode()
        def read_bag() -> torch.Tensor:
            with self._autocast():
                return head(bag)

        bag_s = self._time("MIL head", read_bag)

        bag_shape = f"{STANDARD_SLIDE_ENCODER_PATCHES} x {feature_dim}"
        head_shape = f"{feature_dim} -> 512 -> gated attention 256 -> {MIL_OUTPUTS} logits"
        encoder_setting = f"{name}, batch {s.encoder_batch}, {self.precision}, inference_mode"
        slide_s = [
            p * STANDARD_SLIDE_ENCODER_PATCHES + statistics.median(bag_s) for p in per_patch_s
        ]
        return [
            Measurement(
                "encoder_mil_s_per_slide",
                "encoder + gated-attention MIL",
                f"{encoder_setting}; {STANDARD_SLIDE_ENCODER_PATCHES} patches of "
                f"{ENCODER_PATCH_PX} px at 20x (extrapolated) + one bag of {bag_shape}",
                statistics.median(slide_s),
                "s/slide",
                tuple(slide_s),
            ),
            Measurement(
                "mil_s_per_bag",
                "gated-attention MIL head, one bag",
                f"{head_shape}; bag {bag_shape}, {self.precision}",
                statistics.median(bag_s),
                "s/bag",
                tuple(bag_s),
            ),
            Measurement(
                "encoder_patches_per_s",
                "encoder inference",
                encoder_setting,
                statistics.median(1.0 / t for t in per_patch_s),
                "patches/s",
                tuple(1.0 / t for t in per_patch_s),
            ),
        ]


def environment(device: torch.device) -> dict[str, str]:
    """Device name and library versions for the report."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({torch.get_num_threads()} threads)"
    return {
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "cudnn": str(torch.backends.cudnn.version() or "none"),
    }


def _format_value(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.4g}"


def markdown_report(env: dict[str, str], rows: list[Measurement], tiny: bool) -> str:
    """The Markdown table with its header lines."""
    lines = [
        f"device: {env['device']}; torch {env['torch']}; CUDA {env['cuda']}; cuDNN {env['cudnn']}",
        f"standard slide: {SLIDE_LEVEL0_PX[0]} x {SLIDE_LEVEL0_PX[1]} px at "
        f"{SLIDE_LEVEL0_MPP} um/px, {TISSUE_FRACTION:.0%} tissue, cancer fraction "
        f"{CANCER_FRACTION}; synthetic uint8 patches already on the device (model compute)",
    ]
    if tiny:
        lines.append(
            "**tiny mode**: toy input sizes and models, few iterations; a smoke run "
            "whose numbers are not the GPU figures"
        )
    lines += ["", "| what | setting | value | unit |", "|---|---|---|---|"]
    lines += [
        f"| {row.what} | {row.setting} | {_format_value(row.value)} | {row.unit} |" for row in rows
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="GPU speed of the paper pipeline, an encoder + MIL, and training."
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--tiny", action="store_true", help="toy sizes (automatic when the device is not CUDA)"
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the figures here")
    parser.add_argument("--batch", type=int, help="paper-pipeline patches per forward pass")
    parser.add_argument("--train-batch", type=int, help="training patches per step")
    parser.add_argument("--encoder-batch", type=int, help="encoder patches per forward pass")
    parser.add_argument("--tta-views", type=int, default=8, help="dihedral views, 1-8")
    parser.add_argument("--warmup", type=int, help="untimed calls before each measurement")
    parser.add_argument("--repeats", type=int, help="timed repeats; the median is reported")
    parser.add_argument(
        "--seconds-per-measure", type=float, help="time budget of each measurement's repeats"
    )
    return parser


def _resolve(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> tuple[torch.device, Sizes, bool]:
    """(device, sizes, tiny) from the arguments; exits 2 on a bad one."""
    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError as error:
            parser.error(f"--device: {error}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available here")
    tiny = args.tiny or device.type != "cuda"
    if tiny and not args.tiny:
        _log(f"no CUDA device ({device}): running the tiny mode")
    if not 1 <= args.tta_views <= len(DIHEDRAL):
        parser.error(f"--tta-views must be 1 to {len(DIHEDRAL)}")
    base = TINY if tiny else FULL
    overrides = {
        "batch": args.batch,
        "train_batch": args.train_batch,
        "encoder_batch": args.encoder_batch,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "seconds_per_measure": args.seconds_per_measure,
    }
    for name, value in overrides.items():
        if value is None:
            continue
        flag = f"--{name.replace('_', '-')}"
        if name == "seconds_per_measure" and not (value > 0 and math.isfinite(value)):
            parser.error(f"{flag} must be a positive number of seconds")
        minimum = 0 if name == "warmup" else 1
        if value < minimum:
            parser.error(f"{flag} must be at least {minimum}")
    sizes = replace(base, **{name: v for name, v in overrides.items() if v is not None})
    return device, sizes, tiny


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark; prints the table on stdout, progress on stderr."""
    parser = _parser()
    args = parser.parse_args(argv)
    device, sizes, tiny = _resolve(args, parser)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    env = environment(device)
    _log(f"{env['device']}, torch {env['torch']}, CUDA {env['cuda']}; {sizes}")
    started = time.perf_counter()
    bench = Bench(device, sizes, args.tta_views, tiny)
    rows: list[Measurement] = []
    for measure in (bench.pipeline, bench.encoder_and_mil, bench.training):
        rows += measure()
        bench.release()
    _log(f"done in {time.perf_counter() - started:.1f} s")
    print(markdown_report(env, rows, tiny))
    if args.json is not None:
        payload = {
            **env,
            "tiny": tiny,
            "tta_views": args.tta_views,
            "sizes": asdict(sizes),
            "standard_slide": {
                "patches_512px_20x": STANDARD_SLIDE_PATCHES,
                "cancer_patches_20x": STANDARD_SLIDE_CANCER_PATCHES,
                "biomarker_patches_40x": STANDARD_SLIDE_BIOMARKER_PATCHES,
                "pipeline_patches": STANDARD_SLIDE_PIPELINE_PATCHES,
                "encoder_patches_224px_20x": STANDARD_SLIDE_ENCODER_PATCHES,
            },
            "measurements": {
                row.key: {
                    "what": row.what,
                    "setting": row.setting,
                    "value": row.value,
                    "unit": row.unit,
                    "repeats": list(row.repeats),
                }
                for row in rows
            },
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
