"""Nuclei by a small U-Net: nucleus foreground and distance maps, split by watershed.

The network sees the patch at a fixed working resolution (:data:`WORK_MPP`, 40x): a
20x patch is doubled first. Its first level is thin (8 channels) and sees every pixel,
so the thin gap between two touching nuclei survives, while the deeper levels carry
the context at a quarter of the pixels and less; that keeps a 512 px patch at 40x
cheap on a CPU. It predicts two maps per pixel:

- the probability that the pixel belongs to a nucleus;
- the distance to the nucleus' outline, divided by the largest such distance in the
  same nucleus (1 at each nucleus' centre, falling to 0 at its rim, 0 outside).

Both maps are brought back to the patch's own size, and nuclei are cut from the
foreground by a watershed over the distance map from markers where it is high: where
two nuclei touch the normalized distance drops to 0 whatever their sizes, so the
markers of touching nuclei stay apart (as in DIST and StarDist).

The weights ship in ``services/nuclei/weights/`` (see its model card); they are read
only from there (or a file the caller names), never downloaded. Training:
:mod:`services.nuclei.train_unet`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.segmentation import watershed
from torch import nn

from services.common.errors import FailedPrecondition, InvalidInput
from services.nuclei.segment import relabel_in_raster_order

#: Resolution the network works at, µm/px (40x).
WORK_MPP = 0.25
#: Channel widths of the encoder's levels.
WIDTHS = (8, 16, 32, 64, 128)
#: Input side multiple the levels need (one pooling between two levels).
SIDE_MULTIPLE = 2 ** (len(WIDTHS) - 1)
#: Per-channel mean and standard deviation of 8-bit RGB / 255 (typical H&E).
RGB_MEAN = (0.70, 0.55, 0.70)
RGB_STD = (0.16, 0.19, 0.14)
#: Largest hole inside a nucleus filled with it, µm² (a lumen is larger).
HOLE_MAX_UM2 = 20.0
#: The shipped weights.
WEIGHTS_PATH = Path(__file__).resolve().parent / "weights" / "nuclei_unet.pt"


@dataclass(frozen=True)
class WatershedParams:
    """How the network's maps become nuclei.

    Attributes:
        foreground: Least nucleus probability of a nucleus pixel (0-1).
        marker: Least normalized distance of a marker pixel (0-1): a nucleus' core.
        min_area_um2: Smallest nucleus kept, µm².
        min_marker_um2: Smallest marker, µm² (smaller cores are noise of the map).
    """

    foreground: float = 0.5
    marker: float = 0.45
    min_area_um2: float = 6.0
    min_marker_um2: float = 1.0


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Levels of two 3x3 convolutions (:data:`WIDTHS`), max-pool down, nearest
    up with skip connections; 3 RGB channels in, 2 maps out (nucleus logit,
    normalized distance)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.ModuleList()
        c_in = 3
        for width in WIDTHS:
            self.down.append(_block(c_in, width))
            c_in = width
        self.up = nn.ModuleList(
            _block(WIDTHS[i] + WIDTHS[i + 1], WIDTHS[i]) for i in range(len(WIDTHS) - 2, -1, -1)
        )
        self.head = nn.Conv2d(WIDTHS[0], 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, level in enumerate(self.down):
            if i:
                x = nn.functional.max_pool2d(x, 2)
            x = level(x)
            skips.append(x)
        for level, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = nn.functional.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = level(torch.cat([skip, x], dim=1))
        return self.head(x)


def build_unet() -> UNet:
    """The network with random weights."""
    return UNet()


class NucleiNet:
    """The trained network on one device, ready for batches of patches.

    Args:
        weights: A state dict file of :func:`build_unet`; the shipped one when None.
        device: ``cpu``, ``cuda``...; the GPU when there is one and None is given.

    Raises:
        FailedPrecondition: The weights file is missing or does not fit the network.
    """

    def __init__(self, weights: Path | None = None, device: str | None = None) -> None:
        path = Path(weights) if weights is not None else WEIGHTS_PATH
        if not path.is_file():
            raise FailedPrecondition(f"no nuclei model weights at {str(path)!r}")
        self.path = path
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = build_unet()
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0] if str(exc) else "keys differ"
            raise FailedPrecondition(
                f"{str(path)!r} does not fit the nuclei U-Net: {first}"
            ) from None
        self.model = _fused(model.eval()).to(self.device)
        self.model.to(memory_format=torch.channels_last)
        self._mean = torch.tensor(RGB_MEAN).view(1, 3, 1, 1).to(self.device)
        self._std = torch.tensor(RGB_STD).view(1, 3, 1, 1).to(self.device)

    def maps(self, rgbs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """(H, W, 2) float32 maps (nucleus probability, normalized distance) of RGB
        patches already at :data:`WORK_MPP`; patches of one size run as one batch."""
        out: list[np.ndarray | None] = [None] * len(rgbs)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, rgb in enumerate(rgbs):
            by_shape.setdefault(rgb.shape, []).append(i)
        with torch.inference_mode():
            for shape, members in by_shape.items():
                height, width = shape[:2]
                pad_h = -height % SIDE_MULTIPLE
                pad_w = -width % SIDE_MULTIPLE
                batch = np.stack([rgbs[i] for i in members])
                if pad_h or pad_w:
                    batch = np.pad(batch, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="reflect")
                x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float() / 255.0
                x = x.contiguous(memory_format=torch.channels_last)
                y = self.model((x - self._mean) / self._std)
                y = torch.stack([torch.sigmoid(y[:, 0]), y[:, 1].clamp(0, 1)], dim=-1)
                y = y[:, :height, :width].cpu().numpy()
                for i, maps in zip(members, y, strict=True):
                    out[i] = np.ascontiguousarray(maps, dtype=np.float32)
        return [m for m in out if m is not None]


def _fused(model: UNet) -> UNet:
    """The network for inference: each convolution and the batch norm after it folded
    into one convolution (same outputs, a quarter less work on a CPU)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for module in model.modules():
        if not isinstance(module, torch.nn.Sequential):
            continue
        layers = list(module)
        for i in range(len(layers) - 1):
            conv, norm = layers[i], layers[i + 1]
            if isinstance(conv, torch.nn.Conv2d) and isinstance(norm, torch.nn.BatchNorm2d):
                module[i] = fuse_conv_bn_eval(conv, norm)
                module[i + 1] = torch.nn.Identity()
    return model


