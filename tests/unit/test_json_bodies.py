"""Endpoints' JSON parsed without stalling the loop (evalsvc.http.json_bodies), and what uses it."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from evalsvc.datasets.generation import UnusableAnswer, answer_json
from evalsvc.http import json_bodies
from evalsvc.http.json_bodies import MAX_VALUES, JsonParser, loads_few
from evalsvc.targets import tool_calls_from


@pytest.fixture
def parser() -> Iterator[JsonParser]:
    parser = JsonParser()
    yield parser
    parser.close()


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
        await answer_json(reply, parser)


def test_a_tool_calls_arguments_of_too_many_values_are_kept_as_text() -> None:
    many = "[" + ",".join(["0"] * (MAX_VALUES + 1)) + "]"
    with pytest.raises(ValueError, match="may hold more than"):
        loads_few(many)
    [call] = tool_calls_from([{"function": {"name": "f", "arguments": many}}])
    assert call.name == "f" and call.arguments["_raw"] == many
