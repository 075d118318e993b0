"""Long loops over a request's parts give the event loop turns (evalsvc.turns): no network, no server.

A CreateRun of 100,000 items used to be walked for NUL characters, checked and numbered in stretches
of ~0.8 s together, during which no other call was served. Each test runs one of those loops beside a
task that counts the event loop's turns: a loop that never yields leaves it at zero."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from evalsvc import storable, turns
from evalsvc.errors import FieldViolation
from evalsvc.messages.validation import assign_item_ids, check_items, turn_violations
from evalsvc.storable import request_nul_violations
from evalsvc.v1 import dataset_generation_pb2, item_pb2
from evalsvc.v1 import dataset_service_pb2 as ds
from evalsvc.v1 import eval_run_service_pb2 as pb

ITEMS = 5000


@pytest.fixture(autouse=True)
def every_look_at_the_clock_yields(monkeypatch: pytest.MonkeyPatch) -> None:
    """Yield at every look at the clock, so the counts below do not depend on the machine's speed."""
    monkeypatch.setattr(turns, "YIELD_EVERY_S", -1.0)


async def turns_given(work: Awaitable[object]) -> int:
    """How many turns the event loop gave another task while `work` ran."""
    given = 0
    done = False

    async def count() -> None:
        nonlocal given
        while True:
            await asyncio.sleep(0)
            if done:
                return
            given += 1

    counter = asyncio.create_task(count())
    await asyncio.sleep(0)  # the counter is waiting for its first turn
    before = given
    try:
        await work
    finally:
        done = True
        await counter
    return given - before


def request_with_items(n: int = ITEMS) -> pb.CreateRunRequest:
    """A CreateRun whose items each hold a recorded response (a zero byte in their encoding: a cost)."""
    items = [
        item_pb2.Item(id=f"i{i}", input=f"question {i}", response=item_pb2.Response(content="a", cost_usd=1.0))
        for i in range(n)
    ]
    return pb.CreateRunRequest(items=items)


async def test_a_request_is_walked_for_nul_characters_in_turns() -> None:
    request = request_with_items()
    request.items[ITEMS - 1].input = "the last one\x00"
    violations: list[FieldViolation] = []

    async def walk() -> None:
        violations.extend(await request_nul_violations(request))

    assert await turns_given(walk()) >= ITEMS // 64
    assert [v.field for v in violations] == [f"items[{ITEMS - 1}].input"], "the walk still finds the NUL"


@pytest.mark.parametrize(
    "loop",
    [
        pytest.param(lambda items, out: check_items(items, "items", out), id="check_items"),
        pytest.param(lambda items, out: assign_item_ids(items), id="assign_item_ids"),
    ],
)
async def test_items_are_checked_and_numbered_in_turns(
    loop: Callable[[list[item_pb2.Item], list[FieldViolation]], Awaitable[None]],
) -> None:
    items = [item_pb2.Item(response=item_pb2.Response(content="a")) for _ in range(ITEMS)]
    out: list[FieldViolation] = []
    assert await turns_given(loop(items, out)) >= ITEMS // 64


async def test_a_short_loop_never_yields() -> None:
    """A few parts cost microseconds: no turn is given before the first look at the clock."""
    out: list[FieldViolation] = []
    assert await turns_given(check_items(request_with_items(10).items, "items", out)) == 0
    assert out == []


async def test_a_conversation_is_walked_for_nul_characters_without_serializing_each_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Probe: the walk serialized every turn of a conversation to look for a zero byte, ~4 s for an item
    of 3,000,000 empty turns (an empty turn is a zero byte on the wire, so the request's own fast path
    never spared it). A conversation's turns are flat messages: their strings are searched a chunk at a
    time, only the item is serialized, and the walk still yields and still names each NUL."""
    serialized: list[str] = []
    walk_if_dirty = storable._walk_if_dirty

    def counted(message: item_pb2.Item, prefix: str, out: list[FieldViolation]):  # type: ignore[no-untyped-def]
        serialized.append(prefix)
        return walk_if_dirty(message, prefix, out)

    monkeypatch.setattr(storable, "_walk_if_dirty", counted)
    conversation = [item_pb2.Message(role="user", content=f"turn {j}") for j in range(ITEMS)]
    conversation[7].content = "a\x00"
    conversation[ITEMS - 1].role = "\x00"
    request = ds.AddDatasetItemsRequest(dataset_id="d", items=[item_pb2.Item(input="q", conversation=conversation)])
    violations: list[FieldViolation] = []

    async def walk() -> None:
        violations.extend(await request_nul_violations(request))

    assert await turns_given(walk()) >= ITEMS // storable._CHUNK, "a turn after each chunk of turns"
    assert [v.field for v in violations] == [
        "items[0].conversation[7].content",
        f"items[0].conversation[{ITEMS - 1}].role",
    ]
    assert serialized == ["items[0]."], "the item is serialized, none of its turns"


async def test_check_items_gives_turns_by_conversation_turns_not_only_by_items() -> None:
    """Probe: check_items read the clock once every 64 items, so 64 items of 10,000 turns each (their
    roles read one by one) held the loop ~200 ms. An item counts as its turns too."""
    conversation = [item_pb2.Message(role="user")] * 1000
    items = [item_pb2.Item(id=f"i{i}", conversation=conversation) for i in range(10)]
    out: list[FieldViolation] = []
    assert await turns_given(check_items(items, "items", out)) >= len(items)
    assert out == []


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        pytest.param(pb.CreateRunRequest(items=[item_pb2.Item()]), "items[0].conversation", id="CreateRun"),
        pytest.param(ds.AddDatasetItemsRequest(items=[item_pb2.Item()]), "items[0].conversation", id="AddDatasetItems"),
        pytest.param(
            dataset_generation_pb2.ContinueConversationsRequest(conversations=[dataset_generation_pb2.Conversation()]),
            "conversations[0].turns",
            id="ContinueConversations",
        ),
    ],
)
async def test_every_request_with_conversations_has_them_counted(
    request_: pb.CreateRunRequest, field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """turn_violations finds a request's conversations by their type (a repeated Message), so a request
    that carries them in a field of another name is bounded too."""
    from evalsvc.messages import validation

    monkeypatch.setattr(validation, "MAX_CONVERSATION_TURNS", 2)
    monkeypatch.setattr(validation, "MAX_REQUEST_TURNS", 2)
    outer, _, inner = field.partition("[0].")
    getattr(getattr(request_, outer)[0], inner).extend([item_pb2.Message()] * 3)
    assert await turn_violations(request_) == [
        FieldViolation(field, "at most 2 turns (got 3)"),
        FieldViolation(outer, "at most 2 conversation turns per request, all together (got 3)"),
    ]
