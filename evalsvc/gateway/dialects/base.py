"""The dialect runtime: what a vendor dialect is, and the plumbing every dialect shares.

A dialect is one module (or package) of this package defining `DIALECT = Dialect(...)`: its name, the
path prefix its vendor documents (a client switches by changing only its base URL), its `DialectClient`
subclass (the vendor's operations as evalsvc calls, made as one caller), a `routes(api, client, options)`
function that declares the vendor's routes on `api`, and its `VendorOptions`. As grpc-gateway's ServeMux
takes an error handler and a header matcher as options, a dialect's router is built here from those
options: `error_handler` renders every failure in the vendor's error shape (whether from the gRPC
service, from the dialect's own checks of documented limits, or from FastAPI's request validation), and
`caller` reads the caller's key from the header the vendor documents.

What the client gives every dialect, written once: a call as the request's caller; "the caller's own
resource, or this vendor's not-found" (`get`, `owned`); the ownership label (`labels`, `owns`); token
paging three ways (`pages` lazily, `collect` eagerly, `page` as one cursor page); and the waiting of
synchronous vendor routes (`wait_until_done`). What every dialect reads the same way: a value it stored
(`read_stored`), whose record is not the dialect's when the value cannot be read (docs/dialects.md).
A route's exception that none of these expects is the vendor's 500 (INTERNAL), logged without its message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import re
import time
import traceback
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar, overload

import annotated_types
import grpc
from fastapi import Depends, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute, APIRouter
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message
from pydantic import TypeAdapter, ValidationError
from starlette.exceptions import HTTPException
from starlette.types import Scope

from evalsvc.errors import Reason
from evalsvc.gateway.routes import serve_head
from evalsvc.gateway.translators import (
    BodyCheck,
    InvalidBody,
    LoneSurrogate,
    OffLoopJSONRequest,
    TooManyValues,
    within,
)
from evalsvc.gateway.upstream import Caller, GatewayError, Upstream, with_retry_after
from evalsvc.http.json_bodies import TooDeep
from evalsvc.messages.validation import MAX_ANNOTATIONS_BYTES as MAX_ANNOTATIONS_BYTES  # for the dialects' checks
from evalsvc.messages.validation import missing_required
from evalsvc.v1 import dataset_service_pb2, item_pb2, run_pb2

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
T = TypeVar("T")

log = logging.getLogger(__name__)

OWNER_LABEL = "dialect"  # label on everything a dialect creates: it sees only what carries its name
MAX_PAGE_SIZE = 1000  # evalsvc's largest page of a list
MAX_COLLECTED = 10_000  # what `collect` reads at most, for vendors that page by offset or count a total
# ... and the most bytes (serialized) of them it holds: 10,000 runs whose definitions are each up to a quarter
# of --max-message-bytes are gigabytes, which one tenant's GET of a list would have held in the server.
MAX_COLLECTED_BYTES = 64 << 20
MAX_PAGES = 1000  # what `pages` reads at most (a million elements at MAX_PAGE_SIZE)
# A whole number the dialect stores and echoes back stays within a 32-bit int: Go's and Java's clients decode
# vendor integers as such, and one larger value failed their decoding of every list holding it.
MIN_INT32, MAX_INT32 = -(2**31), 2**31 - 1
# Such a number as `read_stored` reads one back: a value outside it (written natively, or stored before the
# dialects bounded what they take) makes its record Unreadable, not part of every list it would break.
Int32 = Annotated[int, annotated_types.Ge(MIN_INT32), annotated_types.Le(MAX_INT32)]
# The ASGI scope key holding when a dialect route began handling the request (time.monotonic()): a
# synchronous route's wait ends --dialect-sync-wait-s after it, whatever the route did before waiting.
ARRIVED = "evalsvc.dialect.arrived"


def owner_labels(dialect: str) -> dict[str, str]:
    """The labels that mark a resource as created by `dialect`."""
    return {OWNER_LABEL: dialect}


def is_owned(labels: Mapping[str, str], dialect: str) -> bool:
    """Whether a resource with these labels was created by `dialect` (others are not found there)."""
    return labels.get(OWNER_LABEL) == dialect


class Unreadable(ValueError):
    """A value a dialect stored (an annotation, an item's metadata, a record in a grader's text) that it
    cannot read back: written natively into something else. The record holding it is not the dialect's."""


