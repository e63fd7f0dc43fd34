from __future__ import annotations

import pytest

from services.common.errors import InvalidInput
from services.common.refs import validate_bucket, validate_refs
from services.common.stubs.histomarker.v1 import (
    common_pb2,
    nuclei_pb2,
)


def _request(*shard_keys: str, patch_key: str = "tiles/s1/h/shards/20x-00000.tar"):
    return nuclei_pb2.ExtractFeaturesForShardsRequest(
        shards=[common_pb2.ObjectRef(key=key) for key in shard_keys],
        patches=[common_pb2.PatchRef(slide_id="s1", shard=common_pb2.ObjectRef(key=patch_key))],
    )


def test_valid_refs_at_any_depth_pass() -> None:
    validate_refs(_request("tiles/s1/h/shards/20x-00000.tar", "tiles/s1/h/shards/20x-00001.tar"))
    validate_refs(nuclei_pb2.ExtractFeaturesForShardsRequest())  # no refs at all


@pytest.mark.parametrize(
    ("request_", "path"),
    [
        (_request("ok/a.tar", "../b.tar"), "shards[1]"),
        (_request("ok/a.tar", patch_key="/abs.tar"), "patches[0].shard"),
    ],
)
def test_bad_ref_is_named_by_its_field_path(request_, path: str) -> None:
    with pytest.raises(InvalidInput) as info:
        validate_refs(request_)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize("bucket", ["histomarker", "my.bucket-2", "abc"])
def test_good_buckets(bucket: str) -> None:
    assert validate_bucket(bucket) == bucket


@pytest.mark.parametrize("bucket", ["ab", "Upper", "under_score", "-lead", "a..b", "x" * 64])
def test_bad_buckets(bucket: str) -> None:
    with pytest.raises(InvalidInput, match="bucket"):
        validate_bucket(bucket)
