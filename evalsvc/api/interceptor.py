"""The one server interceptor: every call is authenticated and observed by one pair of hooks.

Each call is a `_Call` whose two hooks hold all the interceptor does to it, written once for every
kind of call, as connect-python's metadata interceptors do: `on_start` starts the clock, notes the
peer and admits the call (refusing a key that is not valid or a request that did not decode, and
setting the caller's tenant); `on_end` hands the finished call to the observer. On a gRPC server the
key is checked before the request is read (`_Call.arrived`): a caller without a valid key never has
its request parsed, whatever its size; and a request over 1 MiB is parsed on the loop only once a
worker process has found it holds no map large enough to stall the loop (evalsvc.api.decoding); a keyless
method's (health, reflection) over evalsvc.api.keyless.MAX_REQUEST_BYTES is refused unparsed. The wrappers for
grpc's three handler shapes (a unary coroutine, an async generator, a coroutine that writes to its
context) only run the behaviour between the two and say which status code it ended with. For a
gRPC server, a stream's messages are then written by the interceptor itself (`_Call.written`).

It wraps the handler's behaviour (rather than only deciding at handler lookup) because the key
check must be able to abort the call with a rich status, and because the outcome the observer
records is known only once the behaviour has finished. Admission runs inside the observed part,
so rejected calls are counted and logged too.

Why one interceptor and not one per concern: grpc.aio runs every interceptor's lookup coroutine,
builds a new method handler and adds a wrapper frame to each call, per interceptor. On GetRun,
the hottest call, two layers cost measurably more than one (see docs/performance.md). For the same
reason what the calls of a method share (its `_Method`) is worked out at its first call, so a
lookup builds only the call's `_Call` and the handler grpc needs. The key is taken from the
metadata grpc decoded for the lookup and travels in the `_Call`: decoding it again from the
servicer context would cost more (~3 us) than the rest of the hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from types import MethodType
from typing import Any, TypeAlias, cast

import grpc

from evalsvc.api.admission import Admission
from evalsvc.api.auth import Authenticator, presented_key
from evalsvc.api.decoding import RequestChecker, Unparsed, deferring
from evalsvc.api.keyless import MAX_REQUEST_BYTES, too_large
from evalsvc.api.observability import FinishedCall, Observer
from evalsvc.api.status import abort, internal_error
from evalsvc.api.tenancy import current_tenant
from evalsvc.errors import ServiceError, malformed_request
from evalsvc.limits import HELD_CALL, TENANT_METADATA, HeldCall, TenantLimits
from evalsvc.messages.encoded import Encoded

log = logging.getLogger(__name__)

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
LookUp: TypeAlias = Callable[[grpc.HandlerCallDetails], Awaitable["Handler | None"]]


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates (where the method needs it) and observes every unary and server-streaming call.

    A gRPC server's interceptor (given an `admission`) serializes every response and stream message itself
    (checking its size against `max_message_bytes`) and writes each message of a stream
    (`_Call.written`), and takes every request under `admission`'s bounds (its handlers read their
    requests from the call: `_Call.arrived`); the in-process channel's (evalsvc.api.local, no
    `admission`) hands messages over as objects (their size checked all the same) and gets a stream's
    messages as an async generator, read in its caller's task."""

    def __init__(
        self,
        auth: Authenticator,
        observer: Observer,
        limits: TenantLimits,
        *,
        max_message_bytes: int,
        admission: Admission | None = None,
        checker: RequestChecker | None = None,
    ) -> None:
        self._auth = auth
        self._observer = observer
        self._limits = limits
        self._max_message_bytes = max_message_bytes
        self._admission = admission
        self._checker = checker
        self._writes_streams = admission is not None
        # Method name -> (the service's handler, what its calls share). grpc looks a handler up for
        # every call; a service's is the same object each time (a new one is worked out afresh).
        self._methods: dict[str, tuple[Handler, _Method]] = {}

    async def intercept_service(self, continuation: LookUp, details: grpc.HandlerCallDetails) -> Handler | None:
        handler = await continuation(details)
        # Unknown methods get no handler and stay unwrapped: their names would be unbounded label values
        # (and keys here). Client- and bidi-streaming methods (reflection only; open) pass unobserved,
        # their requests under the admission's bounds.
        if handler is None:
            return handler
        if handler.unary_unary is None and handler.unary_stream is None:
            return handler if self._admission is None else _admitted_stream(details.method, handler, self._admission)
        known = self._methods.get(details.method)
        if known is None or known[0] is not handler:
            method = _Method(
                details.method,
                handler,
                self._auth,
                self._observer,
                self._outgoing(),
                self._admission,
                self._checker,
                self._limits,
            )
            known = self._methods[details.method] = (handler, method)
        return known[1].handler(presented_key(details.invocation_metadata))

    def _outgoing(self) -> Outgoing:
        """What each method's responses pass through on their way out (`Outgoing`)."""
        return Outgoing(self._max_message_bytes, serializes=self._writes_streams)


