"""The spread of the demo's held-out table over synthetic cohorts.

``histomarker demo`` trains and judges on one cohort (seed 0). This script runs the
same demo, settings unchanged, on the cohorts of other seeds, one after the other
(each in a process of its own, outputs in ``OUT/seed-N/``), and prints the held-out
slide AUROC of every task per seed, with the mean, the lowest and the highest:

    .venv/bin/python benchmarks/recipes/demo_seeds.py --out demo-seeds --seeds 0 1 2

A seed whose ``results.json`` is already in ``OUT/seed-N/`` is read, not run again
(``--rerun`` runs it anyway), so the seeds can be run in several sittings. About 22
minutes a seed on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TASKS = ("cancer", "tp53", "pik3ca", "er", "pr", "her2", "basal")


def run_seed(out: Path, seed: int) -> dict:
    """The demo on cohort ``seed`` in a child process; its results.json."""
    folder = out / f"seed-{seed}"
    code = (
        "import sys; from services.apps.demo import run_demo; "
        f"r = run_demo({str(folder)!r}, progress=True, cohort_seed={seed}); "
        "sys.exit(0 if r['ok'] else 1)"
    )
    began = time.perf_counter()
    log = out / f"seed-{seed}.log"
    with open(log, "w") as stream:
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, stderr=stream)
    if done.returncode != 0:
        raise SystemExit(f"seed {seed}: the demo failed (exit {done.returncode}); see {log}")
    print(f"seed {seed}: {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    return json.loads((folder / "results.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo-seeds"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rerun", action="store_true", help="run seeds with results again")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tables: dict[int, dict[str, float]] = {}
    runs: dict[int, str] = {}
    for seed in args.seeds:
        stored = args.out / f"seed-{seed}" / "results.json"
        document = (
            json.loads(stored.read_text())
            if stored.is_file() and not args.rerun
            else run_seed(args.out, seed)
        )
        if document["config"]["cohort_seed"] != seed:
            raise SystemExit(f"{stored} is of cohort seed {document['config']['cohort_seed']}")
        tables[seed] = {r["task"]: float(r["auroc"]) for r in document["results"]}
        runs[seed] = document["run_id"]
    print("| cohort seed | run | " + " | ".join(TASKS) + " |")
    print("|---|---|" + "---|" * len(TASKS))
    for seed, table in tables.items():
        cells = [f"{table.get(t, math.nan):.4f}" for t in TASKS]
        print(f"| {seed} | `{runs[seed]}` | " + " | ".join(cells) + " |")
    for name, pick in (("mean", lambda v: sum(v) / len(v)), ("lowest", min), ("highest", max)):
        cells = []
        for task in TASKS:
            values = [t[task] for t in tables.values() if math.isfinite(t.get(task, math.nan))]
            cells.append(f"{pick(values):.4f}" if values else "n/a")
        print(f"| {name} | | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
