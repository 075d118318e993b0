"""Which calls the gRPC server takes on, and how long a call may wait for its request.

grpc.aio counts a call against its `maximum_concurrent_rpcs` from the call's headers on, before its
request message has arrived, and then waits for that message for as long as the client likes. So a
client that opened calls and never sent their requests held every place: three connections of 1,000
such calls (no API key needed: nothing of ours had run yet) left every tenant's calls
RESOURCE_EXHAUSTED for as long as the connections stayed open. Here, on the wire server:

- the handlers take their requests as a stream (`request`, `messages`: the interceptor builds them
  so), which grpc hands over before any message has arrived; a call waits at most
  --request-timeout-s for each request message, then ends DEADLINE_EXCEEDED (REQUEST_TIMEOUT);
- of one connection's calls that have waited longer than STALE_S, at most
  --max-waiting-calls-per-connection go on waiting; the sweep ends the newer ones at once
  (RESOURCE_EXHAUSTED, WAITING_CALLS_FULL). Only calls that have waited that long: a client's burst of
  calls whose requests are on their way is never refused (a first version refused the 17th call
  waiting on a connection at once, and a test's 20 concurrent CreateRuns on a busy machine got it);
- --max-concurrent-rpcs counts the calls whose request has arrived (`admit`), and grpc's own limit is
  set above it (`grpc_limit`), so calls still waiting for their requests do not take the place of one
  that is served. It refuses tenants' calls only: health and reflection are always admitted. One
  tenant's share of it is bounded by the interceptor (`TenantLimits.take_call`, --max-calls-per-tenant),
  for in-process calls (evalsvc.api.local) too, which are admitted here as well.

Waits are ended by one sweep every SWEEP_S over the waiting calls (not a timer per call, which costs a
heap entry on every call of the hottest methods), so a wait ends up to SWEEP_S after its bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from evalsvc.api.status import abort
from evalsvc.config import Settings, named
from evalsvc.errors import Reason, ServiceError
from evalsvc.metrics import Metrics

Context = grpc.aio.ServicerContext[Any, Any]

SWEEP_S = 0.5  # how often waits past their bounds are looked for
STALE_S = 1.0  # a call whose request has not arrived after this long counts against its connection's cap


def grpc_limit(settings: Settings) -> int:
    """grpc's `maximum_concurrent_rpcs`: the served calls (--max-concurrent-rpcs), every connection's calls
    allowed to wait for their requests, and as many again as are served for calls whose requests are on
    their way (a burst waits for the event loop a few milliseconds), so that grpc's limit is not what
    refuses a call (a C int)."""
    return min(
        2 * settings.max_concurrent_rpcs + settings.max_connections * settings.max_waiting_calls_per_connection,
        2**31 - 1,
    )


def request_timeout(timeout_s: float) -> ServiceError:
    """DEADLINE_EXCEEDED (REQUEST_TIMEOUT): the client opened the call but sent no request message in time."""
    return ServiceError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        Reason.REQUEST_TIMEOUT,
        f"the call's request did not arrive in full within {timeout_s:g} s of the call's start (or of its "
        f"previous message) ({named('request_timeout_s')})",
    )


def waiting_calls_full(limit: int) -> ServiceError:
    """RESOURCE_EXHAUSTED (WAITING_CALLS_FULL): the connection already has `limit` calls waiting for requests."""
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.WAITING_CALLS_FULL,
        f"this connection has {limit} older calls whose request messages have not arrived either "
        f"({named('max_waiting_calls_per_connection')}); send the requests of calls as they begin",
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

    __slots__ = ("_expired", "_max_served", "_metrics", "_per_connection", "_sweep", "_timeout_s", "_waits", "served")

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._metrics = metrics  # refused calls are in no access log: counted here
        self._max_served = settings.max_concurrent_rpcs
        self._timeout_s = settings.request_timeout_s
        self._per_connection = settings.max_waiting_calls_per_connection
        # Each waiting call's task: (its connection, when it began waiting), oldest first.
        self._waits: dict[asyncio.Task[Any], tuple[str, float]] = {}
        # Waiting calls the sweep cancelled (and no one else), with the error each ends with.
        self._expired: dict[asyncio.Task[Any], ServiceError] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self.served = 0  # calls whose request arrived and that have not ended

    @property
    def waiting(self) -> int:
        """Calls waiting for a request message now (all connections)."""
        return len(self._waits)

    async def request(self, context: Context, peer: str) -> Any:
        """The call's one request message, waited for within the bounds; a client that half-closed
        without sending one gets INVALID_ARGUMENT (grpc's unary path waited for it until the deadline)."""
        message = await self._next(context, peer)
        if message is grpc.aio.EOF:
            await self._refuse(
                context,
                ServiceError(grpc.StatusCode.INVALID_ARGUMENT, Reason.MALFORMED_REQUEST, "the call sent no request"),
            )
        return message

    async def messages(self, context: Context, peer: str) -> AsyncIterator[Any]:
        """Each message of a client stream (server reflection), each waited for within the bounds."""
        while (message := await self._next(context, peer)) is not grpc.aio.EOF:
            yield message

    async def admit(self, context: Context, *, keyed: bool) -> None:
        """Count a call whose request arrived as served (`release` when it ends), or end a `keyed` one (a
        tenant's: SERVER_CALLS_FULL) when --max-concurrent-rpcs are. A keyless call (health, reflection) is
        never refused here: when tenants filled the server, the health Check was refused too, and a load
        balancer took the replica out; keyless streams have their own bounds (evalsvc.api.health), and a
        Check is over once answered."""
        if keyed and self.served >= self._max_served:
            await self._refuse(context, server_calls_full(self._max_served))
        self.served += 1

    def release(self) -> None:
        """A served call ended."""
        self.served -= 1

    async def _refuse(self, context: Context, error: ServiceError) -> None:
        self._metrics.call_refused(error.reason)
        await abort(context, error)

    async def _next(self, context: Context, peer: str) -> Any:
        """The call's next request message (or EOF), or the call ended by one of the bounds."""
        task = asyncio.current_task()
        assert task is not None  # a grpc handler runs in its call's task
        loop = asyncio.get_running_loop()
        self._waits[task] = (peer, loop.time())
        if self._sweep is None:
            self._sweep = loop.call_later(SWEEP_S, self._swept)
        try:
            return await context.read()
        except asyncio.CancelledError:
            if task not in self._expired:  # the client went away, or the server stops: not ours to handle
                raise
            task.uncancel()
        finally:
            del self._waits[task]
            error = self._expired.pop(task, None)
        assert error is not None  # only the sweep's own cancellation gets here
        await self._refuse(context, error)

    def _swept(self) -> None:
        """End the waits past their bounds (each call's task ends it with the error given): those past
        --request-timeout-s, and of each connection's waits older than STALE_S, all but the oldest
        --max-waiting-calls-per-connection. Look again while any call waits."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        stale_by_connection: dict[str, int] = {}
        for task, (peer, began) in self._waits.items():  # oldest first: the oldest stale waits are kept
            if task in self._expired:
                continue
            if began <= now - self._timeout_s:
                self._expire(task, request_timeout(self._timeout_s))
                continue
            if began > now - STALE_S:
                continue
            stale = stale_by_connection[peer] = stale_by_connection.get(peer, 0) + 1
            if stale > self._per_connection:
                self._expire(task, waiting_calls_full(self._per_connection))
        self._sweep = loop.call_later(SWEEP_S, self._swept) if self._waits else None

    def _expire(self, task: asyncio.Task[Any], error: ServiceError) -> None:
        self._expired[task] = error
        task.cancel()
