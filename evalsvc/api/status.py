"""Domain errors -> rich gRPC statuses (AIP-193), applied to every servicer method by one decorator.

Every non-OK status carries `google.rpc.ErrorInfo` (stable reason, domain `evalsvc`), plus
`BadRequest` for invalid fields and `RetryInfo` where waiting helps. An unexpected exception is
logged and becomes INTERNAL with a generic message, so no internals leak to callers.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from grpc_status import rpc_status

from evalsvc.errors import Reason, ServiceError, database_unavailable, invalid_argument, to_status
from evalsvc.limits import HELD_CALL
from evalsvc.messages.validation import map_violations, missing_required, turn_violations
from evalsvc.storable import request_nul_violations
from evalsvc.store.db import unavailable_cause

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")


def internal_error() -> ServiceError:
    """INTERNAL (reason INTERNAL): a bug, logged where it happened, never described to the caller."""
    return ServiceError(grpc.StatusCode.INTERNAL, Reason.INTERNAL, "internal error; the service logged the details")


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: ServiceError) -> NoReturn:
    """End the call with the error's rich status."""
    await context.abort_with_status(rpc_status.to_status(to_status(error)))


def unary(
    method: Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    """Translate ServiceError (and unexpected errors) raised by a unary method that writes.

    Shielded: a caller that goes away (or whose deadline passes) stops waiting, but a transaction
    already under way finishes or rolls back whole. Cancelling a task inside a SQLite write
    transaction could strand its connection holding the write lock."""
    return _translated(method, shielded=True)


def unary_read(
    method: Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    """`unary` for methods that only read: not shielded, since a read holds no lock worth finishing
    for, and the shield costs a task and an event-loop turn per call on the hottest path (GetRun)."""
    return _translated(method, shielded=False)


def unary_calls_model(
    method: Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    """`unary` for a method that waits on a model before it writes (ContinueConversations): not shielded,
    so that a caller that goes away, or a server that stops, cancels its model calls; the method shields
    its own write. Shielded, such a call went on after its caller had gone, request and all, with up to
    300 model calls of two minutes each: 1,300 abandoned calls held 1.8 GB and hours of the generator's
    time, and a stopping server logged an ERROR traceback for each when the HTTP client closed under it."""
    return _translated(method, shielded=False)


def _translated(
    method: Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]], *, shielded: bool
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> Resp:
        try:
            await _check_request(request)
            call = method(self, request, context)
            if not shielded:
                return await call
            write = asyncio.ensure_future(call)
            try:
                return await asyncio.shield(write)
            except asyncio.CancelledError:
                _detach(write, method.__name__)
                raise
        except ServiceError as error:
            await abort(context, error)
        except Exception as exc:
            await abort(context, unexpected_error(exc, method.__name__))
        raise AssertionError("abort_with_status returned")  # pragma: no cover

    return wrapper


# Writes whose caller has gone, until they finish: the event loop keeps only weak references to
# tasks, and nothing else would hold these.
_detached: set[asyncio.Task[Any]] = set()


def _detach(write: asyncio.Task[Any], method: str) -> None:
    """Let a shielded write finish without its caller, and take its outcome when it does: without
    this, its exception was "never retrieved" (asyncio logs that at ERROR, with a traceback)."""

    held = HELD_CALL.get()
    give_back = held.keep() if held is not None else None  # the tenant's place, until the write ends

    def settled(task: asyncio.Task[Any]) -> None:
        _detached.discard(task)
        if give_back is not None:
            give_back()
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, Exception) and not isinstance(exc, ServiceError):
            unexpected_error(exc, method)  # logs it as if the caller were still there
        elif exc is not None:
            log.debug("%s finished after its caller left: %s", method, exc)

    _detached.add(write)
    write.add_done_callback(settled)


def server_stream(
    method: Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]]:
    """Translate ServiceError raised by a server-streaming method, before or between messages.

    Cancellation (client gone, server stopping) is never caught here: it must propagate."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> AsyncIterator[Resp]:
        try:
            await _check_request(request)
            async for message in method(self, request, context):
                yield message
        except ServiceError as error:
            await abort(context, error)
        except Exception as exc:
            await abort(context, unexpected_error(exc, method.__name__))

    return wrapper


async def _check_request(request: Any) -> None:
    """Refuse, before any method sees it, a request with a NUL in any string (PostgreSQL cannot store
    one, and checking here makes SQLite answer the same: evalsvc.storable), without an id the
    contract requires (`missing_required`), with conversations past their bounds (`turn_violations`) or
    items' and conversations' maps past theirs (`map_violations`). Conversations and maps are counted
    first and an oversized one is refused without the NUL walk: the walk visits every turn and map entry,
    and a request of millions of them is what the bounds are there to refuse cheaply."""
    oversized = await turn_violations(request) + await map_violations(request)
    violations = missing_required(request) + oversized
    if not oversized:
        violations += await request_nul_violations(request)
    if violations:
        raise invalid_argument(violations)


def unexpected_error(exc: Exception, method: str) -> ServiceError:
    """UNAVAILABLE with RetryInfo when the database cannot serve (a full disk, an unreachable server:
    the call may succeed later, and the operator has a warning naming the cause); INTERNAL, logged,
    for the rest: whatever else reaches here is a bug, never the caller's input."""
    if (unavailable := unavailable_cause(exc)) is not None:
        log.warning("%s: the database cannot serve: %s", method, unavailable)
        return database_unavailable()
    log.error("unexpected error in %s", method, exc_info=exc)
    return internal_error()
