"""Calls whose request messages never arrive hold no served place and wait a bounded time
(evalsvc.api.admission): opened by grpc's own client as request streams that send nothing, which on
the wire is what a unary call whose request is never sent looks like."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from evalsvc.server import EvalServer
from evalsvc.testing import EvalServiceTestServer
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc as stubs
from tests import dbs
from tests.helpers import create_request, error_reason, keyed_channel, retry_delay, until

GET_RUN = "/evalsvc.v1.EvalRunService/GetRun"
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # each channel its own connection


@contextlib.asynccontextmanager
async def served(tmp_path: Path, **settings: Any) -> AsyncIterator[EvalServer]:
    """An in-process server executing nothing (runs stay PENDING), with these settings."""
    async with EvalServiceTestServer(database_url=dbs.db_url(tmp_path), workers=0, **settings) as test:
        yield test.server


@contextlib.asynccontextmanager
async def unsent() -> AsyncIterator[Callable[..., grpc.aio.StreamUnaryCall[Any, Any]]]:
    """Makes calls whose headers go out and whose request message never does: grpc's own client with a
    request stream that sends nothing until the block ends, then ends without a message, so that
    grpc's task reading it finishes too (left waiting, it was destroyed pending and logged at ERROR)."""
    gate = asyncio.Event()

    async def nothing() -> AsyncIterator[pb.GetRunRequest]:
        await gate.wait()
        for never in ():
            yield never

    def call(channel: grpc.aio.Channel, key: str = "", path: str = GET_RUN) -> grpc.aio.StreamUnaryCall[Any, Any]:
        method = channel.stream_unary(
            path,
            request_serializer=pb.GetRunRequest.SerializeToString,
            response_deserializer=pb.GetRunResponse.FromString,
        )
        metadata = (("authorization", f"Bearer {key}"),) if key else None
        return method(nothing(), metadata=metadata)  # type: ignore[no-any-return]

    try:
        yield call
    finally:
        gate.set()
        await until(lambda: not any("_consume_request_iterator" in repr(task) for task in asyncio.all_tasks()))


def refusals(srv: EvalServer, reason: str) -> float | None:
    """evalsvc_calls_refused_total{reason}: refused calls are in no access log."""
    return srv.metrics.registry.get_sample_value("evalsvc_calls_refused_total", {"reason": reason})


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


async def test_calls_never_sent_leave_every_tenants_calls_served(tmp_path: Path) -> None:
    """12 calls opened and never sent, on three connections, against --max-concurrent-rpcs 8: every
    tenant's calls are still served (before, grpc counted them from their headers and every tenant got
    RESOURCE_EXHAUSTED while they stayed open). Of one connection's six such calls, once they have
    waited a second, the two newest are ended (WAITING_CALLS_FULL). Such calls without an API key wait
    for nothing: they are refused before their request is read."""
    async with served(tmp_path, max_concurrent_rpcs=8, max_waiting_calls_per_connection=4) as srv:
        assert srv.bootstrap_key
        async with contextlib.AsyncExitStack() as stack:
            never_sent = await stack.enter_async_context(unsent())
            anonymous = await stack.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}"))
            assert (await refused(never_sent(anonymous))).code() == grpc.StatusCode.UNAUTHENTICATED
            connections = [
                await stack.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}", OWN_CONNECTION))
                for _ in range(3)
            ]
            key = srv.bootstrap_key
            waiting = [never_sent(channel, key) for channel in connections for _ in range(4)]
            await until(lambda: srv.admission.waiting == 12)
            extra = [never_sent(connections[0], key) for _ in range(2)]  # the connection's fifth and sixth

            tenant = stubs.EvalRunServiceStub(
                await stack.enter_async_context(keyed_channel(srv.port, srv.bootstrap_key))
            )
            for _ in range(10):
                missing = await refused(tenant.GetRun(pb.GetRunRequest(run_id="run_missing")))
                assert missing.code() == grpc.StatusCode.NOT_FOUND  # served, not RESOURCE_EXHAUSTED

            for newest in extra:
                ended = await refused(newest)
                assert ended.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert error_reason(ended) == "WAITING_CALLS_FULL" and retry_delay(ended) == 1.0
            assert refusals(srv, "WAITING_CALLS_FULL") == 2  # in no access log: counted
            assert srv.admission.waiting == 12 and not any(call.done() for call in waiting)  # the older ones wait on

            for call in waiting:
                call.cancel()
            await until(lambda: srv.admission.waiting == 0)


async def test_a_burst_of_calls_on_one_connection_is_never_refused(tmp_path: Path) -> None:
    """The connection's cap counts only calls that have waited a second for their requests: a first
    version counted every call whose request the server had not read yet, and refused a test's 20
    concurrent CreateRuns on one channel on a busy machine. 200 at once, the cap at 1: all served."""
    async with served(tmp_path, max_waiting_calls_per_connection=1) as srv:
        assert srv.bootstrap_key
        async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
            tenant = stubs.EvalRunServiceStub(channel)
            outcomes = await asyncio.gather(
                *(tenant.GetRun(pb.GetRunRequest(run_id=f"run_{i}")) for i in range(200)), return_exceptions=True
            )
        assert {o.code() for o in outcomes if isinstance(o, grpc.aio.AioRpcError)} == {grpc.StatusCode.NOT_FOUND}
        assert refusals(srv, "WAITING_CALLS_FULL") is None


