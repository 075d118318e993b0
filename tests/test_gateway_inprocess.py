"""The embedded gateway's in-process transport (evalsvc.api.local): over real HTTP to `serve --http-addr`
on port 0, answers must be those of the same gateway over a gRPC channel, and the call surface
(generated stubs, metadata, deadlines, status details, streams) that of a grpc.aio channel."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

from evalsvc.api.local import PEER, LocalChannel
from evalsvc.gateway.server import Gateway, remote_channels
from evalsvc.server import EvalServer
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc
from tests.conftest import make_settings
from tests.helpers import create_request, serving_gateway
from tests.procs import free_port
from tests.test_gateway import eventually

RUN = {
    "items": [{"id": "a", "input": "q", "expectedOutput": "x", "response": {"content": "x"}}],
    "target": {"provided": {}},
    "graders": [{"name": "exact", "exactMatch": {}}],
}
GET_RUN = "/evalsvc.v1.EvalRunService/GetRun"


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[tuple[EvalServer, httpx.AsyncClient]]:
    async with serving_gateway(make_settings(tmp_path, http_addr="127.0.0.1:0")) as (srv, client):
        yield srv, client


@asynccontextmanager
async def over_grpc(srv: EvalServer) -> AsyncIterator[httpx.AsyncClient]:
    """A second gateway in front of the same server, calling it over a gRPC channel (`evalsvc gateway`)."""
    gateway = Gateway(remote_channels(f"127.0.0.1:{srv.port}"), "127.0.0.1:0", settings=srv.settings)
    port = await gateway.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        await gateway.stop()


def rpcs(srv: EvalServer, method: str, code: str) -> float:
    return srv.metrics.registry.get_sample_value("evalsvc_rpcs_total", {"method": method, "code": code}) or 0.0


async def test_auth_and_tenancy_answer_as_over_grpc(gw) -> None:
    srv, client = gw
    key = srv.bootstrap_key or ""
    run_id = (await client.post("/v1/runs", json=RUN)).json()["run"]["id"]
    other_key, _ = await srv.keys.create("other", "other tenant")
    cases: list[tuple[str, dict[str, str], int]] = [
        (f"/v1/runs/{run_id}", {"authorization": ""}, 401),  # no key
        (f"/v1/runs/{run_id}", {"authorization": "Bearer evk_wrong"}, 401),  # wrong key
        (f"/v1/runs/{run_id}", {"x-api-key": "evk_wrong", "authorization": ""}, 401),
        (f"/v1/runs/{run_id}", {"authorization": f"Bearer {other_key}"}, 404),  # another tenant's run
        (f"/v1/runs/{run_id}:watch", {"authorization": f"Bearer {other_key}"}, 404),
        (f"/v1/runs/{run_id}", {"authorization": f"Bearer {key}"}, 200),
        ("/v1/runs", {"authorization": f"Bearer {other_key}"}, 200),  # the other tenant sees none of ours
    ]
    rejected_before = rpcs(srv, GET_RUN, "UNAUTHENTICATED")
    async with over_grpc(srv) as remote:
        for url, headers, status in cases:
            local, far = await client.get(url, headers=headers), await remote.get(url, headers=headers)
            assert local.status_code == far.status_code == status, (url, headers, local.text, far.text)
            if url.endswith(":watch") and status == 200:
                continue
            assert local.json() == far.json(), (url, headers)
    assert (await client.get("/v1/runs", headers={"authorization": f"Bearer {other_key}"})).json()["runs"] == []
    # Both gateways' rejected GetRuns were counted by the one interceptor: 3 in process, 3 over gRPC.
    assert rpcs(srv, GET_RUN, "UNAUTHENTICATED") == rejected_before + 6


async def test_error_details_reach_a_stub_on_the_local_channel_as_over_grpc(gw) -> None:
    srv, _ = gw
    stub = eval_run_service_pb2_grpc.EvalRunServiceStub(LocalChannel(srv.local))
    auth = (("authorization", f"Bearer {srv.bootstrap_key}"),)
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.CreateRun(create_request(1, description="d" * 1025), metadata=auth)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(bad.value)
    assert status is not None and [d.type_url.rsplit(".", 1)[-1] for d in status.details] == [
        "ErrorInfo",
        "BadRequest",
    ]
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetRun(pb.GetRunRequest(run_id="run_nope"), metadata=auth)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND and rpc_status.from_call(missing.value) is not None
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await stub.GetRun(pb.GetRunRequest(run_id="run_nope"))
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
    run = (await stub.CreateRun(create_request(1), metadata=auth)).run
    assert (await stub.GetRun(pb.GetRunRequest(run_id=run.id), metadata=auth)).run.id == run.id


async def test_deadlines_end_calls_with_deadline_exceeded(gw) -> None:
    srv, _ = gw
    await srv.executor.stop()  # the run stays pending: after its first event the watch waits
    stub = eval_run_service_pb2_grpc.EvalRunServiceStub(LocalChannel(srv.local))
    auth = (("authorization", f"Bearer {srv.bootstrap_key}"),)
    run = (await stub.CreateRun(create_request(1), metadata=auth)).run
    call = stub.WatchRun(pb.WatchRunRequest(run_id=run.id), metadata=auth, timeout=0.5)
    assert (await call.read()).seq == 1
    with pytest.raises(grpc.aio.AioRpcError) as late:
        while await asyncio.wait_for(call.read(), 30) is not grpc.aio.EOF:
            pass
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert srv.bus.watcher_count() == 0
    with pytest.raises(grpc.aio.AioRpcError) as past:  # however fast the call would be, as over gRPC
        await stub.GetRun(pb.GetRunRequest(run_id=run.id), metadata=auth, timeout=0)
    assert past.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_the_access_log_and_metrics_see_in_process_calls(gw, caplog: pytest.LogCaptureFixture) -> None:
    srv, client = gw
    run_id = (await client.post("/v1/runs", json=RUN)).json()["run"]["id"]
    before = rpcs(srv, GET_RUN, "OK")
    with caplog.at_level("INFO", logger="evalsvc.access"):
        # The stream's end frees its place once the server learns of the disconnect (on its own schedule).
        assert await eventually(lambda: srv.bus.watcher_count() == 0)
        assert (await client.get(f"/v1/runs/{run_id}")).status_code == 200
    assert rpcs(srv, GET_RUN, "OK") == before + 1
    line = next(r for r in caplog.records if getattr(r, "method", "") == GET_RUN)
    assert (line.code, line.tenant, line.run_id, line.peer) == ("OK", "default", run_id, PEER)  # type: ignore[attr-defined]


async def test_a_stream_ended_from_another_task_is_logged_under_its_tenant(
    gw, caplog: pytest.LogCaptureFixture
) -> None:
    """The synchronous dialect creates (Agno, Aymara: `Upstream.wait_until_done`) read their watch inside
    `asyncio.wait_for`, a task of its own, and end it from theirs: its access line named no tenant."""
    srv, client = gw
    run_id = (await client.post("/v1/runs", json=RUN)).json()["run"]["id"]
    stub = eval_run_service_pb2_grpc.EvalRunServiceStub(LocalChannel(srv.local))
    call = stub.WatchRun(pb.WatchRunRequest(run_id=run_id), metadata=(("x-api-key", srv.bootstrap_key or ""),))
    with caplog.at_level("INFO", logger="evalsvc.access"):
        assert (await asyncio.wait_for(call.read(), 30)).seq == 1
        call.cancel()
        assert await eventually(lambda: srv.bus.watcher_count() == 0)
    watch = "/evalsvc.v1.EvalRunService/WatchRun"
    line = next(r for r in caplog.records if getattr(r, "method", "") == watch)
    assert (line.code, line.tenant, line.run_id) == ("CANCELLED", "default", run_id)  # type: ignore[attr-defined]


async def test_the_concurrent_rpc_limit_applies_in_process(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, http_addr="127.0.0.1:0", max_concurrent_rpcs=1)
    async with serving_gateway(settings) as (srv, client):
        await srv.executor.stop()
        run_id = (await client.post("/v1/runs", json=RUN)).json()["run"]["id"]
        async with client.stream("GET", f"/v1/runs/{run_id}:watch") as stream:
            lines = stream.aiter_lines()
            assert (await anext(lines)).startswith("id: 1")  # the watch is open: the one RPC allowed
            refused = await client.get(f"/v1/runs/{run_id}")
            assert refused.status_code == 429 and refused.json()["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        # The stream's end frees its place once the server learns of the disconnect (on its own schedule).
        assert await eventually(lambda: srv.bus.watcher_count() == 0)
        assert (await client.get(f"/v1/runs/{run_id}")).status_code == 200


async def test_open_sse_streams_end_when_the_server_stops(tmp_path: Path) -> None:
    srv = EvalServer(make_settings(tmp_path, http_addr="127.0.0.1:0"))
    await srv.start()
    stopping: asyncio.Task[None] | None = None
    try:
        assert srv.gateway is not None
        headers = {"authorization": f"Bearer {srv.bootstrap_key}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.gateway.port}", headers=headers) as client:
            await srv.executor.stop()
            run_id = (await client.post("/v1/runs", json=RUN)).json()["run"]["id"]
            streams = [client.stream("GET", f"/v1/runs/{run_id}:watch", timeout=30) for _ in range(3)]
            opened = [await s.__aenter__() for s in streams]
            readers = [r.aiter_lines() for r in opened]
            for lines in readers:
                assert (await anext(lines)).startswith("id: 1")
            stopping = asyncio.create_task(srv.stop(grace=0.5))
            for lines, stream in zip(readers, streams, strict=True):
                rest = [line async for line in lines]  # ends: the server closed it
                await stream.__aexit__(None, None, None)
                errors = [json.loads(line[6:]) for line in rest if line.startswith("data: ")]
                assert "event: error" in rest and errors[-1]["code"] == grpc.StatusCode.UNAVAILABLE.value[0]
            await asyncio.wait_for(stopping, 30)
    finally:
        if stopping is None:
            await srv.stop(grace=0)


async def test_healthz_tells_http_probes_the_services_health_without_a_key(gw) -> None:
    """A load balancer or an orchestrator's HTTP probe in front of the gateway cannot speak gRPC health:
    GET /healthz answers it, the same through the embedded and the standalone gateway, with no key."""
    srv, keyed = gw
    async with httpx.AsyncClient(base_url=str(keyed.base_url), timeout=30) as keyless, over_grpc(srv) as standalone:
        for client in (keyless, standalone):
            serving = await client.get("/healthz")
            assert (serving.status_code, serving.json()) == (200, {"status": "SERVING"})
            assert (await client.head("/healthz")).status_code == 200
        # A full server (--max-concurrent-rpcs) is a healthy one: the probe is not refused as tenants are.
        full, srv.admission.served = srv.admission.served, srv.settings.max_concurrent_rpcs
        try:
            refused = await keyless.get("/v1/runs", headers={"authorization": f"Bearer {srv.bootstrap_key}"})
            assert refused.status_code == 429 and "SERVER_CALLS_FULL" in refused.text
            for client in (keyless, standalone):
                busy = await client.get("/healthz")
                assert (busy.status_code, busy.json()) == (200, {"status": "SERVING"})
        finally:
            srv.admission.served = full
        # What an orchestrator restarts a process for: a stalled loop.
        await srv.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        for client in (keyless, standalone):
            stalled = await client.get("/healthz")
            assert (stalled.status_code, stalled.json()) == (503, {"status": "NOT_SERVING"})
    # The standalone gateway whose --grpc-target does not answer.
    gateway = Gateway(remote_channels(f"127.0.0.1:{free_port()}"), "127.0.0.1:0", settings=srv.settings)
    port = await gateway.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as alone:
            unreachable = await alone.get("/healthz")
            assert (unreachable.status_code, unreachable.json()) == (503, {"status": "UNREACHABLE"})
    finally:
        await gateway.stop()
