"""Connections are bounded, so file descriptors cannot run out: the gateway spreads watches over a pool
of upstream connections, closes idle and slow HTTP connections, and refuses HTTP and gRPC connections
past their caps. Each case uses small limits on a real server; the defaults are in the README."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from evalsvc.server import EvalServer
from tests.conftest import make_settings

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
        assert b'"code":14' in body
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
