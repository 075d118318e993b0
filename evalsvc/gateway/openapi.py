"""The OpenAPI description of the native routes, derived from the protobuf descriptors.

A route's request body, parameters and responses are JSON Schemas of its gRPC messages in their proto3
JSON form, the form `google.protobuf.json_format` produces: lowerCamelCase names, enums by name, 64-bit
integers as decimal strings, doubles as numbers (or "NaN", "Infinity", "-Infinity"), Timestamp as an
RFC 3339 string, Struct as an object, maps as objects, members of a oneof as optional properties.

The schemas are honest both ways: every document a schema allows parses (json_format also takes the
proto field names, numbers in strings, enum numbers and null for "unset", which the schemas leave out),
and every response the gateway sends matches its schema. Messages live in `components/schemas` under
their full names and refer to each other with `$ref`, so recursion and reuse cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.api import field_behavior_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.rpc import status_pb2

from evalsvc.gateway.routes import Route

EVENT_ONEOF = "event"  # a streamed message's oneof whose set member names its Server-Sent Event
# The schema of one item of a stream: OpenAPI 3.2's `itemSchema`, as an extension (the document is 3.1).
ITEM_SCHEMA = "x-itemSchema"
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "an evalsvc API key (`evk_...`)"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
}

_INT32 = {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1}
_UINT32 = {"type": "integer", "format": "uint32", "minimum": 0, "maximum": 2**32 - 1}
_INT64 = {"type": "string", "format": "int64", "pattern": "^-?[0-9]{1,19}$"}
_UINT64 = {"type": "string", "format": "uint64", "pattern": "^[0-9]{1,20}$"}
# A double or float is a JSON number, or one of the strings json_format writes for what JSON lacks.
_NON_FINITE = "^(NaN|-?Infinity)$"
_FLOAT_MAX = 3.4028234663852886e38
_T = FieldDescriptor
SCALARS: dict[int, dict[str, Any]] = {
    _T.TYPE_DOUBLE: {"type": ["number", "string"], "format": "double", "pattern": _NON_FINITE},
    _T.TYPE_FLOAT: {
        "type": ["number", "string"],
        "format": "float",
        "pattern": _NON_FINITE,
        "minimum": -_FLOAT_MAX,
        "maximum": _FLOAT_MAX,
    },
    _T.TYPE_INT32: _INT32,
    _T.TYPE_SINT32: _INT32,
    _T.TYPE_SFIXED32: _INT32,
    _T.TYPE_UINT32: _UINT32,
    _T.TYPE_FIXED32: _UINT32,
    _T.TYPE_INT64: _INT64,
    _T.TYPE_SINT64: _INT64,
    _T.TYPE_SFIXED64: _INT64,
    _T.TYPE_UINT64: _UINT64,
    _T.TYPE_FIXED64: _UINT64,
    _T.TYPE_BOOL: {"type": "boolean"},
    _T.TYPE_STRING: {"type": "string"},
    _T.TYPE_BYTES: {"type": "string", "format": "byte", "contentEncoding": "base64"},
}

# Well-known types have their own JSON forms; they are written inline, not as components.
WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {
        "type": "string",
        "format": "date-time",
        "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})$",
    },
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]{1,12}(\.[0-9]{1,9})?s$"},
    "google.protobuf.FieldMask": {"type": "string", "description": "comma-separated lowerCamelCase field paths"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {"description": "any JSON value"},
    "google.protobuf.ListValue": {"type": "array"},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string", "description": "type.googleapis.com/<full message name>"}},
        "required": ["@type"],
        "additionalProperties": True,
        "description": "a message of the type `@type` names, its fields beside `@type`",
    },
}
WRAPPERS = {
    f"google.protobuf.{kind}Value"
    for kind in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
}


def _behaviors(field: FieldDescriptor) -> list[int]:
    return list(field.GetOptions().Extensions[field_behavior_pb2.field_behavior])


def map_value(field: FieldDescriptor) -> FieldDescriptor | None:
    """The value field of a `map<K, V>` field (repeated entries on the wire, an object in JSON); None for
    any other field."""
    entry = field.message_type
    return entry.fields_by_name["value"] if entry is not None and entry.GetOptions().map_entry else None


def _real_oneofs(message: Descriptor) -> list[tuple[str, list[str]]]:
    """The message's oneofs and their members' JSON names, without proto3 `optional`'s synthetic ones."""
    found = []
    for oneof in message.oneofs:
        members = [f.json_name for f in oneof.fields]
        if len(oneof.fields) == 1 and oneof.name == f"_{oneof.fields[0].name}":
            continue
        found.append((oneof.name, members))
    return found


