"""``histomarker mil publish MODEL --weights FILE``: a trained head and its encoder
into the object store, ready for ``histomarker models deploy``.

The head (a ``mil train`` model file) names the encoder whose embeddings it reads
and that encoder's weights digest; the weights file given must be that file (the
same sha256), or the command stops before writing anything. Both archives are built
(``encoder_<name>.mar``, ``mil_<name>.mar``) and published under
``models/{model}/{version}/`` with their cards; the versions are the first 12 hex
digits of the weights' and the model file's sha256 unless ``--version`` is given.
The answer lists the two ``histomarker models deploy`` commands that serve them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from services.common.errors import InvalidInput
from services.common.settings import ServiceSettings


def run_publish(args: argparse.Namespace) -> dict[str, Any]:
    """Run the subcommand (module docstring)."""
    from services.common.objectstore import open_store
    from services.encoders.weights_files import file_sha256, require_file
    from services.mil.archive import publish_head_and_encoder
    from services.mil.model import FittedMIL

    model_path = Path(args.model)
    weights = Path(args.weights)
    require_file(weights)
    model = FittedMIL.load(model_path)
    if model.encoder is None:
        raise InvalidInput(f"{model_path} names no encoder; train it with histomarker mil train")
    digest = file_sha256(weights)
    if model.encoder_sha256 and digest != model.encoder_sha256:
        raise InvalidInput(
            f"{weights} (sha256 {digest[:12]}...) is not the {model.encoder} weights "
            f"{model_path.name} was trained on ({model.encoder_sha256[:12]}...)"
        )
    store = open_store(args.store_url or ServiceSettings().store_url)
    (encoder_model, encoder_version, encoder_prefix), (head_model, mil_version, mil_prefix) = (
        publish_head_and_encoder(
            store,
            model_path,
            model.encoder,
            weights,
            name=args.name or model.head_name,
            tiny=args.tiny,
            version=args.version,
        )
    )
    return {
        "store_url": store.url,
        "encoder": {"model": encoder_model, "version": encoder_version, "prefix": encoder_prefix},
        "mil": {"model": head_model, "version": mil_version, "prefix": mil_prefix},
        "deploy": [
            f"histomarker models deploy {encoder_model} {encoder_version}",
            f"histomarker models deploy {head_model} {mil_version}",
        ],
    }


def print_publish(result: dict[str, Any]) -> None:
    """Where the archives went and how to serve them."""
    for kind in ("encoder", "mil"):
        entry = result[kind]
        print(f"{entry['model']} {entry['version']}: {result['store_url']} {entry['prefix']}/")
    print("serve them with:")
    for command in result["deploy"]:
        print(f"  {command}")
