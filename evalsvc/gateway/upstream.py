"""The gRPC service behind the gateway, as the dialects see it.

`Upstream` owns the gateway's pool of channels to the service and their service stubs. `call` sends one request with the
caller's API key and turns a failed call into a `GatewayError`, the gateway's one error type, which the
native routes render as a google.rpc.Status and each dialect in its own error shape. `wait_until_done`
is the synchronous create of the dialects that have one (the rest of their shared plumbing is in
`dialects/base.py`).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from starlette.responses import Response

from evalsvc.errors import Reason
from evalsvc.gateway.reachability import note_unreached
from evalsvc.limits import TENANT_METADATA, Holdings
from evalsvc.statuses import TERMINAL as TERMINAL  # re-exported: the dialects import it from here
from evalsvc.v1 import (
    dataset_generation_pb2_grpc,
    dataset_service_pb2_grpc,
    eval_run_service_pb2,
    eval_run_service_pb2_grpc,
    grader_service_pb2_grpc,
    run_pb2,
    target_service_pb2_grpc,
)

Req = TypeVar("Req")
Resp = TypeVar("Resp", bound=Message)
R = TypeVar("R", bound=Response)


# Makes the gateway's channels, given each one's index in the pool: `grpc.aio.Channel`s to the service,
# or (inside `evalsvc serve`) an `evalsvc.api.local.LocalChannel`, which has the same call surface.
ChannelFactory: TypeAlias = Callable[[int], Any]
DEFAULT_TIMEOUT_S = 60.0

# gRPC status -> HTTP status, as grpc-gateway maps them.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}


@dataclass
class GatewayError(Exception):
    """A request that failed: in the gRPC service, or refused by the gateway before any call (a request
    it cannot translate, a dialect's own checks). The gateway's one error type.

    `violations` are (field, description) pairs; `request_errors` are FastAPI's validation errors when
    the request did not even match the dialect's model (dialects that mimic FastAPI return them as is).
    """

    code: grpc.StatusCode
    message: str
    reason: str = ""
    violations: list[tuple[str, str]] = field(default_factory=list)
    request_errors: list[dict[str, Any]] | None = None
    http_status: int = 0
    retry_after_s: float = 0.0  # from google.rpc.RetryInfo: how long to wait before retrying (0: unknown)
    metadata: dict[str, str] = field(default_factory=dict)  # google.rpc.ErrorInfo's (e.g. which quota)

    def __post_init__(self) -> None:
        super().__init__(self.message)
        if not self.http_status:
            self.http_status = HTTP_STATUS.get(self.code, 500)

    @classmethod
    def from_rpc(cls, error: grpc.aio.AioRpcError) -> GatewayError:
        """The error of a failed gRPC call, with its ErrorInfo reason and BadRequest violations; the
        gateway's own UPSTREAM_UNAVAILABLE when the service could not be reached (`unreachable`)."""
        if never_reached(error):
            return unreachable()
        reason, violations, retry_after_s, metadata = "", [], 0.0, {}
        status = rpc_status.from_call(error)
        for detail in status.details if status is not None else ():
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_after_s = retry.retry_delay.ToTimedelta().total_seconds()
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = [(v.field, v.description) for v in bad.field_violations]
        return cls(
            error.code(), error.details() or "", reason, violations, retry_after_s=retry_after_s, metadata=metadata
        )

    @classmethod
    def invalid(cls, message: str, *violations: tuple[str, str], http_status: int = 0) -> GatewayError:
        """Bad input caught by a dialect before any call (e.g. a vendor's documented limit)."""
        return cls(
            grpc.StatusCode.INVALID_ARGUMENT, message, Reason.INVALID_ARGUMENT, list(violations), None, http_status
        )

    @classmethod
    def not_found(cls, message: str) -> GatewayError:
        # Not a Reason: a dialect's own not-found (an object the vendor has and evalsvc does not),
        # rendered in the vendor's shape and never sent in an ErrorInfo.
        return cls(grpc.StatusCode.NOT_FOUND, message, "NOT_FOUND")

    @classmethod
    def internal(cls) -> GatewayError:
        """A bug in the gateway: INTERNAL, as the service answers one (logged, never described to the caller)."""
        return cls(grpc.StatusCode.INTERNAL, "internal error; the gateway logged the details", Reason.INTERNAL)


UPSTREAM_RETRY_AFTER_S = 1.0


def never_reached(error: grpc.aio.AioRpcError) -> bool:
    """Whether a failed call never reached the service: grpc's own UNAVAILABLE, without the status
    details every error of the service carries (a service that is down, restarting, or refusing
    connections past its --max-connections). Such a call is told to the gateway's log (`reachability`)."""
    unreached = error.code() == grpc.StatusCode.UNAVAILABLE and rpc_status.from_call(error) is None
    if unreached:
        note_unreached(error, error.details() or "")
    return unreached


def unreachable() -> GatewayError:
    """UNAVAILABLE (HTTP 503) with the gateway's own ErrorInfo for a call that `never_reached` the
    service, which was answered with `"details": []`. grpc's message is not passed on: it names the
    gateway's upstream address and connection errors, the operator's business."""
    return GatewayError(
        grpc.StatusCode.UNAVAILABLE,
        "the evalsvc service behind this gateway cannot be reached; retry",
        Reason.UPSTREAM_UNAVAILABLE,
        retry_after_s=UPSTREAM_RETRY_AFTER_S,
    )


@dataclass(frozen=True)
class Caller:
    """Who is calling: the API key taken from the dialect's auth header ("" = none given)."""

    api_key: str = ""

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The gRPC metadata carrying the key. A key gRPC metadata cannot carry (non-ASCII or control
        characters) is refused here as UNAUTHENTICATED, as the service would refuse a wrong key."""
        if not self.api_key:
            return ()
        if not (self.api_key.isascii() and self.api_key.isprintable()):
            raise GatewayError(grpc.StatusCode.UNAUTHENTICATED, "the API key is malformed", Reason.API_KEY_INVALID)
        return (("authorization", f"Bearer {self.api_key}"),)


class _Channel:
    """One channel of the pool (one HTTP/2 connection), its stubs, and the streams open on it."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.streams = 0
        self.runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
        self.datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        self.generations = dataset_generation_pb2_grpc.DatasetGenerationServiceStub(channel)
        self.graders = grader_service_pb2_grpc.GraderServiceStub(channel)
        self.targets = target_service_pb2_grpc.TargetServiceStub(channel)


STREAMS_QUOTA = "max_http_streams_per_tenant"  # the ErrorInfo `quota` of a tenant over its share
STREAMS_RETRY_AFTER_S = 1.0


class TenantStreams:
    """The long-lived streams (SSE/NDJSON watches, synchronous dialect waits) each tenant has open
    through this gateway, at most `limit` each: every one holds an HTTP connection for as long as it
    is open, and without a share one tenant's watches took every connection (--max-http-connections),
    so that every other tenant's calls got 503 until it let go."""

    def __init__(self, limit: int, in_all: int = 1 << 30) -> None:
        self.limit = limit
        self.in_all = in_all  # streams of every tenant together: the rest of the connections are calls'
        self.streams = 0
        self._open = Holdings()  # streams by holder (a key, then its tenant)

    def open_stream(self) -> None:
        """One more stream of anyone; GatewayError UNAVAILABLE when every tenant's together fill their
        part of the connections (several tenants each at its share left no connection for any call)."""
        if self.streams >= self.in_all:
            raise GatewayError(
                grpc.StatusCode.UNAVAILABLE,
                f"this gateway has {self.streams} REST streams open, all it takes; retry, or watch over gRPC",
                Reason.GATEWAY_STREAMS_FULL,
                retry_after_s=STREAMS_RETRY_AFTER_S,
            )
        self.streams += 1

    def close_stream(self) -> None:
        self.streams -= 1

    def take(self, holder: str) -> None:
        """One more stream of `holder` (a tenant); GatewayError RESOURCE_EXHAUSTED when it has its share."""
        held = self._open.of(holder)
        if held >= self.limit:
            raise GatewayError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the tenant has {held} REST streams open on this gateway (at most {self.limit}); "
                "close one, or watch over gRPC",
                Reason.TENANT_QUOTA_EXCEEDED,
                retry_after_s=STREAMS_RETRY_AFTER_S,
                metadata={"quota": STREAMS_QUOTA},
            )
        self._open.take(holder)

    def give_back(self, holder: str) -> None:
        self._open.give_back(holder)