@overload
def read_stored(kind: type[T], value: str, *, as_json: bool = True) -> T: ...
@overload
def read_stored(kind: Any, value: str, *, as_json: bool = True) -> Any: ...  # a union, a Literal, JsonValue


def read_stored(kind: Any, value: str, *, as_json: bool = True) -> Any:
    """A value the dialect stored, read back as `kind` (a pydantic model or any type pydantic reads): JSON,
    or with `as_json=False` the text itself (an enum's name, a number written as text). Unreadable when it
    is not what the dialect writes; the dialect then treats the record holding it as not its own (left
    out of its lists, its vendor's not-found by id: docs/dialects.md), as it does a record without its
    label. Never an error of the request: the tenant wrote the value natively, and every other record
    still reads (a 500 here had broken the dialect's whole list). The value is never in the error."""
    adapter = _adapter(kind)
    try:
        # json.loads first: pydantic's own JSON parser stops at ~200 levels, which a value written
        # natively may nest (as may one stored before the gateway bounded bodies' depth).
        return adapter.validate_python(json.loads(value) if as_json else value)
    except (ValidationError, ValueError, RecursionError):
        raise Unreadable(f"a stored value is not a {getattr(kind, '__name__', kind)}") from None


@functools.cache
def _adapter(kind: Any) -> TypeAdapter[Any]:
    return TypeAdapter(kind)


def annotations_bytes(annotations: Mapping[str, str]) -> int:
    """The size evalsvc counts against MAX_ANNOTATIONS_BYTES: every key and value, UTF-8 encoded."""
    return sum(len(key.encode()) + len(value.encode()) for key, value in annotations.items())


@dataclass(frozen=True)
class DialectOptions:
    """What the operator configures for every dialect's routes."""

    # How long a synchronous route (Agno POST /eval-runs, Aymara score-responses) waits for its run:
    # a little under the vendors' clients' 60 s default timeout (--dialect-sync-wait-s).
    sync_wait_s: float = 58.0