class OversizedResponse(Exception):
    """A response larger than the client may receive: a size bound on the server is missing."""


class Outgoing:
    """Every response and stream message on its way out: serialized here on a gRPC server (grpc then
    sends the bytes), handed over as is in process, and in both checked against --max-message-bytes.

    Past that size grpc's core refused the send: the client saw RESOURCE_EXHAUSTED, grpc logged a
    traceback at ERROR (`ExecuteBatchError raised in core`) and the access log recorded the call OK.
    Every response is bounded by design (pages by bytes, definitions, replies from endpoints), so one
    that is not is a bug: one ERROR line naming the method and sizes, INTERNAL to the caller and in
    the access log. The check costs nothing on a server (the length of bytes grpc would have made)."""

    __slots__ = ("max_bytes", "serializes")

    def __init__(self, max_bytes: int, *, serializes: bool) -> None:
        self.max_bytes = max_bytes
        self.serializes = serializes

    def message(self, serialize: Callable[[Any], bytes] | None, method: str, message: Any) -> Any:
        """What grpc (or the in-process caller) is given for `message`; OversizedResponse when too large.
        A message the behaviour yields already serialized (`Encoded`: a watcher's events as read from the
        log) is given to grpc as those very bytes, not parsed and serialized again per stream."""
        if isinstance(message, Encoded):
            if self.serializes and serialize is not None:
                message = message.data
                size = len(message)
            else:
                message = message.parse()
                size = message.ByteSize()
        elif self.serializes and serialize is not None:
            message = serialize(message)
            size = len(message)
        else:
            size = message.ByteSize()
        if size > self.max_bytes:
            log.error(
                "%s: a response of %d bytes is over --max-message-bytes (%d); some bound is missing",
                method,
                size,
                self.max_bytes,
            )
            raise OversizedResponse(method)
        return message


class MalformedRequest:
    """What the request deserializer yields for bytes that are not the method's message. grpc would
    otherwise answer UNKNOWN and log a traceback for every such call, before any authentication."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem


class Refused:
    """What a gRPC server's call has instead of its request when it is refused before the loop parses
    the request: the caller's key is refused, so the request is never read (a 13 MB message of a
    million map entries held the event loop ~2.5 s for every tenant before its caller, with no valid
    key, was told UNAUTHENTICATED); or the request is over CHECKED_BYTES and the checking process
    refused it, or could not check it (evalsvc.api.decoding)."""

    __slots__ = ("error",)

    def __init__(self, error: ServiceError) -> None:
        self.error = error


def _keyless(method: str, parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """`parse` for a method that needs no key (evalsvc.api.keyless): a request over MAX_REQUEST_BYTES is a
    Refused, its bytes neither parsed nor kept, nor sent to the checker of large requests."""

    def deserialize(data: bytes) -> Any:
        if len(data) > MAX_REQUEST_BYTES:
            return Refused(too_large(method, len(data)))
        return parse(data)

    return deserialize


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The deserializer, returning a MalformedRequest instead of raising."""
    if deserializer is None:
        return None
    parse = deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # protobuf's DecodeError, or whatever a custom deserializer raises
            return MalformedRequest(f"{type(exc).__name__}: {exc}")

    return deserialize