_shared: dict[tuple[str, str], NucleiNet] = {}
_shared_lock = threading.Lock()


def shared_net(weights: Path | None = None, device: str | None = None) -> NucleiNet:
    """One loaded network per weights file and device for the whole process."""
    key = (str(weights or WEIGHTS_PATH), device or "")
    with _shared_lock:
        if key not in _shared:
            _shared[key] = NucleiNet(weights, device)
        return _shared[key]


def to_work_resolution(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """The patch resampled to :data:`WORK_MPP` (area averaging when shrinking)."""
    scale = mpp / WORK_MPP
    if abs(scale - 1.0) < 1e-3:
        return rgb
    height, width = rgb.shape[:2]
    size = (max(SIDE_MULTIPLE, round(width * scale)), max(SIDE_MULTIPLE, round(height * scale)))
    method = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(rgb, size, interpolation=method)


def labels_from_maps(
    maps: np.ndarray, shape: tuple[int, int], mpp: float, params: WatershedParams | None = None
) -> np.ndarray:
    """Nucleus instance labels of the patch's own size from the network's maps.

    Args:
        maps: (h, w, 2) maps at the working resolution.
        shape: (height, width) of the patch.
        mpp: The patch's resolution, µm/px.
        params: Thresholds; defaults when None.

    Returns:
        int32 (height, width) labels, 1..n in raster order of first pixel.
    """
    params = params or WatershedParams()
    height, width = shape
    if maps.shape[:2] != (height, width):
        maps = cv2.resize(maps, (width, height), interpolation=cv2.INTER_LINEAR)
    probability, distance = maps[..., 0], maps[..., 1]
    foreground = probability >= params.foreground
    px_per_um2 = 1.0 / (mpp * mpp)
    # A vesicular nucleus' pale centre can fall under the threshold: holes up to the
    # size of a small nucleus are flooded with their rim.
    filled = ndi.binary_fill_holes(foreground)
    holes = filled & ~foreground
    if holes.any():
        count, hole_labels = cv2.connectedComponents(holes.astype(np.uint8), connectivity=4)
        large = np.bincount(hole_labels.ravel(), minlength=count) > HOLE_MAX_UM2 * px_per_um2
        large[0] = False
        filled[large[hole_labels]] = False
    cores = (distance >= params.marker) & filled
    count, markers = cv2.connectedComponents(cores.astype(np.uint8), connectivity=8)
    if count > 1:
        sizes = np.bincount(markers.ravel(), minlength=count)
        small = sizes < params.min_marker_um2 * px_per_um2
        small[0] = False
        markers[small[markers]] = 0
    # Flood the foreground from the cores, downhill in distance; each nucleus grows
    # from one connected core, so it is one connected piece.
    labels = watershed(-distance, markers, mask=filled).astype(np.int32)
    # Foreground no core reached (a pale nucleus without a confident centre): its own
    # component is one nucleus when large enough.
    orphans = filled & (labels == 0)
    if orphans.any():
        extra_count, extra = cv2.connectedComponents(orphans.astype(np.uint8), connectivity=4)
        if extra_count > 1:
            labels = np.where(extra > 0, extra + int(labels.max()), labels).astype(np.int32)
    return _drop_small(labels, params.min_area_um2 * px_per_um2)


def _drop_small(labels: np.ndarray, min_px: float) -> np.ndarray:
    """Labels under ``min_px`` removed, the rest numbered 1..n in raster order of
    their first pixel."""
    count = int(labels.max()) + 1
    if count == 1:
        return labels
    small = np.bincount(labels.ravel(), minlength=count) < min_px
    small[0] = False
    return relabel_in_raster_order(np.where(small[labels], 0, labels))


def segment_unet(
    rgb: np.ndarray,
    mpp: float,
    params: WatershedParams | None = None,
    net: NucleiNet | None = None,
) -> np.ndarray:
    """Instance labels of one checked RGB patch (see :func:`segment_unet_batch`)."""
    return segment_unet_batch([rgb], [mpp], params, net)[0]


def segment_unet_batch(
    rgbs: Sequence[np.ndarray],
    mpps: Sequence[float],
    params: WatershedParams | None = None,
    net: NucleiNet | None = None,
) -> list[np.ndarray]:
    """Instance labels of checked RGB patches, the network run on them as batches.

    Raises:
        InvalidInput: Patches and resolutions differ in number.
        FailedPrecondition: The weights are missing or unreadable.
    """
    if len(rgbs) != len(mpps):
        raise InvalidInput(f"{len(rgbs)} patches but {len(mpps)} resolutions")
    net = net or shared_net()
    work = [to_work_resolution(rgb, mpp) for rgb, mpp in zip(rgbs, mpps, strict=True)]
    maps = net.maps(work)
    return [
        labels_from_maps(m, rgb.shape[:2], mpp, params)
        for m, rgb, mpp in zip(maps, rgbs, mpps, strict=True)
    ]
