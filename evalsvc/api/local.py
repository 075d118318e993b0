"""Calls to this process's servicers without the network: the embedded REST gateway's transport.

`evalsvc serve --http-addr` used to reach its own gRPC server over a loopback channel: every REST
request was serialised, framed as HTTP/2, sent through the kernel, parsed by grpc core and
deserialised again, twice. `LocalChannel` has the part of `grpc.aio.Channel`'s surface the gateway
and the generated stubs use (`unary_unary`, `unary_stream`, `close`), and dispatches each call to
the method handlers the servicers registered, wrapped by the server's own `CallInterceptor`: API
keys, tenant scoping, metrics, access logs and the rich error statuses are the gRPC path's, and a
failure reaches the caller as the same `grpc.aio.AioRpcError` (code, message, ErrorInfo details in
the trailing metadata). Messages are handed over as objects, never serialised; the size limits a
gRPC server applies are applied with the same settings (a response's size by the interceptor, as on
the server), and its calls are admitted by the gRPC server's own `Admission`: REST and gRPC calls
share one --max-concurrent-rpcs (a counter of its own let each have all of it), and the interceptor
holds each tenant to its share of it on both paths (--max-calls-per-tenant).

What this depends on from the interceptor: only `grpc.aio.ServerInterceptor.intercept_service`,
the handlers it returns (behaviours called as `(request, context)`), and, from the context, the
`grpc.aio.ServicerContext` methods `LocalContext` implements.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, cast

import grpc
from grpc.aio import Metadata
from grpc_status import rpc_status

from evalsvc.api.admission import Admission
from evalsvc.api.auth import Authenticator, presented_key
from evalsvc.errors import to_status

log = logging.getLogger(__name__)

PEER = "in-process"  # what `context.peer()` says (and the access log shows) for calls of the embedded gateway
MetadataPairs = Sequence[tuple[str, str | bytes]]


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "invocation_metadata")), grpc.HandlerCallDetails):
    """What an interceptor is told about a call (grpc builds the same pair)."""


class LocalServices:
    """The method handlers of this process's servicers, by path, and the interceptor they run behind.

    Pass it to the generated `add_*Servicer_to_server` functions as if it were a server (it records
    what they register), beside the gRPC server the same servicers are added to."""

    def __init__(
        self,
        interceptor: grpc.aio.ServerInterceptor,
        *,
        max_message_bytes: int,
        admission: Admission,
        auth: Authenticator | None = None,
    ) -> None:
        self._interceptor = interceptor
        self._auth = auth
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        self._max_message_bytes = max_message_bytes
        self._admission = admission
        # Calls run in copies of the context the services were built in, as a gRPC server's calls
        # run in their own tasks: what authentication sets (the tenant) never leaks between calls.
        self._context = contextvars.copy_context()

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self._handlers.update({f"/{service}/{name}": handler for name, handler in handlers.items()})

    async def key_refusal(self, metadata: MetadataPairs) -> grpc.aio.AioRpcError | None:
        """None when the key these headers present (`authorization: Bearer`, `x-api-key`) is valid; else
        the AioRpcError a call presenting it would fail with (UNAUTHENTICATED with its ErrorInfo reason;
        UNAVAILABLE when the keys cannot be read). The embedded gateway asks before it reads a request's
        body, as a gRPC server checks the key before it reads the request: a caller without a valid key
        had its body parsed first (a 14 MB map held the shared translator threads 12 s before its 401).

        The check is the calls' own (`Authenticator.refusal`: the same answers and timing, the same
        cache), in a copy of the services' context so the tenant it sets never reaches the caller's, and
        is no call: it takes no place under --max-concurrent-rpcs nor the tenant's --max-calls-per-tenant."""
        if self._auth is None:
            return None
        check = self._auth.refusal(presented_key(tuple(metadata)))
        error = await asyncio.create_task(check, context=self._context.copy())
        if error is None:
            return None
        status = rpc_status.to_status(to_status(error))
        return _error(status.code, status.details, status.trailing_metadata)

    def add_generic_rpc_handlers(self, _handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """The generated code registers each service both ways; the registered handlers suffice."""

    async def _lookup(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        return self._handlers.get(details.method)

    async def _open(
        self, method: str, request: Any, metadata: MetadataPairs, context: LocalContext
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """The intercepted handler of a call that may start, or the AioRpcError a gRPC server would answer."""
        if request.ByteSize() > self._max_message_bytes:
            raise _error(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Received message larger than max ({request.ByteSize()} vs. {self._max_message_bytes})",
            )
        handler = await self._interceptor.intercept_service(self._lookup, _CallDetails(method, metadata))
        if handler is None:
            raise _error(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        return handler

    def _checked(self, response: Any, context: LocalContext) -> Any:
        """The response, unless the behaviour set an error code (its size the interceptor checked)."""
        context.raise_if_failed()
        return response

    async def unary(self, method: str, request: Any, metadata: MetadataPairs, timeout: float | None) -> Any:
        """One unary call: its response, or AioRpcError."""
        context = LocalContext(metadata, timeout)
        handler = await self._open(method, request, metadata, context)
        if context.expired():  # a deadline already past fails the call, as gRPC's does, however fast it would be
            raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        if handler.unary_unary is None:
            raise _error(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not a unary method")
        await self._admit(method, context)
        try:
            behaviour = context.outcome(handler.unary_unary(request, cast(Any, context)))
            call = asyncio.create_task(behaviour, context=self._context.copy())
            # The deadline cancels the call's task (a timer handle: asyncio.timeout cost more than the call).
            expiry = None if timeout is None else asyncio.get_running_loop().call_later(timeout, call.cancel)
            try:
                response = await call
            except asyncio.CancelledError:
                caller = asyncio.current_task()
                if expiry is None or (caller is not None and caller.cancelling()) or not context.expired():
                    raise  # the caller was cancelled, not the call
                raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
            finally:
                if expiry is not None:
                    expiry.cancel()
        finally:
            self._admission.release()
        return self._checked(response, context)

    async def stream(self, method: str, request: Any, context: LocalContext) -> AsyncIterator[Any]:
        """One server-streaming call's messages; AioRpcError when it fails. Read by one caller (an HTTP
        response), in that caller's task: no task or queue per stream or per message."""
        handler = await self._open(method, request, context.invocation_metadata(), context)
        messages = handler.unary_stream(request, cast(Any, context)) if handler.unary_stream is not None else None
        if not inspect.isasyncgen(messages):
            raise _error(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not a server-streaming method served in process")
        await self._admit(method, context)
        try:
            while True:
                try:
                    step, remaining = context.outcome(anext(messages)), context.time_remaining()
                    if remaining is None:
                        message = await step
                    else:
                        async with asyncio.timeout(remaining):
                            message = await step
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
                yield self._checked(message, context)
            context.raise_if_failed()
        finally:
            self._admission.release()
            await messages.aclose()

    async def _admit(self, method: str, context: LocalContext) -> None:
        """Count the call as served (`Admission.release` when it ends), or the AioRpcError a gRPC server's
        call would end with (SERVER_CALLS_FULL). As on the wire, a keyless call (the health Check of the
        gateway's GET /healthz) is never refused: a full server is still a healthy one."""
        keyed = Authenticator.guards(method)
        await context.outcome(self._admission.admit(cast(Any, context), keyed=keyed))


class LocalContext:
    """The `grpc.aio.ServicerContext` of an in-process call: the methods the interceptor and the
    servicers use, with grpc's meaning (an abort raises `grpc.aio.AbortError` after setting the status)."""

    __slots__ = ("_code", "_deadline", "_details", "_metadata", "_trailing", "initial")

    def __init__(self, metadata: MetadataPairs, timeout: float | None) -> None:
        self._metadata = tuple(metadata)
        self._deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: MetadataPairs = ()
        self.initial: MetadataPairs = ()  # what the behaviour sent as initial metadata

    async def outcome(self, behaviour: Awaitable[Any]) -> Any:
        """Await a step of the behaviour; an abort, or an exception grpc would answer UNKNOWN for,
        becomes AioRpcError."""
        try:
            return await behaviour
        except grpc.aio.AbortError:
            raise self._failure() from None
        except (StopAsyncIteration, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            log.error("in-process call failed with an unexpected exception", exc_info=exc)
            raise _error(grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc)}: {exc}") from None

    def raise_if_failed(self) -> None:
        """An AioRpcError when the behaviour ended normally but set an error code (grpc sends that code)."""
        if self._code not in (None, grpc.StatusCode.OK):
            raise self._failure()

    def _failure(self) -> grpc.aio.AioRpcError:
        return _error(self._code or grpc.StatusCode.UNKNOWN, self._details, self._trailing)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: MetadataPairs = ()) -> None:
        self._code, self._details, self._trailing = code, details, tuple(trailing_metadata)
        raise grpc.aio.AbortError()

    async def abort_with_status(self, status: grpc.Status) -> None:
        await self.abort(status.code, status.details, status.trailing_metadata)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    async def send_initial_metadata(self, initial_metadata: MetadataPairs) -> None:
        self.initial = tuple(initial_metadata)

    def set_trailing_metadata(self, trailing_metadata: MetadataPairs) -> None:
        self._trailing = tuple(trailing_metadata)

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata

    def peer(self) -> str:
        return PEER

    def expired(self) -> bool:
        return self._deadline is not None and self._deadline <= asyncio.get_running_loop().time()

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - asyncio.get_running_loop().time())


def _error(code: grpc.StatusCode, details: str, trailing: MetadataPairs = ()) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, Metadata(), Metadata(*trailing), details)


class _UnaryUnary:
    """`channel.unary_unary(path)`: awaiting a call returns the response or raises AioRpcError."""

    def __init__(self, services: LocalServices, method: str) -> None:
        self._services = services
        self._method = method

    def __call__(
        self, request: Any, *, metadata: MetadataPairs | None = None, timeout: float | None = None, **_options: Any
    ) -> Awaitable[Any]:
        return self._services.unary(self._method, request, metadata or (), timeout)


class LocalStreamCall:
    """A server-streaming call as grpc.aio's: `await read()` (grpc.aio.EOF at the end) or `async for`,
    `initial_metadata()` and `cancel()`. The call starts (authenticates, opens the servicer's stream) at
    the first read."""

    def __init__(self, messages: AsyncIterator[Any], context: LocalContext) -> None:
        self._messages = messages
        self._context = context
        self._done = False

    async def initial_metadata(self) -> Metadata:
        """The initial metadata the servicer has sent so far: read a message first (grpc.aio's waits for it)."""
        return Metadata(*self._context.initial)

    async def read(self) -> Any:
        if self._done:
            return grpc.aio.EOF
        try:
            return await anext(self._messages)
        except StopAsyncIteration:
            self._done = True
            return grpc.aio.EOF
        except BaseException:
            self._done = True
            raise

    def __aiter__(self) -> LocalStreamCall:
        return self

    async def __anext__(self) -> Any:
        message = await self.read()
        if message is grpc.aio.EOF:
            raise StopAsyncIteration
        return message

    def cancel(self) -> bool:
        """End the stream: the servicer's generator is closed (its cleanup runs on the loop, at once)
        and the observer records CANCELLED, as for a gRPC client that went away."""
        if self._done:
            return False
        self._done = True
        closing = asyncio.ensure_future(self._messages.aclose())  # type: ignore[attr-defined]
        _closing.add(closing)  # the loop keeps only weak references to tasks
        closing.add_done_callback(_closing.discard)
        return True


_closing: set[asyncio.Future[None]] = set()


class _UnaryStream:
    """`channel.unary_stream(path)`: a call is a `LocalStreamCall`."""

    def __init__(self, services: LocalServices, method: str) -> None:
        self._services = services
        self._method = method

    def __call__(
        self, request: Any, *, metadata: MetadataPairs | None = None, timeout: float | None = None, **_options: Any
    ) -> LocalStreamCall:
        context = LocalContext(metadata or (), timeout)
        return LocalStreamCall(self._services.stream(self._method, request, context), context)


class LocalChannel:
    """A stand-in for `grpc.aio.Channel` whose calls go to `services` in this process. Serializers
    are ignored: requests and responses are the generated message objects themselves."""

    def __init__(self, services: LocalServices) -> None:
        self._services = services

    def unary_unary(self, method: str, *_args: Any, **_options: Any) -> _UnaryUnary:
        return _UnaryUnary(self._services, method)

    def unary_stream(self, method: str, *_args: Any, **_options: Any) -> _UnaryStream:
        return _UnaryStream(self._services, method)

    async def key_refusal(self, metadata: MetadataPairs) -> grpc.aio.AioRpcError | None:
        """`LocalServices.key_refusal`: why a call with these headers' key would be refused, or None."""
        return await self._services.key_refusal(metadata)

    async def close(self, grace: float | None = None) -> None:
        """Nothing to close: the calls' lifetimes are their callers'."""
