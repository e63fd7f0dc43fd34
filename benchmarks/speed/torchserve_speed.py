"""Patches/s of one model in-process and through TorchServe (REST and gRPC), one run.

The same ResNet-18 bundle (224 px input) and the same PNG patches go through:

- in-process, model only: uint8 arrays -> ``to_input`` -> calibrated TTA probabilities
  in batches of ``--batch``;
- in-process, handler pipeline: the handler's pure functions on the PNG bytes (decode,
  preprocess, predict, outputs) in batches of ``--batch``;
- TorchServe REST and gRPC, one patch per request from ``--clients`` concurrent
  clients, with TorchServe batching ``--batch`` requests into one handler call;
- TorchServe REST with ``--batch`` patches in one request (a ``.npy`` array).

Overhead is the relative loss of patches/s against the in-process model. Run
``.venv/bin/python benchmarks/speed/torchserve_speed.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from services.common.vocabulary import CANCER_DETECTOR
from services.inference.archive import build_mar
from services.inference.backbones import build_backbone
from services.inference.bundle import ModelConfig, load_bundle, save_bundle
from services.inference.preprocess import PreprocessConfig
from services.inference.serving_io import (
    decode_item,
    encode_npy,
    patch_outputs,
    predict,
    to_batch,
)
from services.inference.torchserve import TorchServe, TorchServeConfig
from services.inference.tta import TRANSFORM_NAMES


def _png(patch: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(patch).save(buffer, "PNG")
    return buffer.getvalue()


def _patches(count: int, side: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth, tissue-like random patches (PNG compresses them as it would tissue)."""
    rng = np.random.default_rng(seed)
    patches = []
    for _ in range(count):
        low = rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)
        image = Image.fromarray(low).resize((side, side), Image.Resampling.BICUBIC)
        noise = rng.integers(-8, 9, (side, side, 3))
        patches.append(np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8))
    return patches


def _interleaved_rates(
    count: int, paths: dict[str, Callable[[], object]], repeats: int
) -> dict[str, float]:
    """Patches/s of each path: the best of ``repeats`` rounds after a warm-up round.

    Rounds interleave the paths, so a change in the machine's load hits every path
    alike instead of favouring whichever ran at a quiet moment.
    """
    best = dict.fromkeys(paths, float("inf"))
    for round_index in range(repeats + 1):
        for name, run in paths.items():
            start = time.perf_counter()
            run()
            if round_index:
                best[name] = min(best[name], time.perf_counter() - start)
    return {name: count / seconds for name, seconds in best.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=256, help="patches per timed run")
    parser.add_argument("--batch", type=int, default=16, help="batch size everywhere")
    parser.add_argument("--px", type=int, default=224, help="patch and input side, px")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--delay-ms", type=int, default=20, help="TorchServe max_batch_delay")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best counts")
    parser.add_argument("--tta", type=int, default=1, choices=(1, 8), help="TTA views")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = ModelConfig(
        name=CANCER_DETECTOR,
        version="1",
        backbone="resnet18",
        class_names=("normal", "cancer"),
        preprocess=PreprocessConfig(input_px=args.px),
        temperature=1.5,
        tta=TRANSFORM_NAMES[: args.tta],
    )
    patches = _patches(args.patches, args.px)
    pngs = [_png(p) for p in patches]
    batches = [np.stack(patches[i : i + args.batch]) for i in range(0, len(patches), args.batch)]
    with tempfile.TemporaryDirectory(prefix="torchserve-speed-") as scratch:
        root = Path(scratch)
        bundle = save_bundle(
            root / "bundle", build_backbone("resnet18", 2, input_px=args.px), config
        )
        model, loaded = load_bundle(bundle)
        mar = build_mar(bundle, root / "store")
        ts_config = TorchServeConfig.with_free_ports(root / "store", root / "work")
        npys = [encode_npy(batch) for batch in batches]
        with (
            TorchServe(ts_config) as server,
            ThreadPoolExecutor(args.clients) as pool,
            server.grpc_client() as grpc_client,
        ):
            server.register(
                mar, batch_size=args.batch, max_batch_delay_ms=args.delay_ms, initial_workers=1
            )

            def in_process_model() -> None:
                for batch in batches:
                    predict(model, to_batch([batch], loaded), loaded)

            def in_process_handler() -> None:
                for i in range(0, len(pngs), args.batch):
                    arrays = [decode_item(png) for png in pngs[i : i + args.batch]]
                    probabilities, logits = predict(model, to_batch(arrays, loaded), loaded)
                    patch_outputs(probabilities, logits, loaded)

            def rest_single() -> None:
                list(pool.map(lambda png: server.predict_rest(config.name, png), pngs))

            def grpc_single() -> None:
                list(pool.map(lambda png: grpc_client.predict(config.name, png), pngs))

            def rest_batched() -> None:
                list(pool.map(lambda npy: server.predict_rest(config.name, npy), npys))

            label = f"{args.clients} clients, 1 patch/request, TorchServe batch {args.batch}"
            paths: dict[str, Callable[[], object]] = {
                "in-process, model only (uint8 arrays)": in_process_model,
                "in-process, handler pipeline (PNG decode)": in_process_handler,
                f"TorchServe REST, {label}": rest_single,
                f"TorchServe gRPC, {label}": grpc_single,
                f"TorchServe REST, {args.batch} patches/request (.npy)": rest_batched,
            }
            rates = _interleaved_rates(len(patches), paths, args.repeats)
            time.sleep(1.0)  # TorchServe writes its metrics log asynchronously
            calls = _handler_calls(ts_config.log_dir)
            requests = (args.repeats + 1) * (2 * len(pngs) + len(npys))
    rows = list(rates.items())
    baseline = rows[0][1]
    print(
        f"resnet18, {args.px} px, TTA {args.tta}, T=1.5, batch {args.batch}, "
        f"{args.patches} patches, best of {args.repeats}; torch threads "
        f"{torch.get_num_threads()}"
    )
    print()
    print("| path | patches/s | overhead vs in-process model |")
    print("|---|---|---|")
    for name, rate in rows:
        overhead = "-" if name == rows[0][0] else f"{100 * (1 - rate / baseline):+.1f}%"
        print(f"| {name} | {rate:.1f} | {overhead} |")
    if calls:
        print()
        print(
            f"TorchServe handled {requests} requests in {calls} handler calls "
            f"({requests / calls:.1f} per call; batch size {args.batch})"
        )
    return 0


def _handler_calls(log_dir: Path) -> int:
    """Handler calls so far: TorchServe logs one HandlerTime metric per call."""
    path = log_dir / "model_metrics.log"
    if not path.is_file():
        return 0
    return sum("HandlerTime.ms:" in line for line in path.read_text(errors="replace").splitlines())


if __name__ == "__main__":
    sys.exit(main())