class _Method:
    """One observed unary or server-streaming method: what all its calls share."""

    __slots__ = (
        "admission",
        "auth",
        "behaviour",
        "build",
        "checker",
        "limits",
        "name",
        "observer",
        "outgoing",
        "parse",
        "serialize",
        "shape",
        "streaming",
    )

    def __init__(
        self,
        name: str,
        handler: Handler,
        auth: Authenticator,
        observer: Observer,
        outgoing: Outgoing,
        admission: Admission | None,
        checker: RequestChecker | None,
        limits: TenantLimits,
    ) -> None:
        self.name = name
        self.admission = admission
        self.checker = checker
        self.auth = auth if auth.guards(name) else None
        self.streaming = handler.unary_unary is None
        # A tenant's unary calls count against its share of the served places; its streams have their own
        # caps (WatchRun's --max-watch-streams), and keyless calls (health, reflection) belong to no tenant.
        self.limits = limits if self.auth is not None and not self.streaming else None
        self.observer = observer
        self.outgoing = outgoing
        self.parse = _tolerant(handler.request_deserializer)
        if self.parse is not None and admission is not None and self.auth is None:
            # keyless (health): a request over MAX_REQUEST_BYTES is refused unparsed, never checked
            self.parse = _keyless(name, self.parse)
        elif checker is not None and self.parse is not None:  # a large request is checked before it is parsed
            self.parse = deferring(handler.request_deserializer, self.parse)
        self.serialize = handler.response_serializer  # used by `outgoing`; grpc is given bytes, or objects in process
        writes = outgoing.serializes
        self.behaviour: Callable[..., Any]
        self.shape: Callable[..., Any]  # the _Call method that runs the behaviour between the hooks
        # With an admission (a gRPC server), grpc is given a request-streaming handler: it calls the
        # behaviour before the request has arrived, and `_Call.arrived` reads it within the bounds.
        if not self.streaming:
            self.behaviour, self.shape = cast("Callable[..., Any]", handler.unary_unary), _Call.unary
            self.build = (
                grpc.unary_unary_rpc_method_handler if admission is None else grpc.stream_unary_rpc_method_handler
            )
        else:
            self.behaviour = cast("Callable[..., Any]", handler.unary_stream)
            if not inspect.isasyncgenfunction(self.behaviour):
                self.shape = _Call.stream_writer
            else:
                self.shape = _Call.written if writes else _Call.stream
            self.build = (
                grpc.unary_stream_rpc_method_handler if admission is None else grpc.stream_stream_rpc_method_handler
            )

    def handler(self, key: str | None) -> Handler:
        """The handler of one call that presented `key`: the behaviour run between that call's hooks
        (a bound method: grpc tells the shapes apart by it, as it would the behaviour)."""
        call = _Call(self, key)
        observed = MethodType(self.shape if self.admission is None else _Call.arrived, call)
        # grpc is given bytes (`sent`), but by a behaviour that writes its messages itself (health Watch).
        serializer = self.serialize if self.shape is _Call.stream_writer else None
        return self.build(observed, request_deserializer=self.parse, response_serializer=serializer)

    async def checked(self, request: Unparsed) -> Any:
        """A request over CHECKED_BYTES, parsed once the checking process has found it decodes and holds
        no map over MAX_MAP_ENTRIES (evalsvc.api.decoding); else the MalformedRequest or Refused that
        `on_start` ends the call with."""
        try:
            problem = await cast(RequestChecker, self.checker).problem(current_tenant.get(), request)
        except ServiceError as error:
            return Refused(error)
        return MalformedRequest(problem) if problem is not None else request.parse(request.data)

    def sent(self, message: Any) -> Any:
        """`message` as grpc (or the in-process caller) is given it: `Outgoing.message` (a call whose
        message is too large to send ends INTERNAL)."""
        return self.outgoing.message(self.serialize, self.name, message)


