"""The one server interceptor: every call is authenticated and observed by one pair of hooks.

Each call gets a `_Call` whose two hooks hold all the interceptor does, written once for every
kind of call, as connect-python's metadata interceptors do: `on_start` starts the clock, notes the
peer and admits the call (refusing a request that did not decode or a key that is not valid, and
setting the caller's tenant); `on_end` hands the finished call to the observer. The wrappers for
grpc's three handler shapes (a unary coroutine, an async generator, a coroutine that writes to its
context) only run the behaviour between the two and say which status code it ended with.

It wraps the handler's behaviour (rather than only deciding at handler lookup) because the key
check must be able to abort the call with a rich status, and because the outcome the observer
records is known only once the behaviour has finished. Admission runs inside the observed part,
so rejected calls are counted and logged too.

Why one interceptor and not one per concern: grpc.aio runs every interceptor's lookup coroutine,
builds a new method handler and adds a wrapper frame to each call, per interceptor. On GetRun,
the hottest call, two layers cost measurably more than one (see docs/performance.md). For the same
reason the hooks keep the call's state in the `_Call`'s slots rather than in a token object.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, cast

import grpc

from evalsvc.api.auth import Authenticator, presented_key
from evalsvc.api.observability import FinishedCall, Observer
from evalsvc.api.status import abort
from evalsvc.errors import malformed_request

log = logging.getLogger(__name__)

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
LookUp: TypeAlias = Callable[[grpc.HandlerCallDetails], Awaitable["grpc.RpcMethodHandler[Any, Any] | None"]]


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates (where the method needs it) and observes every unary and server-streaming call."""

    def __init__(self, auth: Authenticator, observer: Observer) -> None:
        self._auth = auth
        self._observer = observer

    async def intercept_service(
        self, continuation: LookUp, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        # Unknown methods get no handler and stay unwrapped: their names would be unbounded label values.
        if handler is None:
            return handler
        method: str = details.method
        unary = handler.unary_unary is not None
        call = _Call(method, self._auth, presented_key(details.invocation_metadata), self._observer, stream=not unary)
        if unary:
            return grpc.unary_unary_rpc_method_handler(
                call.unary(handler.unary_unary),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            behaviour = cast("Callable[..., Any]", handler.unary_stream)
            wrap = call.stream if inspect.isasyncgenfunction(behaviour) else call.stream_writer
            return grpc.unary_stream_rpc_method_handler(
                wrap(behaviour),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler  # client- and bidi-streaming (reflection only; open) pass through unobserved


class MalformedRequest:
    """What the request deserializer yields for bytes that are not the method's message. grpc would
    otherwise answer UNKNOWN and log a traceback for every such call, before any authentication."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem


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


class _Call:
    """One call of one method, with the key it presented: its two hooks, and the wrappers that run a
    behaviour of each handler shape between them."""

    __slots__ = ("_auth", "_key", "_method", "_observer", "_peer", "_started", "_stream")

    def __init__(self, method: str, auth: Authenticator, key: str | None, observer: Observer, *, stream: bool) -> None:
        self._method = method
        self._auth = auth if auth.guards(method) else None
        self._key = key
        self._observer = observer
        self._stream = stream

    async def on_start(self, request: Any, context: Context) -> None:
        """Start observing the call, then admit it: abort it (INVALID_ARGUMENT) when its request did
        not decode, or (UNAUTHENTICATED) when its key is not valid; otherwise set the caller's tenant."""
        self._started = time.perf_counter()
        self._peer = _peer(context)
        if self._stream:
            self._observer.stream_opened(self._method)
        if isinstance(request, MalformedRequest):
            # A broken client's problem, not the server's: a debug line, no traceback.
            log.debug("%s: the request is not a valid message (%s)", self._method, request.problem)
            await abort(context, malformed_request())
        if self._auth is not None:
            await self._auth.authenticate(self._key, context)

    def on_end(self, code: grpc.StatusCode, request: Any, response: Any) -> None:
        """Report the finished call (admitted or not) to the observer: metrics and access log."""
        self._observer.finished(
            FinishedCall(self._method, code, self._started, request, response, self._peer, self._stream)
        )

    def unary(self, behaviour: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def observed(request: Any, context: Context) -> Any:
            response = None
            code = grpc.StatusCode.UNKNOWN
            try:
                await self.on_start(request, context)
                response = await behaviour(request, context)
                code = _code(context, grpc.StatusCode.OK)
                return response
            except BaseException as exc:
                code = _outcome(context, exc)
                raise
            finally:
                self.on_end(code, request, response)

        return observed

    def stream(self, behaviour: Callable[..., AsyncGenerator[Any, None]]) -> Callable[..., AsyncIterator[Any]]:
        """Wraps an async-generator behaviour (the evalsvc servicers)."""

        async def observed(request: Any, context: Context) -> AsyncIterator[Any]:
            code = grpc.StatusCode.UNKNOWN
            try:
                await self.on_start(request, context)
                # aclosing: when the client leaves, the inner generators' cleanup (unsubscribing the
                # watcher, releasing its stream quota) runs now, not whenever the garbage collector gets to it.
                async with contextlib.aclosing(behaviour(request, context)) as messages:
                    async for message in messages:
                        yield message
                code = _code(context, grpc.StatusCode.OK)
            except BaseException as exc:  # GeneratorExit when the client goes away
                code = _outcome(context, exc)
                raise
            finally:
                self.on_end(code, request, None)

        return observed

    def stream_writer(self, behaviour: Callable[..., Any]) -> Callable[..., Awaitable[None]]:
        """Wraps a coroutine behaviour that sends with `context.write` (grpc's health Watch)."""

        async def observed(request: Any, context: Context) -> None:
            code = grpc.StatusCode.UNKNOWN
            try:
                await self.on_start(request, context)
                result = behaviour(request, context)
                if inspect.isasyncgen(result):  # an async generator we could not recognise up front
                    async with contextlib.aclosing(result) as messages:
                        async for message in messages:
                            await context.write(message)
                else:
                    await result
                code = _code(context, grpc.StatusCode.OK)
            except BaseException as exc:
                code = _outcome(context, exc)
                raise
            finally:
                self.on_end(code, request, None)

        return observed


def _code(context: Context, default: grpc.StatusCode) -> grpc.StatusCode:
    """The code the handler set or aborted with; `default` when it set none."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return default


def _outcome(context: Context, exc: BaseException) -> grpc.StatusCode:
    """What the client sees when a behaviour ends with this exception: the code it aborted with,
    CANCELLED when the client left or the call was cancelled, UNKNOWN for anything else."""
    if isinstance(exc, grpc.aio.AbortError):
        return _code(context, grpc.StatusCode.UNKNOWN)
    if isinstance(exc, (GeneratorExit, asyncio.CancelledError)):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def _peer(context: Context) -> str:
    """The client's address, read when the call starts: asking a context whose call was cancelled
    (client gone) for its peer dereferenced a null pointer in grpc's core and killed the server."""
    try:
        return str(context.peer())
    except Exception:  # a context that cannot say: the log line matters more than its peer
        return ""
