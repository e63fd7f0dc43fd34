"""``histomarker demo``: the whole method on one machine, stage by stage.

Synthetic cohort -> tiling -> training -> serving -> prediction -> report. Each stage
runs when its implementation has landed; the others are listed with the issue that
brings them, so the demo always says exactly how much of the system it exercised.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.grpc_client import open_channel
from services.common.objectstore import open_store
from services.common.settings import ServiceSettings

SERVICES = ("tiling", "nuclei", "analysis", "prediction")


@dataclass(frozen=True)
class PlannedStage:
    """A stage of the demo whose implementation arrives with a later issue."""

    name: str
    issue: int


PLANNED = (
    PlannedStage("calibrated slide predictions over gRPC", 9),
    PlannedStage(
        "training the cancer detector and the six biomarker models on the demo cohort, "
        "serving them on TorchServe, and the analysis report (Prefect flows)",
        10,
    ),
)


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, flush=True)


def _check_store(store_url: str) -> dict[str, Any]:
    store = open_store(store_url)
    key = f"runs/demo-check/{time.time_ns()}.txt"
    payload = b"histomarker object store check\n"
    written = store.put_bytes(key, payload)
    ok = store.get_bytes(key) == payload and store.stat(key).sha256 == written.sha256
    store.delete(key)
    return {"url": store_url, "round_trip": ok}


def _synth_cohort(folder: Path, progress: bool) -> dict[str, Any]:
    from services.synth.cohort import generate_cohort

    summary = generate_cohort(
        folder, n_slides=4, seed=0, preset="tiny", progress=progress, overwrite=True
    )
    return {key: summary[key] for key in ("manifest", "slides", "cancer", "normal")}


def _tile_first_cancer_slide(cohort: Path, store_url: str) -> dict[str, Any]:
    import csv
    import io

    import pandas as pd

    from services.tiling.highres import extract_40x
    from services.tiling.pipeline import tile_slide
    from services.tiling.reader import open_slide

    with (cohort / "manifest.csv").open() as handle:
        row = next(r for r in csv.DictReader(handle) if r["kind"] == "cancer")
    store = open_store(store_url)
    prefix = f"tiles/{row['slide_id']}/demo"
    with open_slide(cohort / row["slide_path"]) as reader:
        result = tile_slide(reader, row["slide_id"], store, prefix)
        grid = pd.read_parquet(io.BytesIO(store.get_bytes(f"{prefix}/grid.parquet")))
        # The 40x step on a few 20x patches, the way the cancer patches get it.
        chosen = [(int(r.x), int(r.y), float(r.width)) for r in grid.head(4).itertuples()]
        high = extract_40x(reader, store, prefix, chosen) if chosen else None
    nuclei = _nuclei_of_first_40x_patch(store, high.shards[0]) if high else {}
    return {
        "nuclei_40x": nuclei,
        "slide_id": result.slide_id,
        "status": result.status,
        "patches": result.patch_count,
        "grid": f"{prefix}/grid.parquet",
        "patches_40x": high.patch_count if high else 0,
        "source_40x": high.source.value if high else "",
    }


def _nuclei_of_first_40x_patch(store: Any, shard_key: str) -> dict[str, Any]:
    """Nuclei and the 75 features of one 40x patch, as the feature analysis sees it."""
    from services.nuclei.pipeline import analyze_patch
    from services.tiling.shards import iter_shard

    member, rgb = next(iter_shard(store, shard_key))
    analysis = analyze_patch(rgb, 0.25)
    features = analysis.features.as_dict()
    return {
        "patch": member,
        "nuclei": analysis.features.nucleus_count,
        "morph.area.mean_um2": round(features["morph.area.mean"], 1),
    }


def _check_services() -> dict[str, str]:
    statuses: dict[str, str] = {}
    for name in SERVICES:
        module = importlib.import_module(f"services.{name}.server")
        settings = ServiceSettings(service_name=name, port=0)
        server, port = module.create(settings)
        server.start()
        channel = open_channel(f"127.0.0.1:{port}")
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=module.SERVICE_NAME), timeout=10
            )
            statuses[module.SERVICE_NAME] = health_pb2.HealthCheckResponse.ServingStatus.Name(
                reply.status
            )
        except grpc.RpcError as exc:
            statuses[module.SERVICE_NAME] = f"error: {exc.code().name}"
        finally:
            channel.close()
            server.stop(0).wait()
    return statuses


def run_demo(out_dir: str | Path = "demo-out", progress: bool = True) -> dict[str, Any]:
    """Run every stage of the demo that exists and report the rest as missing.

    Args:
        out_dir: Folder for the demo's outputs (created).
        progress: Print a line per stage as it runs.

    Returns:
        What ran, what it measured, and which stages are still missing.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store_url = (out / "store").resolve().as_uri()
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("synthetic cohort", lambda: _synth_cohort(out / "cohort", progress)),
        ("tiling", lambda: _tile_first_cancer_slide(out / "cohort", store_url)),
        ("object store", lambda: _check_store(store_url)),
        ("gRPC services (health)", _check_services),
    ]
    ran: dict[str, Any] = {}
    for index, (name, step) in enumerate(steps, start=1):
        _say(progress, f"[{index}/{len(steps)}] {name} ...")
        started = time.perf_counter()
        ran[name] = step()
        _say(progress, f"      done in {time.perf_counter() - started:.1f} s: {ran[name]}")
    missing = [f"{stage.name} (issue #{stage.issue})" for stage in PLANNED]
    if missing:
        _say(progress, "still missing: " + "; ".join(missing))
    ok = ran["synthetic cohort"]["slides"] == 4 and bool(ran["object store"]["round_trip"])
    ok = ok and ran["tiling"]["status"] == "ok"
    ok = ok and all(status == "SERVING" for status in ran["gRPC services (health)"].values())
    return {"ok": ok, "ran": ran, "missing": missing, "out_dir": str(out)}
