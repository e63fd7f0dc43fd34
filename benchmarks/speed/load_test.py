"""Bounded load test of PredictionService.PredictSlide and TilingService.NormalizePatches.

Each service under test runs as its own process (``python -m services.cli serve
NAME``, as ``histomarker up`` starts it) on 127.0.0.1 with a free port, so its memory
is measured alone; the script starts and stops it (and, for PredictSlide, a real
TorchServe with seven random-weight models, as ``prediction_speed.py`` builds them).

Per concurrency level (1, 2, 4, 8 clients by default) the clients, each with its own
channel, share a fixed number of requests and send them back to back; a time cap
per level stops new requests (those not sent are reported), and every request has a
deadline, so a level lasts at most cap + deadline. A request refused with
RESOURCE_EXHAUSTED (PredictionService's admission queue: ``max_concurrent_predictions``
running + ``max_queued_predictions`` waiting) is retried by its client after a
back-off, as a well-behaved client does; refusals are counted apart from errors.

Reported per level: p50/p95/p99 latency of the successful requests, throughput
(requests/s, and patches/s for NormalizePatches) over the level's wall time, the
count of each gRPC status, and the service process's RSS before the level, its peak
(sampled every 50 ms during the level) and after it; for PredictSlide also
TorchServe's (all its processes summed).

- PredictSlide: synthetic ``tiny`` slides (4096x3072 px at 0.25 µm/px) in a
  file:// store, requests cycling over them; every 20x tissue patch kept as cancer
  (``cancer_confidence`` 0, the heaviest case).
- NormalizePatches: one stream per request with one message of ``--patches`` 512 px
  PNG patches (20x, from a tiny slide, the tissue-richest windows), Vahadane, the
  built-in reference inline and the slide's stain matrix as source (the
  TileSlide-then-normalize use), PNG out.

Run ``.venv/bin/python benchmarks/speed/load_test.py`` (``--help`` for options; ``--json
OUT`` also writes the figures for ``benchmarks/quality/reliability.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from services.common.grpc_client import open_channel
from services.common.processes import start_ticks, stop_group
from services.common.stubs.histomarker.v1 import (
    common_pb2,
    prediction_pb2,
    prediction_pb2_grpc,
    tiling_pb2,
    tiling_pb2_grpc,
)

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ("predict", "normalize")
REFUSED = "RESOURCE_EXHAUSTED"
PATCH_PX = 512
SAMPLE_S = 0.05
#: Process groups this run started (services, TorchServe): in the JSON, so a caller
#: can check that none is left.
STARTED_GROUPS: list[int] = []


def log(message: str) -> None:
    """Progress, on stderr (the tables go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- memory ----------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (``VmRSS``), 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssSampler:
    """Samples the summed RSS of some processes on a thread; keeps the peak.

    Args:
        pids: Returns the processes to sum (called at every sample).
        interval_s: Seconds between samples.
    """

    def __init__(self, pids: Callable[[], list[int]], interval_s: float = SAMPLE_S) -> None:
        self.pids = pids
        self.interval_s = interval_s
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def now(self) -> int:
        return sum(rss_bytes(pid) for pid in self.pids())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


# -- the service under test as a process -----------------------------------------------


class ServiceProcess:
    """``python -m services.cli serve NAME`` in its own session, on a free port.

    Args:
        name: ``tiling`` or ``prediction``.
        service: The gRPC service name its health status is kept under.
        env: ``HISTOMARKER_*`` settings (port and log level are added).
        log_path: Where its output goes.
    """

    def __init__(self, name: str, service: str, env: dict[str, str], log_path: Path) -> None:
        from services.common.processes import free_ports

        self.name = name
        self.service = service
        self.port = free_ports(1)[0]
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "HISTOMARKER_HOST": "127.0.0.1",
            "HISTOMARKER_PORT": str(self.port),
            "HISTOMARKER_LOG_LEVEL": "WARNING",
            **env,
        }
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.ticks: int | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout_s: float = 120.0) -> ServiceProcess:
        from services.apps.local_stack.stack import grpc_serving

        with self.log_path.open("ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "serve", self.name],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: stopped whole
            )
        self.ticks = start_ticks(self.process.pid)
        STARTED_GROUPS.append(self.process.pid)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited: {self._log_tail()}")
                if grpc_serving(self.target, self.service):
                    return self
                time.sleep(0.25)
            raise RuntimeError(
                f"{self.name} not serving after {timeout_s:.0f} s: {self._log_tail()}"
            )
        except BaseException:
            self.stop()
            raise

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is None:
            return
        stop_group(self.process.pid, self.ticks, 30.0)
        self.process.wait(timeout=10.0)
        self.process = None

    def _log_tail(self) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return " | ".join(lines[-5:])

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# -- one level -------------------------------------------------------------------------


