"""Run a command with TorchServe's keys in its environment (the flows container).

Token-authorized TorchServe writes fresh random keys to ``key_file.json`` each time
it starts, so they cannot come from ``.env``. This waits for the key file
($TORCHSERVE_KEY_FILE, shared read-only through the ``torchserve-keys`` volume), sets
``HISTOMARKER_TORCHSERVE_INFERENCE_TOKEN`` and ``..._MANAGEMENT_TOKEN`` unless they
are set already, and replaces itself with the command:

    python with_torchserve_keys.py histomarker flows serve
"""

from __future__ import annotations

import json
import os
import sys
import time

KEY_FILE = "/var/lib/torchserve/keys/key_file.json"
WAIT_S = 120.0


def read_keys(path: str) -> dict[str, str]:
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
            return {
                "HISTOMARKER_TORCHSERVE_INFERENCE_TOKEN": data["inference"]["key"],
                "HISTOMARKER_TORCHSERVE_MANAGEMENT_TOKEN": data["management"]["key"],
            }
        except (OSError, KeyError, TypeError, ValueError) as exc:
            if time.monotonic() > deadline:
                raise SystemExit(f"no TorchServe key file at {path} after {WAIT_S:.0f} s") from exc
            time.sleep(1.0)


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: with_torchserve_keys.py COMMAND [ARG...]")
    for name, value in read_keys(os.environ.get("TORCHSERVE_KEY_FILE", KEY_FILE)).items():
        os.environ.setdefault(name, value)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