# The service's quotas on a tenant's watch streams: how many are open, and the memory they may hold.
WATCH_QUOTAS = frozenset({STREAMS_QUOTA, "max_watch_streams", "max_watch_bytes_per_tenant"})


def _no_room_for_streams(error: GatewayError) -> bool:
    """Whether a stream was refused for want of room (its tenant's share of this gateway's streams or of
    the service's watch streams and their memory, or all tenants' together), not for what it asked. The
    service's own refusals were taken for failures: a synchronous create (Agno, Aymara) answered 429
    for a run it had created, and the client's retry created another."""
    return error.reason in (Reason.GATEWAY_STREAMS_FULL, Reason.SERVER_STREAMS_FULL) or (
        error.metadata.get("quota") in WATCH_QUOTAS
    )


def key_holder(credentials: tuple[tuple[str, str], ...]) -> str:
    """The caller's key as a holder of streams (a digest, so the key itself is not kept)."""
    return "key:" + hashlib.sha256(repr(credentials).encode()).hexdigest()


async def stream_holder(call: Any, credentials: tuple[tuple[str, str], ...]) -> str:
    """Whom a started stream counts against: the tenant the service named in its initial metadata
    (TENANT_METADATA), or, from a service that names none (an older version), the caller's key."""
    tenant = (await call.initial_metadata()).get(TENANT_METADATA)
    return f"tenant:{tenant}" if tenant else key_holder(credentials)