@dataclass
class Attempt:
    """One call: its latency, gRPC status name and the patches it carried."""

    latency_s: float
    code: str
    patches: int = 0


@dataclass
class Level:
    """The outcome of one concurrency level."""

    target: str
    clients: int
    planned: int
    wall_s: float
    attempts: list[Attempt]
    not_sent: int
    rss_before_mb: float
    rss_peak_mb: float
    rss_after_mb: float
    rss_samples: int
    other_rss_mb: dict[str, float] = field(default_factory=dict)
    server_alive: bool = True

    def summary(self) -> dict[str, Any]:
        codes = Counter(a.code for a in self.attempts)
        ok = [a for a in self.attempts if a.code == "OK"]
        latencies = np.array([a.latency_s for a in ok]) if ok else np.array([np.nan])
        sent = len(self.attempts) - codes[REFUSED]  # requests admitted (or failed)
        errors = {code: n for code, n in codes.items() if code not in ("OK", REFUSED)}
        return {
            "target": self.target,
            "clients": self.clients,
            "planned": self.planned,
            "requests": sent,
            "ok": len(ok),
            "refused": codes[REFUSED],
            "errors": errors,
            "error_rate": sum(errors.values()) / sent if sent else 0.0,
            "refusal_rate": codes[REFUSED] / len(self.attempts) if self.attempts else 0.0,
            "not_sent": self.not_sent,
            "wall_s": self.wall_s,
            "p50_s": float(np.percentile(latencies, 50)),
            "p95_s": float(np.percentile(latencies, 95)),
            "p99_s": float(np.percentile(latencies, 99)),
            "requests_per_s": len(ok) / self.wall_s if self.wall_s else 0.0,
            "patches_per_s": sum(a.patches for a in ok) / self.wall_s if self.wall_s else 0.0,
            "rss_before_mb": self.rss_before_mb,
            "rss_peak_mb": self.rss_peak_mb,
            "rss_after_mb": self.rss_after_mb,
            "rss_samples": self.rss_samples,
            "other_rss_mb": self.other_rss_mb,
            "server_alive": self.server_alive,
        }


Call = Callable[[grpc.Channel, int], int]
"""Sends request number ``i`` over a channel; returns the patches it carried."""


def run_level(
    name: str,
    server: ServiceProcess,
    call: Call,
    clients: int,
    requests: int,
    time_cap_s: float,
    backoff_s: float,
    others: dict[str, Callable[[], list[int]]] | None = None,
) -> Level:
    """``clients`` threads share ``requests`` calls, back to back, until done or the cap.

    Args:
        name: What is called (for the report).
        server: The service under test; its RSS is sampled.
        call: One request.
        clients: Concurrent clients, each with its own channel.
        requests: Requests of the level (refused attempts retried, not counted).
        time_cap_s: No request starts after this many seconds.
        backoff_s: A client's wait after RESOURCE_EXHAUSTED before retrying.
        others: More process groups whose RSS is sampled (summed per entry).
    """
    lock = threading.Lock()
    attempts: list[Attempt] = []
    issued = 0
    cap = 0.0  # set when the level starts

    def take() -> int | None:
        nonlocal issued
        with lock:
            if issued >= requests or time.monotonic() >= cap:
                return None
            issued += 1
            return issued - 1

    def client() -> None:
        channel = open_channel(server.target)
        try:
            while (number := take()) is not None:
                while True:
                    begun = time.perf_counter()
                    try:
                        attempt = Attempt(0.0, "OK", call(channel, number))
                    except grpc.RpcError as exc:
                        attempt = Attempt(0.0, exc.code().name)
                    attempt.latency_s = time.perf_counter() - begun
                    with lock:
                        attempts.append(attempt)
                    if attempt.code != REFUSED or time.monotonic() >= cap:
                        break
                    time.sleep(backoff_s)
        finally:
            channel.close()

    def progress() -> None:
        while not finished.wait(10.0):
            with lock:
                done = sum(1 for a in attempts if a.code != REFUSED)
                refused = len(attempts) - done
            log(f"  {name} x{clients}: {done}/{requests} done, {refused} refused")

    samplers = {"service": RssSampler(lambda: [server.pid])}
    for label, pids in (others or {}).items():
        samplers[label] = RssSampler(pids)
    before = samplers["service"].now()
    finished = threading.Event()
    reporter = threading.Thread(target=progress, daemon=True)
    with ExitStack() as stack:
        for sampler in samplers.values():
            stack.enter_context(sampler)
        reporter.start()
        started = time.monotonic()
        cap = started + time_cap_s
        with ThreadPoolExecutor(clients) as pool:
            for future in [pool.submit(client) for _ in range(clients)]:
                future.result()
        wall = time.monotonic() - started
        finished.set()
    after = samplers["service"].now()
    mb = 1024 * 1024
    return Level(
        target=name,
        clients=clients,
        planned=requests,
        wall_s=wall,
        attempts=attempts,
        not_sent=requests - issued,
        rss_before_mb=before / mb,
        rss_peak_mb=samplers["service"].peak / mb,
        rss_after_mb=after / mb,
        rss_samples=samplers["service"].samples,
        other_rss_mb={label: s.peak / mb for label, s in samplers.items() if label != "service"},
        server_alive=server.alive(),
    )


