"""grpc's health service, with its Watch streams bounded.

Health needs no API key (orchestrators and load balancers probe it), so its streams were the one kind
nobody's quota counted: one client opened 5,000 Watch streams over 6 connections in a second, which
took every place of --max-concurrent-rpcs, and every tenant's calls got RESOURCE_EXHAUSTED until it
let go. A connection may hold PER_CONNECTION Watch streams (gRPC's client-side health checking opens
one per connection), and all connections together `Settings.health_watches_in_all`; past either, the
Watch is answered UNIMPLEMENTED (reason SERVER_STREAMS_FULL): a gRPC client doing client-side health
checking then turns it off and goes on calling, where UNAVAILABLE would have it take the server for
unhealthy and fail every call (so one anonymous client filling the Watch streams would have stopped
every such client). `Check` is unbounded: it is a unary call, over as soon as answered.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from evalsvc.api.status import abort
from evalsvc.errors import Reason, ServiceError
from evalsvc.limits import Holdings

PER_CONNECTION = 2


class BoundedHealthServicer(health.aio.HealthServicer):  # type: ignore[misc]  # grpc_health has no stubs
    """The health service; at most PER_CONNECTION Watch streams a connection, `in_all` in all."""

    def __init__(self, in_all: int) -> None:
        super().__init__()
        self._in_all = in_all
        self._by_connection = Holdings()  # by peer (address and port: one connection)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        peer = context.peer()
        if self._by_connection.of(peer) >= PER_CONNECTION:
            await abort(context, _unwatchable(f"a connection may hold {PER_CONNECTION} health Watch streams"))
        if self._by_connection.total >= self._in_all:
            await abort(context, _unwatchable("the server's health Watch streams are all taken"))
        self._by_connection.take(peer)
        try:
            await super().Watch(request, context)
        finally:
            self._by_connection.give_back(peer)


def _unwatchable(why: str) -> ServiceError:
    """The refusal of a health Watch past its bounds: UNIMPLEMENTED, so that client-side health checking
    is turned off rather than failed (see the module docstring)."""
    return ServiceError(grpc.StatusCode.UNIMPLEMENTED, Reason.SERVER_STREAMS_FULL, f"{why}; use Check")