class Schemas:
    """JSON Schemas of protobuf messages in proto3 JSON, gathered as OpenAPI components."""

    def __init__(self) -> None:
        self.components: dict[str, dict[str, Any]] = {}

    def message(self, descriptor: Descriptor) -> dict[str, Any]:
        """The schema of a message-typed value: a `$ref` to its component (added with all it uses on first
        sight), or the inline JSON form of a well-known type."""
        name = descriptor.full_name
        if name in WELL_KNOWN:
            return dict(WELL_KNOWN[name])
        if name in WRAPPERS:
            return self.value(descriptor.fields_by_name["value"])
        if name not in self.components:
            self.components[name] = {}  # reserved first: a message that contains itself refers to it
            self.components[name] = self.object(descriptor)
        return {"$ref": f"#/components/schemas/{name}"}

    def object(self, descriptor: Descriptor, omit: frozenset[str] = frozenset()) -> dict[str, Any]:
        """A message's fields as an object schema, leaving out the fields named in `omit`."""
        fields = [f for f in descriptor.fields if f.name not in omit]
        schema: dict[str, Any] = {
            "type": "object",
            "title": descriptor.name,
            "properties": {f.json_name: self.field(f) for f in fields},
            "additionalProperties": False,  # the gateway parses strictly: an unknown field is a 400
        }
        required = [f.json_name for f in fields if field_behavior_pb2.REQUIRED in _behaviors(f)]
        if required:
            schema["required"] = required
        oneofs = [
            (name, members) for name, members in _real_oneofs(descriptor) if schema["properties"].keys() & set(members)
        ]
        if oneofs:
            schema["description"] = " ".join(
                f"At most one of {', '.join(f'`{m}`' for m in members)} (oneof `{name}`)." for name, members in oneofs
            )
        return schema

    def field(self, field: FieldDescriptor) -> dict[str, Any]:
        """A field's schema: a map is an object, a repeated field an array; OUTPUT_ONLY is `readOnly`."""
        entry = map_value(field)
        schema: dict[str, Any]
        if entry is not None:
            schema = {"type": "object", "additionalProperties": self.value(entry)}
        elif field.is_repeated:
            schema = {"type": "array", "items": self.value(field)}
        else:
            schema = self.value(field)
        if field_behavior_pb2.OUTPUT_ONLY in _behaviors(field):
            schema["readOnly"] = True
        return schema

    def value(self, field: FieldDescriptor) -> dict[str, Any]:
        """The schema of one value of a field (an element, if it is repeated)."""
        if field.message_type is not None:
            return self.message(field.message_type)
        if field.enum_type is not None:
            return {"type": "string", "enum": [v.name for v in field.enum_type.values]}
        return dict(SCALARS[field.type])

    def status(self) -> dict[str, Any]:
        """The error body of every route: google.rpc.Status."""
        return self.message(status_pb2.Status.DESCRIPTOR)


def _scalar_in_json(field: FieldDescriptor) -> bool:
    """Whether one value of a field is a JSON scalar: not a message, unless a well-known type written as one."""
    if field.message_type is None:
        return True
    name = field.message_type.full_name
    return name in WRAPPERS or WELL_KNOWN.get(name, {}).get("type") == "string"


def query_fields(route: Route) -> list[FieldDescriptor]:
    """The fields the query string may set: those neither in the path nor in the body whose values are JSON
    scalars (repeated ones too, as repeated parameters), and maps of scalars, as `name.key=value`."""
    if route.body == "*":
        return []
    taken = {*route.path_params, route.body}
    return [f for f in route.method.input_type.fields if f.name not in taken and _scalar_in_json(map_value(f) or f)]


