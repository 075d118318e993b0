"""What a proto3 JSON parse error says, for the caller: the field it is about and why, in its words.

`json_format` reports a wrong value as Python sees it ("Failed to parse repetitions field: invalid
literal for int() with base 10: 'abc'.", "expected string or bytes-like object, got 'int'"), nested
once per message level (not for a oneof's or an `optional` field), usually ending " at Type.path", and
an unknown field with the message type's full name. The gateway answers both as INVALID_ARGUMENT with
a field violation (google.rpc.BadRequest), as the service does for any other bad field: the field
path and a description that needs no Python.

A path names each field as the proto does (`items[0].response.latency_ms`, AIP-193), as the service's own
checks name it, whichever of its two JSON names the caller wrote (`latencyMs`, `latency_ms`): the gateway's
violations used the caller's spelling, so one field had two paths, depending on which layer refused it.
An unknown field keeps the caller's name (there is no other), and a map key its text.

The message quotes the caller's value, which may be megabytes of anything (it is read before the API
key is checked), so it is taken apart with string operations that cost its length once: no regular
expression runs over it (one with overlapping classes and `$` took quadratic time in a run of dots:
~90 s of the event loop for a 100 KB value). Only json_format's own path, bounded and checked, meets
a regular expression.
"""

from __future__ import annotations

import functools
import re

from google.protobuf import descriptor_pool, json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor

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
_SEGMENT = re.compile(r"\.?([A-Za-z_]\w*)((?:\[[^\[\]]*\])*)")  # one field of such a path, its indices
_WELL_KNOWN = "google/protobuf/"  # Struct, Value, wrappers...: what follows them is data, not field names
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
    ("Value out of range", "is out of range for the field's type"),  # protobuf's, setting an int64 past 2^63
)


def field_violation(exc: json_format.ParseError, message: Descriptor) -> tuple[str, str] | None:
    """(field path, description) of a parse error about one field of a `message`, the path in proto
    names; None when it is about the whole body (not JSON, not UTF-8) or does not say which field."""
    text = str(exc).strip()
    names: list[str] = []
    while text.startswith(_FAILED) and (end := text.find(_FIELD, len(_FAILED), len(_FAILED) + MAX_PATH)) > 0:
        names.append(text[len(_FAILED) : end])
        text = text[end + len(_FIELD) :]
    unknown = _unknown_field(text, message)
    if unknown is not None:
        return unknown
    detail, at, where = text.rpartition(" at ")
    path = _field_path(where.strip().rstrip(".").strip('"')) if at else None
    if path is None and (raised := _raised_at(exc)):  # a message without " at Type.path"
        path, detail = raised, text
    if path and names:
        path = _deepest(path, names)
    if not path:  # none, or the message itself: the fields json_format named on the way, if any
        if not names:
            return None
        path, detail = ".".join(names), (detail if path == "" else text)
    return proto_path(path, message), _plain(detail.strip().rstrip("."))


def _raised_at(exc: BaseException) -> str | None:
    """The path json_format was converting when a Python error it does not catch was raised (e.g.
    `int("0x10")`'s, or protobuf's "Value out of range" from setting an int64), which its message lacks: it
    named the fields on the way without their indices (`items.response.promptTokens`, where every other
    wrong value is at `items[0].response.promptTokens`). json_format (pure Python, whichever protobuf
    backend) keeps it as `path` in the frames converting the value; the deepest of them is read from the
    error's traceback (a walk as deep as the body's nesting), and used only if it is a path (`_field_path`)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    where = None
    frames = exc.__traceback__
    while frames is not None:
        frame = frames.tb_frame
        if frame.f_globals.get("__name__") == json_format.__name__ and isinstance(
            path := frame.f_locals.get("path"), str
        ):
            where = path
        frames = frames.tb_next
    return _field_path(where) if where else None


def _deepest(path: str, names: list[str]) -> str:
    """json_format's path of the message a wrong value is in (`webhook`), extended by the fields it named
    on the way past it (`webhook.eventTypes`): a repeated field given no list is reported at its message,
    so `{"webhook": {"eventTypes": "run.failed"}}` was a violation on `webhook`. The path keeps its
    indices; the names are followed only when they agree with its fields."""
    fields: list[str] = []
    position = 0
    while position < len(path) and (segment := _SEGMENT.match(path, position)) is not None:
        fields.append(segment.group(1))
        position = segment.end()
    if position < len(path) or len(names) <= len(fields) or names[: len(fields)] != fields:
        return path
    return ".".join([path, *names[len(fields) :]])


def field_named(message: Descriptor, name: str) -> FieldDescriptor | None:
    """The field of `message` that `name` names in proto3 JSON: its JSON name or its proto name."""
    return _json_names(message).get(name) or message.fields_by_name.get(name)


@functools.cache
def _json_names(message: Descriptor) -> dict[str, FieldDescriptor]:
    return {field.json_name: field for field in message.fields}


def field_message(field: FieldDescriptor) -> Descriptor | None:
    """The message whose fields come after this field in a path (a map's values' type): None when what
    follows is not field names (a scalar, a well-known type such as Struct, whose keys are data)."""
    target = field.message_type
    if target is not None and target.GetOptions().map_entry:
        target = target.fields_by_name["value"].message_type
    return None if target is None or target.file.name.startswith(_WELL_KNOWN) else target


def proto_path(path: str, message: Descriptor) -> str:
    """A field path as json_format writes it, in the caller's names, with each field's proto name
    (`items[0].response.latencyMs` -> `items[0].response.latency_ms`); indices and map keys as they are,
    and from the first name that is no field of its message on, the path as given."""
    parts: list[str] = []
    position = 0
    at: Descriptor | None = message
    while position < len(path):
        segment = _SEGMENT.match(path, position)
        field = field_named(at, segment.group(1)) if segment is not None and at is not None else None
        if segment is None or field is None:
            parts.append(path[position:])
            break
        parts.append(("." if position else "") + field.name + segment.group(2))
        position, at = segment.end(), field_message(field)
    return "".join(parts)


def _unknown_field(text: str, message: Descriptor) -> tuple[str, str] | None:
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
    return (f"{proto_path(parent, message)}.{name}" if parent else name), "unknown field"


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
        return f"unknown value {value[:MAX_SHOWN]}{_enum_values(detail[end + len(_ENUM_END) :]) if end > 0 else ''}"
    for words, plain in _PLAIN:
        if words in detail:
            return plain
    return detail[: MAX_SHOWN * 2]


@functools.lru_cache(maxsize=64)  # json_format's own type names: a few, but bounded whatever comes
def _enum_values(enum_type: str) -> str:
    """What an unknown value of `enum_type` (json_format's full name of it) could have been, as the run
    filter's error lists a status: `?states=failed` said only "unknown value failed". Empty for a type not
    in the pool."""
    try:
        enum = descriptor_pool.Default().FindEnumTypeByName(enum_type.strip())
    except KeyError:
        return ""
    return f"; expected one of {', '.join(v.name for v in enum.values if v.number != 0)}"
