"""Access log and RPC metrics: one server interceptor that sees every call's outcome.

It is installed outermost, before authentication, so calls the auth interceptor rejects are counted
and logged too. It wraps the handler's behaviour (rather than only the handler lookup) because the
status code, the latency and the caller's tenant are known only once the behaviour has finished:
the auth wrapper sets `current_tenant` inside the call and never resets it, so reading it after the
inner behaviour returns or raises gives the tenant the call acted for ("" when it was rejected).

What is logged is chosen field by field: method, tenant, code, latency, run id and peer address.
Metadata (where API keys travel) and request bodies are never read for the log.
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

from evalsvc.api.tenancy import current_tenant
from evalsvc.metrics import Metrics

access_log = logging.getLogger("evalsvc.access")

# Load balancers poll health; at INFO those lines would drown the rest. They are logged at DEBUG.
QUIET_PREFIXES = ("/grpc.health.v1.Health/",)

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """Logs one access line per RPC and records RPC metrics (count by code, latency, open streams)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        # Unknown methods get no handler and stay unwrapped: their names would be unbounded label values.
        if handler is None:
            return handler
        method: str = details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            wrap = self._stream if inspect.isasyncgenfunction(handler.unary_stream) else self._stream_writer
            return grpc.unary_stream_rpc_method_handler(
                wrap(method, cast("Callable[..., Any]", handler.unary_stream)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # client- and bidi-streaming (reflection only) pass through unobserved

    def _unary(self, method: str, behaviour: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def observed(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            peer = _peer(context)
            response = None
            code = grpc.StatusCode.UNKNOWN
            try:
                response = await behaviour(request, context)
                code = _code(context, grpc.StatusCode.OK)
                return response
            except grpc.aio.AbortError:
                code = _code(context, grpc.StatusCode.UNKNOWN)
                raise
            except BaseException as exc:
                code = _code_of_exception(exc)
                raise
            finally:
                self._finished(method, code, started, request, response, peer, stream=False)

        return observed

    def _stream(
        self, method: str, behaviour: Callable[..., AsyncGenerator[Any, None]]
    ) -> Callable[..., AsyncIterator[Any]]:
        """Wraps an async-generator behaviour (the evalsvc servicers, through the auth wrapper)."""

        async def observed(request: Any, context: Context) -> AsyncIterator[Any]:
            started = time.perf_counter()
            peer = _peer(context)
            code = grpc.StatusCode.UNKNOWN
            gauge = self._metrics.open_streams.labels(method)
            gauge.inc()
            try:
                # aclosing: when the client leaves, the inner generators' cleanup (unsubscribing the
                # watcher, releasing its stream quota) runs now, not whenever the garbage collector gets to it.
                async with contextlib.aclosing(behaviour(request, context)) as messages:
                    async for message in messages:
                        yield message
                code = _code(context, grpc.StatusCode.OK)
            except grpc.aio.AbortError:
                code = _code(context, grpc.StatusCode.UNKNOWN)
                raise
            except BaseException as exc:  # GeneratorExit when the client goes away
                code = _code_of_exception(exc)
                raise
            finally:
                gauge.dec()
                self._finished(method, code, started, request, None, peer, stream=True)

        return observed

    def _stream_writer(self, method: str, behaviour: Callable[..., Any]) -> Callable[..., Awaitable[None]]:
        """Wraps a coroutine behaviour that sends with `context.write` (grpc's health Watch)."""

        async def observed(request: Any, context: Context) -> None:
            started = time.perf_counter()
            peer = _peer(context)
            code = grpc.StatusCode.UNKNOWN
            gauge = self._metrics.open_streams.labels(method)
            gauge.inc()
            try:
                result = behaviour(request, context)
                if inspect.isasyncgen(result):  # an async generator we could not recognise up front
                    async with contextlib.aclosing(result) as messages:
                        async for message in messages:
                            await context.write(message)
                else:
                    await result
                code = _code(context, grpc.StatusCode.OK)
            except grpc.aio.AbortError:
                code = _code(context, grpc.StatusCode.UNKNOWN)
                raise
            except BaseException as exc:
                code = _code_of_exception(exc)
                raise
            finally:
                gauge.dec()
                self._finished(method, code, started, request, None, peer, stream=True)

        return observed

    def _finished(
        self,
        method: str,
        code: grpc.StatusCode,
        started: float,
        request: Any,
        response: Any,
        peer: str,
        *,
        stream: bool,
    ) -> None:
        seconds = time.perf_counter() - started
        self._metrics.rpc_finished(method, code.name, seconds, stream=stream)
        level = logging.DEBUG if method.startswith(QUIET_PREFIXES) else logging.INFO
        if not access_log.isEnabledFor(level):
            return
        tenant = current_tenant.get()
        run_id = _run_id(request, response)
        latency_ms = round(seconds * 1000, 3)
        access_log.log(
            level,
            "%s %s %.1f ms tenant=%s%s",
            method,
            code.name,
            latency_ms,
            tenant or "-",
            f" run_id={run_id}" if run_id else "",
            extra={
                "method": method,
                "code": code.name,
                "latency_ms": latency_ms,
                "tenant": tenant,
                "run_id": run_id,
                "peer": peer,
            },
        )


def _code(context: Context, default: grpc.StatusCode) -> grpc.StatusCode:
    """The code the handler set or aborted with; `default` when it set none."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return default


def _code_of_exception(exc: BaseException) -> grpc.StatusCode:
    """What the client sees when a behaviour ends with this exception instead of a status."""
    if isinstance(exc, (GeneratorExit, asyncio.CancelledError)):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def _run_id(request: Any, response: Any) -> str:
    """The run a call concerns: the request's `run_id`, else the created run of a response (CreateRun)."""
    descriptor = getattr(request, "DESCRIPTOR", None)
    if descriptor is not None and "run_id" in descriptor.fields_by_name:
        return str(request.run_id)
    descriptor = getattr(response, "DESCRIPTOR", None)
    if descriptor is not None and "run" in descriptor.fields_by_name and response.HasField("run"):
        return str(response.run.id)
    return ""


def _peer(context: Context) -> str:
    """The client's address, read when the call starts: asking a context whose call was cancelled
    (client gone) for its peer dereferenced a null pointer in grpc's core and killed the server."""
    try:
        return str(context.peer())
    except Exception:  # a context that cannot say: the log line matters more than its peer
        return ""
