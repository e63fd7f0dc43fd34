"""Cache keys and the retry predicate of the pipeline's tasks."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from flows.runtime.policy import cache_key, canonical, input_digest, is_retryable
from flows.runtime.records import SlideRef
from flows.training.config import ModelTraining, TilingConfig
from services.common.errors import InvalidInput, NotFound, ResourceExhausted, Unavailable


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "from a test"


def test_equal_inputs_give_equal_keys_in_any_order_and_form() -> None:
    slide = SlideRef(slide_id="S1", key="slides/S1.tiff", sha256="ab" * 32)
    a = cache_key("tile", "file:///store", {"slide": slide, "config": TilingConfig()})
    b = cache_key(
        "tile",
        "file:///store",
        {"config": TilingConfig(), "slide": SlideRef(**slide.model_dump())},
    )
    assert a == b and a.startswith("tile-v")
    assert input_digest({"x": (1, 2), "p": Path("/a/b")}) == input_digest(
        {"p": Path("/a/b"), "x": [1, 2]}
    )


@pytest.mark.parametrize(
    "change",
    [
        {"name": "train"},
        {"store": "file:///other"},
        {"parameters": {"training": ModelTraining(epochs=2)}},
    ],
)
def test_any_input_change_changes_the_key(change: dict) -> None:
    base = {"name": "train", "store": "file:///s", "parameters": {"training": ModelTraining()}}
    args = {**base, **change}
    if change == {"name": "train"}:
        args["name"] = "train-other"
    assert cache_key(args["name"], args["store"], args["parameters"]) != cache_key(
        base["name"], base["store"], base["parameters"]
    )


def test_handles_have_no_cache_key() -> None:
    with pytest.raises(TypeError, match="no stable form"):
        canonical({"lock": object()})


@pytest.mark.parametrize(
    ("error", "retry"),
    [
        (Unavailable("store down"), True),
        (ResourceExhausted("queue full"), True),
        (_RpcError(grpc.StatusCode.UNAVAILABLE), True),
        (_RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED), True),
        (_RpcError(grpc.StatusCode.INVALID_ARGUMENT), False),
        (_RpcError(grpc.StatusCode.UNIMPLEMENTED), False),
        (InvalidInput("bad"), False),
        (NotFound("gone"), False),
        (ValueError("bug"), False),
        (None, False),
    ],
)
def test_only_an_unavailable_dependency_is_retried(
    error: BaseException | None, retry: bool
) -> None:
    assert is_retryable(error) is retry


def test_tasks_carry_the_policy() -> None:
    from flows.runtime.policy import RETRIES, retry_on_unavailable
    from flows.training.preprocess import tile_slide
    from flows.training.serving import register_model

    assert tile_slide.retries == RETRIES
    assert tile_slide.retry_condition_fn is retry_on_unavailable
    assert tile_slide.cache_key_fn is not None and tile_slide.persist_result
    assert register_model.cache_key_fn is None  # TorchServe may have restarted


def test_failed_calls_become_typed_errors_that_keep_their_retry_decision() -> None:
    from flows.runtime.clients import service_errors
    from services.common.errors import Unimplemented

    with (
        pytest.raises(Unavailable, match="TilingService answered UNAVAILABLE") as caught,
        service_errors("TilingService"),
    ):
        raise _RpcError(grpc.StatusCode.UNAVAILABLE)
    assert is_retryable(caught.value)
    with pytest.raises(Unimplemented) as unimplemented, service_errors("NucleiService"):
        raise _RpcError(grpc.StatusCode.UNIMPLEMENTED)
    assert not is_retryable(unimplemented.value)
