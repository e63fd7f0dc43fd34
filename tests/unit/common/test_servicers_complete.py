"""Every RPC the contract declares is implemented by its service's servicer (none
falls back to the generated "Method not implemented!")."""

from __future__ import annotations

import importlib

import pytest

SERVICES = {
    "tiling": ("TilingService", "TilingServicer"),
    "nuclei": ("NucleiService", "NucleiServicer"),
    "analysis": ("AnalysisService", "AnalysisServicer"),
    "prediction": ("PredictionService", "PredictionServicer"),
}


@pytest.mark.parametrize("name", list(SERVICES))
def test_every_declared_rpc_is_implemented(name: str) -> None:
    service, servicer = SERVICES[name]
    stubs = importlib.import_module(f"services.common.stubs.histomarker.v1.{name}_pb2")
    server = importlib.import_module(f"services.{name}.server")
    cls = getattr(server, servicer)
    declared = [m.name for m in stubs.DESCRIPTOR.services_by_name[service].methods]
    missing = [rpc for rpc in declared if rpc not in cls.__dict__]
    assert declared and missing == []