class StreamSlot:
    """A place for one long-lived stream on a channel of the pool, in the share of the key that opens it
    from the start and, once `admit`ted, in its tenant's share of the gateway's streams; `release`
    (idempotent) frees all three.

    The key's share counts the stream before the service has said whose it is: a stream may wait long
    for its first message (a watch resumed at a running run's last event waits for the next, or for a
    heartbeat), and such streams, uncounted until then, could take connections past the tenant's share."""

    def __init__(self, pooled: _Channel, tenants: TenantStreams, credentials: tuple[tuple[str, str], ...]) -> None:
        self._key = key_holder(credentials)
        tenants.open_stream()  # GatewayError when all tenants' streams fill their part: nothing taken
        try:
            tenants.take(self._key)  # GatewayError past the key's share
        except GatewayError:
            tenants.close_stream()
            raise
        self._pooled: _Channel | None = pooled
        pooled.streams += 1
        self.channel = pooled.channel
        self.runs = pooled.runs
        self._tenants = tenants
        self._holder: str | None = None

    async def admit(self, call: Any, credentials: tuple[tuple[str, str], ...]) -> None:
        """Count the stream `call` (read once: the service has authenticated it and named its tenant)
        against its tenant's share; GatewayError RESOURCE_EXHAUSTED, with the slot released, past it."""
        holder = await stream_holder(call, credentials)
        if self._pooled is None or self._holder is not None or holder == self._key:
            return  # released meanwhile, admitted already, or counted by its key (a service naming no tenant)
        try:
            self._tenants.take(holder)
        except GatewayError:
            self.release()
            raise
        self._holder = holder

    @property
    def owner(self) -> str:
        """Whose stream this is: its tenant once admitted, until then the key that opened it."""
        return self._holder or self._key

    def release(self) -> None:
        if self._pooled is not None:
            self._pooled.streams -= 1
            self._pooled = None
            self._tenants.give_back(self._key)
            self._tenants.close_stream()
        if self._holder is not None:
            self._tenants.give_back(self._holder)
            self._holder = None


