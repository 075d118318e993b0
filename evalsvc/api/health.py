"""The streams anyone may open, no API key needed: grpc's health Watch and server reflection, bounded.

Orchestrators and load balancers probe health, and tools (grpcurl) list services by reflection, so
neither needs a key, and their streams were the ones nobody's quota counted: one client opened 5,000
health Watch streams over 6 connections in a second, which took every place of --max-concurrent-rpcs,
and every tenant's calls got RESOURCE_EXHAUSTED until it let go; a review held every served place with
500 connections of 16 reflection streams, each asking once every few seconds. Together they may hold
`Settings.health_watches_in_all` streams (an eighth of --max-concurrent-rpcs) and PER_CONNECTION on one
connection (gRPC's client-side health checking opens one Watch a connection; a tool one reflection
stream at a time) (`KeylessStreams`). Past either:

- a health Watch is answered UNIMPLEMENTED (reason SERVER_STREAMS_FULL): a gRPC client doing client-side
  health checking then turns it off and goes on calling, where UNAVAILABLE would have it take the
  server for unhealthy and fail every call. `Check` is unbounded: a unary call, over once answered.
- a reflection stream is UNAVAILABLE (SERVER_STREAMS_FULL, RetryInfo), as a WatchRun past the server's
  part of streams. Its messages are written here, so a client that leaves mid-write ends it quietly
  (grpc writing them itself logged `ExecuteBatchError raised in core` with a traceback at ERROR).

A health service name over evalsvc.api.keyless.MAX_SERVICE_NAME_CHARS is INVALID_ARGUMENT (Check and
Watch): a Watch keeps its request for as long as it stays open (a longer request is refused before it
is parsed: evalsvc.api.keyless).

Reflection's requests are bounded in rate as well as its streams: a stream asks one question at a time,
but each ~60-byte question may be answered with ~30 KB of descriptors (~0.8 ms of the loop), and 4
clients of 2 streams asking in a loop (1,100-2,200 answers a second) took another tenant's ListRuns from
3.5 to 96 ms (p50). The process answers at most BURST of them in any WINDOW_S (100 a second), all
connections together; the next waits for a place, in turn across connections (evalsvc.slots.Slots, by
peer), so one connection's backlog delays another's request by one answer a turn. A tool's session
(grpcurl: one to three requests a command; evans: a listing and a file a service) fits in one burst;
under a flood it waits its turn. Small bursts rather than a second's worth at once: a flood's answers do
not come in one block every second. A file's descriptors are serialized once (grpc_reflection copied each
to a new FileDescriptorProto for every request: ~0.8 ms for the run service's, now ~25 us).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from typing import Any

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

from evalsvc.api.interceptor import ended_by_core
from evalsvc.api.keyless import MAX_SERVICE_NAME_CHARS, service_name_too_long
from evalsvc.api.status import abort
from evalsvc.errors import Reason, ServiceError
from evalsvc.limits import Holdings, streams_full
from evalsvc.slots import Slots

PER_CONNECTION = 2
# Reflection requests answered in any WINDOW_S, all connections together (100 a second); more wait their turn.
BURST = 20
WINDOW_S = 0.2

Context = grpc.aio.ServicerContext[Any, Any]


class KeylessStreams:
    """How many keyless streams (health Watch, reflection) each connection and all of them hold: at
    most PER_CONNECTION a connection (by the peer grpc names: address and port) and `in_all` in all."""

    def __init__(self, in_all: int) -> None:
        self._in_all = in_all
        self._by_connection = Holdings()

    @property
    def total(self) -> int:
        """The keyless streams open now, all connections."""
        return self._by_connection.total

    def full(self, peer: str) -> str:
        """Why one more stream of `peer`'s is refused; "" when it may open."""
        if self._by_connection.of(peer) >= PER_CONNECTION:
            return f"a connection may hold {PER_CONNECTION} health Watch or reflection streams"
        if self._by_connection.total >= self._in_all:
            return "the server's health Watch and reflection streams are all taken"
        return ""

    @contextlib.contextmanager
    def held(self, peer: str) -> Iterator[None]:
        """One stream of `peer`'s while the block runs (`full` said it may open)."""
        self._by_connection.take(peer)
        try:
            yield
        finally:
            self._by_connection.give_back(peer)


