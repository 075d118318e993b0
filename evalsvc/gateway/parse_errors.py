"""What a proto3 JSON parse error says, for the caller: the field it is about and why, in its words.

`json_format` reports a wrong value as Python sees it ("Failed to parse repetitions field: invalid
literal for int() with base 10: 'abc'.", "expected string or bytes-like object, got 'int'"), nested
once per message level, and an unknown field with the message type's full name. The gateway answers
both as INVALID_ARGUMENT with a field violation (google.rpc.BadRequest), as the service does for
any other bad field: the field path as the caller wrote it and a description that needs no Python.
"""

from __future__ import annotations

import re

from google.protobuf import json_format

_FAILED = re.compile(r"Failed to parse (\S+) field: ")
_UNKNOWN = re.compile(r'has no field named "([^"]+)" at "[\w.]*?(?:\.([^"]*))?"')
_AT = re.compile(r" at [A-Z]\w*\.(\S+?)\.*$")
_ENUM = re.compile(r"Invalid enum value (\S+) for enum type")
_WHERE = re.compile(r' at "?[A-Z][\w.\[\]]*"?\.*$')  # json_format's " at Type.path" suffix
# What Python's words mean, for a caller who sent JSON.
_PLAIN = (
    ("invalid literal for int()", "must be a whole number"),
    ("Couldn't parse integer", "must be a whole number"),
    ("Couldn't parse float", "must be a number"),
    ("expected string or bytes-like object", "must be a string"),
    ("not iterable", "must be a JSON object"),
    ("object has no attribute", "must be a JSON object"),
    ("must be in a dict", "must be a JSON object"),
    ("must be in []", "must be a JSON list"),
    ("should not have multiple", "sets more than one field of a oneof"),
)


def field_violation(exc: json_format.ParseError) -> tuple[str, str] | None:
    """(field path, description) of a parse error about one field; None when it is about the whole
    body (not JSON, not UTF-8)."""
    text = str(exc).strip()
    unknown = _UNKNOWN.search(text)
    if unknown is not None:
        name, parent = unknown.group(1), unknown.group(2)
        return (f"{parent}.{name}" if parent else name), "unknown field"
    names: list[str] = []
    while (failed := _FAILED.match(text)) is not None:
        names.append(failed.group(1))
        text = text[failed.end() :]
    if not names:
        return None
    at = _AT.search(text)
    path = at.group(1) if at is not None else ".".join(names)
    detail = _WHERE.sub("", text).rstrip(".").strip()
    if (enum := _ENUM.search(detail)) is not None:
        return path, f"unknown value {enum.group(1)}"
    for words, plain in _PLAIN:
        if words in detail:
            return path, plain
    return path, detail
