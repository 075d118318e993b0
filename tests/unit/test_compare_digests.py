"""The item digests CreateRun stores with a run's items and comparisons read (evalsvc.runs.compare
`item_digests`, `digests_of`): fixed for a fixed item, and hashed in turns weighed by the items' sizes."""

from __future__ import annotations

import asyncio

import pytest

from evalsvc import turns
from evalsvc.runs.compare import digests_of, item_digests
from evalsvc.v1 import item_pb2


def test_an_items_digests_are_pinned() -> None:
    """Digests are stored with run items (revision 0028) and have no version: a comparison of a run stored
    today with one stored later trusts that both were hashed alike. A change of `_UNCOMPARED_ITEM_FIELDS`,
    of what is cleared or of the serialization (deterministic protobuf bytes) that changes these values
    must come with a migration that clears the stored digests (run_items.digest_with_metadata and
    digest_without_metadata to NULL: comparisons then hash those items again), or every old run compares
    as of different items. The id, recorded response and human verdicts are not hashed."""
    item = item_pb2.Item(
        id="q1",
        input="What is 2 + 2?",
        expected_output="4",
        metadata={"source": "arith"},
        response=item_pb2.Response(content="4"),
    )
    digests = item_digests(item.SerializeToString())
    assert digests.with_metadata.hex() == "b9b4f304d9beb910aa8c0629a202a42436ffff8c4779633ae26e22f34998031c"
    assert digests.without_metadata.hex() == "6d3da66d2986328027b6d57cae5727889cf131cd65ae54059f09d8e3d77c8ccb"
    item.id, item.response.content = "other", "5"
    assert item_digests(item.SerializeToString()) == digests


async def test_large_items_are_hashed_with_turns_for_the_event_loop_between_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An item of 10,000 conversation turns takes ~1.5 ms to hash. Counted one part an item, the clock was
    read every 64 items: 70 such items held the event loop ~100 ms at a stretch. Weighed by size, a few
    such items are enough for the loop to get a turn (here, with no time allowed, after each of these
    items of 4,000 turns)."""
    monkeypatch.setattr(turns, "YIELD_EVERY_S", 0.0)
    item = item_pb2.Item(input="q", conversation=[item_pb2.Message(role="user", content="x" * 20)] * 4000)
    raw = item.SerializeToString()
    others = 0

    async def other() -> None:
        nonlocal others
        while True:
            await asyncio.sleep(0)
            others += 1

    running = asyncio.create_task(other())
    await asyncio.sleep(0)
    before = others
    digests = await digests_of([raw] * 10)
    turns_given = others - before
    running.cancel()
    assert digests == [item_digests(raw)] * 10
    assert turns_given >= 9, turns_given