def bearer_key(request: Request) -> Caller:
    """`Authorization: Bearer <key>` (Omni, Agno, Vogent)."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return Caller(key.strip() if scheme.lower() == "bearer" else "")


@dataclass(frozen=True)
class VendorOptions:
    """A vendor's conventions, as options of its dialect's router (as grpc-gateway's ServeMuxOptions)."""

    # Every failure as the vendor's HTTP response (its status, body and headers).
    error_handler: Callable[[GatewayError], Response]
    # A FastAPI dependency reading the caller's API key from the header the vendor documents.
    caller: Callable[..., Caller] = bearer_key
    # `caller` as a plain function of the request, for the key check before the body is read
    # (evalsvc.gateway.request_limits): a key it reads is the key `caller` reads.
    key_of: Callable[[Request], Caller] = bearer_key
    # How `caller` takes the key, as the answer to a request without one says ("an API key is required: ...").
    key_help: str = "send it as 'Authorization: Bearer <key>'"
    # The error responses of every route, for the OpenAPI document.
    error_responses: dict[int | str, dict[str, Any]] = field(default_factory=dict)
    # Whether the service's own NOT_FOUND reaches the vendor's client as it is (its message and reason,
    # which the vendor's error body shows) rather than as the dialect's `missing` error.
    service_not_found: bool = False


class DialectClient:
    """The runtime of one request: evalsvc calls as its caller, over the gateway's one `Upstream`.

    Each dialect subclasses it with its vendor's operations, so a route is one call on the client."""

    def __init__(self, upstream: Upstream, caller: Caller, dialect: Dialect, arrived: float | None = None) -> None:
        self.upstream = upstream
        self.caller = caller
        self.dialect = dialect
        self.arrived = time.monotonic() if arrived is None else arrived  # when the request arrived (monotonic)

    @property
    def labels(self) -> dict[str, str]:
        """The labels this dialect puts on what it creates (and filters its lists by)."""
        return owner_labels(self.dialect.name)

    def owns(self, labels: Mapping[str, str]) -> bool:
        """Whether a resource with these labels was created by this dialect (others are not found here)."""
        return is_owned(labels, self.dialect.name)

    async def call(self, method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp], request: Req) -> Resp:
        """One unary call as the caller; a failure raises `GatewayError`."""
        return await self.upstream.call(method, request, self.caller)

    async def get(
        self, method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp], request: Req, missing: GatewayError
    ) -> Resp:
        """The answer of a Get call; NOT_FOUND becomes `missing`, the vendor's not-found for that thing,
        and so does an empty id (the service refuses it as INVALID_ARGUMENT: no vendor id is empty)."""
        if missing_required(request):
            raise missing
        try:
            return await self.call(method, request)
        except GatewayError as error:
            if error.code == grpc.StatusCode.NOT_FOUND:
                raise missing from None
            raise

    async def owned(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        resource: str,
        missing: GatewayError,
        accept: Callable[[Any], bool] = lambda _: True,
    ) -> Any:
        """`resource` (a field of the Get call's answer) when this dialect created it and `accept` agrees,
        else `missing`. A NOT_FOUND from the service is `missing` too, unless the vendor shows the service's
        own (`VendorOptions.service_not_found`)."""
        if missing_required(request):  # see `get`
            raise missing
        if self.dialect.vendor.service_not_found:
            answer = await self.call(method, request)
        else:
            answer = await self.get(method, request, missing)
        found = getattr(answer, resource)
        if not (self.owns(found.labels) and accept(found)):
            raise missing
        return found

    async def pages(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Any, Any],
        request: Message,
        items: str,
        *,
        page_size: int = MAX_PAGE_SIZE,
    ) -> AsyncIterator[Any]:
        """Every element of a token-paged list, read lazily page by page (at most MAX_PAGES pages).
        `request` must have page_size and page_token; `items` names the answer's repeated field."""
        request.page_size = page_size  # type: ignore[attr-defined]
        for _ in range(MAX_PAGES):
            page = await self.call(method, request)
            for element in getattr(page, items):
                yield element
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token  # type: ignore[attr-defined]

    async def collect(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Any, Any],
        request: Message,
        items: str,
        *,
        limit: int = MAX_COLLECTED,
    ) -> list[Any]:
        """The first `limit` elements of a token-paged list, for vendors that page by offset or report a
        total count, as many of them as fit MAX_COLLECTED_BYTES (at least one)."""
        found: list[Any] = []
        held = 0
        if limit <= 0:
            return found
        async for element in self.pages(method, request, items):
            held += element.ByteSize()
            if found and held > MAX_COLLECTED_BYTES:
                break
            found.append(element)
            if len(found) >= limit:
                break
        return found

    async def page(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Any, Any],
        request: Message,
        items: str,
        limit: int,
        cursor: str | None,
        keep: Callable[[Any], bool] = lambda _: True,
        *,
        max_calls: int = 20,
    ) -> tuple[list[Any], str | None]:
        """Up to `limit` kept elements of a token-paged list from `cursor` (a page token), and the cursor of
        the rest (None at the end), for vendors whose cursors are opaque.

        Each call asks for exactly the elements still missing, so a page is always consumed whole and its
        next page token is a valid cursor even when `keep` drops elements (the page then holds fewer); at
        most `max_calls` calls fill one page, and the cursor continues from there."""
        found: list[Any] = []
        token = cursor or ""
        for _ in range(max_calls):
            request.page_size = limit - len(found)  # type: ignore[attr-defined]
            request.page_token = token  # type: ignore[attr-defined]
            answer = await self.call(method, request)
            found.extend(element for element in getattr(answer, items) if keep(element))
            token = answer.next_page_token
            if len(found) >= limit or not token:
                break
        return found, token or None

    async def wait_until_done(self, run_id: str, wait_s: float) -> run_pb2.Run:
        """The run once it has ended, or as it stands `wait_s` seconds after the request arrived (synchronous
        vendor routes). The wait is counted from the arrival, not from the run's creation: what the route did
        before (Aymara writes the next prompts of continued threads with the generator model) comes out of
        it, so the answer still comes before the vendor's client times out and retries, creating the run
        again."""
        left = max(0.0, self.arrived + wait_s - time.monotonic())
        return await self.upstream.wait_until_done(run_id, self.caller, left)

    async def fill_new(
        self, dataset: dataset_service_pb2.Dataset, items: Sequence[item_pb2.Item]
    ) -> dataset_service_pb2.Dataset:
        """A dataset this request just made, with `items` added. The vendors create a set and its
        prompts in one call, evalsvc in two: when the service refuses the items (a bad prompt, the
        tenant's item cap), the dataset is deleted again, so the refused create leaves nothing behind
        (an empty set stayed, and the client's corrected retry found its slug taken) - unless it holds
        items by then: a retry racing this request (the same idempotency key: CreateDataset replayed
        the same, still empty dataset) added them, was answered, and its dataset stays."""
        request = dataset_service_pb2.AddDatasetItemsRequest(dataset_id=dataset.id, items=items)
        try:
            return (await self.call(self.upstream.datasets.AddDatasetItems, request)).dataset
        except GatewayError:
            with contextlib.suppress(GatewayError):  # the refusal is what the client must see
                get = dataset_service_pb2.GetDatasetRequest(dataset_id=dataset.id)
                if (await self.call(self.upstream.datasets.GetDataset, get)).dataset.item_count == 0:
                    delete = dataset_service_pb2.DeleteDatasetRequest(dataset_id=dataset.id)
                    await self.call(self.upstream.datasets.DeleteDataset, delete)
            raise


