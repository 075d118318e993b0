"""The process that parses a large request before the event loop may (`python -m evalsvc.api.decode_worker`),
started by evalsvc.api.decoding over the pipes of evalsvc.workers.

Each request is a pickled `(module, message name, bytes, bound)`; each reply the pickled `(problem,
path, entries)`: `problem` says why the bytes are not that message (else None), `path` and `entries`
name the largest map in the message's tree with more than `bound` entries (`items[3].metadata`,
200000; "" and 0 when there is none). Its parse may take seconds
(protobuf's map parse is superlinear in the entries of one map), which is why it is done here, in a
process the server kills when it takes too long, and not on the loop.
"""

from __future__ import annotations

import functools
import importlib
import pickle
from dataclasses import dataclass

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

from evalsvc.workers import serve

_KEY_CHARS = 64  # of a map key quoted in a path (the error cuts a path at 256 characters anyway)


@functools.cache
def _message_class(module: str, full_name: str) -> type[Message]:
    """The class of the message `full_name`, defined by the generated module `module`."""
    importlib.import_module(module)
    return message_factory.GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(full_name))


@functools.cache
def _holds_maps(descriptor: Descriptor) -> bool:
    """Whether a message of this type can hold a map anywhere in its tree."""
    seen: set[str] = set()
    pending = [descriptor]
    while pending:
        message = pending.pop()
        if message.full_name in seen:
            continue
        seen.add(message.full_name)
        for field in message.fields:
            if field.message_type is None:
                continue
            if field.message_type.GetOptions().map_entry:
                return True
            pending.append(field.message_type)
    return False


@dataclass(frozen=True, slots=True)
class _Look:
    """One field of a message type that may hold a map: a map itself, or messages that may hold maps
    (`within`: the message type of a map's values or of the field, when those may hold maps)."""

    name: str
    is_map: bool
    repeated: bool
    within: Descriptor | None


@functools.cache
def _looks(descriptor: Descriptor) -> tuple[_Look, ...]:
    """The fields of a message type the walk looks at: only those that may hold maps. Worked out once a
    type, so that a million repeated items cost the walk a few attribute reads each (measured: walking
    every field of 1.2 million small items took 4.5 s)."""
    looks = []
    for field in descriptor.fields:
        kind = field.message_type
        if kind is None:
            continue
        if kind.GetOptions().map_entry:
            values = kind.fields_by_name["value"].message_type
            looks.append(_Look(field.name, True, True, values if values is not None and _holds_maps(values) else None))
        elif _holds_maps(kind):
            looks.append(_Look(field.name, False, field.is_repeated, kind))
    return tuple(looks)


def largest_map(message: Message, more_than: int) -> tuple[str, int]:
    """The path (from `message`) and size of the largest map of more than `more_than` entries in
    `message`'s tree, maps inside repeated messages and map values included (a google.protobuf.Struct's
    every nested Struct is a map of its own); ("", 0) when it has none."""
    best = ("", 0)
    for look in _looks(message.DESCRIPTOR):
        if not look.repeated:
            if message.HasField(look.name):
                best = _larger(best, largest_map(getattr(message, look.name), more_than), look.name)
            continue
        value = getattr(message, look.name)
        if look.is_map:
            if len(value) > max(best[1], more_than):
                best = (look.name, len(value))
            if look.within is not None:
                for key, inner in value.items():
                    best = _larger(best, largest_map(inner, more_than), f"{look.name}[{str(key)[:_KEY_CHARS]}]")
        else:
            for i, inner in enumerate(value):
                best = _larger(best, largest_map(inner, more_than), f"{look.name}[{i}]")
    return best


def _larger(best: tuple[str, int], found: tuple[str, int], name: str) -> tuple[str, int]:
    """`best`, or `found` (its path from within the field `name`) when it is larger."""
    return (f"{name}.{found[0]}", found[1]) if found[1] > best[1] else best


def _check(request: bytes) -> bytes:
    module, name, data, more_than = pickle.loads(request)
    try:
        message = _message_class(module, name).FromString(data)
    except Exception as exc:  # protobuf's DecodeError (as the loop's deserializer would have raised)
        return pickle.dumps((f"{type(exc).__name__}: {exc}", "", 0))
    return pickle.dumps((None, *largest_map(message, more_than)))


def main() -> None:
    """Check requests until stdin closes."""
    serve(_check)


if __name__ == "__main__":
    main()
