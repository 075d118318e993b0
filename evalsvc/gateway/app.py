"""The gateway's ASGI app: native proto3-JSON routes (one per `google.api.http` rule) and the
WatchRun stream as Server-Sent Events or NDJSON.

Bodies are the canonical proto3 JSON mapping (`google.protobuf.json_format`, lowerCamelCase, enums
by name, int64 as strings), as grpc-gateway produces. Errors map gRPC codes to HTTP statuses as
grpc-gateway does, with the `google.rpc.Status` as the body: `{code, message, details}`; so are a path no
route has (404) and a method its routes do not take (405), or in a dialect's error shape when the path is
one of that dialect's (`unrouted.py`).

Parsing is strict: an unknown field or enum name, a query parameter that names no field (but the cache
buster `_`), a wrong type, a number out of range, an integer query value that is not decimal digits
(with an optional `-`: `1e3`, `5.0`, `+5`), a body that is not a UTF-8 JSON object (or holds the
non-JSON literals `NaN`, `Infinity`) or a field given under both its JSON names (or, in the query
string, twice) is a 400 before any call, so a misspelt field is never silently dropped; violations
name fields by their proto paths. Every GET route answers HEAD too, without the body. `/openapi.json`
documents every route with schemas derived from the messages (see `openapi.py`).
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import grpc
from fastapi import FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute

from evalsvc.errors import MAX_VIOLATIONS, FieldViolation, Reason, ServiceError, to_status
from evalsvc.gateway import dialects, openapi, ui
from evalsvc.gateway.conditional import (
    apply_if_match,
    apply_if_none_match,
    check_read_if_match,
    etag_header,
    unmet_status,
)
from evalsvc.gateway.dialects.base import DialectOptions
from evalsvc.gateway.parse_errors import MAX_SHOWN, field_message, field_named, field_violation
from evalsvc.gateway.routes import Route, routes, serve_head
from evalsvc.gateway.translators import TRANSLATOR_THREADS, in_turn, loads, object_of, translated
from evalsvc.gateway.unrouted import Keyed, RoutingErrors
from evalsvc.gateway.upstream import (
    HTTP_STATUS,
    ChannelFactory,
    GatewayError,
    StreamSlot,
    Upstream,
    never_reached,
    unreachable,
    with_retry_after,
)
from evalsvc.messages.validation import (
    MAX_CONVERSATION_TURNS,
    MAX_REQUEST_TURNS,
    conversation_fields,
    too_many_turns,
    too_many_turns_together,
)
from evalsvc.slots import Slots

FORWARDED_HEADERS = ("authorization", "x-api-key")
HEALTH_TIMEOUT_S = 5.0  # GET /healthz waits this long for the service's answer
_UNREACHED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
RESUME_FIELD = "after_seq"  # what a stream's Last-Event-ID header sets, over the query string
CACHE_BUSTER = "_"  # jQuery's `_=<timestamp>`: the one query parameter that names no field and is not refused
_QUERY_BOOLS = {"true": True, "false": False}

log = logging.getLogger(__name__)


def to_json(message: Message) -> dict[str, Any]:
    """The canonical proto3 JSON of a message, every field present (grpc-gateway's default)."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


async def json_body(message: Message) -> bytes:
    """`to_json` as a response body, written as JSONResponse writes it; bodies of small messages are
    remembered by the message's bytes, so a run read again and again (GetRun polling) is translated
    once per version: proto3 JSON is pure Python, its wire form C. A large one is written in a
    translator thread (evalsvc.gateway.translators)."""
    wire = message.SerializeToString()
    if len(wire) > _REMEMBERED_BYTES:
        return await translated(len(wire), _json_body, message)
    # Message classes hash by identity; the protobuf stubs declare Message.__hash__ in a way mypy rejects.
    return _remembered_body(type(message), wire)  # type: ignore[arg-type]


_REMEMBERED_BYTES = 4096  # a run is ~0.5 KiB; with 1024 bodies remembered, at most ~12 MiB


@functools.lru_cache(maxsize=1024)
def _remembered_body(kind: type[Message], wire: bytes) -> bytes:
    return _json_body(kind.FromString(wire))


def _json_body(message: Message) -> bytes:
    return json.dumps(to_json(message), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


async def _fitting_count(request: Message, response: Message, max_json_bytes: int) -> int:
    """For a page of a list (a request with `page_size`, a response with `next_page_token` and one repeated
    message field) whose JSON is over `max_json_bytes`: how many of its leading items' JSON fit in it (at
    least one), when fewer than it holds; else 0. The service bounds a page by its protobuf size (half of
    --max-message-bytes), and its JSON may be far larger: text escapes (a control character is 6 bytes of
    JSON, 1 of protobuf) and field names; a page of 16.7 MB of results was 100 MB of JSON, 0.6 s to write
    and ~300 MiB. The gateway asks again for that many (`page_size`), so the page and its token stay the
    service's."""
    fields = response.DESCRIPTOR.fields_by_name
    repeated = [f for f in response.DESCRIPTOR.fields if f.is_repeated and f.message_type is not None]
    if "next_page_token" not in fields or "page_size" not in request.DESCRIPTOR.fields_by_name or len(repeated) != 1:
        return 0
    items = getattr(response, repeated[0].name)
    if len(items) < 2:
        return 0
    sizes = await translated(response.ByteSize(), lambda: [len(_json_body(item)) + 1 for item in items])
    total = kept = 0
    for size in sizes:
        total += size
        if total > max_json_bytes - 4096 and kept > 0:  # the field's name, the token, the braces
            break
        kept += 1
    return kept if kept < len(items) else 0


def status_body(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    """`{code, message, details}`: the google.rpc.Status of a failed call, as JSON; for a call that never
    reached the service, the gateway's UPSTREAM_UNAVAILABLE (`unreachable`)."""
    if never_reached(error):
        return to_json(_status(unreachable()))
    status = rpc_status.from_call(error)
    if status is not None:
        return to_json(status)
    return {"code": error.code().value[0], "message": error.details() or "", "details": []}


def error_response(error: grpc.aio.AioRpcError) -> JSONResponse:
    """The HTTP response for a failed call."""
    response = JSONResponse(status_code=HTTP_STATUS.get(error.code(), 500), content=status_body(error))
    return with_retry_after(response, GatewayError.from_rpc(error))


def refused(error: GatewayError) -> JSONResponse:
    """The native routes' error handler: a request the gateway refused to send, as the google.rpc.Status
    the service would have answered (`{code, message, details}`, with RetryInfo and `Retry-After` when
    waiting helps)."""
    return with_retry_after(JSONResponse(status_code=error.http_status, content=to_json(_status(error))), error)


def _status(error: GatewayError) -> status_pb2.Status:
    """The google.rpc.Status of an error the gateway itself answers."""
    violations = [FieldViolation(name, description) for name, description in error.violations]
    retry_after_s = error.retry_after_s or None
    return to_status(ServiceError(error.code, error.reason, error.message, violations, error.metadata, retry_after_s))


def _message_class(descriptor: Any) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


# The status nginx logs for a client that closed its connection before the answer: nothing reads it.
CLIENT_CLOSED_REQUEST = 499


async def _disconnect(request: Request) -> None:
    """Return once the HTTP client has closed its connection (ASGI's http.disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _reads_key(route: BaseRoute, caller: Callable[..., Any]) -> bool:
    """Whether a dialect's route depends on its vendor's `caller` (reads the caller's key)."""

    def depends(dependant: Dependant) -> bool:
        return any(each.call is caller or depends(each) for each in dependant.dependencies)

    return isinstance(route, APIRoute) and depends(route.dependant)


def _metadata(request: Request) -> tuple[tuple[str, str], ...]:
    """The caller's API key headers as gRPC metadata, which admits printable ASCII only (HTTP admits more)."""
    found = tuple((name, request.headers[name]) for name in FORWARDED_HEADERS if name in request.headers)
    if any(not value.isascii() or not value.isprintable() for _, value in found):
        raise GatewayError(
            grpc.StatusCode.UNAUTHENTICATED, "the API key is malformed or mistyped", Reason.API_KEY_INVALID
        )
    return found


def _query_value(field: FieldDescriptor, text: str) -> Any:
    """A query string value as json_format takes it: booleans unquoted, anything else as the string."""
    is_bool = field.type == FieldDescriptor.TYPE_BOOL or (
        field.message_type is not None and field.message_type.full_name == "google.protobuf.BoolValue"
    )
    return _QUERY_BOOLS.get(text, text) if is_bool else text


_INTEGER_TYPES = (
    FieldDescriptor.CPPTYPE_INT32,
    FieldDescriptor.CPPTYPE_INT64,
    FieldDescriptor.CPPTYPE_UINT32,
    FieldDescriptor.CPPTYPE_UINT64,
)
_INTEGER_WRAPPERS = {f"google.protobuf.{name}" for name in ("Int32Value", "Int64Value", "UInt32Value", "UInt64Value")}
_INTEGER = re.compile(r"-?[0-9]+")  # what grpc-gateway's strconv.ParseInt takes
WHOLE_NUMBER = "must be a whole number"


def _check_integer(field: FieldDescriptor, text: str, path: str) -> None:
    """An integer field's query value is decimal digits with an optional `-`: read as proto3 JSON, `1e3`
    was 1000 and `5.0` or `1E1` numbers too (while `+5` was refused, and Last-Event-ID's `1e0`), so a
    mangled value was taken as another. Refused naming the field, as other values it cannot take are."""
    integer = field.cpp_type in _INTEGER_TYPES or (
        field.message_type is not None and field.message_type.full_name in _INTEGER_WRAPPERS
    )
    if integer and not _INTEGER.fullmatch(text):
        raise GatewayError.invalid(f"invalid request: {path}: {WHOLE_NUMBER}", (path, WHOLE_NUMBER))


_FLOAT_TYPES = (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT)
_FLOAT_WRAPPERS = {"google.protobuf.DoubleValue", "google.protobuf.FloatValue"}
_NONZERO_MANTISSA = re.compile(
    r"\s*[+-]?(?:[0-9]*[1-9][0-9]*\.?[0-9]*|[0-9]*\.[0-9]*[1-9][0-9]*)(?:[eE][+-]?[0-9]+)?\s*"
)
TOO_SMALL = "is too small to be told from 0 (it underflows to 0, which means the default)"


def _check_float(field: FieldDescriptor, text: str, path: str) -> None:
    """A number field's query value that is not zero but reads as 0.0 (`alpha=1e-400`) is refused: 0 means
    "the default", so the strictest value asked for was silently replaced by a lenient one (gRPC callers
    cannot send it: their double is already 0)."""
    number = field.cpp_type in _FLOAT_TYPES or (
        field.message_type is not None and field.message_type.full_name in _FLOAT_WRAPPERS
    )
    if not number or not _NONZERO_MANTISSA.fullmatch(text):
        return
    try:
        value = float(text)
    except ValueError:
        return
    if value == 0.0:
        raise GatewayError.invalid(f"invalid request: {path}: {TOO_SMALL}", (path, TOO_SMALL))


def _query_fields(request: Request, route: Route) -> dict[str, Any]:
    """Query parameters as request fields, by proto or JSON name: repeated fields may repeat, and
    `map.key=value` sets a map entry. A field mask is left out: `_set_masks` sets it.

    A name that is no such field is refused naming it, but for the cache buster `_`: it was ignored, so
    `?status=RUN_STATUS_FAILED` (the field is `statuses`) listed every run, and a cleanup script with a
    typo acted on all of them. A singular field or a map entry given twice (`?after_seq=1&after_seq=5`,
    `?pageSize=1&page_size=9`) is refused as the body's is, and as grpc-gateway refuses it: the last one
    won silently."""
    fields = {name: f for f in openapi.query_fields(route) for name in (f.name, f.json_name)}
    values: dict[str, Any] = {}
    given: dict[str, str] = {}  # the proto path of each singular field or map entry set -> the parameter that set it
    for key, text in request.query_params.multi_items():
        if key == CACHE_BUSTER:
            continue
        name, dot, entry = key.partition(".")
        field = fields.get(name)
        if field is None:
            raise _unknown_parameter(key, fields)
        if _is_mask(field):
            continue
        value_field = openapi.map_value(field)
        if (value_field is not None) != bool(dot):
            usage = f"{field.json_name}.<key>=<value>" if value_field is not None else f"{field.json_name}=<value>"
            raise json_format.ParseError(f"query parameter {key!r}: write {usage}")
        if field.is_repeated and value_field is None:
            _check_integer(field, text, field.name)
            _check_float(field, text, field.name)
            values.setdefault(field.json_name, []).append(_query_value(field, text))
            continue
        path = f"{field.name}[{entry}]" if value_field is not None else field.name
        _check_integer(value_field or field, text, path)
        _check_float(value_field or field, text, path)
        if path in given:
            description = f"given twice, as {given[path]} and {key}"
            raise GatewayError.invalid(f"invalid request: {path}: {description}", (path, description))
        given[path] = key
        if value_field is not None:
            values.setdefault(field.json_name, {})[entry] = _query_value(value_field, text)
        else:
            values[field.json_name] = _query_value(field, text)
    return values


def _unknown_parameter(key: str, fields: dict[str, FieldDescriptor]) -> GatewayError:
    """The refusal of a query parameter that names no field of the route, with the name it was probably
    meant to be (`label.suite` -> `labels.suite`, `status` -> `statuses`)."""
    shown = key[:MAX_SHOWN]  # the caller's text, of any length, is repeated back
    name, _, entry = shown.partition(".")
    found = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.6)
    hint = ""
    if found:
        maps = openapi.map_value(fields[found[0]]) is not None
        hint = f"; did you mean '{found[0]}.{entry or '<key>'}'?" if maps else f"; did you mean '{found[0]}'?"
    description = f"unknown query parameter{hint}"
    return GatewayError.invalid(f"invalid request: {shown}: {description}", (shown, description))


def _is_mask(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.full_name == "google.protobuf.FieldMask"


def _set_masks(request: Request, route: Route, message: Message) -> None:
    """Each field mask of the query string (comma-separated paths; the parameter may repeat) into the
    request, its paths in the proto's own names.

    Not through json_format: its FieldMask turns every lowerCamelCase letter into `_` and a lower case
    letter, so `annotations.myKey` arrived as `annotations.my_key`, and a PATCH set nothing and
    removed `my_key` (a map key is data, not a field name), and it refused the proto's own names
    (`display_name`). Field names are taken in either form; what follows a map field is its key,
    verbatim."""
    resource = route.method.input_type.fields_by_name.get(route.body)
    names = resource.message_type if resource is not None and resource.message_type is not None else None
    for field in openapi.query_fields(route):
        if not _is_mask(field):
            continue
        texts = [text for name in (field.name, field.json_name) for text in request.query_params.getlist(name)]
        paths = [path.strip() for text in texts for path in _MASK_PATHS.findall(text)]
        getattr(message, field.name).paths.extend(_mask_path(path, names) for path in paths if path)


def _mask_path(path: str, message: Descriptor | None) -> str:
    """A field mask path with its field names in proto form (`displayName` -> `display_name`), up to
    a map field, after which comes a key, kept as it is."""
    name, dot, rest = path.partition(".")
    snake = _CAMEL_HUMP.sub(r"_\1", name).lower() if name[:1].islower() else name
    field = message.fields_by_name.get(snake) if message is not None else None
    if field is None:
        return path if dot else snake
    if not dot:
        return snake
    if openapi.map_value(field) is not None or field.message_type is None:
        return f"{snake}.{rest}"
    return f"{snake}.{_mask_path(rest, field.message_type)}"


_CAMEL_HUMP = re.compile(r"([A-Z])")
# A mask's paths: split at commas, except inside a backtick-quoted map key (`` doubles a backtick).
_MASK_PATHS = re.compile(r"(?:[^,`]|`(?:[^`]|``)*`)+")


def _apply_last_event_id(request: Request, route: Route, message: Message) -> None:
    """The resume point of an EventSource that reconnects with Last-Event-ID, which wins over the URL it
    first opened (`?after_seq=`); a value that is no seq is refused naming the header, which the caller
    sent, not the field it sets.

    The header is an `id:` this gateway wrote, a plain decimal seq, not proto3 JSON: read as JSON, `1e3`
    was seq 1000 and `3.0`, `+3` or `1e0` other seqs than written, so a mangled id resumed somewhere else."""
    resume = route.method.input_type.fields_by_name.get(RESUME_FIELD)
    last_event_id = request.headers.get("last-event-id", "")
    if resume is None or not last_event_id:
        return
    description = "must be a whole number, the id of an event of the stream"
    if _EVENT_ID.fullmatch(last_event_id):
        try:
            json_format.ParseDict({resume.json_name: last_event_id}, message)
            return
        except json_format.ParseError as exc:  # out of range
            violation = field_violation(exc, route.method.input_type)
            description = violation[1] if violation else description
    raise GatewayError.invalid(f"invalid request: Last-Event-ID: {description}", ("Last-Event-ID", description))


_EVENT_ID = re.compile(r"[0-9]{1,20}")  # an int64 seq has at most 19 digits; ParseDict refuses more as out of range


async def _parse_body(request: Request, route: Route, message: Message) -> None:
    """The JSON body into the message (`body: "*"`) or into the field the rule names; empty is no body."""
    raw = await request.body()
    if not raw.strip():
        return
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise json_format.ParseError(f"the body is not UTF-8: {exc}") from None
    await translated(len(raw), _read_object, text, route, message)


def _read_object(text: str, route: Route, message: Message) -> None:
    """A body's JSON into the message, as `json_format.Parse` reads it, but only a JSON object, each
    field of it once: a list was read as an empty message (`[]` cancelled a run), a string or a list of
    strings as field names (`s`, `1`), a number or null leaked Python's TypeError; and a field given
    under both its names (`displayName` and `display_name`) took the last one silently."""
    try:
        body = loads(text, object_pairs_hook=_unique_keys, parse_constant=_not_json)
    except (ValueError, RecursionError) as exc:
        raise json_format.ParseError(f"Failed to load JSON: {exc}.") from None
    if not isinstance(body, dict):
        if route.body == "*":  # the request itself: there is no field to name
            raise GatewayError.invalid("the body must be a JSON object")
        raise GatewayError.invalid(
            f"invalid request: {route.body}: must be a JSON object", (route.body, "must be a JSON object")
        )
    fields = body if route.body == "*" else {route.body: body}  # paths then start at the request, as the service's
    if (twice := _named_twice(fields, route.method.input_type)) is not None:
        raise GatewayError.invalid(f"invalid request: {twice[0]}: {twice[1]}", twice)
    if oversized := _oversized_conversations(fields, route.method.input_type):
        names = ", ".join(field for field, _ in oversized[:5])
        raise GatewayError.invalid(f"invalid request: {names}", *oversized[:MAX_VIOLATIONS])
    try:
        json_format.ParseDict(fields, message)
    except json_format.ParseError:
        raise
    except Exception as exc:  # what json_format.Parse wraps as well: a wrong type deep down (TypeError)
        raise json_format.ParseError(f"Failed to parse JSON: {type(exc).__name__}: {exc}.") from None


def _oversized_conversations(body: dict[str, Any], message: Descriptor) -> list[tuple[str, str]]:
    """The service's bounds on conversation turns (evalsvc.messages.validation.turn_violations), checked
    on the parsed JSON by counting its lists, before json_format reads it: proto3 JSON is pure Python
    (~5 us a turn), and a body of 1,000,000 empty turns (3 MB) took 5 s of the interpreter to read
    before the service refused it."""
    out: list[tuple[str, str]] = []
    for outer, inner in conversation_fields(message):
        elements = _json_field(body, outer)
        if not isinstance(elements, list):
            continue  # json_format names what is wrong with it
        total = 0
        for i, element in enumerate(elements):
            turns = _json_field(element, inner) if isinstance(element, dict) else None
            count = len(turns) if isinstance(turns, list) else 0
            total += count
            if count > MAX_CONVERSATION_TURNS:
                out.append((f"{outer.name}[{i}].{inner.name}", too_many_turns(count)))
        if total > MAX_REQUEST_TURNS:
            out.append((outer.name, too_many_turns_together(total)))
    return out


def _json_field(body: dict[str, Any], field: FieldDescriptor) -> Any:
    """A field's value in a JSON object, under its JSON name or its proto name (None when under neither)."""
    return body.get(field.json_name, body.get(field.name))


def _not_json(name: str) -> Any:
    """NaN, Infinity and -Infinity, which Python's json reads and JSON has not: a tool call's arguments
    of `{"x": NaN}` were stored, and every read of the item then failed. (proto3 JSON's own spelling of
    such a double, the string `"NaN"`, is still read, and a field that needs a finite number refuses it.)"""
    raise ValueError(f"{name} is not JSON (proto3 JSON writes a double's {name} as the string {json.dumps(name)})")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object of the body, refused when it repeats a key (as json_format refuses it)."""
    found = object_of(pairs)
    if len(found) != len(pairs):
        raise ValueError("an object repeats a key")
    return found


def _named_twice(body: dict[str, Any], message: Descriptor, path: str = "") -> tuple[str, str] | None:
    """The first field that an object of the body, or of its nested messages, gives under both its JSON
    names, or a message field given a string or a list, as a violation (proto path, description); None
    when there is none. json_format checks each spelling apart."""
    seen: dict[str, str] = {}
    for key, value in body.items():
        field = field_named(message, key)
        if field is None:
            continue  # json_format refuses it, naming it
        at = f"{path}.{field.name}" if path else field.name
        if field.name in seen:
            return at, f"given twice, as {seen[field.name]} and {key}"
        seen[field.name] = key
        nested = field_message(field)
        if nested is None:
            continue
        if openapi.map_value(field) is not None and isinstance(value, dict):
            values = [(f"{at}[{k}]", v) for k, v in value.items()]
        elif field.is_repeated and isinstance(value, list):
            values = [(f"{at}[{i}]", v) for i, v in enumerate(value)]
        else:
            values = [(at, value)]
        for where, item in values:
            if isinstance(item, dict) and (twice := _named_twice(item, nested, where)) is not None:
                return twice
            if isinstance(item, (str, list)) and not (field.is_repeated and item is value):
                # json_format reads a string's characters (or a list's items) as field names: `{"webhook":
                # "x"}` was `webhook.x: unknown field`.
                return where, "must be a JSON object"
    return None


async def build_request(request: Request, route: Route) -> Message:
    """The gRPC request of an HTTP request: body, then query, then Last-Event-ID, then path parameters;
    GatewayError when they are not what the message admits."""
    message = _message_class(route.method.input_type)()
    try:
        if route.body:
            await _parse_body(request, route, message)
        json_format.ParseDict(_query_fields(request, route), message)
        _set_masks(request, route, message)
    except json_format.ParseError as exc:
        violation = field_violation(exc, route.method.input_type)
        raise GatewayError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"invalid request: {violation[0]}: {violation[1]}"
            if violation
            else f"the request is not proto3 JSON: {exc}",
            Reason.INVALID_ARGUMENT,
            [violation] if violation else [],
        ) from None
    _apply_last_event_id(request, route, message)
    for name, value in request.path_params.items():
        setattr(message, name, value)
    return message


def create_app(
    channel_factory: ChannelFactory,
    dialect_spec: str = "all",
    dialect_options: DialectOptions | None = None,
    *,
    streams_per_channel: int = 500,
    streams_per_tenant: int = 500,
    streams_in_all: int = 1500,
    max_json_bytes: int = 16 << 20,
) -> FastAPI:
    """The gateway app, calling the service over channels made by `channel_factory` (given each one's
    index in the pool; see `Upstream`), with the vendor dialects `dialect_spec` names (see
    `dialects.mounts`) beside the native routes, each given `dialect_options`. A tenant may have
    `streams_per_tenant` watches (and synchronous dialect waits) open at once, all tenants together
    `streams_in_all`. A page of a list is answered in at most `max_json_bytes` of JSON (`_fitting_page`)
    when its items allow.

    The app keeps its RoutingErrors (its routes by API, which answers a path no route takes in the error
    shape of the API the path belongs to) as `app.state.routing_errors`, read typed by `routing_errors(app)`:
    what answers for the app from outside it, the size limits wrapped around it in evalsvc.gateway.server
    (evalsvc.gateway.request_limits), answers through it too."""
    upstream = Upstream(channel_factory, streams_per_channel, streams_per_tenant, streams_in_all)
    stream_turns = Slots(TRANSLATOR_THREADS)  # the streams' messages, translated in their tenants' turns

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        upstream.open()
        try:
            yield
        finally:
            await upstream.close()

    app = FastAPI(
        title="evalsvc",
        version="v1",
        description="The evalsvc API as proto3 JSON over HTTP (a translator in front of the gRPC service).",
        lifespan=lifespan,
        # Swagger UI and ReDoc would load their scripts from a CDN: off (the document is /openapi.json).
        docs_url=None,
        redoc_url=None,
        # FastAPI's OpenTelemetry hooks look the providers up in os.environ on every request (18% of a
        # GET /v1/runs/{id} under load); evalsvc exports Prometheus metrics and access logs instead.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        # Starlette answers a path that a route has with or without a trailing slash by a 307 to the other
        # spelling, its Location built from the request's Host header (`Host: evil.example` sent clients
        # to http://evil.example/v1/datasets), over plain http behind TLS, and a DELETE's redirect then
        # got 405. No route path ends in `/`: such a path is the unrouted 404 (ROUTE_NOT_FOUND, or the
        # dialect's own) that docs/errors.md promises. The routers included below are the app's routes
        # (this setting governs them); theirs say the same.
        redirect_slashes=False,
    )

    def unary_endpoint(route: Route) -> Callable[[Request], Any]:
        reading = route.verb.upper() == "GET"  # also as HEAD: If-Match is checked against what it returns

        async def endpoint(request: Request) -> Response:
            if_match = request.headers.get("if-match", "")
            if_none_match = "" if reading else request.headers.get("if-none-match", "")  # a read ignores it
            try:
                message, metadata = await build_request(request, route), _metadata(request)
                if not reading:
                    apply_if_match(if_match, route, message)
                    apply_if_none_match(if_none_match, route, message)  # after: `*` fails whatever If-Match holds
            except GatewayError as error:
                return refused(error)
            call: grpc.aio.UnaryUnaryMultiCallable[Message, Message] = upstream.channel.unary_unary(
                route.grpc_path,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=_message_class(route.method.output_type).FromString,
            )
            try:
                calling = call(message, metadata=metadata, timeout=60)
                answered = await (calling if reading else _ended_with_client(request, calling))
            except grpc.aio.AioRpcError as error:
                return unmet_status(error_response(error), GatewayError.from_rpc(error).reason, if_match, if_none_match)
            if answered is None:
                return Response(status_code=CLIENT_CLOSED_REQUEST)  # no one is there to read it
            response = answered
            if reading:
                try:
                    check_read_if_match(if_match, response)
                except GatewayError as error:
                    return unmet_status(refused(error), error.reason, if_match)
            try:
                body = await json_body(response)
                if (
                    reading
                    and len(body) > max_json_bytes
                    and (fewer := await _fitting_count(message, response, max_json_bytes))
                ):
                    # Asked again for the leading items that fit: the service's token is for them alone.
                    message.page_size = fewer  # type: ignore[attr-defined]  # a list request (`_fitting_count`)
                    try:
                        response = await call(message, metadata=metadata, timeout=60)
                    except grpc.aio.AioRpcError as error:
                        return unmet_status(
                            error_response(error), GatewayError.from_rpc(error).reason, if_match, if_none_match
                        )
                    body = await json_body(response)
            except Exception:  # a value proto3 JSON cannot write (a NaN in a Struct): a google.rpc.Status, not text
                log.exception("%s: the response cannot be written as proto3 JSON", route.method.full_name)
                return refused(GatewayError.internal())  # where Starlette answered a plain-text 500
            tag = etag_header(response)
            headers = {"etag": tag} if tag else None
            return Response(body, media_type=JSONResponse.media_type, headers=headers)

        return endpoint

    async def _ended_with_client(request: Request, calling: Awaitable[Message]) -> Message | None:
        """The call's response, or None once the HTTP client has gone away first: the call is cancelled.
        A write is the service's to finish or not (its transaction is shielded from its call's
        cancellation), but work done for the caller - a ContinueConversations' model calls - ended with a
        gRPC caller and went on for a REST one that had left, up to the 60 s bound, holding its tenant's
        places. Not for reads: they are short, and watching the connection would cost every GET a task."""
        answer = asyncio.ensure_future(calling)
        answer.add_done_callback(lambda done: done.cancelled() or done.exception())  # seen, when not ours to read
        gone = asyncio.ensure_future(_disconnect(request))
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not answer.done():
                answer.cancel()  # the call with it: a remote call's RPC, or the in-process handler (api.local)
        return answer.result() if answer.done() and not answer.cancelled() else None

    def stream_endpoint(route: Route) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            try:
                message, metadata = await build_request(request, route), _metadata(request)
                slot = upstream.stream_slot(metadata)  # in the key's share from the start
            except GatewayError as error:
                return refused(error)
            try:
                call = cast(
                    "grpc.aio.UnaryStreamMultiCallable[Message, Message]",
                    slot.channel.unary_stream(
                        route.grpc_path,
                        request_serializer=lambda m: m.SerializeToString(),
                        response_deserializer=_message_class(route.method.output_type).FromString,
                    ),
                )(message, metadata=metadata)
            except BaseException:  # a channel closed at shutdown, say: the slot is not kept
                slot.release()
                raise
            ndjson = "application/x-ndjson" in request.headers.get("accept", "")
            media_type = "application/x-ndjson" if ndjson else "text/event-stream"
            try:
                first = await call.read()  # fail as a plain HTTP error before the stream starts
                if request.method == "HEAD":  # GET's answer without its body: no stream to hold open
                    call.cancel()
                    slot.release()
                    return Response(media_type=media_type, headers={"cache-control": "no-cache"})
                await slot.admit(call, metadata)  # within the tenant's share of streams
            except BaseException as error:
                call.cancel()
                slot.release()
                if isinstance(error, grpc.aio.AioRpcError):
                    return error_response(error)
                if isinstance(error, GatewayError):
                    return refused(error)
                raise
            return StreamingResponse(
                _relay(call, first, ndjson, slot, stream_turns),
                media_type=media_type,
                headers={"cache-control": "no-cache"},
            )

        return endpoint

    schemas = openapi.Schemas()
    for route in routes():
        streaming = route.method.server_streaming
        endpoint = stream_endpoint(route) if streaming else unary_endpoint(route)
        app.add_api_route(
            route.routed_path,
            endpoint,
            methods=[route.verb.upper()],
            name=route.method.name,
            operation_id=f"{route.method.containing_service.name}_{route.method.name}",
            summary=route.method.name,
            description=_description(route),
            tags=[route.method.containing_service.name],
            response_class=StreamingResponse if streaming else JSONResponse,
            openapi_extra=openapi.operation(route, schemas),
        )
    serve_head(app.router)
    # Requests no route takes (404, 405) answer in the shape of the API their path belongs to.
    unrouted = RoutingErrors(refused)
    # The native routes, which take the caller's key, then /openapi.json, which needs none.
    unrouted.add([r for r in app.routes if isinstance(r, APIRoute)], keyed=Keyed(_metadata, refused))
    unrouted.add([r for r in app.routes if not isinstance(r, APIRoute)])
    unrouted.add(_health_routes(app, upstream))  # needs no key, as gRPC's health service
    for dialect, prefix in dialects.mounts(dialect_spec):
        router = dialect.router(upstream, dialect_options or DialectOptions())
        app.include_router(router, prefix=prefix, tags=[dialect.title])
        # A dialect's routes take the key its caller dependency reads; those that do not (Aymara's
        # health check) are routes that need none, as /openapi.json is.
        keyed = [route for route in router.routes if _reads_key(route, dialect.vendor.caller)]
        unrouted.add(keyed, dialect.vendor.error_handler, prefix, Keyed(dialect.key_metadata, dialect.refusal))
        unrouted.add([route for route in router.routes if route not in keyed], dialect.vendor.error_handler, prefix)
    pages = ui.router()
    serve_head(pages)
    app.include_router(pages)
    unrouted.add(pages.routes)
    app.add_exception_handler(HTTPException, unrouted.handle)
    app.state.routing_errors = unrouted
    app.state.upstream = upstream
    # FastAPI's documented way to extend the document is replacing the method; mypy forbids assigning methods.
    app.openapi = openapi.with_components(app.openapi, schemas)  # type: ignore[method-assign]
    return app


def _health_routes(app: FastAPI, upstream: Upstream) -> list[BaseRoute]:
    """GET (and HEAD) /healthz: the gRPC service's health for HTTP probes and load balancers in front of
    the gateway, which cannot speak gRPC's. Keyless and never refused for a full server, as gRPC's health
    Check (evalsvc.api.admission)."""

    async def healthz() -> JSONResponse:
        stub = health_pb2_grpc.HealthStub(upstream.channel)  # in process, the servicer itself
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as error:
            status = "UNREACHABLE" if error.code() in _UNREACHED else "UNKNOWN"
        return JSONResponse({"status": status}, status_code=200 if status == "SERVING" else 503)

    schema = {"type": "object", "properties": {"status": {"type": "string"}}}
    app.add_api_route(
        "/healthz",
        healthz,
        methods=["GET"],
        operation_id="Health_Check",
        summary="Health",
        description=_HEALTH_DESCRIPTION,
        tags=["Health"],
        responses={
            200: {"description": '`{"status": "SERVING"}`', "content": {"application/json": {"schema": schema}}},
            503: {"description": "not serving", "content": {"application/json": {"schema": schema}}},
            "4XX": {"description": "the request was refused (google.rpc.Status): e.g. 431, headers too large"},
        },
    )
    serve_head(app.router)
    return [route for route in app.routes if getattr(route, "path", None) == "/healthz"]


_HEALTH_DESCRIPTION = (
    "The service's health, for HTTP probes (no key). 200 `SERVING`; otherwise 503 with `NOT_SERVING` (a loop "
    "of the server is stalled: docs/operations.md), `UNREACHABLE` (the standalone gateway's --grpc-target "
    f"refuses connections or does not answer within {HEALTH_TIMEOUT_S:g} s) or `UNKNOWN`."
)


def routing_errors(app: FastAPI) -> RoutingErrors:
    """The RoutingErrors of an app `create_app` made: its routes by API, and how each API writes its errors."""
    errors = app.state.routing_errors
    if not isinstance(errors, RoutingErrors):
        raise TypeError("the app was not made by create_app: it has no RoutingErrors")
    return errors


def upstream_of(app: FastAPI) -> Upstream:
    """The Upstream (the pool of channels to the service) of an app `create_app` made."""
    upstream = app.state.upstream
    if not isinstance(upstream, Upstream):
        raise TypeError("the app was not made by create_app: it has no Upstream")
    return upstream


def _description(route: Route) -> str:
    """What a route calls, how it streams and how its map fields are written in the query string."""
    parts = [
        f"gRPC `{route.grpc_path}`: {route.method.input_type.full_name} -> "
        f"{route.method.output_type.full_name} as proto3 JSON."
    ]
    if route.method.server_streaming:
        parts.append("Server-Sent Events, or NDJSON with `Accept: application/x-ndjson`; resume with `Last-Event-ID`.")
    parts += [
        f"Query `{name}.<key>=<value>` sets an entry of `{name}` (repeatable)."
        for name in openapi.map_parameters(route)
    ]
    return " ".join(parts)


def _sse_event(message: Message) -> bytes:
    """One Server-Sent Event: `event:` the member of the message's `event` oneof that is set (`message`
    when it has none), `id:` the last seq it carries, so an EventSource resumes after it (Last-Event-ID)."""
    kind = message.WhichOneof(openapi.EVENT_ONEOF) if openapi.EVENT_ONEOF in message.DESCRIPTOR.oneofs_by_name else None
    seq = _last_seq(message)
    head = f"id: {seq}\n" if seq else ""
    return f"{head}event: {kind or 'message'}\ndata: {json.dumps(to_json(message))}\n\n".encode()


def _last_seq(message: Any) -> int:
    """The seq of a WatchRun event, or of the last event of a WatchRunBatched batch; 0 for none (a heartbeat)."""
    fields = message.DESCRIPTOR.fields_by_name
    if "events" in fields:
        return _last_seq(message.events[-1]) if message.events else 0
    return int(message.seq) if "seq" in fields else 0


def _ndjson_line(message: Message) -> bytes:
    """One NDJSON line, grpc-gateway style: `{"result": ...}`."""
    return (json.dumps({"result": to_json(message)}) + "\n").encode()


async def _relay(call: Any, first: Any, ndjson: bool, slot: StreamSlot, turns: Slots) -> AsyncIterator[bytes]:
    """Stream messages as SSE (`id:` = seq, so EventSource resumes with Last-Event-ID) or NDJSON
    (`{"result": ...}` per line, grpc-gateway style), each translated in a translator thread in its
    tenant's turn (`translators.in_turn`). A client that disconnects cancels the gRPC call and frees its
    stream's place in the pool."""
    encode = _ndjson_line if ndjson else _sse_event
    try:
        message = first
        while message is not grpc.aio.EOF:
            yield await in_turn(turns, slot.owner, encode, message)
            message = await call.read()
    except grpc.aio.AioRpcError as error:
        body = status_body(error)
        if ndjson:
            yield (json.dumps({"error": body}) + "\n").encode()
        else:
            yield f"event: error\ndata: {json.dumps(body)}\n\n".encode()
    finally:
        call.cancel()
        slot.release()