class _Call:
    """One call of a method: its two hooks, what they share (the key, when it started, who called),
    and the behaviour of each handler shape run between them."""

    __slots__ = ("_authenticated", "_held", "_key", "_method", "_peer", "_started", "_tenant")

    def __init__(self, method: _Method, key: str | None) -> None:
        self._method = method
        self._key = key
        self._peer = ""
        # Who the call acted for, as authentication found ("" until then): kept here, not read from
        # `current_tenant` at the end, because a stream may be ended from another context (the gateway's
        # synchronous creates close their watch from a task of their own: logged as tenant "-").
        self._tenant = ""
        self._authenticated = False
        self._held: HeldCall | None = None  # its place of its tenant's share of the served calls (`on_start`)

    async def arrived(self, requests: Any, context: Context) -> Any:
        """On a gRPC server: the call's request, read from the call within the admission's bounds, then
        the call's shape run on it while the call counts as served (evalsvc.api.admission). A request
        over CHECKED_BYTES is parsed only once the checking process has passed it (`_Method.checked`,
        while the call counts as served: its request has arrived). A call that never got its request
        is neither observed nor logged: one line per call a client opens and never sends would be
        theirs to write into the log."""
        method = self._method
        admission = cast(Admission, method.admission)
        self._peer = _peer(context)
        request: Any
        if method.auth is not None and (error := await method.auth.refusal(self._key)) is not None:
            request = Refused(error)  # the key is checked before the request is read (and parsed)
        else:
            self._authenticated = method.auth is not None
            self._tenant = current_tenant.get()  # for the log, should the request be refused before `on_start` ends
            request = await admission.request(context, self._peer)
        await admission.admit(context, keyed=method.auth is not None)
        try:
            if isinstance(request, Unparsed):
                request = await method.checked(request)
            return await method.shape(self, request, context)
        finally:
            admission.release()

    async def on_start(self, request: Any, context: Context) -> None:
        """Start observing the call, then admit it: abort it when it was refused before its request was
        parsed (on a gRPC server, by `arrived`: UNAUTHENTICATED for a key that is not valid, or what the
        check of a large request found), or (INVALID_ARGUMENT) when its request did not decode; otherwise
        set the caller's tenant, and count a unary call against the tenant's share of the served calls
        (RESOURCE_EXHAUSTED past it: `TenantLimits.take_call`), on the wire and in process alike. The
        clock and the peer come first, so `on_end` has them for a refused call too."""
        method = self._method
        self._started = time.perf_counter()
        if not self._peer:  # read by `arrived` already on a gRPC server
            self._peer = _peer(context)
        if method.streaming:
            method.observer.stream_opened(method.name)
        if isinstance(request, Refused):
            await abort(context, request.error)
        if isinstance(request, MalformedRequest):
            # A broken client's problem, not the server's: a debug line, no traceback.
            log.debug("%s: the request is not a valid message (%s)", method.name, request.problem)
            await abort(context, malformed_request())
        if method.auth is not None and not self._authenticated:
            await method.auth.authenticate(self._key, context)
        self._tenant = current_tenant.get()
        if method.limits is not None:
            try:
                self._held = method.limits.take_call(self._tenant)
            except ServiceError as error:
                await abort(context, error)
            HELD_CALL.set(self._held)  # the handler's context: a write that outlives the call keeps it

    def on_end(self, code: grpc.StatusCode, request: Any, response: Any) -> None:
        """Give back the tenant's place, and report the finished call (admitted or not) to the observer:
        metrics and access log."""
        method = self._method
        if self._held is not None:
            self._held.end()
            self._held = None
        method.observer.finished(
            FinishedCall(
                method.name, code, self._started, request, response, self._peer, method.streaming, self._tenant
            )
        )

    async def unary(self, request: Any, context: Context) -> Any:
        """A unary behaviour."""
        response = None
        code = grpc.StatusCode.UNKNOWN
        try:
            await self.on_start(request, context)
            response = await self._method.behaviour(request, context)
            code = _code(context, grpc.StatusCode.OK)
            if response is None:
                return None
            try:
                return self._method.sent(response)
            except OversizedResponse:
                await abort(context, internal_error())
        except BaseException as exc:
            code = _outcome(context, exc)
            raise
        finally:
            self.on_end(code, request, response)

    async def stream(self, request: Any, context: Context) -> AsyncGenerator[Any, None]:
        """An async-generator behaviour (the evalsvc servicers)."""
        code = grpc.StatusCode.UNKNOWN
        try:
            await self.on_start(request, context)
            # The first message goes with initial metadata naming the caller's tenant (TENANT_METADATA).
            tenant = current_tenant.get() if self._method.auth is not None else ""
            # aclosing: when the client leaves, the inner generators' cleanup (unsubscribing the
            # watcher, releasing its stream quota) runs now, not whenever the garbage collector gets to it.
            async with contextlib.aclosing(self._method.behaviour(request, context)) as messages:
                async for message in messages:
                    try:
                        sent = self._method.sent(message)
                    except OversizedResponse:
                        await abort(context, internal_error())
                    if tenant:
                        await context.send_initial_metadata(((TENANT_METADATA, tenant),))
                        tenant = ""
                    yield sent
            code = _code(context, grpc.StatusCode.OK)
        except BaseException as exc:  # GeneratorExit when the client goes away
            code = _outcome(context, exc)
            raise
        finally:
            self.on_end(code, request, None)

    async def written(self, request: Any, context: Context) -> None:
        """An async-generator behaviour on a gRPC server: `stream`, its messages written here.

        grpc.aio writes the messages a handler's generator yields itself, and a write to a client that
        had gone (it stopped reading, then disconnected: the write waited for a flow-control window)
        failed in grpc's own code, which logged `ExecuteBatchError raised in core by servicer method`
        with a traceback at ERROR whenever it saw the failure before the client's close, and left the
        generators to be closed whenever they were collected. Written here, such a failure ends the call
        quietly (`ended_by_core`), and first `stream` is closed: the behaviour's cleanup (the watch
        slot, the subscription) runs at once, and the call is recorded with the code the client got."""
        async with contextlib.aclosing(self.stream(request, context)) as messages:
            try:
                async for message in messages:
                    await context.write(message)
            except grpc.aio.InternalError as exc:
                raise ended_by_core(self._method.name, exc) from exc

    async def stream_writer(self, request: Any, context: Context) -> None:
        """A coroutine behaviour that sends with `context.write` (grpc's health Watch)."""
        code = grpc.StatusCode.UNKNOWN
        try:
            await self.on_start(request, context)
            result = self._method.behaviour(request, context)
            if inspect.isasyncgen(result):  # an async generator we could not recognise up front
                async with contextlib.aclosing(result) as messages:
                    async for message in messages:
                        await context.write(message)
            else:
                await result
            code = _code(context, grpc.StatusCode.OK)
        except grpc.aio.InternalError as exc:  # a write refused: the call is over in grpc's core
            code = _outcome(context, exc)
            raise ended_by_core(self._method.name, exc) from exc
        except BaseException as exc:
            code = _outcome(context, exc)
            raise
        finally:
            self.on_end(code, request, None)


