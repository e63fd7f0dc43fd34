"""Region-read speed: OpenSlide, our tifffile fast path, TIAToolbox's TIFF reader.

Reads the same 512x512 regions at level 1 (20x from a 40x slide) at random tissue
positions of a synthetic slide (small preset unless ``--preset``/``--slide``) with
three readers, each on one CPU core, and prints patches per second side by side:

- ``openslide`` and ``tifffile`` (ours), both through
  ``services.slide.reader.open_slide(path, backend=...)``, in this process pinned
  to ``--core``;
- ``tiatoolbox``: ``tiatoolbox.wsicore.wsireader.TIFFWSIReader`` in a child process
  run by the Python of a separate venv (TIAToolbox pins an older torch; make it
  with ``bash benchmarks/speed/tiatoolbox_venv.sh``), pinned to the same core, once as
  shipped (with its decoded-tile cache) and once with that cache bypassed. Without
  that venv these rows are skipped with a one-line note.

Each reader reads the list once from a fresh reader (timed as the first pass; those
patches are kept and compared with ours pixel by pixel), then is timed over
``--repeats`` more passes, where readers with a decoded-tile cache (ours, and
TIAToolbox as shipped) decode nothing again. Run:

    .venv/bin/python benchmarks/speed/read_speed.py [--patches 300] [--slide PATH]

TIAToolbox's ``TIFFWSIReader`` only opens SVS, OME, BigTIFF or single-page tiled
TIFFs, and the synthetic generator writes classic TIFF below 2 GiB of raw pixels,
so the slide made here is forced to BigTIFF (same tiles, same pixels; OpenSlide and
ours read BigTIFF too).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

PATCH_PX = 512
LEVEL = 1
ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TIA_PYTHON = ROOT / ".venv-tiatoolbox" / "bin" / "python"


def tissue_positions(path: Path, count: int, seed: int) -> list[tuple[int, int]]:
    """Level-0 (x, y) of level-1 patches whose centre lies on tissue."""
    from services.slide.reader import open_slide

    with open_slide(path) as reader:
        thumb_level = reader.level_count - 1
        thumb = reader.read_level(thumb_level).astype(np.int16)
        downsample = reader.level_downsamples[thumb_level]
        width0, height0 = reader.dimensions
    # Tissue: not near-white and somewhat coloured (H&E).
    tissue = (thumb.min(axis=2) < 215) & (np.ptp(thumb, axis=2) > 15)
    rows, cols = np.nonzero(tissue)
    if rows.size == 0:
        raise SystemExit("no tissue found on the slide")
    rng = np.random.default_rng(seed)
    footprint0 = PATCH_PX * 2**LEVEL
    picks = rng.integers(0, rows.size, count)
    positions = []
    for pick in picks:
        x = int(cols[pick] * downsample) - footprint0 // 2
        y = int(rows[pick] * downsample) - footprint0 // 2
        # Level-aligned, inside the slide.
        x = min(max(x, 0), width0 - footprint0) // 2**LEVEL * 2**LEVEL
        y = min(max(y, 0), height0 - footprint0) // 2**LEVEL * 2**LEVEL
        positions.append((x, y))
    return positions


def time_backend(
    path: Path, backend: str, positions: list[tuple[int, int]], repeats: int
) -> tuple[float, float, list[np.ndarray]]:
    """Patches per second on the first (cold) pass and over ``repeats`` more passes,
    and the first pass's patches."""
    from services.slide.reader import open_slide

    with open_slide(path, backend=backend) as reader:
        started = time.perf_counter()
        patches = [reader.read_region(x, y, LEVEL, PATCH_PX, PATCH_PX) for x, y in positions]
        cold = len(positions) / (time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(repeats):
            for x, y in positions:
                reader.read_region(x, y, LEVEL, PATCH_PX, PATCH_PX)
        elapsed = time.perf_counter() - started
    return cold, repeats * len(positions) / elapsed, patches


def tiatoolbox_child(work: Path, slide: Path, repeats: int, core: int) -> None:
    """Runs under TIAToolbox's venv: time TIFFWSIReader on work/positions.npy.

    Two variants, each with a fresh reader: ``cached`` is the reader as shipped
    (its zarr ``CacheStore`` keeps up to 256 MiB of *decoded* tiles, so a tile read
    again is not decoded again); ``uncached`` reads through the same tifffile zarr
    store with that cache left out (every read decodes its tiles, as ours and
    OpenSlide past its 32 MiB tile cache do). Writes each variant's first-pass
    patches to work/<variant>.npy and prints ``{"rates": {...}, "version": ...}``
    as the last line of stdout. Imports nothing of histomarker (its venv has only
    TIAToolbox's reader dependencies).
    """
    os.sched_setaffinity(0, {core})
    import tiatoolbox
    import zarr
    from tiatoolbox.wsicore.wsireader import TIFFWSIReader
    from tiatoolbox.wsicore.wsireader.base import ArrayView, TIFFWSIReaderDelegate

    positions = [(int(x), int(y)) for x, y in np.load(work / "positions.npy")]
    size = (PATCH_PX, PATCH_PX)
    rates = {}
    cold_rates = {}
    for variant in ("cached", "uncached"):
        reader = TIFFWSIReader(slide)
        if variant == "uncached":
            # Benchmark-only: the level arrays straight on tifffile's zarr store,
            # as the constructor builds them but without its CacheStore.
            group = zarr.open(reader._zarr_store, mode="r")
            reader.level_arrays = {
                int(key): ArrayView(array, axes=reader._axes)
                for key, array in sorted(group.members(), key=lambda item: int(item[0]))
            }
            reader.tiff_reader_delegate = TIFFWSIReaderDelegate(reader, reader.level_arrays)
        # Level 1 is 20x: the slide's own level-1 mpp (0.5 for a 0.25 µm/px slide).
        mpp = float(reader.info.mpp[0]) * reader.info.level_downsamples[LEVEL]

        def read(x: int, y: int, reader: TIFFWSIReader = reader, mpp: float = mpp) -> np.ndarray:
            # read_rect takes the top-left in baseline (level-0) pixels and the
            # output size at the requested resolution: the same contract as our
            # read_region(x, y, level, w, h). units="mpp" at the level's exact mpp
            # is how a pipeline asks for 20x; TIAToolbox then picks level 1 with a
            # scale of exactly 1, reads it at (x / 2, y / 2) and does no
            # resampling, so the pixels can be compared with ours exactly.
            # (read_bounds would take baseline bounds and give the same patch;
            # units="level", resolution=1 gives the same pixels too, but is not
            # how callers ask for a magnification.)
            return reader.read_rect((x, y), size, resolution=mpp, units="mpp")

        patches = np.lib.format.open_memmap(
            work / f"{variant}.npy", mode="w+", dtype=np.uint8, shape=(len(positions), *size, 3)
        )
        started = time.perf_counter()
        for i, (x, y) in enumerate(positions):
            patches[i] = read(x, y)
        cold_rates[variant] = len(positions) / (time.perf_counter() - started)
        patches.flush()
        del patches
        started = time.perf_counter()
        for _ in range(repeats):
            for x, y in positions:
                read(x, y)
        rates[variant] = repeats * len(positions) / (time.perf_counter() - started)
        reader.tiff.close()
    print(json.dumps({"rates": rates, "cold": cold_rates, "version": tiatoolbox.__version__}))


def time_tiatoolbox(
    python: Path, path: Path, positions: list[tuple[int, int]], repeats: int, core: int
) -> tuple[dict[str, tuple[float, float, np.ndarray]], str] | str:
    """{variant: (cold patches/s, repeat patches/s, first-pass patches)} and version
    from the child, or why not."""
    if not python.exists():
        return f"no TIAToolbox venv at {python} (make it: bash benchmarks/speed/tiatoolbox_venv.sh)"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        np.save(work / "positions.npy", np.asarray(positions, dtype=np.int64))
        command = [
            str(python),
            str(Path(__file__).resolve()),
            "--tiatoolbox-child",
            str(work),
            "--slide",
            str(path),
            "--repeats",
            str(repeats),
            "--core",
            str(core),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
            hint = " (it opens SVS, OME, BigTIFF or one-page tiled TIFF)"
            unsupported = "Unsupported TIFF WSI format" in lines[-1]
            return f"TIAToolbox child failed: {lines[-1]}" + (hint if unsupported else "")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        variants = {
            variant: (float(result["cold"][variant]), float(rate), np.load(work / f"{variant}.npy"))
            for variant, rate in result["rates"].items()
        }
    return variants, str(result["version"])


def diff_stats(ours: list[np.ndarray], other: list[np.ndarray] | np.ndarray) -> tuple[int, float]:
    """Max and mean absolute pixel difference over all patches."""
    diffs = [
        np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in zip(ours, other, strict=True)
    ]
    return max(int(d.max()) for d in diffs), float(np.mean([d.mean() for d in diffs]))


def run(
    path: Path, count: int, repeats: int, seed: int, core: int, tia_python: Path | None
) -> None:
    positions = tissue_positions(path, count, seed)
    rates: dict[str, float] = {}
    cold: dict[str, float] = {}
    patches: dict[str, list[np.ndarray]] = {}
    for backend in ("openslide", "tifffile"):
        cold[backend], rates[backend], patches[backend] = time_backend(
            path, backend, positions, repeats
        )
    ours = patches["tifffile"]
    diffs = {"openslide": diff_stats(ours, patches["openslide"])}
    labels = {
        "openslide": "openslide",
        "tifffile": "tifffile (ours, `auto` picks it for TIFF pyramids)",
    }
    note = None
    if tia_python is None:
        note = "TIAToolbox skipped (--tiatoolbox-python '')"
    else:
        tia = time_tiatoolbox(tia_python, path, positions, repeats, core)
        if isinstance(tia, str):
            note = tia
        else:
            variants, version = tia
            for variant, (cold_rate, rate, tia_patches) in variants.items():
                key = f"tiatoolbox-{variant}"
                rates[key] = rate
                cold[key] = cold_rate
                diffs[key] = diff_stats(ours, tia_patches)
                cache = (
                    "as shipped: 256 MiB decoded-tile cache"
                    if variant == "cached"
                    else "its tile cache bypassed"
                )
                labels[key] = f"TIAToolbox {version} `TIFFWSIReader.read_rect`, {cache}"
    print(f"slide {path.name}, {len(positions)} patches x {repeats} passes, one core")
    print(
        "| reader | first pass, patches/s | repeat passes, patches/s | repeat vs OpenSlide "
        "| max abs diff to ours | mean abs diff to ours |"
    )
    print("|---|---|---|---|---|---|")
    base = rates["openslide"]
    for backend, rate in rates.items():
        diff_max, diff_mean = diffs.get(backend, (0, 0.0))
        print(
            f"| {labels[backend]} | {cold[backend]:.1f} | {rate:.1f} | {rate / base:.2f}x "
            f"| {diff_max} | {diff_mean:.4f} |"
        )
    for key in ("tiatoolbox-cached", "tiatoolbox-uncached"):
        if key in rates:
            for name, table in (("first pass", cold), ("repeat passes", rates)):
                ratio = table["tifffile"] / table[key]
                verdict = "met" if ratio >= 1 else "NOT met"
                print(f"ours / {key}, {name}: {ratio:.2f}x (target >= 1.00x: {verdict})")
    if note:
        print(note)


def make_slide(folder: str, preset: str) -> Path:
    """One synthetic cancer slide of the preset, written as BigTIFF (see above)."""
    import services.synth.pyramid as pyramid
    from services.synth.cohort import generate_cohort

    # Benchmark-only: BigTIFF at any size, so TIAToolbox's TIFFWSIReader accepts it.
    pyramid._BIGTIFF_RAW_BYTES = 0
    generate_cohort(folder, 1, 0, preset)
    (slide,) = sorted((Path(folder) / "slides").glob("*.tiff"))
    return slide


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patches", type=int, default=300, help="distinct tissue patches")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes over them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--core", type=int, default=0, help="CPU core to pin to")
    parser.add_argument("--slide", type=Path, help="an existing slide (else a synth one)")
    parser.add_argument(
        "--preset", default="small", help="synth preset when no --slide (default small)"
    )
    parser.add_argument(
        "--tiatoolbox-python",
        default=str(DEFAULT_TIA_PYTHON),
        help="Python of the TIAToolbox venv ('' to skip; default %(default)s)",
    )
    parser.add_argument("--tiatoolbox-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiatoolbox_child is not None:
        tiatoolbox_child(args.tiatoolbox_child, args.slide, args.repeats, args.core)
        return
    os.sched_setaffinity(0, {args.core})
    tia_python = Path(args.tiatoolbox_python) if args.tiatoolbox_python else None
    if args.slide is not None:
        run(args.slide, args.patches, args.repeats, args.seed, args.core, tia_python)
        return
    with tempfile.TemporaryDirectory() as tmp:
        slide = make_slide(tmp, args.preset)
        run(slide, args.patches, args.repeats, args.seed, args.core, tia_python)


if __name__ == "__main__":
    main()