def window(items: Sequence[Any], offset: int, limit: int) -> list[Any]:
    """`limit` elements from `offset` (offset pagination over a collected list)."""
    return list(items[offset : offset + limit])


# routes(api, client, options): declares the vendor's routes on `api`; `client` is the dependency that
# gives a route its DialectClient (a parameter `x: MyClient = client`).
Routes = Callable[[APIRouter, Any, DialectOptions], None]


@dataclass(frozen=True)
class Dialect:
    """One vendor's eval-run API, translated to evalsvc."""

    name: str  # e.g. "omni"; also the value of the owner label on what it creates
    title: str  # e.g. "Omni AI Eval"
    prefix: str  # the documented base path, e.g. "/api" for Omni ("" for the root)
    client: type[DialectClient]
    routes: Routes
    vendor: VendorOptions

    def key_metadata(self, request: Request) -> tuple[tuple[str, str], ...]:
        """The caller's key as the vendor's routes read it, as gRPC metadata (GatewayError when malformed)."""
        return self.vendor.key_of(request).metadata

    def refusal(self, error: GatewayError) -> Response:
        """A refused key (or any GatewayError) answered as the vendor's routes answer it."""
        return with_retry_after(self.vendor.error_handler(_keyless(error, self.vendor.key_help)), error)

    def router(self, upstream: Upstream, options: DialectOptions) -> APIRouter:
        """The vendor's routes over `upstream`, failures rendered by the vendor's error handler."""
        route_class = error_route_class(self.vendor.error_handler, self.vendor.key_help)
        # No slash redirects, as the app has none (evalsvc.gateway.app.create_app): a path with a trailing
        # slash is the vendor's own 404.
        api = APIRouter(route_class=route_class, responses=self.vendor.error_responses, redirect_slashes=False)
        reader = self.vendor.caller

        def client(request: Request, caller: Caller = Depends(reader)) -> DialectClient:
            return self.client(upstream, caller, self, request.scope.get(ARRIVED))

        self.routes(api, Depends(client), options)
        serve_head(api)
        return api


