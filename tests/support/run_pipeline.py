"""Run ``train_pipeline`` in a process of its own (for tests that compare runs).

    python tests/support/run_pipeline.py MANIFEST COHORT CONFIG.json RESULT.json

The flow's settings come from the environment (``HISTOMARKER_*``, ``PREFECT_API_URL``);
the result is written as JSON.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from flows.training.config import PipelineConfig
    from flows.training.pipeline import train_pipeline

    manifest, cohort, config_path, result_path = argv
    config = PipelineConfig.model_validate_json(Path(config_path).read_text())
    result = train_pipeline(manifest, cohort, config)
    Path(result_path).write_text(result.model_dump_json())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
