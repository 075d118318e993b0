"""Translator threads: large JSON is read and written off the event loop.

JSON is read and written in Python: proto3 JSON (json_format) costs ~90 ns a byte to read and about
half that to write, and even the C `json.loads` takes ~0.4 s for 16 MiB of small objects. On the event
loop, one large body held every other call that long - before the service had checked the caller's
key, since a body is read first. So a body or response of OFF_LOOP_BYTES or more is translated in one
of a few threads, which hand the GIL back to the event loop every few milliseconds; smaller ones,
which cost microseconds, stay inline.

While a large translation runs, the cyclic garbage collector is paused: a 15 MiB body is millions of
short-lived, acyclic objects, and the full collections they set off scanned them all with every
thread stopped (100-250 ms each). They are freed by reference counting when the translation ends.
A pause lasts at most MAX_GC_PAUSE_S however many translations follow one another: other calls'
cyclic garbage must still be collected.

FastAPI validates a dialect's body on the event loop, one error per wrong value: a body of a million
numbers where strings belong took 8 s of the loop to report, before the caller's key was even looked
at. So a large body is validated in the translator thread, beside its parse, and one that fails is
refused with its first MAX_ERRORS errors without FastAPI validating it again; and a body may hold at
most MAX_JSON_VALUES values, which bounds that validation too (the documented maxima fit: Bland's
5,000 calls as Bland returns them are ~230,000). What a refused body of that many wrong values still
costs is pydantic building its errors (~0.5 s, in the thread but holding the GIL).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import json.decoder
import json.scanner
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from starlette.requests import Request

from evalsvc.http.json_bodies import depth_bounded, has_long_number
from evalsvc.slots import Slots

T = TypeVar("T")

OFF_LOOP_BYTES = 64 * 1024
TRANSLATOR_THREADS = 2
MAX_GC_PAUSE_S = 0.5
MAX_JSON_VALUES = 300_000
# Arrays and objects a body may nest: what protobuf can carry (its depth limit of 100 messages, a Struct
# three a JSON level) with room for the documented shapes around it. Deeper, a dialect stored what
# pydantic could not read back (~200 levels: the record vanished from its lists) or serialize (~255: a 500).
MAX_JSON_DEPTH = 64
# A body with at most this many commas, brackets and braces is parsed by the C scanner (`loads`): one
# stretch holding the GIL of at most ~0.1 s.
C_SCAN_TOKENS = 200_000
MAX_ERRORS = 100  # validation errors a refused body is answered with
# At most this many large bodies are translated at once; more wait their turn.
_TRANSLATORS = ThreadPoolExecutor(max_workers=TRANSLATOR_THREADS, thread_name_prefix="gateway-json")
# The streams' messages have threads of their own: in the pool above, first come first served, one
# tenant's large responses held every tenant's stream messages behind them (an SSE event waited 1.9 s
# behind 8 bodies of 6.7 MB).
_STREAM_TRANSLATORS = ThreadPoolExecutor(max_workers=TRANSLATOR_THREADS, thread_name_prefix="gateway-stream-json")


async def translated(size: int, translate: Callable[..., T], *args: Any) -> T:
    """`translate(*args)`: on the event loop when `size` (the bytes it reads or writes) is small,
    else in a translator thread."""
    if size < OFF_LOOP_BYTES:
        return translate(*args)
    return await asyncio.get_running_loop().run_in_executor(_TRANSLATORS, _collector.paused, translate, *args)


async def in_turn(turns: Slots, owner: str, translate: Callable[..., T], *args: Any) -> T:
    """`translate(*args)` in a translator thread, in `owner`'s turn among the owners waiting for one of
    `turns` (as many as there are translator threads). For the messages of REST streams: each costs
    ~0.1 ms of pure-Python proto3 JSON, and one tenant's 400 watches catching up on a run converted
    theirs on the event loop back to back (a full core; another tenant's GetRun took 6 s). In turns,
    one owner's backlog waits behind at most one conversion per other owner, and the event loop keeps
    its share of the interpreter."""
    await turns.acquire(owner)
    try:
        return await asyncio.get_running_loop().run_in_executor(_STREAM_TRANSLATORS, translate, *args)
    finally:
        turns.release()


class _Collector:
    """Pauses the cyclic garbage collector while any large translation runs (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._was_enabled = False
        self._since = 0.0

    def paused(self, translate: Callable[..., T], *args: Any) -> T:
        with self._lock:
            if self._running == 0:
                self._was_enabled = gc.isenabled()
                self._since = time.monotonic()
                gc.disable()
            elif self._was_enabled and time.monotonic() - self._since > MAX_GC_PAUSE_S:
                gc.enable()  # translations have followed one another for long enough
            self._running += 1
        try:
            return translate(*args)
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0 and self._was_enabled:
                    gc.enable()


_collector = _Collector()


# An object's pairs are made a dict this many at a time (`object_of`).
PAIRS_AT_ONCE = 10_000


def object_of(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict, built PAIRS_AT_ONCE at a time: `dict(pairs)` is one C call, and
    an object of 1,400,000 keys held the GIL ~1 s in it (the reading thread's, the event loop waiting)."""
    if len(pairs) <= PAIRS_AT_ONCE:
        return dict(pairs)
    found: dict[str, Any] = {}
    for start in range(0, len(pairs), PAIRS_AT_ONCE):
        found.update(pairs[start : start + PAIRS_AT_ONCE])
    return found


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A Python hook on every JSON object: the points at which the reading thread lets the event loop
    # have the GIL (a parse in C alone would hold it from start to end).
    return object_of(pairs)


class TooManyValues(ValueError):
    """A JSON body with more than MAX_JSON_VALUES values."""


LONE_SURROGATE = "the request holds text that is not Unicode: a lone surrogate (\\ud800-\\udfff) in a string"


class LoneSurrogate(ValueError):
    """A JSON body with a lone surrogate in a string (JSON's `\\ud800`): text no UTF-8 can hold. Found
    when the body is read, before a route writes anything: the vendors' models take it as text, and
    only building the service's request found it (a 500; or, after a first write, a half-done call)."""


def _unicode(value: Any) -> bool:
    """Whether every string of a parsed JSON value (keys too) is Unicode that UTF-8 can hold: the
    document written back (in C) encodes, or does not."""
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


class InvalidBody(ValueError):
    """A body its route's validation refused, with the first MAX_ERRORS of its errors."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(f"the body is invalid ({len(errors)} errors shown)")
        self.errors = errors


# The route's validation of a parsed body: the errors, in FastAPI's form (empty when it is valid).
BodyCheck = Callable[[Any], list[dict[str, Any]]]


def loads(text: str | bytes, **hooks: Any) -> Any:
    """`json.loads(text, **hooks)`, by the C scanner when the text cannot hold many values (its commas,
    brackets and braces, counted in C in milliseconds, bound them from above: at most C_SCAN_TOKENS)
    and has no very long number; else by the pure-Python scanner (~6x slower), which lets the event loop
    run every few milliseconds. The C scanner holds the GIL for the whole text, whichever thread runs
    it, and the object hook only lets the loop in when an object closes: one flat object of 1,400,000
    keys (15 MB), sent without a key, held every tenant's calls ~2 s before anything looked at it."""
    data = text.encode(errors="replace") if isinstance(text, str) else text
    tokens = data.count(b",") + data.count(b"[") + data.count(b"{")
    if tokens <= C_SCAN_TOKENS and not has_long_number(data):
        return json.loads(text, **hooks)
    decoder = json.JSONDecoder(**{"object_pairs_hook": object_of, **hooks})
    decoder.parse_string = json.decoder.py_scanstring  # type: ignore[attr-defined]
    decoder.scan_once = json.scanner.py_make_scanner(decoder)  # type: ignore[attr-defined]
    if isinstance(text, bytes):
        text = text.decode(json.detect_encoding(text), "surrogatepass")  # as json.loads decodes bytes
    return decoder.decode(text)


def read_json(body: bytes, check: BodyCheck | None = None) -> Any:
    """`loads(body)`, letting other threads run between the objects it reads; TooDeep when it nests
    more than MAX_JSON_DEPTH levels, TooManyValues when it holds more than MAX_JSON_VALUES values,
    LoneSurrogate when a string holds one, InvalidBody when `check` finds errors."""
    value = depth_bounded(
        functools.partial(loads, object_pairs_hook=_pairs), body, limit=MAX_JSON_DEPTH, what="the body"
    )
    if not within(value, MAX_JSON_VALUES):
        raise TooManyValues(f"the body holds more than {MAX_JSON_VALUES} JSON values")
    if (b"\\ud" in body or b"\\uD" in body) and not _unicode(value):
        raise LoneSurrogate(LONE_SURROGATE)
    if check is not None and (errors := check(value)):
        raise InvalidBody(errors[:MAX_ERRORS])
    return value


def within(value: Any, max_values: int, max_chars: int | None = None) -> bool:
    """Whether a parsed JSON value holds at most `max_values` values (objects, arrays and scalars; a
    tuple counts as an array) and, given `max_chars`, no string, bytes or key longer than that. Stops
    as soon as either bound is passed: the value may be a 16 MiB body."""
    pending, counted = [value], 0
    while pending:
        item = pending.pop()
        counted += 1
        if isinstance(item, dict):
            if max_chars is not None and any(len(str(key)) > max_chars for key in item):
                return False
            item = list(item.values())
        if isinstance(item, list | tuple):
            if counted + len(pending) + len(item) > max_values:
                return False
            pending.extend(item)
        elif max_chars is not None and isinstance(item, str | bytes) and len(item) > max_chars:
            return False
    return True


class OffLoopJSONRequest(Request):
    """A request whose JSON body FastAPI reads through `translated` (FastAPI's documented way to
    change how a route reads its request: a Request subclass given to the route's handler); a large
    one is validated there too, by `check`."""

    def __init__(self, scope: Any, receive: Any, check: BodyCheck | None = None) -> None:
        super().__init__(scope, receive)
        self._check = check

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            check = self._check if len(body) >= OFF_LOOP_BYTES else None
            self._json = await translated(len(body), read_json, body, check)
        return self._json