# -- NormalizePatches ------------------------------------------------------------------


def tissue_patches(slide: Path, count: int) -> list[np.ndarray]:
    """The ``count`` 512 px windows of the slide's 20x level with the most tissue."""
    from services.slide.reader import open_slide

    with open_slide(slide) as reader:
        level = reader.best_level_for_downsample(2)
        width, height = reader.level_dimensions[level]
        scale = round(reader.level_downsamples[level])
        windows = [
            (x, y)
            for y in range(0, height - PATCH_PX + 1, PATCH_PX // 2)
            for x in range(0, width - PATCH_PX + 1, PATCH_PX // 2)
        ]
        scored = []
        for x, y in windows:
            rgb = reader.read_region(x * scale, y * scale, level, PATCH_PX, PATCH_PX)
            tissue = float((rgb.min(axis=2) < 200).mean())
            scored.append((tissue, rgb))
    scored.sort(key=lambda item: -item[0])
    return [rgb for _, rgb in scored[:count]]


def normalize_call(patches: list[np.ndarray], source: Any, timeout_s: float) -> tuple[Call, int]:
    """A NormalizePatches call of one message carrying every patch (PNG)."""
    from services.slide.stain import builtin_reference
    from services.tiling.server import stain_to_proto

    images = []
    for rgb in patches:
        ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        assert ok
        images.append(common_pb2.Image(data=png.tobytes(), format=common_pb2.IMAGE_FORMAT_PNG))
    message = tiling_pb2.NormalizePatchesRequest(
        images=images,
        method=tiling_pb2.STAIN_METHOD_VAHADANE,
        reference_matrix=stain_to_proto(builtin_reference("vahadane")),
        source_matrix=stain_to_proto(source),
    )
    size = message.ByteSize()

    def call(channel: grpc.Channel, _number: int) -> int:
        stub = tiling_pb2_grpc.TilingServiceStub(channel)
        answers = list(stub.NormalizePatches(iter([message]), timeout=timeout_s))
        if len(answers) != 1 or len(answers[0].images) != len(patches):
            raise RuntimeError("NormalizePatches answered the wrong number of images")
        return len(patches)

    return call, size


def load_normalize(args: argparse.Namespace, root: Path, slide: Path) -> list[dict[str, Any]]:
    from services.slide.reader import open_slide
    from services.slide.stain import get_normalizer
    from services.tiling.server import SERVICE_NAME

    patches = tissue_patches(slide, args.patches)
    with open_slide(slide) as reader:
        level = reader.best_level_for_downsample(8)
        source = get_normalizer("vahadane").stain_matrix_of(reader.read_level(level))
    call, size = normalize_call(patches, source, args.normalize_timeout_s)
    log(f"NormalizePatches: {len(patches)} patches of {PATCH_PX} px, {size / 1e6:.1f} MB a call")
    env = {
        "HISTOMARKER_STORE_URL": (root / "store").as_uri(),
        "HISTOMARKER_SLIDE_CACHE_DIR": str(root / "tiling-cache"),
    }
    rows = []
    with ServiceProcess("tiling", SERVICE_NAME, env, root / "tiling.log") as server:
        log(f"tiling service pid {server.pid} on {server.target}")
        warm = open_channel(server.target)
        try:
            call(warm, -1)
        finally:
            warm.close()
        for clients in args.levels:
            log(f"NormalizePatches, {clients} client(s), {args.normalize_requests} requests ...")
            level = run_level(
                "NormalizePatches",
                server,
                call,
                clients,
                args.normalize_requests,
                args.time_cap_s,
                args.backoff_s,
            )
            rows.append(level.summary())
            log(f"  done in {level.wall_s:.1f} s")
    return rows


# -- PredictSlide ----------------------------------------------------------------------


def _bundles(root: Path, backbone: str, input_px: int) -> dict[str, Path]:
    """The seven models with random weights (timing only)."""
    import torch

    from services.common.vocabulary import BIOMARKERS, CANCER_DETECTOR, model_name_of
    from services.inference.backbones import build_backbone
    from services.inference.bundle import ModelConfig, save_bundle
    from services.inference.preprocess import PreprocessConfig
    from services.inference.tta import TRANSFORM_NAMES

    bundles = {}
    for seed, name in enumerate([CANCER_DETECTOR, *(model_name_of(b) for b in BIOMARKERS)]):
        torch.manual_seed(seed)
        config = ModelConfig(
            name=name,
            version="1",
            backbone=backbone,
            class_names=("normal", "cancer") if name == CANCER_DETECTOR else ("neg", "pos"),
            preprocess=PreprocessConfig(input_px=input_px),
            tta=TRANSFORM_NAMES[:1],  # one view
        )
        model = build_backbone(backbone, 2, input_px=input_px)
        bundles[name] = save_bundle(root / name, model, config)
    return bundles


@contextmanager
def torchserve_with_models(args: argparse.Namespace, root: Path, store: Any) -> Iterator[Any]:
    """A TorchServe on free ports with the seven models registered and published."""
    from services.inference.archive import build_mar
    from services.inference.registry import publish_bundle
    from services.inference.torchserve import TorchServe, TorchServeConfig

    bundles = _bundles(root / "bundles", args.backbone, args.input_px)
    model_store = root / "model-store"
    with ThreadPoolExecutor(2) as pool:
        mars = list(pool.map(lambda b: build_mar(b, model_store), bundles.values()))
    for bundle, mar in zip(bundles.values(), mars, strict=True):
        publish_bundle(store, bundle, mar)
    config = TorchServeConfig.with_free_ports(model_store, root / "ts", token_auth=False)
    with TorchServe(config) as torchserve:
        assert torchserve.pid is not None
        STARTED_GROUPS.append(torchserve.pid)
        log(f"TorchServe pid {torchserve.pid}: registering {len(mars)} models ...")
        with ThreadPoolExecutor(len(mars)) as pool:
            list(pool.map(lambda m: torchserve.register(m), mars))
        yield torchserve


def predict_call(keys: list[str], cancer_confidence: float, timeout_s: float) -> Call:
    """A PredictSlide call of slide ``keys[i % len(keys)]``."""

    def call(channel: grpc.Channel, number: int) -> int:
        stub = prediction_pb2_grpc.PredictionServiceStub(channel)
        request = prediction_pb2.PredictSlideRequest(
            slide=common_pb2.SlideRef(object=common_pb2.ObjectRef(key=keys[number % len(keys)])),
            options=prediction_pb2.PredictionOptions(cancer_confidence=cancer_confidence),
        )
        answer = stub.PredictSlide(request, timeout=timeout_s)
        return int(answer.prediction.cancer_patch_count)

    return call


def load_predict(
    args: argparse.Namespace, root: Path, store: Any, keys: list[str]
) -> list[dict[str, Any]]:
    from services.prediction.server import SERVICE_NAME

    rows = []
    with torchserve_with_models(args, root, store) as torchserve:
        env = {
            "HISTOMARKER_STORE_URL": store.url,
            "HISTOMARKER_SLIDE_CACHE_DIR": str(root / "prediction-cache"),
            "HISTOMARKER_TORCHSERVE_GRPC_TARGET": torchserve.grpc_inference_target,
            "HISTOMARKER_TORCHSERVE_MANAGEMENT_URL": torchserve.management_url,
            "HISTOMARKER_MAX_CONCURRENT_PREDICTIONS": str(args.max_concurrent_predictions),
            "HISTOMARKER_MAX_QUEUED_PREDICTIONS": str(args.max_queued_predictions),
        }
        call = predict_call(keys, args.cancer_confidence, args.predict_timeout_s)
        ts_pids: Callable[[], list[int]] = torchserve.processes
        with ServiceProcess("prediction", SERVICE_NAME, env, root / "prediction.log") as server:
            log(f"prediction service pid {server.pid} on {server.target}; warm-up ...")
            warm = open_channel(server.target)
            try:
                call(warm, 0)
            finally:
                warm.close()
            for clients in args.levels:
                log(f"PredictSlide, {clients} client(s), {args.predict_requests} requests ...")
                level = run_level(
                    "PredictSlide",
                    server,
                    call,
                    clients,
                    args.predict_requests,
                    args.time_cap_s,
                    args.backoff_s,
                    others={"torchserve": ts_pids},
                )
                rows.append(level.summary())
                log(f"  done in {level.wall_s:.1f} s")
    return rows


# -- report ----------------------------------------------------------------------------


def _codes(row: dict[str, Any]) -> str:
    errors = row["errors"]
    return ", ".join(f"{code} {n}" for code, n in sorted(errors.items())) or "none"


def table(rows: list[dict[str, Any]]) -> str:
    """The figures as a Markdown table."""
    header = [
        "RPC",
        "clients",
        "requests (ok / sent / planned)",
        "p50 s",
        "p95 s",
        "p99 s",
        "requests/s",
        "patches/s",
        "refused (RESOURCE_EXHAUSTED)",
        "errors",
        "error rate",
        "service RSS before / peak / after MB",
        "TorchServe peak RSS MB",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        torchserve = row["other_rss_mb"].get("torchserve")
        patches = f"{row['patches_per_s']:.1f}" if row["target"] == "NormalizePatches" else "-"
        cells = [
            row["target"],
            str(row["clients"]),
            f"{row['ok']} / {row['requests']} / {row['planned']}",
            f"{row['p50_s']:.2f}",
            f"{row['p95_s']:.2f}",
            f"{row['p99_s']:.2f}",
            f"{row['requests_per_s']:.2f}",
            patches,
            f"{row['refused']} ({row['refusal_rate']:.0%} of attempts)",
            _codes(row) + ("" if row["server_alive"] else "; SERVER DIED"),
            f"{row['error_rate']:.1%}",
            f"{row['rss_before_mb']:.0f} / {row['rss_peak_mb']:.0f} / {row['rss_after_mb']:.0f}",
            f"{torchserve:.0f}" if torchserve is not None else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _levels(text: str) -> list[int]:
    levels = [int(part) for part in text.split(",") if part.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("levels must be positive integers, e.g. 1,2,4,8")
    return levels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(TARGETS), help="predict,normalize")
    parser.add_argument("--levels", type=_levels, default=[1, 2, 4, 8], help="clients per level")
    parser.add_argument("--predict-requests", type=int, default=12, help="per level")
    parser.add_argument("--normalize-requests", type=int, default=48, help="per level")
    parser.add_argument("--patches", type=int, default=16, help="patches per NormalizePatches")
    parser.add_argument("--time-cap-s", type=float, default=300.0, help="per level")
    parser.add_argument("--predict-timeout-s", type=float, default=600.0)
    parser.add_argument("--normalize-timeout-s", type=float, default=120.0)
    parser.add_argument("--backoff-s", type=float, default=2.0, help="after a refusal")
    parser.add_argument("--slides", type=int, default=4, help="tiny slides to cycle over")
    parser.add_argument("--backbone", default="resnet18", choices=("resnet18", "tiny"))
    parser.add_argument("--input-px", type=int, default=224, help="network input side")
    parser.add_argument("--cancer-confidence", type=float, default=0.0)
    parser.add_argument("--max-concurrent-predictions", type=int, default=2)
    parser.add_argument("--max-queued-predictions", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; choose from {TARGETS}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from services.common.objectstore import open_store
    from services.synth.cohort import generate_cohort

    started = time.time()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="load-test-") as scratch:
        root = Path(scratch)
        store = open_store((root / "store").as_uri())
        log(f"generating {args.slides} tiny slides ...")
        generate_cohort(root / "cohort", args.slides, seed=3, preset="tiny", truth_crops=0)
        manifest = pd.read_csv(root / "cohort" / "manifest.csv")
        paths = [root / "cohort" / p for p in manifest["slide_path"]]
        keys = []
        for path in paths:
            keys.append(f"slides/{path.name}")
            store.put_file(keys[-1], path)
        if "normalize" in args.targets:
            rows += load_normalize(args, root, paths[0])
        if "predict" in args.targets:
            rows += load_predict(args, root, store, keys)
    print(table(rows))
    if args.json is not None:
        figures = {
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
            "wall_s": time.time() - started,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "levels": rows,
            "process_groups": STARTED_GROUPS,
        }
        args.json.write_text(json.dumps(figures, indent=2))
    if any(not row["server_alive"] for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
