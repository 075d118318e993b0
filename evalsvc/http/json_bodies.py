"""JSON from endpoints, parsed without stalling the event loop.

An endpoint's reply (a target's, a judge's, the generator's) is bounded in bytes (--max-reply-bytes),
but what `json.loads` costs depends on how many values the text holds, and the C parser holds the GIL
for the whole text, so a thread would not help: a tenant's endpoint answering 4 MB of `[0,0,0,...]`
(two million values) held the loop 100-450 ms per reply, with 64 workers every tenant's calls waited
seconds. A megabyte of prose, one string, parses in a millisecond or two.

So a text is parsed in place when it is small, or when it cannot hold more than MAX_VALUES values
(its commas, brackets and braces, counted in C, bound them from above) and has no very long number;
anything else goes to a worker process (`python -m evalsvc.http.json_worker`, an evalsvc.workers
`Worker`, as the grading processes and the checker of large requests are), which parses it and
refuses it when it holds more than MAX_VALUES values. What comes back is bounded by that, so taking
it in (unpickling) is bounded too. Nesting deeper than MAX_DEPTH (or too deep for the parser,
`RecursionError`) is a ValueError like any other text that is not JSON.

The worker parses one text at a time, and texts wait for it in their tenants' turns (`Slots`, as
grading processes and endpoint slots are handed out): first come, first served, a tenant whose
endpoint floods it with texts of 0.1-0.45 s each made another tenant's one large reply wait behind
the whole flood. A text that keeps the worker past PARSE_TIMEOUT_S, or whose caller is cancelled
meanwhile (a cancelled run's reply), stops the worker at once (it is killed; the next text starts
another): no text holds the worker, and with it every tenant's large replies, longer than that.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from typing import Any

from evalsvc.slots import Slots
from evalsvc.workers import LoneWorker, WorkerGone

# At most this many values are parsed on the loop (a few ms), or taken back from a worker: legitimate
# replies hold a few dozen (a chat completion, a verdict, a batch of generated items, tool calls).
MAX_VALUES = 20_000
# Arrays and objects nested deeper than this are refused: every recursive walk of a parsed answer (making
# its strings storable, a verdict's, a reply's) would otherwise hit Python's recursion limit on a
# model's answer of 700 `[`s (RecursionError: a generation that never ended, an RPC's INTERNAL).
# Legitimate answers nest a few levels; and a tool call's arguments (a protobuf Struct, three message
# levels a JSON level) past about 30 levels could not be read back (protobuf's depth limit of 100).
MAX_DEPTH = 24
# Below this many characters a text holds too few values to matter.
INLINE_CHARS = 64 * 1024
# A text the worker has not parsed in this long is refused (and the worker killed): a reply is at most
# --max-reply-bytes, and 16 MB of the costliest JSON (`[0,0,...]`, eight million values) takes ~1.5 s.
PARSE_TIMEOUT_S = 10.0
WORKER_MODULE = "evalsvc.http.json_worker"


# Digits, all read as 0, so that a run of LONG_NUMBER of them is one substring search (C, ~5 ms for 4 MB;
# a regular expression took 100 ms).
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_NUMBER = b"0" * 400


def has_long_number(text: str | bytes) -> bool:
    """Whether the text holds a run of 400 digits: a number that long costs as much to parse as hundreds
    of values (930 integers of 4,300 digits, 4 MB, took 80 ms), whatever the count of values says."""
    data = text.encode(errors="replace") if isinstance(text, str) else text
    return _LONG_NUMBER in data.translate(_DIGITS_AS_ZERO)


class TooDeep(ValueError):
    """A JSON text nesting arrays and objects deeper than its bound, or too deep for the parser itself."""


def depth_bounded(
    parse: Callable[[str | bytes], Any], text: str | bytes, *, limit: int = MAX_DEPTH, what: str = "the JSON"
) -> Any:
    """`parse(text)` (a JSON text of `what`), TooDeep when it nests arrays and objects more than `limit`
    levels (or too deep for `parse`: a RecursionError). The parsed value is walked only when the text
    has more than `limit` brackets and braces. Endpoints' replies (MAX_DEPTH) and the REST gateway's
    bodies (evalsvc.gateway.translators) are bounded by this one check."""
    error = f"{what} is nested too deeply (more than {limit} levels)"
    try:
        parsed = parse(text)
    except RecursionError:
        raise TooDeep(error) from None
    if most_containers(text) > limit and too_deep(parsed, limit):
        raise TooDeep(error)
    return parsed


def loads(text: str | bytes) -> Any:
    """`json.loads`, with nesting deeper than MAX_DEPTH (or too deep for the parser) a ValueError."""
    return depth_bounded(json.loads, text)


def most_containers(text: str | bytes) -> int:
    """An upper bound of the arrays and objects in a JSON text, and so of its depth."""
    if isinstance(text, bytes):
        return text.count(b"[") + text.count(b"{")
    return text.count("[") + text.count("{")


def too_deep(parsed: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether a parsed JSON value nests arrays and objects more than `limit` deep (walked without
    recursion, stopping at the first too deep)."""
    pending = [(parsed, 0)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth >= limit:
            return True
        pending.extend((child, depth + 1) for child in children)
    return False


def most_values(text: str | bytes) -> int:
    """An upper bound of the values in a JSON text: one more than its separators and containers."""
    if isinstance(text, bytes):
        return text.count(b",") + text.count(b"[") + text.count(b"{") + 1
    return text.count(",") + text.count("[") + text.count("{") + 1


def _values(parsed: Any) -> int:
    """How many values a parsed JSON document holds (walked without recursion)."""
    count, pending = 0, [parsed]
    while pending:
        value = pending.pop()
        count += 1
        if isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return count


def parse_bounded(text: str | bytes) -> Any:
    """In a worker process: the parsed text, or ValueError when it holds more than MAX_VALUES values."""
    parsed = loads(text)
    if _values(parsed) > MAX_VALUES:
        raise ValueError(f"the JSON holds more than {MAX_VALUES:,} values")
    return parsed


class JsonParser:
    """Parses endpoints' JSON (see the module docstring); one worker process, started at first need."""

    def __init__(self) -> None:
        self._worker = LoneWorker(WORKER_MODULE, "parses large JSON replies")
        self._turns = Slots(1)  # the worker, handed to waiting tenants in turn

    async def parse(self, text: str | bytes, tenant: str = "") -> Any:
        """The parsed text; ValueError when it is not JSON, nested too deeply, holds too many values, or
        cannot be parsed now (its worker took too long, died or was stopped). `tenant`: whose turn a text
        that needs the worker waits for."""
        if len(text) <= INLINE_CHARS or (most_values(text) <= MAX_VALUES and not has_long_number(text)):
            return loads(text)
        payload = pickle.dumps(text)
        await self._turns.acquire(tenant)
        try:
            parsed, problem = await self._worker.call(payload, PARSE_TIMEOUT_S)
        except TimeoutError:
            raise ValueError(f"the JSON took longer than {PARSE_TIMEOUT_S:g} s to parse") from None
        except WorkerGone as exc:
            raise ValueError(f"the JSON could not be parsed: its parser process is gone ({exc})") from None
        finally:
            self._turns.release()
        if problem is not None:
            raise ValueError(problem)
        return parsed

    async def close(self) -> None:
        """Stop the worker, busy or not (a parse in progress fails), and start no other."""
        await self._worker.close()
