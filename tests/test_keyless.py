"""What callers without an API key may ask of the server (health, reflection): small requests, none kept large
for a stream's life nor sent to the tenants' checker of large requests, and reflection answered within a
budget of requests a second (evalsvc.api.keyless, evalsvc.api.health)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from evalsvc.server import EvalServer
from evalsvc.testing import EvalServiceTestServer
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc as stubs
from tests import dbs
from tests.helpers import keyed_channel, until, violations

OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # each channel its own connection
RUN_SERVICE = "evalsvc.v1.EvalRunService"


@contextlib.asynccontextmanager
async def served(tmp_path: Path) -> AsyncIterator[EvalServer]:
    """An in-process server executing nothing."""
    async with EvalServiceTestServer(database_url=dbs.db_url(tmp_path), workers=0) as test:
        yield test.server


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


async def test_a_health_service_name_over_256_characters_is_refused_and_never_held(tmp_path: Path) -> None:
    """A health Watch kept its request for the stream's life: 60 anonymous streams of 8 MiB names took the
    server from 144 to 1,587 MiB. A service name over 256 characters is INVALID_ARGUMENT naming `service`
    (Watch and Check), whether parsed (300 characters) or refused unparsed as a request over 4 KiB (2 MiB),
    and no stream is held for it; a name within the bound is watched as before."""
    async with (
        served(tmp_path) as srv,
        grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}", OWN_CONNECTION) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("s" * 300, "s" * (2 << 20)):
            for call in (
                health.Watch(health_pb2.HealthCheckRequest(service=name)).read(),
                health.Check(health_pb2.HealthCheckRequest(service=name)),
            ):
                error = await refused(call)
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
                assert "256 characters" in violations(error)["service"]
        assert srv.keyless_streams.total == 0
        watch = health.Watch(health_pb2.HealthCheckRequest(service=RUN_SERVICE + "x" * 200))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        watch.cancel()
        served_name = await health.Check(health_pb2.HealthCheckRequest(service=RUN_SERVICE))
        assert served_name.status == health_pb2.HealthCheckResponse.SERVING


async def test_keyless_requests_over_1_mib_never_reach_the_tenants_checker(tmp_path: Path) -> None:
    """docs/security.md: only requests of callers with a valid key are checked by the process that checks
    requests over 1 MiB. Anonymous 2 MiB health Checks and reflection messages went there all the same, in
    one anonymous line (its 4 in flight refused the 5th, and they delayed tenants' checks); now they are
    INVALID_ARGUMENT unparsed, and a tenant's own large request is still checked."""
    async with served(tmp_path) as srv:
        assert srv.bootstrap_key
        checked: list[str] = []
        check = srv.checker.problem

        async def recorded(tenant: str, request: Any) -> str | None:
            checked.append(tenant)
            return await check(tenant, request)

        srv.checker.problem = recorded  # type: ignore[method-assign]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}", OWN_CONNECTION) as anonymous:
            big = "s" * (2 << 20)
            error = await refused(
                health_pb2_grpc.HealthStub(anonymous).Check(health_pb2.HealthCheckRequest(service=big))
            )
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "service" in violations(error)
            stream = reflection_pb2_grpc.ServerReflectionStub(anonymous).ServerReflectionInfo()
            await stream.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=big))
            error = await refused(stream.read())
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "at most 4096 bytes" in violations(error)["request"]
        assert checked == []
        async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
            missing = await refused(stubs.EvalRunServiceStub(channel).GetRun(pb.GetRunRequest(run_id="r" * (2 << 20))))
        assert missing.code() == grpc.StatusCode.NOT_FOUND  # checked, then looked up
        assert checked == ["default"]
        await until(lambda: srv.keyless_streams.total == 0 and srv.admission.served == 0)


async def test_reflection_requests_past_the_budget_wait_their_turn(tmp_path: Path) -> None:
    """Four anonymous clients asking reflection for a 30 KB file in a loop took another tenant's ListRuns
    from 3.5 to 96 ms (p50). Reflection answers at most a budget of requests in any window, all connections
    together (20 in 0.2 s; here 3, the window held open): the next request waits, in turn across
    connections, while tenants' calls are served meanwhile, and is answered once a place frees up. Places
    come back when their window has passed. The answers are grpc_reflection's."""
    async with served(tmp_path) as srv:
        assert srv.bootstrap_key
        reflection = srv.reflection
        assert (reflection.budget.capacity, reflection.window_s) == (20, 0.2)
        budget = reflection.budget
        budget.set_capacity(3)
        reflection.window_s = 600.0  # no place comes back by itself in this test
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}", OWN_CONNECTION) as anonymous,
            grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}", OWN_CONNECTION) as other,
            keyed_channel(srv.port, srv.bootstrap_key) as keyed,
        ):
            stream = reflection_pb2_grpc.ServerReflectionStub(anonymous).ServerReflectionInfo()
            answers = []
            for _ in range(3):
                await stream.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=RUN_SERVICE))
                answers.append(await stream.read())
            files = answers[0].file_descriptor_response.file_descriptor_proto
            assert b"evalsvc/v1/eval_run_service.proto" in files[0] and len(files) > 1  # with its dependencies
            assert all(a.file_descriptor_response == answers[0].file_descriptor_response for a in answers)
            await stream.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            await until(lambda: budget.waiting == 1)
            second = reflection_pb2_grpc.ServerReflectionStub(other).ServerReflectionInfo()
            await second.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            await until(lambda: budget.waiting == 2)
            tenant = stubs.EvalRunServiceStub(keyed)
            assert (await tenant.ListRuns(pb.ListRunsRequest())).runs == []  # served while reflection waits
            assert budget.waiting == 2
            budget.set_capacity(5)  # two places free up: each waiting connection gets one
            assert (await stream.read()).list_services_response.service
            assert (await second.read()).list_services_response.service
            assert budget.waiting == 0

            reflection.window_s = 0.01  # places come back: a session of 20 requests is answered whole
            budget.set_capacity(7)  # the five taken stay taken
            for _ in range(20):
                await second.write(reflection_pb2.ServerReflectionRequest(list_services=""))
                assert (await second.read()).list_services_response.service
            await second.write(
                reflection_pb2.ServerReflectionRequest(file_by_filename="evalsvc/v1/eval_run_service.proto")
            )
            by_name = (await second.read()).file_descriptor_response.file_descriptor_proto
            assert by_name == files
            assert [descriptor_pb2.FileDescriptorProto.FromString(f).name for f in files][:1] == [
                "evalsvc/v1/eval_run_service.proto"
            ]
            for call in (stream, second):
                await call.done_writing()
                assert await call.read() == grpc.aio.EOF
