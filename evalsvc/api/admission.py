"""Which calls the gRPC server takes on, and how long a call may wait for its request.

grpc.aio counts a call against its `maximum_concurrent_rpcs` from the call's headers on, before its
request message has arrived, and then waits for that message for as long as the client likes. So a
client that opened calls and never sent their requests held every place: three connections of 1,000
such calls (no API key needed: nothing of ours had run yet) left every tenant's calls
RESOURCE_EXHAUSTED for as long as the connections stayed open. Here, on the wire server:

- the handlers take their requests as a stream (`request`, `messages`: the interceptor builds them
  so), which grpc hands over before any message has arrived; a call waits at most
  --request-timeout-s for each request message, then ends DEADLINE_EXCEEDED (REQUEST_TIMEOUT);
- one connection may have at most --max-waiting-calls-per-connection calls waiting for a request
  message at once; a call past it is refused at once (RESOURCE_EXHAUSTED, WAITING_CALLS_FULL);
- --max-concurrent-rpcs counts the calls whose request has arrived (`admit`), and grpc's own limit is
  set above it by every connection's waiting calls (`grpc_limit`), so calls still waiting for their
  requests can never take the place of one that is served.

Waits are ended by one sweep a second over the waiting calls (not a timer per call, which costs a
heap entry on every call of the hottest methods), so a wait ends between the timeout and a second
after it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from evalsvc.api.status import abort
from evalsvc.config import Settings, named
from evalsvc.errors import Reason, ServiceError
from evalsvc.limits import Holdings
from evalsvc.metrics import Metrics

Context = grpc.aio.ServicerContext[Any, Any]

SWEEP_S = 1.0  # how often waits past the timeout are looked for


def grpc_limit(settings: Settings) -> int:
    """grpc's `maximum_concurrent_rpcs`: the served calls (--max-concurrent-rpcs) plus every connection's
    calls waiting for their requests, so that grpc's limit is never what refuses a call (a C int)."""
    return min(
        settings.max_concurrent_rpcs + settings.max_connections * settings.max_waiting_calls_per_connection, 2**31 - 1
    )


def request_timeout(timeout_s: float) -> ServiceError:
    """DEADLINE_EXCEEDED (REQUEST_TIMEOUT): the client opened the call but sent no request message in time."""
    return ServiceError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        Reason.REQUEST_TIMEOUT,
        f"no request message arrived within {timeout_s:g} s of the call's start or its previous message "
        f"({named('request_timeout_s')})",
    )


def waiting_calls_full(limit: int) -> ServiceError:
    """RESOURCE_EXHAUSTED (WAITING_CALLS_FULL): the connection already has `limit` calls waiting for requests."""
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.WAITING_CALLS_FULL,
        f"this connection already has {limit} calls whose request messages have not arrived "
        f"({named('max_waiting_calls_per_connection')}); send them, or cancel those calls",
        retry_after_s=1.0,
    )


def server_calls_full(limit: int) -> ServiceError:
    """RESOURCE_EXHAUSTED (SERVER_CALLS_FULL): --max-concurrent-rpcs calls are being served."""
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.SERVER_CALLS_FULL,
        f"the server is serving {limit} calls ({named('max_concurrent_rpcs')}); retry shortly",
        retry_after_s=1.0,
    )


class Admission:
    """The bounds of one gRPC server's calls: how long and how many of them may wait for requests
    (per connection, by the peer grpc names: address and port), and how many are served at once."""

    __slots__ = (
        "_deadlines",
        "_expired",
        "_max_served",
        "_metrics",
        "_per_connection",
        "_sweep",
        "_timeout_s",
        "_waiting",
        "served",
    )

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._metrics = metrics  # refused calls are in no access log: counted here
        self._max_served = settings.max_concurrent_rpcs
        self._timeout_s = settings.request_timeout_s
        self._per_connection = settings.max_waiting_calls_per_connection
        self._waiting = Holdings()  # calls waiting for a request message, by connection
        self._deadlines: dict[asyncio.Task[Any], float] = {}  # each waiting call's task: when its wait ends
        self._expired: set[asyncio.Task[Any]] = set()  # waiting calls this sweep cancelled (and no one else)
        self._sweep: asyncio.TimerHandle | None = None
        self.served = 0  # calls whose request arrived and that have not ended

    @property
    def waiting(self) -> int:
        """Calls waiting for a request message now (all connections)."""
        return self._waiting.total

    async def request(self, context: Context, peer: str) -> Any:
        """The call's one request message, waited for within the bounds; a client that half-closed
        without sending one gets INVALID_ARGUMENT, as grpc answers a unary call that has none."""
        message = await self._next(context, peer)
        if message is grpc.aio.EOF:
            await abort(
                context,
                ServiceError(grpc.StatusCode.INVALID_ARGUMENT, Reason.MALFORMED_REQUEST, "the call sent no request"),
            )
        return message

    async def messages(self, context: Context, peer: str) -> AsyncIterator[Any]:
        """Each message of a client stream (server reflection), each waited for within the bounds."""
        while (message := await self._next(context, peer)) is not grpc.aio.EOF:
            yield message

    def admit(self) -> bool:
        """Count a call whose request arrived as served; False when --max-concurrent-rpcs are."""
        if self.served >= self._max_served:
            return False
        self.served += 1
        return True

    def release(self) -> None:
        """A served call ended."""
        self.served -= 1

    async def refuse(self, context: Context) -> None:
        """End a call that `admit` did not take."""
        await self._refuse(context, server_calls_full(self._max_served))

    async def _refuse(self, context: Context, error: ServiceError) -> None:
        self._metrics.call_refused(error.reason)
        await abort(context, error)

    async def _next(self, context: Context, peer: str) -> Any:
        """The call's next request message (or EOF), or the call ended by one of the bounds."""
        if self._waiting.of(peer) >= self._per_connection:
            await self._refuse(context, waiting_calls_full(self._per_connection))
        task = asyncio.current_task()
        assert task is not None  # a grpc handler runs in its call's task
        loop = asyncio.get_running_loop()
        self._waiting.take(peer)
        self._deadlines[task] = loop.time() + self._timeout_s
        if self._sweep is None:
            self._sweep = loop.call_later(SWEEP_S, self._swept)
        try:
            return await context.read()
        except asyncio.CancelledError:
            if task not in self._expired:  # the client went away, or the server stops: not ours to handle
                raise
            task.uncancel()
        finally:
            del self._deadlines[task]
            self._expired.discard(task)
            self._waiting.give_back(peer)
        await self._refuse(context, request_timeout(self._timeout_s))

    def _swept(self) -> None:
        """Cancel the waits past their deadline (each call's task ends it with REQUEST_TIMEOUT); look
        again in a second while any call waits."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for task, deadline in self._deadlines.items():
            if deadline <= now and task not in self._expired:
                self._expired.add(task)
                task.cancel()
        self._sweep = loop.call_later(SWEEP_S, self._swept) if self._deadlines else None
