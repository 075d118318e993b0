"""What a proto3 JSON parse error says, for the caller: the field it is about and why, in its words.

`json_format` reports a wrong value as Python sees it ("Failed to parse repetitions field: invalid
literal for int() with base 10: 'abc'.", "expected string or bytes-like object, got 'int'"), nested
once per message level (not for a oneof's or an `optional` field), usually ending " at Type.path", and
an unknown field with the message type's full name. The gateway answers both as INVALID_ARGUMENT with
a field violation (google.rpc.BadRequest), as the service does for any other bad field: the field
path and a description that needs no Python.

The message quotes the caller's value, which may be megabytes of anything (it is read before the API
key is checked), so it is taken apart with string operations that cost its length once: no regular
expression runs over it (one with overlapping classes and `$` took quadratic time in a run of dots:
~90 s of the event loop for a 100 KB value). Only json_format's own path, bounded and checked, meets
a regular expression.
"""

from __future__ import annotations

import re

from google.protobuf import json_format

_FAILED = "Failed to parse "
_FIELD = " field: "
_UNKNOWN_START = 'Message type "'
_UNKNOWN_NAME = '" has no field named "'
_UNKNOWN_AT = '" at "'
_AVAILABLE = "\n Available Fields"
_ENUM = "Invalid enum value "
_ENUM_END = " for enum type"
MAX_PATH = 512  # json_format's paths are field names and indices: longer is not one of them
MAX_SHOWN = 128  # characters of a caller's field name or value repeated in a description
# Type.field[0].field...: no two parts can match the same characters, so matching is linear.
_PATH = re.compile(r"[A-Za-z_]\w*(?:\[[^\[\]]*\])*(?:\.[A-Za-z_]\w*(?:\[[^\[\]]*\])*)*")  # [0], [map key]
# What Python's words mean, for a caller who sent JSON (substring tests: linear).
_PLAIN = (
    ("invalid literal for int()", "must be a whole number"),
    ("int() argument", "must be a whole number"),
    ("Couldn't parse integer", "must be a whole number"),
    ("Couldn't parse float", "must be a number"),
    ("float() argument", "must be a number"),
    ("expected string or bytes-like object", "must be a string"),
    ("not iterable", "must be a JSON object"),
    ("object has no attribute", "must be a JSON object"),
    ("must be in a dict", "must be a JSON object"),
    ("must be in []", "must be a JSON list"),
    ("should not have multiple", "sets more than one field of a oneof"),
)


def field_violation(exc: json_format.ParseError) -> tuple[str, str] | None:
    """(field path, description) of a parse error about one field; None when it is about the whole
    body (not JSON, not UTF-8) or does not say which field."""
    text = str(exc).strip()
    names: list[str] = []
    while text.startswith(_FAILED) and (end := text.find(_FIELD, len(_FAILED), len(_FAILED) + MAX_PATH)) > 0:
        names.append(text[len(_FAILED) : end])
        text = text[end + len(_FIELD) :]
    unknown = _unknown_field(text)
    if unknown is not None:
        return unknown
    detail, at, where = text.rpartition(" at ")
    path = _field_path(where.strip().rstrip(".").strip('"')) if at else None
    if not path:  # none, or the message itself: the fields json_format named on the way, if any
        if not names:
            return None
        path, detail = ".".join(names), (detail if path == "" else text)
    return path, _plain(detail.strip().rstrip("."))


def _unknown_field(text: str) -> tuple[str, str] | None:
    """`Message type "T" has no field named "NAME" at "T.path".` -> (path.NAME, "unknown field")."""
    line = text.rpartition(_AVAILABLE)[0] or text  # the caller's name may hold a newline: json_format's list follows
    if not line.startswith(_UNKNOWN_START) or (named := line.find(_UNKNOWN_NAME)) < 0:
        return None
    name_start = named + len(_UNKNOWN_NAME)
    name_end = line.rfind(_UNKNOWN_AT)  # the name is the caller's: json_format's own suffix is the last
    if name_end < name_start:
        return None
    parent = _field_path(line[name_end + len(_UNKNOWN_AT) :].rstrip(".").rstrip('"'))
    name = line[name_start:name_end][:MAX_SHOWN]
    return (f"{parent}.{name}" if parent else name), "unknown field"


def _field_path(where: str) -> str | None:
    """The field path of json_format's `Type.a[0].b` (the message type left out); "" for the message
    itself; None when the text is not such a path (a caller's value that happens to contain " at ")."""
    if len(where) > MAX_PATH or _PATH.fullmatch(where) is None:
        return None
    return where.partition(".")[2]


def _plain(detail: str) -> str:
    if detail.startswith(_ENUM):
        end = detail.rfind(_ENUM_END)
        value = detail[len(_ENUM) : end if end > 0 else None]
        return f"unknown value {value[:MAX_SHOWN]}"
    for words, plain in _PLAIN:
        if words in detail:
            return plain
    return detail[: MAX_SHOWN * 2]
