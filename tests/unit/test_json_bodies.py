"""Endpoints' JSON parsed without stalling the loop (evalsvc.http.json_bodies), and what uses it."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator

import pytest

from evalsvc.datasets.generation import UnusableAnswer, answer_json
from evalsvc.http import json_bodies
from evalsvc.http.json_bodies import MAX_VALUES, JsonParser
from evalsvc.messages.canonical import struct_values
from evalsvc.targets import tool_calls_from


@pytest.fixture
async def parser() -> AsyncIterator[JsonParser]:
    parser = JsonParser()
    yield parser
    await parser.close()


def parsers() -> list[int]:
    """The pids of this process's JSON worker processes still alive (or not reaped)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                command = cmdline.read()
        except (OSError, ValueError):
            continue
        if parent == os.getpid() and json_bodies.WORKER_MODULE.encode() in command:
            found.append(int(pid))
    return found


async def test_small_and_simple_texts_are_parsed_in_place(parser: JsonParser, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(json_bodies, "parse_bounded", None)  # the worker's function: never reached here
    assert await parser.parse('{"a": [1, 2]}') == {"a": [1, 2]}
    prose = json.dumps({"content": "word " * 400_000})  # 2 MB, one string: fast in place
    assert (await parser.parse(prose))["content"].startswith("word word")


async def test_a_text_of_too_many_values_is_refused_by_a_worker_and_one_of_many_commas_is_parsed(
    parser: JsonParser,
) -> None:
    """A tenant's endpoint answering 4 MB of `[0,0,...]` (two million values) held the event loop
    100-450 ms per reply; every tenant's calls waited seconds. Such a text goes to a worker process,
    which refuses it; prose with more commas than MAX_VALUES (one string) comes back whole."""
    with pytest.raises(ValueError, match=f"more than {MAX_VALUES:,} values"):
        await parser.parse("[" + ",".join(["0"] * 2_000_000) + "]")
    commas = json.dumps({"content": "a, " * (MAX_VALUES * 2)})
    assert (await parser.parse(commas))["content"].count(",") == MAX_VALUES * 2
    assert await parser.parse("[" + ",".join(["1"] * (MAX_VALUES - 1)) + ", 2]") == [1] * (MAX_VALUES - 1) + [2]


async def test_nesting_too_deep_is_not_json_not_a_recursion_error(parser: JsonParser) -> None:
    """`json.loads` of 100,000 nested lists raised RecursionError, which the generator's and the judge's
    parsing did not catch: a generation's task died with an ERROR traceback, and was retried for good."""
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(ValueError, match="nested too deeply"):
        await parser.parse(deep)
    with pytest.raises(ValueError, match="nested too deeply"):
        await parser.parse("[" * 5_000 + "]" * 5_000)  # in place (few values), the same answer
    reply = {"choices": [{"message": {"content": deep}}]}
    with pytest.raises(UnusableAnswer, match="not a JSON answer"):
        await answer_json(reply, parser.parse)


def test_tool_call_arguments_share_one_budget_of_values_per_reply() -> None:
    """Each call's arguments under the bound, a dozen of them were parsed on the loop in turn (350 ms):
    the reply's calls share one budget; arguments past it stay text."""
    keys = MAX_VALUES // 2 - 10  # two such calls fit the budget, a third does not
    near = "{" + ",".join(f'"k{i}": 0' for i in range(keys)) + "}"
    calls = tool_calls_from([{"function": {"name": f"f{i}", "arguments": near}} for i in range(3)])
    assert [len(c.arguments) for c in calls[:2]] == [keys] * 2
    assert list(calls[2].arguments) == ["_raw"] and calls[2].arguments["_raw"] == near


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999", "1" + "0" * 400])
def test_tool_call_arguments_json_cannot_carry_are_kept_as_text(number: str) -> None:
    """A target's reply with tool-call arguments of NaN or Infinity (which Python's json reads) was stored
    as numbers, and every REST read of the run's results then failed. Such arguments are not usable JSON:
    kept as text (`_raw`), as arguments that are not JSON are, whether sent as a string or an object."""
    text = f'{{"a": {number}, "b": "c"}}'
    as_string, as_object = tool_calls_from(
        [{"function": {"name": "f", "arguments": text}}, {"name": "g", "arguments": json.loads(text)}]
    )
    assert dict(as_string.arguments) == {"_raw": text}
    assert list(as_object.arguments) == ["_raw"] and as_object.arguments["_raw"].startswith('{"a": ')
    assert struct_values(as_object.arguments) is not None
    [fine] = tool_calls_from([{"name": "f", "arguments": {"a": 1e300}}])
    assert dict(fine.arguments) == {"a": 1e300}


async def test_a_long_number_is_parsed_by_the_worker(parser: JsonParser, monkeypatch: pytest.MonkeyPatch) -> None:
    """930 integers of 4,300 digits count as 931 values but took 80 ms to parse: such text goes to the worker."""
    numbers = "[" + ",".join(["7" * 4000] * 30) + "]"
    assert len(numbers) > json_bodies.INLINE_CHARS and json_bodies.has_long_number(numbers)
    monkeypatch.setattr(json_bodies, "loads", None)  # only the worker may parse it (it imports its own)
    assert await parser.parse(numbers) == [int("7" * 4000)] * 30


async def test_a_text_whose_worker_died_is_refused_and_the_next_gets_a_new_worker(parser: JsonParser) -> None:
    """When the worker dies (killed, out of memory), its text is a ValueError saying so (a generation's
    task died of an AttributeError once), and the next text is parsed by a new worker."""
    flood = "[" + ",".join(["0"] * 2_000_000) + "]"
    parsing = asyncio.create_task(parser.parse(flood))
    for _ in range(1000):  # the worker says it is ready before it reads the text (no event tells the test)
        if parsers():
            break
        await asyncio.sleep(0.01)
    [pid] = parsers()
    os.kill(pid, 9)
    with pytest.raises(ValueError, match="its parser process is gone"):
        await parsing
    numbers = "[" + ",".join(["7" * 4000] * 30) + "]"  # the next text for a worker: a new one parses it
    assert await parser.parse(numbers) == [int("7" * 4000)] * 30
    assert len(parsers()) == 1 and parsers() != [pid]


async def test_a_worker_that_died_while_idle_is_replaced_and_fails_no_text(parser: JsonParser) -> None:
    """An idle worker killed (the OOM killer, an operator) failed the next text, and with it an evaluation
    blaming its endpoint ("a body that is not usable JSON"), for nothing of its own (a probe). It is
    reaped and replaced before it is used."""
    numbers = "[" + ",".join(["7" * 4000] * 30) + "]"
    assert await parser.parse(numbers) == [int("7" * 4000)] * 30
    [pid] = parsers()
    os.kill(pid, 9)
    await parser._worker._worker.process.wait()  # type: ignore[union-attr]  # the loop has heard of its exit
    assert await parser.parse(numbers) == [int("7" * 4000)] * 30
    assert len(parsers()) == 1 and parsers() != [pid]


async def test_a_text_past_its_time_limit_stops_the_worker(parser: JsonParser, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's parse had no time limit: one text could keep every tenant's large replies waiting for as
    long as it took. Past PARSE_TIMEOUT_S the text is refused and its worker killed (and reaped)."""
    monkeypatch.setattr(json_bodies, "PARSE_TIMEOUT_S", 0.001)
    with pytest.raises(ValueError, match=r"took longer than 0\.001 s to parse"):
        await parser.parse("[" + ",".join(["0"] * 2_000_000) + "]")
    assert parsers() == []
    monkeypatch.setattr(json_bodies, "PARSE_TIMEOUT_S", 10.0)
    numbers = "[" + ",".join(["7" * 4000] * 30) + "]"
    assert await parser.parse(numbers) == [int("7" * 4000)] * 30


async def test_texts_wait_for_the_worker_in_their_tenants_turns(parser: JsonParser) -> None:
    """The one worker took texts first come, first served: a tenant whose endpoint flooded it made another
    tenant's one large reply wait behind the whole flood. Texts now wait in their tenants' turns."""
    numbers = "[" + ",".join(["7" * 4000] * 30) + "]"  # parsed by the worker (a long number)
    finished: list[str] = []

    async def parse(tenant: str) -> None:
        await parser.parse(numbers, tenant)
        finished.append(tenant)

    flood = [asyncio.create_task(parse("a")) for _ in range(6)]
    await asyncio.sleep(0)  # the flood is waiting before the other tenant's text arrives
    await asyncio.gather(*flood, parse("b"))
    assert finished.index("b") <= 2, finished  # after at most a text of "a" ahead and one in progress


async def test_a_cancelled_callers_text_stops_the_worker_at_once(parser: JsonParser) -> None:
    """A cancelled caller's text kept the worker until it was parsed (a process pool cannot stop a running
    task), and every tenant's next large reply waited for it. Its worker is killed now: the turn is free at
    once, and the next text is parsed by a new worker."""
    flood = "[" + ",".join(["0"] * 2_000_000) + "]"
    first = asyncio.create_task(parser.parse(flood, "a"))
    for _ in range(1000):
        if parsers():
            break
        await asyncio.sleep(0.01)
    [pid] = parsers()
    assert not parser._turns.available()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert parser._turns.available() and parsers() == []  # killed and reaped
    numbers = "[" + ",".join(["7" * 4000] * 30) + "]"
    assert await parser.parse(numbers, "b") == [int("7" * 4000)] * 30
    assert parsers() != [pid]


async def test_a_parser_closed_while_its_worker_starts_leaves_no_process() -> None:
    """The server's stop closed the parser while its worker was starting: `close` found no process to stop,
    the start finished and the text was parsed after the stop, and the process outlived the parser (a
    review). The text is refused now, and the process killed and reaped."""
    parser = JsonParser()
    parsing = asyncio.create_task(parser.parse("[" + ",".join(["7" * 4000] * 30) + "]"))
    for _ in range(1000):  # spawned, not yet ready (its imports take a while): no event tells the test
        if parsers():
            break
        await asyncio.sleep(0.001)
    assert parsers() and not parsing.done()
    await parser.close()
    with pytest.raises(ValueError, match="stopped with the server"):
        await parsing
    assert parsers() == []


@pytest.mark.parametrize("depth", [json_bodies.MAX_DEPTH + 1, 700, 5000])
async def test_json_nested_too_deeply_is_not_json(depth: int) -> None:
    """Probe: 700 nested `[`s parse, but every recursive walk of the answer (making its strings storable,
    a generation's, a judge's, a target reply's) then raised RecursionError: a generation left RUNNING
    for good, a run's evaluation errored "RecursionError: maximum recursion depth exceeded". Past
    MAX_DEPTH levels the text is a ValueError saying so, inline or in the worker."""
    deep = '{"choices": ' + "[" * depth + "]" * depth + "}"
    parser = JsonParser()
    try:
        for text in (deep, deep + " " * json_bodies.INLINE_CHARS):  # parsed in place, and by the worker
            with pytest.raises(ValueError, match=rf"nested too deeply \(more than {json_bodies.MAX_DEPTH} levels\)"):
                await parser.parse(text)
        fine = "[" * (json_bodies.MAX_DEPTH - 1) + '{"a": "[[[[{{{{"}' + "]" * (json_bodies.MAX_DEPTH - 1)
        assert await parser.parse(fine) is not None  # brackets in strings do not count
    finally:
        await parser.close()
