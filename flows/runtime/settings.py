"""Where the flows find the object store, the gRPC services and TorchServe.

One pydantic-settings class, like every service's, with the prefix ``HISTOMARKER_``
(``HISTOMARKER_STORE_URL``, ``HISTOMARKER_TILING_TARGET``, ...). The flows read it
when a task runs, never from flow parameters: parameters are recorded by Prefect,
and tokens must stay in the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr

from services.common.settings import DEFAULT_PORTS
from services.inference.served_models import ServingSettings


class FlowSettings(ServingSettings):
    """Endpoints and local folders of the training flows.

    The store URL, S3 credentials and ``auth_token`` (the bearer token the gRPC
    services expect) are the services' own settings, read from the same variables;
    TorchServe's management URL, key and model store folder are
    :class:`ServingSettings`' (``histomarker models`` reads the same variables).
    """

    service_name: str = "flows"
    #: TilingService address, ``host:port``.
    tiling_target: str = f"127.0.0.1:{DEFAULT_PORTS['tiling']}"
    #: NucleiService address, ``host:port``.
    nuclei_target: str = f"127.0.0.1:{DEFAULT_PORTS['nuclei']}"
    #: AnalysisService address, ``host:port``.
    analysis_target: str = f"127.0.0.1:{DEFAULT_PORTS['analysis']}"
    #: TorchServe's gRPC inference API, ``host:port``.
    torchserve_grpc_target: str = "127.0.0.1:7070"
    #: Key of TorchServe's inference API (its ``key_file.json``); None when token
    #: authorization is off.
    torchserve_inference_token: SecretStr | None = None
    #: Local scratch folder: shard caches, training checkpoints, bundles before upload.
    work_dir: Path = Path.home() / ".histomarker" / "flows"
    #: Seconds one gRPC call to a service may take (tiling a slide, nuclei of a slide,
    #: an ablation).
    rpc_timeout_s: float = Field(default=3600.0, gt=0)
    #: PredictionService address, ``host:port`` (``predict_batch``).
    prediction_target: str = f"127.0.0.1:{DEFAULT_PORTS['prediction']}"
    #: Where ``predict_batch`` looks for new slides (``inbox/{slide_id}.{ext}``).
    predict_inbox_prefix: str = "inbox/"
    #: What runs the per-slide fan-out (``preprocess``, ``predict_batch``): threads of
    #: the flow run's process, or a Dask cluster (``prefect-dask``).
    task_runner: Literal["thread", "dask"] = "thread"
    #: Dask scheduler, ``tcp://host:port``; None starts a local cluster on 127.0.0.1
    #: for each flow run (its workers inherit this environment).
    dask_address: str | None = None
    #: Worker processes of that local cluster (one thread each).
    dask_workers: int = Field(default=2, ge=1, le=64)
    #: Cron schedule of the ``train_pipeline`` deployment (``flows serve``).
    train_cron: str = "0 3 * * 0"
    #: The cohort manifest the scheduled training runs on; unscheduled when unset.
    train_manifest: Path | None = None
    #: Its cohort name in the store.
    train_cohort: str | None = None
    #: Seconds between scheduled ``predict_batch`` runs.
    predict_interval_s: float = Field(default=600.0, gt=0)