class BoundedHealthServicer(health.aio.HealthServicer):  # type: ignore[misc]  # grpc_health has no stubs
    """The health service; its Watch streams within the keyless streams' bounds, and ended (OK) once they
    have sent NOT_SERVING at shutdown (`enter_graceful_shutdown`): grpc_health's stayed open, so one load
    balancer's Watch held every SIGTERM of an idle server for the whole --grace-s."""

    def __init__(self, streams: KeylessStreams) -> None:
        super().__init__()
        self._streams = streams

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Context) -> health_pb2.HealthCheckResponse:
        if len(request.service) > MAX_SERVICE_NAME_CHARS:
            await abort(context, service_name_too_long(len(request.service)))
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Context) -> None:
        if len(request.service) > MAX_SERVICE_NAME_CHARS:
            await abort(context, service_name_too_long(len(request.service)))
        peer = context.peer()
        if why := self._streams.full(peer):
            await abort(context, _unwatchable(why))
        with self._streams.held(peer):
            await self._watch(request.service, context)

    async def _watch(self, service: str, context: Context) -> None:
        """grpc_health's Watch (each change of `service`'s status, written once), ending after the status
        it writes once the shutdown has begun."""
        condition = self._server_watchers[service]
        self._watcher_count_by_service[service] += 1
        last_status = None
        try:
            async with condition:
                while True:
                    status = self._server_status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                    if self._gracefully_shutting_down and status == health_pb2.HealthCheckResponse.SERVING:
                        # The shutdown has begun but not yet set this service: a stream ending here
                        # must not end on SERVING.
                        status = health_pb2.HealthCheckResponse.NOT_SERVING
                    if status != last_status:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                        last_status = status
                    if self._gracefully_shutting_down:
                        return  # NOT_SERVING (or SERVICE_UNKNOWN) said: the stream ends, OK
                    await condition.wait()
        finally:
            self._watcher_count_by_service[service] -= 1
            if self._watcher_count_by_service[service] == 0:
                del self._server_watchers[service]
                del self._watcher_count_by_service[service]

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING for good, and every Watch stream ended once it has said so (a watch of
        a service without a status too)."""
        await super().enter_graceful_shutdown()
        for condition in list(self._server_watchers.values()):
            async with condition:
                condition.notify_all()


class BoundedReflectionServicer(ReflectionServicer):  # type: ignore[misc]  # grpc_reflection has no stubs
    """Server reflection; its streams within the keyless streams' bounds, their messages written here, its
    requests within the process's budget (`budget`: BURST requests in any `window_s`; past it a stream's
    next request waits its turn, in turn across connections), and a file's descriptors serialized once."""

    def __init__(self, service_names: tuple[str, ...], streams: KeylessStreams) -> None:
        super().__init__(service_names)
        self._streams = streams
        self.budget = Slots(BURST)  # a slot a request, given back `window_s` after it was taken
        self.window_s = WINDOW_S
        # A file's name -> its own and its transitive dependencies' serialized descriptors: the files of
        # the pool only, so as many entries as the server has .proto files.
        self._files: dict[str, tuple[bytes, ...]] = {}

    async def ServerReflectionInfo(
        self, request_iterator: AsyncIterable[reflection_pb2.ServerReflectionRequest], context: Context
    ) -> None:
        peer = context.peer()
        if why := self._streams.full(peer):
            await abort(context, streams_full(why))
        with self._streams.held(peer):
            answers: AsyncIterator[reflection_pb2.ServerReflectionResponse] = super().ServerReflectionInfo(
                self._in_budget(request_iterator, peer), context
            )
            async with contextlib.aclosing(answers):  # type: ignore[type-var]
                try:
                    async for answer in answers:
                        await context.write(answer)
                except grpc.aio.InternalError as exc:  # a write refused: the call is over in grpc's core
                    raise ended_by_core("ServerReflectionInfo", exc) from exc

    async def _in_budget(
        self, requests: AsyncIterable[reflection_pb2.ServerReflectionRequest], peer: str
    ) -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        """Each request once the budget has room: at most BURST are answered in any `window_s`, the
        waiting ones in turn across connections (`peer`)."""
        loop = asyncio.get_running_loop()
        async for request in requests:
            await self.budget.acquire(peer)
            loop.call_later(self.window_s, self.budget.release, peer)
            yield request

    def _file_by_filename(self, request: Any, filename: str) -> reflection_pb2.ServerReflectionResponse:
        try:
            descriptor = self._pool.FindFileByName(filename)
        except KeyError:
            return super()._file_by_filename(request, filename)  # its NOT_FOUND answer
        return self._file_answer(descriptor, request)

    def _file_containing_symbol(self, request: Any, symbol: str) -> reflection_pb2.ServerReflectionResponse:
        try:
            descriptor = self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            return super()._file_containing_symbol(request, symbol)
        return self._file_answer(descriptor, request)

    def _file_answer(self, descriptor: Any, request: Any) -> reflection_pb2.ServerReflectionResponse:
        """grpc_reflection's answer of a file (it and its transitive dependencies, serialized), each
        file's serialized once: grpc_reflection copied every one to a new FileDescriptorProto per request
        (~30 KB for the run service's), which a flood of 60-byte requests made the loop's main work."""
        files = self._files.get(descriptor.name)
        if files is None:
            files = self._files[descriptor.name] = _serialized_files(descriptor)
        return reflection_pb2.ServerReflectionResponse(
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(file_descriptor_proto=files),
            original_request=request,
        )


def _serialized_files(descriptor: Any) -> tuple[bytes, ...]:
    """A file's descriptor and its transitive dependencies', serialized (as grpc_reflection orders them)."""
    seen: dict[str, Any] = {}
    pending = [descriptor]
    while pending:
        file = pending.pop()
        if file.name in seen:
            continue
        seen[file.name] = file
        pending.extend(reversed(file.dependencies))
    serialized = []
    for file in seen.values():
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        serialized.append(proto.SerializeToString())
    return tuple(serialized)


def _unwatchable(why: str) -> ServiceError:
    """The refusal of a health Watch past its bounds: UNIMPLEMENTED, so that client-side health checking
    is turned off rather than failed (see the module docstring)."""
    return ServiceError(grpc.StatusCode.UNIMPLEMENTED, Reason.SERVER_STREAMS_FULL, f"{why}; use Check")
