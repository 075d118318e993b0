"""The UUID form of evalsvc ids that dialects show where a vendor documents `string<uuid>` (no network)."""

from __future__ import annotations

import uuid

import pytest

from evalsvc.gateway.dialects.uuids import derived_uuid, from_uuid, to_uuid
from evalsvc.ids import new_id


@pytest.mark.parametrize("prefix", ["run", "ds", "tgt", "grd"])
def test_every_kind_of_id_round_trips_through_a_version_8_uuid(prefix: str) -> None:
    ids = [new_id(prefix) for _ in range(200)]
    shown = [to_uuid(each) for each in ids]
    for evalsvc_id, text in zip(ids, shown, strict=True):
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 8 and parsed.variant == uuid.RFC_4122
        assert from_uuid(text) == evalsvc_id and from_uuid(text.upper()) == evalsvc_id
    assert len(set(shown)) == len(ids)
    assert sorted(shown) == shown  # ids keep their creation order in the UUID form


def test_anything_else_passes_through_unchanged() -> None:
    foreign = [str(uuid.uuid4()) for _ in range(100)] + [str(uuid.uuid1()), str(uuid.uuid5(uuid.NAMESPACE_DNS, "x"))]
    for value in [*foreign, "run_missing", "ds_missing", "", "not a uuid", "tgt_0661B8332D02165DCA2AC81D"]:
        assert from_uuid(value) == value
    assert to_uuid("run_missing") == "run_missing" and to_uuid("item-7") == "item-7"
    # a version-8 UUID of another scheme (unknown kind, or payload padding not zero) is not ours either
    assert from_uuid("f0661b83-32d0-8216-85dc-a2ac81d00000") == "f0661b83-32d0-8216-85dc-a2ac81d00000"
    assert from_uuid("30661b83-32d0-8216-85dc-a2ac81d00001") == "30661b83-32d0-8216-85dc-a2ac81d00001"


def test_derived_uuids_are_stable_and_distinct() -> None:
    job = derived_uuid("omni.agentic_job", "run_1", "item-1")
    assert job == derived_uuid("omni.agentic_job", "run_1", "item-1") and uuid.UUID(job).version == 5
    others = {derived_uuid("omni.conversation", "run_1", "item-1"), derived_uuid("omni.agentic_job", "run_1", "item-2")}
    assert job not in others and len(others) == 2
    assert derived_uuid("a", "bc") != derived_uuid("ab", "c")  # names are separated, not concatenated
