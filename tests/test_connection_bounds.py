"""Connections are bounded, so file descriptors cannot run out: the gateway spreads watches over a pool
of upstream connections, closes idle and slow HTTP connections, and refuses HTTP and gRPC connections
past their caps. Each case uses small limits on a real server; the defaults are in the README."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from evalsvc.api.local import LocalChannel
from evalsvc.gateway.server import Gateway, remote_channels
from evalsvc.gateway.upstream import Caller, GatewayError, Upstream
from evalsvc.server import EvalServer
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc, run_pb2
from tests import http2
from tests.conftest import make_settings
from tests.helpers import create_request, keyed_channel

RUN = {"items": [{"input": "q", "expectedOutput": "a"}], "target": {"echo": {}}, "graders": [{"exactMatch": {}}]}
EOF_WITHIN_S = 20.0  # generous on a loaded machine; the configured timeouts below are ~1 s


@asynccontextmanager
async def gateway_server(tmp_path: Path, **settings: Any) -> AsyncIterator[tuple[EvalServer, str]]:
    srv = EvalServer(make_settings(tmp_path, http_addr="127.0.0.1:0", dialects="none", **settings))
    await srv.start()
    try:
        assert srv.gateway is not None and srv.bootstrap_key
        yield srv, f"http://127.0.0.1:{srv.gateway.port}"
    finally:
        await srv.stop(grace=0.5)


async def first_event(client: httpx.AsyncClient, url: str, opened: list[tuple[httpx.Response, Any]]) -> str:
    """Open an SSE watch and return its first event's `event:` line; the stream stays open."""
    response = await client.send(client.build_request("GET", url), stream=True)
    lines = response.aiter_lines()
    opened.append((response, lines))  # a dropped line iterator would close the stream when collected
    assert response.status_code == 200
    async for line in lines:
        if line.startswith("event:"):
            return line
    raise AssertionError("the stream ended before its first event")


async def test_the_gateway_pool_grows_past_one_connections_stream_limit(tmp_path: Path) -> None:
    """8 streams per connection on the server, 5 watches per upstream channel in the gateway: 20 open
    watches need 4 connections. With one connection, watches 9-20 would wait for a free stream forever
    and every REST call behind them too."""
    async with gateway_server(tmp_path, workers=0, max_concurrent_streams=8, gateway_streams_per_channel=5) as (
        srv,
        base,
    ):
        headers = {"authorization": f"Bearer {srv.bootstrap_key}"}
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30, limits=limits) as client:
            run_id = (await client.post("/v1/runs", json=RUN)).json()["run"]["id"]  # stays PENDING: no workers
            opened: list[tuple[httpx.Response, Any]] = []
            try:
                firsts = await asyncio.wait_for(
                    asyncio.gather(*(first_event(client, f"/v1/runs/{run_id}:watch", opened) for _ in range(20))),
                    60,
                )
                assert firsts == ["event: run"] * 20
                assert srv.bus.watcher_count() == 20  # all open at once
                got = await client.get(f"/v1/runs/{run_id}")  # REST calls still pass
                assert got.status_code == 200 and got.json()["run"]["status"] == "RUN_STATUS_PENDING"
            finally:
                for response, _ in opened:
                    await response.aclose()