def error_route_class(
    render: Callable[[GatewayError], Response], key_help: str = VendorOptions.key_help
) -> type[APIRoute]:
    """An APIRoute class whose handlers answer every GatewayError and request-validation error with
    `render(error)`. Request validation errors become INVALID_ARGUMENT with HTTP status 422 (FastAPI's
    own) and keep FastAPI's error list in `request_errors`; `render` may choose another status. The
    service's "an API key is required", which names the gRPC metadata, says `key_help` instead."""

    class DialectRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()
            check = _body_check(self)
            takes_json = self.body_field is not None

            async def handle(request: Request) -> Response:
                scope = _as_json(request.scope) if takes_json else request.scope
                scope[ARRIVED] = time.monotonic()
                try:
                    # A large body is read, and validated, in a translator thread (evalsvc.gateway.translators).
                    return await handler(OffLoopJSONRequest(scope, request.receive, check))
                except GatewayError as error:
                    return with_retry_after(render(_keyless(error, key_help)), error)
                except HTTPException as error:  # FastAPI's "error parsing the body" (Starlette's class)
                    if isinstance(error.__cause__, TooManyValues):
                        return render(GatewayError.invalid(str(error.__cause__), http_status=413))
                    if isinstance(error.__cause__, TooDeep):
                        return render(GatewayError.invalid(str(error.__cause__)))
                    if isinstance(error.__cause__, InvalidBody):
                        return render(_request_invalid(error.__cause__.errors))
                    if isinstance(error.__cause__, LoneSurrogate):  # a 500 in plain text, before
                        unicode = {"type": "string_unicode", "loc": ["body"], "msg": str(error.__cause__)}
                        return render(_request_invalid([unicode]))  # as a body FastAPI cannot parse: 422
                    raise
                except RequestValidationError as error:
                    return render(_request_invalid(error.errors()))
                except Exception as error:  # a bug: the vendor's 500 (INTERNAL), never Starlette's plain text
                    _log_bug(request.method, self.path, error)
                    return render(GatewayError.internal())

            return handle

    return DialectRoute


def _log_bug(method: str, path: str, error: Exception) -> None:
    """An ERROR line for an unexpected exception in a dialect route: the route (its template, not the
    request's path), the exception's type and where it was raised, but not its message, which may hold
    the caller's data (a pydantic error quotes the value it refused)."""
    frames = "".join(traceback.format_tb(error.__traceback__))
    log.error("%s %s: unexpected %s (message withheld)\n%s", method, path, type(error).__name__, frames.rstrip())


def _keyless(error: GatewayError, key_help: str) -> GatewayError:
    """The service's refusal of a call without a key tells a gRPC client which metadata carries one; a
    vendor's client sends an HTTP header, the dialect's, which the message names instead."""
    if error.reason != Reason.API_KEY_MISSING:
        return error
    return dataclasses.replace(error, message=f"an API key is required: {key_help}")


def _as_json(scope: Scope) -> Scope:
    """The request as one declaring a JSON body, whatever Content-Type it declared: FastAPI hands a body
    declared otherwise, or not at all, to validation as bytes, and every dialect answered curl's `-d`
    (form-encoded by default) with "Input should be a valid dictionary or object to extract fields
    from". Every dialect's body is JSON, and the native routes read any body as JSON too."""
    headers = [(name, value) for name, value in scope["headers"] if name != b"content-type"]
    return {**scope, "headers": [*headers, (b"content-type", b"application/json")]}


# The validation errors a response lists, and the size of an echoed `input` it keeps (JSON values).
MAX_ERRORS = 100
MAX_ECHOED_VALUES = 1000
MAX_ECHOED_CHARS = 64 * 1024
MAX_ECHOED_KEY = 256


def _request_invalid(errors: Sequence[Any]) -> GatewayError:
    """INVALID_ARGUMENT (HTTP 422, FastAPI's own) for a request FastAPI's validation refused, keeping
    its error list (bounded) in `request_errors`."""
    listed = _writable(jsonable_encoder(_bounded(errors)))
    violations = [_violation(error) for error in listed]
    return GatewayError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "the request does not match the documented shape",
        "INVALID_ARGUMENT",
        violations,
        listed,
        422,
    )


