"""The gateway's translator threads (evalsvc.gateway.translators): no network, no server."""

from __future__ import annotations

import asyncio
import gc
import json

import pytest

from evalsvc.gateway import translators
from evalsvc.gateway.app import _json_body, _sse_event
from evalsvc.gateway.translators import MAX_JSON_DEPTH, MAX_JSON_VALUES, TooManyValues, read_json
from evalsvc.http.json_bodies import TooDeep
from evalsvc.slots import Slots
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import run_pb2


def test_a_body_is_read_as_json_up_to_its_budget_of_values() -> None:
    within = {"a": [1] * (MAX_JSON_VALUES - 2)}  # the object, the list and its numbers
    assert read_json(json.dumps(within).encode()) == within
    with pytest.raises(TooManyValues):
        read_json(json.dumps({"a": [1] * (MAX_JSON_VALUES - 1)}).encode())


async def test_a_body_of_many_values_is_read_letting_the_event_loop_run() -> None:
    """One flat object of 1,400,000 keys (15 MB, no key needed) held every tenant's calls ~2 s: the C
    scanner holds the GIL for the whole text in whichever thread it runs, and the object hook lets the
    loop in only when an object closes. A body whose commas and brackets pass C_SCAN_TOKENS is read by
    the pure-Python scanner: the loop runs all along (counted here in turns of the loop, not in time),
    and what is read, and refused, is the same."""
    flat = {f"k{i}": i for i in range(translators.C_SCAN_TOKENS + 50_000)}
    body = json.dumps(flat).encode()
    loop = asyncio.get_running_loop()
    began = last = loop.time()
    longest = 0.0  # the longest the loop waited between two of its turns
    reading = loop.run_in_executor(None, translators.loads, body)
    while not reading.done():
        await asyncio.sleep(0)
        longest, last = max(longest, loop.time() - last), loop.time()
    assert await reading == flat
    # With the C scanner the loop waits out the one stretch: its longest wait is nearly the whole read.
    assert longest < (loop.time() - began) / 5, (longest, loop.time() - began)
    pairs = [(f"k{i % 15_000}", i) for i in range(3 * translators.PAIRS_AT_ONCE)]
    assert translators.object_of(pairs) == dict(pairs)  # built in parts, the same dict (last value wins)
    hooks = {"object_pairs_hook": dict, "parse_constant": float}
    small = b'{"a": [1, 2.5, "x", null, true], "b": {"c": NaN}}'
    assert str(translators.loads(small, **hooks)) == str(json.loads(small, **hooks))
    many = b"[" + b",".join([rb'{"a": "b\u00e9"}'] * (translators.C_SCAN_TOKENS // 2)) + b"]"
    assert translators.loads(many, **hooks) == json.loads(many, **hooks)

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    with pytest.raises(ValueError, match="NaN is not JSON"):  # the hooks apply on both paths
        translators.loads(b"[" + b"0," * translators.C_SCAN_TOKENS + b"NaN]", parse_constant=refuse)
    with pytest.raises(json.JSONDecodeError):
        translators.loads(b"[" + b"0," * translators.C_SCAN_TOKENS + b"]")


def test_the_collector_is_paused_during_a_translation_and_enabled_after_even_when_it_fails() -> None:
    assert gc.isenabled()
    assert translators._collector.paused(gc.isenabled) is False

    def fails() -> None:
        raise ValueError("a body that does not parse")

    with pytest.raises(ValueError):
        translators._collector.paused(fails)
    assert gc.isenabled()


def test_translations_that_follow_one_another_pause_the_collector_only_so_long(monkeypatch: pytest.MonkeyPatch) -> None:
    """Overlapping large bodies (from any caller) must not keep the collector off for good: other
    calls' cyclic garbage would pile up for as long as they kept coming."""
    monkeypatch.setattr(translators, "MAX_GC_PAUSE_S", -1.0)  # any overlap has lasted long enough
    collector = translators._Collector()
    assert collector.paused(collector.paused, gc.isenabled) is True, "the overlapping one runs with it on"
    assert gc.isenabled()


async def test_a_streams_message_is_not_queued_behind_large_bodies_of_another_tenant() -> None:
    """Stream messages and large bodies shared one pool, first come first served: tenant B's SSE event
    waited 1.9 s behind tenant A's 8 large responses (6.7 MB each, ~170 ms apiece to translate). Stream
    messages have threads of their own: B's is done while A's bodies are still being translated."""
    big = pb.ListRunResultsResponse(
        results=[
            run_pb2.Result(item_id=f"i{i}", grader="g", explanation="x" * 200, output={"content": "y" * 2000})
            for i in range(3000)
        ]
    )
    event = pb.WatchRunResponse(seq=7, result=run_pb2.Result(item_id="b", grader="g"))
    bodies = [asyncio.ensure_future(translators.translated(big.ByteSize(), _json_body, big)) for _ in range(8)]
    await asyncio.sleep(0)  # A's bodies are queued first
    sent = await translators.in_turn(Slots(translators.TRANSLATOR_THREADS), "B", _sse_event, event)
    assert sent.startswith(b"id: 7\n")
    assert not all(body.done() for body in bodies), "B's event waited for every one of A's bodies"
    assert sum(body.done() for body in bodies) <= 2, "B's event waited behind A's queued bodies"
    await asyncio.gather(*bodies)


def test_a_body_nested_deeper_than_its_bound_is_refused_however_deep() -> None:
    """Review: dialects stored what pydantic could not read back (~200 levels: the record vanished from
    its lists) or serialize (~255: a 500). A body is at most MAX_JSON_DEPTH deep; deeper, or too deep
    for the parser itself, it is refused."""
    within_bound = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert read_json(within_bound.encode()) is not None
    for depth in (MAX_JSON_DEPTH + 1, 220, 100_000):
        with pytest.raises(TooDeep):
            read_json(("[" * depth + "]" * depth).encode())
