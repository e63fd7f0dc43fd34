"""The product's nouns, in one place: the six biomarkers, the served model names and
the gRPC enum values that stand for them.

Every module that names a biomarker or a model takes it from here: the cohort
manifest's label columns, the training flows, TorchServe's model names, the
PredictionService and its clients, the AnalysisService. The synthetic generator
draws labels for these same names; it does not define them.

A new biomarker is added here (its name, and a ``BIOMARKER_<NAME>`` value in
``protos/histomarker/v1/common.proto``), and then has a manifest column, a model
``biomarker_<name>``, a training task and a place in every result.
"""

from __future__ import annotations

from services.common.errors import InvalidInput
from services.common.stubs.histomarker.v1 import common_pb2

#: The biomarkers, in the method's order: TP53 and PIK3CA mutation, ER, PR and HER2
#: receptor status, Basal intrinsic subtype. Also the cohort manifest's label columns.
BIOMARKERS: tuple[str, ...] = ("tp53", "pik3ca", "er", "pr", "her2", "basal")
#: TorchServe name of the calibrated cancer detector.
CANCER_DETECTOR = "cancer_detector"
#: TorchServe names of the biomarker models: this prefix and the biomarker.
BIOMARKER_MODEL_PREFIX = "biomarker_"
#: Biomarker name -> its ``histomarker.v1.Biomarker`` enum value.
BIOMARKER_ENUMS: dict[str, common_pb2.Biomarker] = {
    name: common_pb2.Biomarker.Value(f"BIOMARKER_{name.upper()}") for name in BIOMARKERS
}
#: ``histomarker.v1.Biomarker`` enum value -> biomarker name.
BIOMARKER_NAMES: dict[int, str] = {value: name for name, value in BIOMARKER_ENUMS.items()}


def check_biomarker(name: str) -> str:
    """``name`` if it is one of :data:`BIOMARKERS`, else InvalidInput naming them."""
    if name not in BIOMARKERS:
        raise InvalidInput(f"unknown biomarker {name!r}; use one of {', '.join(BIOMARKERS)}")
    return name


def model_name_of(biomarker: str) -> str:
    """TorchServe name of a biomarker's model, ``biomarker_<name>`` (InvalidInput for an
    unknown biomarker)."""
    return f"{BIOMARKER_MODEL_PREFIX}{check_biomarker(biomarker)}"


def biomarker_of_model(model_name: str) -> str | None:
    """The biomarker a model name serves, or None (the cancer detector, or another
    name)."""
    name = model_name.removeprefix(BIOMARKER_MODEL_PREFIX)
    if name == model_name or name not in BIOMARKERS:
        return None
    return name


def biomarker_name(value: int, what: str = "biomarker", required: bool = True) -> str | None:
    """The name of a ``histomarker.v1.Biomarker`` enum value (``tp53`` for
    ``BIOMARKER_TP53``); None for UNSPECIFIED when not required.

    Raises:
        InvalidInput: UNSPECIFIED when required, or a value that is no biomarker.
    """
    if value == common_pb2.BIOMARKER_UNSPECIFIED:
        if required:
            raise InvalidInput(f"{what} is required")
        return None
    try:
        return BIOMARKER_NAMES[value]
    except KeyError:
        raise InvalidInput(f"{what}: unknown biomarker {value}") from None