def _violation(error: Mapping[str, Any]) -> tuple[str, str]:
    """(field, description) of one of FastAPI's validation errors: the field is its `loc` after "body" or
    "query". A body that is not JSON is a violation on `body`: FastAPI puts the character offset where the
    field goes (`("body", 13)`), which every dialect reported as a field named "13"."""
    loc = error.get("loc", ())
    if error.get("type") == "json_invalid":
        why = (error.get("ctx") or {}).get("error") or error.get("msg", "")
        at = f" (character {loc[1]})" if len(loc) > 1 else ""
        return "body", f"not valid JSON: {why}{at}"
    field = ".".join(str(part) for part in loc[1:])
    if not field and error.get("type") != "value_error":
        # A body of the wrong type (`[1, 2]`, `null`) or none is at ("body",): on `body`, not on a field
        # named "". A check of several fields (a model's validator, "value_error") stays on none of them.
        field = str(loc[0]) if loc else "body"
    return field, error.get("msg", "")


def _body_check(route: APIRoute) -> BodyCheck | None:
    """FastAPI's validation of the route's body (its own ModelField), to run beside a large body's
    parse in a translator thread; None for a route without a body or with several (embedded)."""
    body = route.body_field
    if body is None or getattr(route, "_embed_body_fields", True):
        return None

    def check(value: Any) -> list[dict[str, Any]]:
        return body.validate(value, {}, loc=("body",))[1]

    return check


def _bounded(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """FastAPI's validation errors, at most MAX_ERRORS of them, each without its echoed `input` when
    that is large and with long `loc` parts cut short. An error echoes the value it found, and one
    about a list that is too long echoes the whole list: a 15 MiB body of tiny objects took 5 s of
    the event loop to encode back, for any caller (the body is read before the key is checked)."""
    bounded = []
    for error in list(errors)[:MAX_ERRORS]:
        kept = {
            key: value
            for key, value in error.items()
            if key != "input" or within(value, MAX_ECHOED_VALUES, MAX_ECHOED_CHARS)
        }
        if "loc" in kept:
            kept["loc"] = tuple(_shortened(part) for part in kept["loc"])
        bounded.append(kept)
    return bounded


def _shortened(part: Any) -> Any:
    """A `loc` part (a key of the caller's body) of at most MAX_ECHOED_KEY characters."""
    return part[:MAX_ECHOED_KEY] + "..." if isinstance(part, str) and len(part) > MAX_ECHOED_KEY else part


def _writable(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """FastAPI's validation errors, without the echoed `input` and `ctx` when those cannot be written back
    as JSON: NaN and lone surrogates are valid in a JSON request but not in a response (a 500 otherwise)."""
    try:
        json.dumps(errors, ensure_ascii=False, allow_nan=False).encode()
        return errors
    except ValueError:  # UnicodeEncodeError is a ValueError
        return [{key: value for key, value in e.items() if key not in ("input", "ctx")} for e in errors]


# evalsvc's verdict prefix on an LLM judge's explanation (evalsvc.graders.judge): "judge says PASS: <reason>",
# "judge score 8/10 (pass at 7): <reason>". A vendor shows the verdict in its own fields, and the reason alone.
_JUDGE_PREFIX = re.compile(r"^judge (?:score \d+/10 \(pass at \d+\)|says (?:PASS|FAIL)): ")


def judge_reason(explanation: str) -> str:
    """The judge's own reason, without evalsvc's verdict prefix (any other explanation unchanged)."""
    return _JUDGE_PREFIX.sub("", explanation, count=1)


def iso(ts: timestamp_pb2.Timestamp, *, millis: bool = False) -> str | None:
    """An RFC 3339 UTC timestamp (`2025-01-15T10:00:00Z`, or with `.000` milliseconds), None if unset."""
    if not ts.seconds and not ts.nanos:
        return None
    moment = datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, UTC)
    if millis:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