async def test_a_request_that_never_arrives_ends_the_call(tmp_path: Path) -> None:
    """A call's request message waited for --request-timeout-s (then DEADLINE_EXCEEDED REQUEST_TIMEOUT),
    and so is each message of a reflection stream; a call that half-closes with no request is
    INVALID_ARGUMENT."""
    async with (
        served(tmp_path, request_timeout_s=0.5) as srv,
        keyed_channel(srv.port, srv.bootstrap_key or "") as channel,
        unsent() as never_sent,
    ):
        began = time.monotonic()
        timed_out = await refused(never_sent(channel, srv.bootstrap_key or ""))
        assert timed_out.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert error_reason(timed_out) == "REQUEST_TIMEOUT"
        assert "did not arrive in full within 0.5 s" in (timed_out.details() or "")
        assert "--request-timeout-s" in (timed_out.details() or "")
        assert 0.5 <= time.monotonic() - began < 5.0  # the timeout, plus at most one sweep (1 s)
        assert srv.admission.waiting == 0 and srv.admission.served == 0
        assert refusals(srv, "REQUEST_TIMEOUT") == 1

        empty = channel.stream_unary(GET_RUN, request_serializer=pb.GetRunRequest.SerializeToString)(
            iter(()), metadata=(("authorization", f"Bearer {srv.bootstrap_key}"),)
        )
        nothing = await refused(empty)
        assert nothing.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_reason(nothing) == "MALFORMED_REQUEST" and refusals(srv, "MALFORMED_REQUEST") == 1

        idle = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
        await idle.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        assert (await idle.read()).list_services_response.service  # served while it asks
        ended = await refused(idle.read())  # then idle past the timeout
        assert ended.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert error_reason(ended) == "REQUEST_TIMEOUT"
        await until(lambda: srv.admission.served == 0)


async def test_served_calls_past_max_concurrent_rpcs_are_refused_with_retry_info(tmp_path: Path) -> None:
    """--max-concurrent-rpcs 2, held by an open WatchRun and an open reflection stream: the next call is
    RESOURCE_EXHAUSTED SERVER_CALLS_FULL with RetryInfo; once the reflection stream ends, calls are
    served again."""
    async with served(tmp_path, max_concurrent_rpcs=2) as srv:
        assert srv.bootstrap_key
        async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
            tenant = stubs.EvalRunServiceStub(channel)
            run = (await tenant.CreateRun(create_request(1))).run  # no workers: it stays PENDING
            watch = tenant.WatchRun(pb.WatchRunRequest(run_id=run.id))
            await watch.read()
            stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
            await stream.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            await stream.read()
            assert srv.admission.served == 2
            full = await refused(tenant.GetRun(pb.GetRunRequest(run_id="run_missing")))
            assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_reason(full) == "SERVER_CALLS_FULL"
            assert retry_delay(full) == 1.0
            assert refusals(srv, "SERVER_CALLS_FULL") == 1

            await stream.done_writing()
            assert await stream.read() == grpc.aio.EOF
            await until(lambda: srv.admission.served == 1)
            missing = await refused(tenant.GetRun(pb.GetRunRequest(run_id="run_missing")))
            assert missing.code() == grpc.StatusCode.NOT_FOUND
            watch.cancel()


async def test_keyless_streams_are_bounded_per_connection_and_in_all(tmp_path: Path) -> None:
    """Reflection needs no key, as health does, and its streams took every served place (500 connections
    of 16 streams, each asking every few seconds, a review found). Health Watch and reflection streams
    together: two a connection, an eighth of --max-concurrent-rpcs in all (16: 2); past either a
    reflection stream is UNAVAILABLE SERVER_STREAMS_FULL. Ordinary calls keep their room."""
    async with served(tmp_path, max_concurrent_rpcs=16) as srv:
        assert srv.bootstrap_key
        async with contextlib.AsyncExitStack() as stack:
            first, second = [
                await stack.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}", OWN_CONNECTION))
                for _ in range(2)
            ]
            watch = health_pb2_grpc.HealthStub(first).Watch(health_pb2.HealthCheckRequest())
            await watch.read()
            listing = await listed(first)
            for channel, why in ((first, "a connection may hold 2"), (second, "all taken")):
                over = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
                error = await refused(over.read())  # refused as it opens, before any request of it is read
                assert error.code() == grpc.StatusCode.UNAVAILABLE and error_reason(error) == "SERVER_STREAMS_FULL"
                assert why in (error.details() or ""), error.details()
            tenant = stubs.EvalRunServiceStub(
                await stack.enter_async_context(keyed_channel(srv.port, srv.bootstrap_key))
            )
            assert (await refused(tenant.GetRun(pb.GetRunRequest(run_id="run_x")))).code() == grpc.StatusCode.NOT_FOUND
            watch.cancel()
            listing.cancel()


async def listed(channel: grpc.aio.Channel) -> Any:
    """A reflection stream that has listed the services once and stays open."""
    stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
    await stream.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    assert (await stream.read()).list_services_response.service
    return stream