async def eof_after(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    return await asyncio.wait_for(reader.read(), EOF_WITHIN_S)


async def test_idle_and_slowloris_http_connections_are_closed(tmp_path: Path) -> None:
    async with gateway_server(tmp_path, http_header_timeout_s=1.0, http_keepalive_timeout_s=1.0) as (_srv, base):
        port = int(base.rsplit(":", 1)[1])
        idle = await asyncio.open_connection("127.0.0.1", port)  # connects and says nothing
        slow = await asyncio.open_connection("127.0.0.1", port)  # headers that never end
        slow[1].write(b"GET /v1/runs HTTP/1.1\r\nhost: x\r\nx-slow: 1")
        kept = await asyncio.open_connection("127.0.0.1", port)  # one request, then keep-alive idle
        kept[1].write(b"GET /openapi.json HTTP/1.1\r\nhost: x\r\n\r\n")
        assert await eof_after(idle[0]) == b""
        assert await eof_after(slow[0]) == b""
        answered = await eof_after(kept[0])
        assert answered.startswith(b"HTTP/1.1 200 ")
        for _, writer in (idle, slow, kept):
            writer.close()


async def test_http_connections_past_the_cap_get_503_with_retry_after(tmp_path: Path) -> None:
    async with gateway_server(tmp_path, max_http_connections=3, http_header_timeout_s=60.0) as (_srv, base):
        port = int(base.rsplit(":", 1)[1])
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        extra = await asyncio.open_connection("127.0.0.1", port)
        extra[1].write(b"GET /openapi.json HTTP/1.1\r\nhost: x\r\n\r\n")
        refused = await eof_after(extra[0])
        head, _, body = refused.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in head.lower(), refused
        status = json.loads(body)
        assert status["code"] == 14 and status["details"][0]["reason"] == "GATEWAY_CONNECTIONS_FULL", status
        assert status["details"][1]["retryDelay"] == "1s"
        extra[1].close()

        held.pop()[1].close()  # a place frees up: new connections are served again
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            for _ in range(100):
                response = await client.get("/openapi.json")
                if response.status_code == 200:
                    break
                assert response.status_code == 503 and response.headers["retry-after"] == "1"
                await asyncio.sleep(0.1)  # the server notices the closed connection asynchronously
            assert response.status_code == 200
        for _, writer in held:
            writer.close()


async def test_grpc_connections_past_the_cap_are_closed(tmp_path: Path) -> None:
    srv = EvalServer(make_settings(tmp_path, max_connections=2))
    await srv.start()
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(3)
    ]
    try:
        checks = [health_pb2_grpc.HealthStub(channel).Check for channel in channels]
        request = health_pb2.HealthCheckRequest(service="")
        for check in checks[:2]:
            assert (await check(request, timeout=30)).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await checks[2](request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        await channels[0].close()  # a connection ends: the next attempt (after the client's backoff) gets in
        reply = await checks[2](request, timeout=60, wait_for_ready=True)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        for channel in channels[1:]:
            await channel.close()
        await srv.stop(grace=0.5)


async def test_grpc_connections_that_never_call_are_closed_so_new_ones_get_in(tmp_path: Path) -> None:
    """Regression: connections that never make a call held every place under --max-connections for as
    long as they stayed open, so anyone who could reach the port kept every tenant out, with no API key.
    A connection with no call for --connection-idle-s is now closed (GOAWAY, then EOF), and a tenant's
    channel, waiting for a free place, gets in."""
    srv = EvalServer(make_settings(tmp_path, max_connections=2, connection_idle_s=1.0))
    await srv.start()
    assert srv.bootstrap_key
    flood = [await asyncio.open_connection("127.0.0.1", srv.port) for _ in range(2)]
    try:
        for _, writer in flood:
            writer.write(http2.opening())  # a finished HTTP/2 handshake, and then no call
        async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
            stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:  # the flood holds both places
                await stub.ListRuns(pb.ListRunsRequest(), timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            started = time.monotonic()
            for reader, _ in flood:
                assert await eof_after(reader) != b""  # the server's SETTINGS and GOAWAY, then EOF
            reaped_after = time.monotonic() - started
            await stub.ListRuns(pb.ListRunsRequest(), timeout=EOF_WITHIN_S, wait_for_ready=True)
        assert reaped_after < EOF_WITHIN_S
    finally:
        for _, writer in flood:
            writer.close()
        await srv.stop(grace=0.5)


async def test_a_connection_with_an_open_watch_is_not_idle(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """grpc counts a connection idle only while it carries no call: an open WatchRun stream keeps its
    connection however long the run stays quiet (heartbeats or none). Shown by the peer address: a call
    made on the channel after several idle periods, while the watch is open, comes over the watch's
    connection; once the watch has ended, the connection is closed after the idle period and the next
    call comes over a new one (so the idle limit was in force all along)."""
    idle_s = 0.5
    srv = EvalServer(make_settings(tmp_path, workers=0, connection_idle_s=idle_s, heartbeat_s=0.2))
    await srv.start()
    assert srv.bootstrap_key
    caplog.set_level(logging.INFO, logger="evalsvc.access")
    try:
        async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
            stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            run_id = (await stub.CreateRun(create_request(1), timeout=30)).run.id  # stays PENDING: no workers
            watch = stub.WatchRun(pb.WatchRunRequest(run_id=run_id), timeout=60)
            started = time.monotonic()
            kinds = []
            while time.monotonic() - started < 4 * idle_s:  # the run, then heartbeats, for four idle periods
                kinds.append((await watch.read()).WhichOneof("event"))
            assert kinds[0] == "run" and set(kinds[1:]) == {"heartbeat"}, kinds
            await stub.GetRun(pb.GetRunRequest(run_id=run_id), timeout=30)  # while the watch is open
            watch.cancel()
            async with asyncio.timeout(EOF_WITHIN_S):  # the connection, now without a call, is closed
                while channel.get_state() != grpc.ChannelConnectivity.IDLE:
                    await channel.wait_for_state_change(channel.get_state())
            await stub.GetRun(pb.GetRunRequest(run_id=run_id), timeout=30)  # over a new connection
    finally:
        await srv.stop(grace=0.5)
    peers = {
        method: [r.peer for r in caplog.records if getattr(r, "method", "") == f"/evalsvc.v1.EvalRunService/{method}"]
        for method in ("CreateRun", "WatchRun", "GetRun")
    }
    assert len(peers["WatchRun"]) == 1 and len(peers["GetRun"]) == 2, peers
    assert peers["GetRun"][0] == peers["WatchRun"][0], peers  # the watch's connection was kept
    assert peers["GetRun"][1] != peers["WatchRun"][0], peers  # and reaped once it carried no call


def quota_details(body: dict[str, Any]) -> tuple[str, dict[str, str], str]:
    """(ErrorInfo reason, ErrorInfo metadata, RetryInfo delay) of a google.rpc.Status body."""
    info = next(d for d in body["details"] if d["@type"].endswith("ErrorInfo"))
    retry = next(d for d in body["details"] if d["@type"].endswith("RetryInfo"))
    return info["reason"], info.get("metadata", {}), retry["retryDelay"]


@asynccontextmanager
async def standalone_gateway(srv: EvalServer) -> AsyncIterator[str]:
    """A second gateway with the server's settings, calling it over gRPC (`evalsvc gateway`): its URL."""
    gateway = Gateway(remote_channels(f"127.0.0.1:{srv.port}"), "127.0.0.1:0", dialects="none", settings=srv.settings)
    port = await gateway.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await gateway.stop()


@pytest.mark.parametrize("transport", ["in process", "over gRPC"])
async def test_one_tenants_watches_leave_rest_connections_for_the_other_tenants(tmp_path: Path, transport: str) -> None:
    """Regression: a tenant's watch quota (--max-watch-streams, 2000) was all of --max-http-connections
    (2000): one tenant's SSE watches took every REST connection, and every other tenant's calls got 503
    until it let go. A tenant now holds at most its share of REST streams (by default a quarter of the
    connections: 5 of 20 here); the next is 429 RESOURCE_EXHAUSTED, as the watch quota is, and other
    tenants' calls and watches go on. The gateway learns a stream's tenant from the service, in process
    (`evalsvc serve --http-addr`) and over gRPC (`evalsvc gateway`) alike."""
    async with (
        gateway_server(tmp_path, workers=0, max_http_connections=20) as (srv, embedded),
        contextlib.AsyncExitStack() as stack,
    ):
        base = embedded if transport == "in process" else await stack.enter_async_context(standalone_gateway(srv))
        other_key, _ = await srv.keys.create("other")
        theirs = {"authorization": f"Bearer {other_key}"}
        async with httpx.AsyncClient(base_url=base, headers=theirs, timeout=30) as setup:
            their_run = (await setup.post("/v1/runs", json=RUN)).json()["run"]["id"]
        limits = httpx.Limits(max_connections=40)
        mine = httpx.AsyncClient(
            base_url=base, headers={"authorization": f"Bearer {srv.bootstrap_key}"}, timeout=30, limits=limits
        )
        opened: list[httpx.Response] = []
        try:
            run_id = (await mine.post("/v1/runs", json=RUN)).json()["run"]["id"]  # stays PENDING: no workers
            # The tenant's share is the tenant's, whichever of its keys opens the watches.
            second_key, _ = await srv.keys.create("default", "a second key of the same tenant")
            watch = mine.build_request("GET", f"/v1/runs/{run_id}:watch")
            watches = [watch, mine.build_request("GET", watch.url, headers={"authorization": f"Bearer {second_key}"})]
            refusal: httpx.Response | None = None
            async with asyncio.timeout(60):
                for attempt in range(21):  # every connection, and one more
                    response = await mine.send(watches[attempt % 2], stream=True)
                    if response.status_code != 200:
                        refusal = response
                        await response.aread()
                        break
                    opened.append(response)

                # Another tenant, on new connections: its ordinary calls are served, and so are its watches.
                async with httpx.AsyncClient(base_url=base, headers=theirs, timeout=30) as other:
                    listed = await other.get("/v1/runs")
                    assert listed.status_code == 200, listed.text
                    assert [run["id"] for run in listed.json()["runs"]] == [their_run]
                    async with other.stream("GET", f"/v1/runs/{their_run}:watch") as their_watch:
                        assert their_watch.status_code == 200

            assert len(opened) == srv.settings.http_streams_per_tenant == 5
            assert refusal is not None and refusal.status_code == 429, refusal and refusal.text
            assert refusal.headers["retry-after"] == "1"
            body = refusal.json()
            assert body["code"] == 8 and "at most 5" in body["message"], body  # RESOURCE_EXHAUSTED
            assert quota_details(body) == ("TENANT_QUOTA_EXCEEDED", {"quota": "max_http_streams_per_tenant"}, "1s")

            await opened.pop().aclose()  # a watch ends: its place in the tenant's share frees up
            async with asyncio.timeout(30):
                while (again := await mine.send(watch, stream=True)).status_code == 429:
                    await again.aclose()
                    await asyncio.sleep(0.1)  # the gateway notices the closed connection asynchronously
            opened.append(again)
            assert again.status_code == 200
        finally:
            for response in opened:
                await response.aclose()
            await mine.aclose()


async def test_watches_still_waiting_for_their_first_event_count_against_the_key(tmp_path: Path) -> None:
    """A watch resumed at a running run's last event sends nothing until the next event (or a heartbeat,
    seconds later), and streams were counted against their tenant only at their first message: opened
    fast enough, such watches held connections past the tenant's share (a reviewer's finding). A stream
    now counts against the key that opens it from the start: the key's 6th silent watch is refused at
    once, while the other 5 still wait for their first event."""
    async with gateway_server(tmp_path, workers=0, max_http_connections=20, heartbeat_s=60.0) as (srv, base):
        headers = {"authorization": f"Bearer {srv.bootstrap_key}"}
        async with httpx.AsyncClient(
            base_url=base, headers=headers, timeout=30, limits=httpx.Limits(max_connections=40)
        ) as mine:
            run = (await mine.post("/v1/runs", json=RUN)).json()["run"]  # stays PENDING: no workers
            silent = mine.build_request("GET", f"/v1/runs/{run['id']}:watch", params={"afterSeq": run["lastSeq"]})
            opening = [asyncio.create_task(mine.send(silent, stream=True)) for _ in range(6)]
            try:
                done, waiting = await asyncio.wait(opening, timeout=20, return_when=asyncio.FIRST_COMPLETED)
                assert len(done) == 1 and len(waiting) == 5, "no watch was refused while the others waited"
                refused = done.pop().result()
                await refused.aread()
                assert refused.status_code == 429 and quota_details(refused.json())[0] == "TENANT_QUOTA_EXCEEDED"
            finally:
                for task in opening:
                    task.cancel()
                await asyncio.gather(*opening, return_exceptions=True)


async def test_several_tenants_at_their_share_leave_connections_for_ordinary_calls(tmp_path: Path) -> None:
    """Each tenant's watches are held to a quarter of the connections, but four tenants at their share
    took them all, and every other call got 503. All tenants' streams together now stop at three
    quarters (15 of 20 here): the next watch is 503 GATEWAY_STREAMS_FULL, and ordinary calls go on."""
    async with gateway_server(tmp_path, workers=0, max_http_connections=20) as (srv, base):
        assert srv.settings.http_streams_per_tenant == 5 and srv.settings.http_streams_in_all == 15
        opened: list[httpx.Response] = []
        clients: list[httpx.AsyncClient] = []
        try:
            for name in ("t1", "t2", "t3", "t4"):
                key, _ = await srv.keys.create(name)
                client = httpx.AsyncClient(base_url=base, headers={"authorization": f"Bearer {key}"}, timeout=30)
                clients.append(client)
            runs = [(await c.post("/v1/runs", json=RUN)).json()["run"]["id"] for c in clients]  # PENDING
            async with asyncio.timeout(60):
                for client, run_id in zip(clients[:3], runs, strict=False):  # three tenants at their share
                    for _ in range(5):
                        watch = await client.send(client.build_request("GET", f"/v1/runs/{run_id}:watch"), stream=True)
                        assert watch.status_code == 200
                        opened.append(watch)
                full = await clients[3].get(f"/v1/runs/{runs[3]}:watch")
                assert full.status_code == 503 and full.headers["retry-after"] == "1", full.text
                assert full.json()["details"][0]["reason"] == "GATEWAY_STREAMS_FULL"
                listed = await clients[3].get("/v1/runs")  # an ordinary call of the fourth tenant
                assert listed.status_code == 200 and [r["id"] for r in listed.json()["runs"]] == [runs[3]]
        finally:
            for response in opened:
                await response.aclose()
            for client in clients:
                await client.aclose()


@pytest.mark.parametrize(
    ("share", "refused_for", "quota"),
    [
        ({"streams_per_tenant": 1}, "TENANT_QUOTA_EXCEEDED", {"quota": "max_http_streams_per_tenant"}),
        ({"streams_in_all": 1}, "GATEWAY_STREAMS_FULL", {}),
    ],
)
async def test_a_synchronous_dialect_wait_past_the_tenants_share_answers_the_run_as_it_stands(
    tmp_path: Path, share: dict[str, int], refused_for: str, quota: dict[str, str]
) -> None:
    """The synchronous dialect routes (Agno POST /eval-runs, Aymara score-responses) wait on a watch too,
    within the tenant's share and all tenants' together; past either they answer at once with the run as
    it stands, as after their wait (the run exists: an error would have the vendor's client create it
    again)."""
    async with gateway_server(tmp_path, workers=0) as (srv, base):
        async with httpx.AsyncClient(
            base_url=base, headers={"authorization": f"Bearer {srv.bootstrap_key}"}, timeout=30
        ) as client:
            run_id = (await client.post("/v1/runs", json=RUN)).json()["run"]["id"]  # stays PENDING
        upstream = Upstream(lambda _index: LocalChannel(srv.local), **share)
        upstream.open()
        caller = Caller(srv.bootstrap_key or "")
        held = upstream.watch(run_id, caller)
        try:
            async with asyncio.timeout(30):
                assert (await anext(held)).WhichOneof("event") == "run"  # the tenant's one stream
                with pytest.raises(GatewayError) as over:
                    await anext(upstream.watch(run_id, caller))
                assert over.value.reason == refused_for and over.value.metadata == quota
                started = time.monotonic()
                run = await upstream.wait_until_done(run_id, caller, timeout=25)
                assert time.monotonic() - started < 10  # at once, not after its 25 s
            assert run.id == run_id and run.status == run_pb2.RUN_STATUS_PENDING
        finally:
            await held.aclose()
            await upstream.close()
