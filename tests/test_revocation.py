"""Revocation ends streams: a WatchRun or WatchRunBatched stream opened with a key that is then revoked
(by another process: the CLI writes the database, past this server's auth cache) or that expires
ends with UNAUTHENTICATED within --auth-cache-s; other keys' streams go on."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from evalsvc.auth.revocation import StreamRevoker
from evalsvc.auth.service import KeyService, unauthenticated
from evalsvc.errors import ServiceError
from evalsvc.events.bus import EventBus
from evalsvc.server import EvalServer
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc, item_pb2, target_pb2
from tests.conftest import make_settings
from tests.fake_llm import FakeEndpoint, Reply
from tests.helpers import error_reason, exact, keyed_channel

AUTH_CACHE_S = 1.0
# The check runs every AUTH_CACHE_S; the rest is room for a loaded, shared machine.
SLACK_S = 3.0


@pytest.fixture
async def hanging_run(tmp_path: Path) -> AsyncIterator[tuple[EvalServer, str]]:
    """A server (and its REST gateway) with a 1 s auth cache and a run that stays RUNNING (its webhook
    answers after a minute)."""
    srv = EvalServer(
        make_settings(
            tmp_path, auth_cache_s=AUTH_CACHE_S, heartbeat_s=0.2, outbound_allow="127.0.0.1", http_addr="127.0.0.1:0"
        )
    )
    await srv.start()
    try:
        with FakeEndpoint(Reply(body={"content": "late"}, delay_s=60)) as agent:
            assert srv.bootstrap_key
            async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
                created = await eval_run_service_pb2_grpc.EvalRunServiceStub(channel).CreateRun(
                    pb.CreateRunRequest(
                        items=[item_pb2.Item(input="q", expected_output="a")],
                        target=target_pb2.Target(
                            http=target_pb2.HttpTarget(endpoint=target_pb2.Endpoint(base_url=agent.url, timeout_s=120))
                        ),
                        graders=[exact()],
                    )
                )
            yield srv, created.run.id
    finally:
        await srv.stop(grace=0.5)


async def _open(channel: grpc.aio.Channel, run_id: str, batched: bool) -> Any:
    """A watch stream that has delivered its first message (so it is open and subscribed)."""
    stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
    call = (
        stub.WatchRunBatched(pb.WatchRunBatchedRequest(run_id=run_id))
        if batched
        else stub.WatchRun(pb.WatchRunRequest(run_id=run_id))
    )
    await asyncio.wait_for(call.read(), 30)
    return call


async def _ends_unauthenticated(call: Any) -> grpc.aio.AioRpcError:
    """Read the stream until it fails; the error."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async with asyncio.timeout(AUTH_CACHE_S + SLACK_S + 30):
            while True:
                message = await call.read()
                assert message is not grpc.aio.EOF, "the stream ended without an error"
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    return err.value


@pytest.mark.parametrize("batched", [False, True], ids=["WatchRun", "WatchRunBatched"])
async def test_a_revoked_keys_streams_end_unauthenticated_within_the_auth_cache(hanging_run, batched: bool) -> None:
    srv, run_id = hanging_run
    doomed_key, doomed = await srv.keys.create("default", "doomed")
    other_key, _ = await srv.keys.create("default", "other")
    async with keyed_channel(srv.port, doomed_key) as doomed_channel, keyed_channel(srv.port, other_key) as other:
        doomed_calls = [await _open(doomed_channel, run_id, batched) for _ in range(2)]
        other_call = await _open(other, run_id, batched)
        # As `evalsvc keys revoke` does from another process: only the database learns of it.
        assert await KeyService(srv.db).revoke(doomed.key_id)
        revoked_at = time.monotonic()
        errors = await asyncio.gather(*(_ends_unauthenticated(call) for call in doomed_calls))
        elapsed = time.monotonic() - revoked_at
        assert all(error_reason(error) == "API_KEY_REVOKED" for error in errors)
        assert elapsed < AUTH_CACHE_S + SLACK_S, f"streams ended {elapsed:.2f} s after the revocation"
        # The other key's stream is still served: it keeps getting heartbeats.
        for _ in range(3):
            message = await asyncio.wait_for(other_call.read(), 30)
            assert message is not grpc.aio.EOF
        other_call.cancel()
        # And the revoked key opens nothing new.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _open(doomed_channel, run_id, batched)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_an_expiring_keys_stream_ends_when_it_expires(hanging_run) -> None:
    srv, run_id = hanging_run
    lifetime_s = 2.0
    short_key, _ = await srv.keys.create("default", "short", expires_in_s=lifetime_s)
    created = time.monotonic()
    async with keyed_channel(srv.port, short_key) as channel:
        call = await _open(channel, run_id, batched=False)
        error = await _ends_unauthenticated(call)
    assert error_reason(error) == "API_KEY_EXPIRED"
    assert time.monotonic() - created < lifetime_s + AUTH_CACHE_S + SLACK_S


async def test_a_revoked_keys_rest_watch_ends_with_an_unauthenticated_error_event(hanging_run) -> None:
    srv, run_id = hanging_run
    assert srv.gateway is not None
    key, info = await srv.keys.create("default", "rest")
    headers = {"authorization": f"Bearer {key}"}
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.gateway.port}", timeout=60) as client,
        client.stream("GET", f"/v1/runs/{run_id}:watch", headers=headers) as response,
    ):
        assert response.status_code == 200
        lines = response.aiter_lines()
        assert (await anext(lines)).startswith("id:")  # the stream is open
        assert await KeyService(srv.db).revoke(info.key_id)
        received = [line async for line in lines]  # the server ends the stream
    assert "event: error" in received
    error = json.loads(received[received.index("event: error") + 1].removeprefix("data: "))
    assert error["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]


class _FlakyKeys:
    """A key service whose first check fails (the database away), then refuses key `k1`."""

    def __init__(self) -> None:
        self.checks = 0

    async def refused_now(self, key_ids: list[str]) -> dict[str, ServiceError]:
        self.checks += 1
        if self.checks == 1:
            raise ConnectionError("database unreachable")
        return {k: unauthenticated("API_KEY_REVOKED", "the API key was revoked") for k in key_ids if k == "k1"}


async def test_the_revocation_check_survives_a_failed_check_and_ends_only_the_refused_keys_watches() -> None:
    bus = EventBus()
    keys = _FlakyKeys()
    revoker = StreamRevoker(keys, bus, auth_cache_s=0)  # type: ignore[arg-type]
    revoker.start()
    try:
        with bus.subscribe("run_a", 8, owner="k1") as revoked, bus.subscribe("run_a", 8, owner="k2") as kept:
            with pytest.raises(ServiceError) as err:
                await asyncio.wait_for(revoked.next(timeout=60), 30)
            assert err.value.reason == "API_KEY_REVOKED" and keys.checks >= 2
            bus.publish("run_a", [pb.WatchRunResponse(seq=1)])
            assert [e.seq for e in await kept.next(timeout=30) or []] == [1]
        assert bus.owners() == []
    finally:
        await revoker.stop()