def _admitted_stream(method: str, handler: Handler, admission: Admission) -> Handler:
    """A bidi-streaming handler (server reflection: open, unobserved, its bounds its own: evalsvc.api.health)
    whose request messages are read within the admission's bounds, the call counted as served while it
    lasts. Its behaviour writes its messages itself (a coroutine: grpc's reader/writer shape)."""
    behaviour = cast("Callable[..., Any] | None", handler.stream_stream)
    if behaviour is None or not inspect.iscoroutinefunction(behaviour):
        raise TypeError(f"no client-streaming methods but server reflection's writing one are expected: {handler!r}")
    parse = _tolerant(handler.request_deserializer)

    async def admitted(requests: Any, context: Context) -> None:
        peer = _peer(context)
        await admission.admit(context, keyed=False)
        try:
            await behaviour(_parsed(admission.messages(context, peer), context), context)
        finally:
            admission.release()

    return grpc.stream_stream_rpc_method_handler(
        admitted,
        request_deserializer=None if parse is None else _keyless(method, parse),
        response_serializer=handler.response_serializer,
    )


async def _parsed(messages: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
    """The messages of a keyless client stream; the call ends at one over MAX_REQUEST_BYTES (INVALID_ARGUMENT,
    evalsvc.api.keyless) or one that is not its message (MALFORMED_REQUEST), as a unary call would."""
    async for message in messages:
        if isinstance(message, Refused):
            await abort(context, message.error)
        if isinstance(message, MalformedRequest):
            await abort(context, malformed_request())
        yield message


def ended_by_core(method: str, exc: grpc.aio.InternalError) -> asyncio.CancelledError:
    """What a stream raises to grpc when grpc's core refused one of its writes (ExecuteBatchError): the
    call is over there (the client went away, its deadline passed, its connection closed). grpc takes
    CancelledError for a cancelled call and logs it at DEBUG; anything else it would log as a
    traceback at ERROR, for what is the client's doing. The refusal itself is a DEBUG line here."""
    log.debug("%s: the call ended in grpc's core while the server was sending (%s)", method, exc)
    return asyncio.CancelledError(f"the call ended in grpc's core: {exc}")


def _code(context: Context, default: grpc.StatusCode) -> grpc.StatusCode:
    """The code the handler set or aborted with; `default` when it set none."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return default


def _outcome(context: Context, exc: BaseException) -> grpc.StatusCode:
    """What the client sees when a behaviour ends with this exception: the code it aborted with;
    when the call ended under it (cancelled, the client gone, a write refused by grpc's core: the
    InternalError of a failed batch) DEADLINE_EXCEEDED or CANCELLED (`_gone`); UNKNOWN for anything else."""
    if isinstance(exc, grpc.aio.AbortError):
        return _code(context, grpc.StatusCode.UNKNOWN)
    if isinstance(exc, (GeneratorExit, asyncio.CancelledError, grpc.aio.InternalError)):
        return _gone(context)
    return grpc.StatusCode.UNKNOWN


def _gone(context: Context) -> grpc.StatusCode:
    """The code of a call that ended under the server: DEADLINE_EXCEEDED once its deadline has passed
    (what the client's stub reports then), else CANCELLED. The deadline is the context's own copy:
    reading it does not reach the ended call in grpc's core (tests/test_stream_cancel.py)."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def _peer(context: Context) -> str:
    """The client's address, read when the call starts: asking a context whose call was cancelled
    (client gone) for its peer dereferenced a null pointer in grpc's core and killed the server."""
    try:
        return str(context.peer())
    except Exception:  # a context that cannot say: the log line matters more than its peer
        return ""