class Upstream:
    """A pool of channels to the gRPC service, shared by every route of the gateway.

    An HTTP/2 connection carries a bounded number of concurrent streams (the server's
    max_concurrent_streams, 1000 for evalsvc): past it, calls queue. Watches (SSE, NDJSON, dialects
    waiting for a run) hold a stream for as long as they are open, so each channel takes at most
    `streams_per_channel` of them, a new channel (its own connection) is opened when every channel is
    full, and unary calls go to the channel with the fewest watches, where there is always room.
    Channels are kept once opened (idle connections only cost a keepalive ping).

    Each tenant may hold at most `streams_per_tenant` of those streams at once, and all tenants together
    `streams_in_all` (`TenantStreams`): each is also an HTTP connection to the gateway, and those are
    shared by every tenant and every call."""

    def __init__(
        self,
        channel_factory: ChannelFactory,
        streams_per_channel: int = 500,
        streams_per_tenant: int = 500,
        streams_in_all: int = 1500,
    ) -> None:
        self._factory = channel_factory
        self._streams_per_channel = streams_per_channel
        self._pool: list[_Channel] = []
        self.tenant_streams = TenantStreams(streams_per_tenant, streams_in_all)

    def open(self) -> None:
        self._pool = [_Channel(self._factory(0))]

    async def close(self) -> None:
        pool, self._pool = self._pool, []
        await asyncio.gather(*(pooled.channel.close() for pooled in pool))

    def _least_loaded(self) -> _Channel:
        if not self._pool:
            raise RuntimeError("the gateway's channels are not open (the app's lifespan has not started)")
        return min(self._pool, key=lambda pooled: pooled.streams)

    @property
    def channel(self) -> grpc.aio.Channel:
        """A channel for a unary call."""
        return self._least_loaded().channel

    @property
    def runs(self) -> eval_run_service_pb2_grpc.EvalRunServiceAsyncStub:
        return self._least_loaded().runs

    @property
    def datasets(self) -> dataset_service_pb2_grpc.DatasetServiceAsyncStub:
        return self._least_loaded().datasets

    @property
    def generations(self) -> dataset_generation_pb2_grpc.DatasetGenerationServiceAsyncStub:
        return self._least_loaded().generations

    @property
    def graders(self) -> grader_service_pb2_grpc.GraderServiceAsyncStub:
        return self._least_loaded().graders

    @property
    def targets(self) -> target_service_pb2_grpc.TargetServiceAsyncStub:
        return self._least_loaded().targets

    def stream_slot(self, credentials: tuple[tuple[str, str], ...]) -> StreamSlot:
        """Room for one long-lived stream of the caller with these `credentials`: on the first channel
        with room, or on a new channel; GatewayError when the key has its share of streams open. Once the
        stream has started, `admit` it (its tenant's share)."""
        for pooled in self._pool:
            if pooled.streams < self._streams_per_channel:
                return StreamSlot(pooled, self.tenant_streams, credentials)
        if not self._pool:
            raise RuntimeError("the gateway's channels are not open (the app's lifespan has not started)")
        pooled = _Channel(self._factory(len(self._pool)))
        self._pool.append(pooled)
        return StreamSlot(pooled, self.tenant_streams, credentials)

    async def call(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        caller: Caller,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> Resp:
        """One unary call as `caller`; a failure raises `GatewayError`."""
        try:
            return await method(request, metadata=caller.metadata, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise GatewayError.from_rpc(error) from None

    async def watch(
        self, run_id: str, caller: Caller, after_seq: int = 0
    ) -> AsyncGenerator[eval_run_service_pb2.WatchRunResponse, None]:
        """The run's WatchRun events (a failure raises `GatewayError`, as does the caller's tenant having
        its share of streams open); closing the iterator cancels it."""
        slot = self.stream_slot(caller.metadata)
        try:
            call = slot.runs.WatchRun(
                eval_run_service_pb2.WatchRunRequest(run_id=run_id, after_seq=after_seq), metadata=caller.metadata
            )
        except BaseException:  # a channel closed at shutdown, say: the slot is not kept
            slot.release()
            raise
        try:
            admitted = False
            async for event in call:
                if not admitted:
                    await slot.admit(call, caller.metadata)
                    admitted = True
                yield event
        except grpc.aio.AioRpcError as error:
            raise GatewayError.from_rpc(error) from None
        finally:
            call.cancel()
            slot.release()

    async def wait_until_done(self, run_id: str, caller: Caller, timeout: float) -> run_pb2.Run:
        """The run once it has ended, or as it stands when `timeout` seconds have passed.

        For the dialects whose create call is synchronous (Agno, Aymara): they create the run, then wait
        for its terminal event here; the run keeps going if the wait gives up. A caller with no room for a
        stream (its tenant's share, or all tenants' together, is open) gets the run as it stands at once
        (the run exists: an error would have its client create it again).
        """
        deadline = time.monotonic() + timeout
        events = self.watch(run_id, caller)
        try:
            while (left := deadline - time.monotonic()) > 0:
                try:
                    event = await asyncio.wait_for(anext(events), left)
                except (TimeoutError, StopAsyncIteration):
                    break
                except GatewayError as error:
                    if not _no_room_for_streams(error):
                        raise
                    break
                if event.WhichOneof("event") == "run" and event.run.status in TERMINAL:
                    return event.run
        finally:
            await events.aclose()
        got = await self.call(self.runs.GetRun, eval_run_service_pb2.GetRunRequest(run_id=run_id), caller)
        return got.run


def with_retry_after(response: R, error: GatewayError) -> R:
    """Add `Retry-After` (whole seconds, rounded up) when the service said how long to wait: HTTP
    clients of every dialect understand it, whatever their error body looks like."""
    if error.retry_after_s > 0 and "retry-after" not in response.headers:
        response.headers["retry-after"] = str(math.ceil(error.retry_after_s))
    return response
