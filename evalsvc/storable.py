"""Text both database engines can store, checked where it enters the service.

PostgreSQL's text cannot hold a NUL (U+0000) and no UTF-8 text can hold a lone surrogate
(U+D800-U+DFFF, which JSON's `\\u` escapes can produce); SQLite would store a NUL without complaint.
So that the two engines behave the same, and so that one bad string can never fail the transaction
that records other tenants' results, text is handled at the edge, by one rule each way:

- what callers send: a NUL in any string of a request is INVALID_ARGUMENT naming the field
  (`request_nul_violations`, applied to every RPC by evalsvc.api.status);
- what targets and judges send back: NUL and lone surrogates are replaced by U+FFFD (`storable_text`,
  `storable_json`), so their output is always recorded (docs/targets.md).
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Iterable, Iterator
from operator import attrgetter
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from evalsvc.errors import FieldViolation
from evalsvc.turns import Turns

__all__ = ["REPLACEMENT", "request_nul_violations", "storable_json", "storable_text"]

REPLACEMENT = "\ufffd"
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_NUL_BYTE = b"\x00"
_NUL_DESCRIPTION = "must not contain NUL (U+0000) characters"
# The walk stops after this many: a request of a million NUL strings is refused just the same.
MAX_NUL_VIOLATIONS = 1000
_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE
_NESTED = (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP)
# Elements of a repeated field of flat messages (`_flat_strings`) checked at once, between two yields.
_CHUNK = 256


def storable_text(text: str) -> str:
    """The text with every NUL and lone surrogate replaced by U+FFFD; the same object when it has none."""
    return text if _UNSTORABLE.search(text) is None else _UNSTORABLE.sub(REPLACEMENT, text)


def storable_json(value: Any) -> Any:
    """A parsed JSON value with every string (keys too) made storable; numbers, booleans and null as they are."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, dict):
        return {storable_text(k): storable_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [storable_json(v) for v in value]
    return value


async def request_nul_violations(request: Message) -> list[FieldViolation]:
    """One violation per string field (or map key) of the request that holds a NUL, with its path
    (`items[3].input`, `labels[team]`, `target.chat.parameters.fields[k].string_value`).

    A UTF-8 string holds a zero byte only where it holds a NUL, so a request whose encoding has no
    zero byte at all is clean: that check runs in C and spares the walk for most requests. It is not
    proof of a NUL, though: an empty message, an empty string that has presence and most doubles are
    zero bytes too. So the walk gives the event loop turns between the elements of repeated fields
    (evalsvc.turns): a CreateRun of 100,000 items takes ~0.4 s to walk. The elements of a repeated
    field of flat messages (a conversation's turns) are not serialized one by one: their strings are
    gathered and searched in C, a chunk at a time (3,000,000 empty turns took ~4 s turn by turn, ~0.7 s
    so; a request holds at most 1,000,000 turns, evalsvc.messages.validation). It stops after
    MAX_NUL_VIOLATIONS."""
    if _NUL_BYTE not in request.SerializeToString():
        return []
    out: list[FieldViolation] = []
    turns = Turns()
    for parts in _walk(request, "", out):
        await turns.tick(parts)
    return out


def _walk(message: Message, prefix: str, out: list[FieldViolation]) -> Iterator[int]:
    """Appends the message's violations to `out`, yielding after each element of a repeated message
    field (and each map entry, and each chunk of flat messages) how many parts it did: the points at
    which the caller may let others run."""
    for field, value in message.ListFields():
        path = prefix + field.name
        if len(out) >= MAX_NUL_VIOLATIONS:
            return
        if field.type == _STRING:
            if field.is_repeated:
                for i, text in enumerate(value):
                    if "\x00" in text:
                        out.append(FieldViolation(f"{path}[{i}]", _NUL_DESCRIPTION))
                        if len(out) >= MAX_NUL_VIOLATIONS:
                            return
                    if i % 256 == 255:
                        yield 1
            elif "\x00" in value:
                out.append(FieldViolation(path, _NUL_DESCRIPTION))
        elif field.type == _MESSAGE:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                yield from _walk_map(field.message_type.fields_by_name["value"], value, path, out)
            elif field.is_repeated and (strings := _flat_strings(field.message_type)) is not None:
                yield from _walk_flat(value, strings, path, out)
            elif field.is_repeated:
                for i, element in enumerate(value):
                    yield from _walk_if_dirty(element, f"{path}[{i}].", out)
                    if len(out) >= MAX_NUL_VIOLATIONS:
                        return
                    yield 1
            else:
                yield from _walk_if_dirty(value, path + ".", out)


@functools.cache
def _flat_strings(message: Descriptor) -> tuple[str, ...] | None:
    """The string fields of a message type whose fields are all singular and not messages (a
    conversation's `Message`: role and content); None for any other type."""
    if any(field.is_repeated or field.type in _NESTED for field in message.fields):
        return None
    return tuple(field.name for field in message.fields if field.type == _STRING)


def _walk_flat(
    elements: Iterable[Message], strings: tuple[str, ...], path: str, out: list[FieldViolation]
) -> Iterator[int]:
    """`_walk` of a repeated field of flat messages: each chunk's strings, field by field, joined and
    searched for a NUL in C; only a chunk that holds one is visited element by element, to name them."""
    getters = [(name, attrgetter(name)) for name in strings]
    elements = iter(elements)
    start = 0
    while chunk := list(itertools.islice(elements, _CHUNK)):
        if any("\x00" in "".join(map(getter, chunk)) for _, getter in getters):
            for i, element in enumerate(chunk, start):
                for name, getter in getters:
                    if "\x00" in getter(element):
                        out.append(FieldViolation(f"{path}[{i}].{name}", _NUL_DESCRIPTION))
                        if len(out) >= MAX_NUL_VIOLATIONS:
                            return
        start += len(chunk)
        yield len(chunk)


def _walk_if_dirty(message: Message, prefix: str, out: list[FieldViolation]) -> Iterator[int]:
    if _NUL_BYTE in message.SerializeToString():
        yield from _walk(message, prefix, out)


def _walk_map(value_field: FieldDescriptor, entries: Any, path: str, out: list[FieldViolation]) -> Iterator[int]:
    for key, value in entries.items():
        if len(out) >= MAX_NUL_VIOLATIONS:
            return
        shown = key.replace("\x00", "\\u0000") if isinstance(key, str) else key
        at = f"{path}[{shown}]"
        if isinstance(key, str) and "\x00" in key:
            out.append(FieldViolation(at, "keys " + _NUL_DESCRIPTION))
        if value_field.type == _STRING:
            if "\x00" in value:
                out.append(FieldViolation(at, _NUL_DESCRIPTION))
        elif value_field.type == _MESSAGE:
            yield from _walk_if_dirty(value, at + ".", out)
        yield 1