def _parameters(route: Route, schemas: Schemas) -> list[dict[str, Any]]:
    fields = route.method.input_type.fields_by_name
    params = [
        {"name": name, "in": "path", "required": True, "schema": schemas.value(fields[name])}
        for name in route.path_params
    ]
    for field in query_fields(route):
        if map_value(field) is not None:
            continue  # `name.key=value` pairs: no OpenAPI style describes them; the description does
        params.append({"name": field.json_name, "in": "query", "required": False, "schema": schemas.field(field)})
    return params


def _body(route: Route, schemas: Schemas) -> dict[str, Any]:
    """The request body: the input message without its path fields (`body: "*"`), or one of its fields."""
    message = route.method.input_type
    if route.body != "*":
        schema = schemas.field(message.fields_by_name[route.body])
    elif route.path_params:
        schema = schemas.object(message, omit=frozenset(route.path_params))
    else:
        schema = schemas.message(message)
    return {"required": False, "content": {"application/json": {"schema": schema}}}


def _stream_content(route: Route, schemas: Schemas) -> dict[str, Any]:
    """The two encodings of a server stream, each described by the schema of one of its items (a stream as
    a whole is a string to OpenAPI 3.1)."""
    output = route.method.output_type
    event = schemas.message(output)
    status = schemas.status()
    oneof = output.oneofs_by_name.get(EVENT_ONEOF)
    names = [f.name for f in oneof.fields] if oneof is not None else ["message"]
    return {
        "text/event-stream": {
            "schema": {"type": "string"},
            ITEM_SCHEMA: {
                "type": "object",
                "description": "`id` is the last seq the event carries (resume with Last-Event-ID); `event: error` "
                "ends a stream that failed, its data a google.rpc.Status",
                "properties": {
                    "id": {"type": "string", "pattern": "^[0-9]+$"},
                    "event": {"type": "string", "enum": [*names, "error"]},
                    "data": {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {"anyOf": [event, status]},
                    },
                },
                "required": ["event", "data"],
            },
        },
        "application/x-ndjson": {
            "schema": {"type": "string"},
            ITEM_SCHEMA: {
                "type": "object",
                "description": "one JSON object per line: `result` per message, `error` if the stream fails",
                "properties": {"result": event, "error": status},
            },
        },
    }


def operation(route: Route, schemas: Schemas) -> dict[str, Any]:
    """The OpenAPI operation of one native route (FastAPI merges it into what it generates)."""
    status = {"content": {"application/json": {"schema": schemas.status()}}}
    ok = (
        _stream_content(route, schemas)
        if route.method.server_streaming
        else {"application/json": {"schema": schemas.message(route.method.output_type)}}
    )
    doc: dict[str, Any] = {
        "parameters": _parameters(route, schemas),
        "responses": {
            "200": {"description": route.method.output_type.full_name, "content": ok},
            "4XX": {"description": "the request failed (google.rpc.Status)", **status},
            "5XX": {"description": "the service failed or is unavailable (google.rpc.Status)", **status},
        },
        "security": [{name: []} for name in SECURITY_SCHEMES],
    }
    if route.body:
        doc["requestBody"] = _body(route, schemas)
    return doc


def map_parameters(route: Route) -> list[str]:
    """JSON names of the map fields the query string sets as `name.key=value` (for route descriptions)."""
    return [f.json_name for f in query_fields(route) if map_value(f) is not None]


def with_components(generate: Callable[[], dict[str, Any]], schemas: Schemas) -> Callable[[], dict[str, Any]]:
    """FastAPI's document generator (`app.openapi`) plus the message schemas the native operations refer
    to and the API key schemes; the dialects' own components stay as FastAPI made them."""

    def document() -> dict[str, Any]:
        spec = generate()
        components = spec.setdefault("components", {})
        components.setdefault("schemas", {}).update(schemas.components)
        components.setdefault("securitySchemes", {}).update(SECURITY_SCHEMES)
        return spec

    return document
