"""What a tenant's open watch streams may hold is bounded in bytes (--max-watch-bytes-per-tenant), not only
in number: every run event carries the whole run, so 100 non-reading streams on a run of 3.8 MB of graders
held 1.3 GB of the server's memory. A stream past the budget is refused with the quota reason, other
tenants keep watching and calling, and a stream's bytes come back when it ends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest

from evalsvc.errors import ServiceError
from evalsvc.events.watch import PAGE_BYTES, RUN_COPIES
from evalsvc.limits import TenantLimits
from evalsvc.server import EvalServer
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc as stubs
from evalsvc.v1 import grader_pb2
from tests.conftest import make_settings
from tests.helpers import (
    create_request,
    error_reason,
    retry_delay,
    rich_error,
    serving_gateway,
    two_tenants_idle,
    until,
)

GRADER_BYTES = 64 * 1024
LARGE_RUN_GRADERS = 3  # a run of ~192 KB of definitions: each watch of it is counted ~1 MB
BUDGET = 5 * 512 * 1024  # two such watches fit, a third does not


def large_graders() -> list[grader_pb2.Grader]:
    return [
        grader_pb2.Grader(name=f"g{k}", contains=grader_pb2.Contains(values=["Z" * GRADER_BYTES]))
        for k in range(LARGE_RUN_GRADERS)
    ]


@pytest.fixture
async def budgeted(
    tmp_path: Path,
) -> AsyncIterator[tuple[EvalServer, stubs.EvalRunServiceStub, stubs.EvalRunServiceStub]]:
    settings = make_settings(tmp_path, max_watch_bytes_per_tenant=BUDGET, max_watch_bytes=4 * BUDGET)
    async with two_tenants_idle(settings) as served:  # runs stay pending: their watches stay open
        yield served


async def test_watches_past_the_tenants_budget_are_refused_and_others_are_served(budgeted) -> None:
    srv, mine, theirs = budgeted
    large = (await mine.CreateRun(create_request(1, graders=large_graders()))).run
    assert large.ByteSize() > LARGE_RUN_GRADERS * GRADER_BYTES
    first = mine.WatchRun(pb.WatchRunRequest(run_id=large.id))
    second = mine.WatchRunBatched(pb.WatchRunBatchedRequest(run_id=large.id))
    assert (await first.read()).run.id == large.id
    assert (await second.read()).events[0].run.id == large.id
    for refused in (
        mine.WatchRun(pb.WatchRunRequest(run_id=large.id)),
        mine.WatchRunBatched(pb.WatchRunBatchedRequest(run_id=large.id)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await refused.read()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_reason(err.value) == "TENANT_QUOTA_EXCEEDED"
        assert rich_error(err.value).metadata == {"quota": "max_watch_bytes_per_tenant"}
        assert retry_delay(err.value) is not None  # the bytes come back as streams end
    held = srv.limits.watch_bytes_of("default")
    assert 2 * RUN_COPIES * large.ByteSize() < held <= BUDGET  # each counted by the run it may hold

    # A watch of a small run still fits: streams are counted by what they may hold, not by number.
    small = (await mine.CreateRun(create_request(1))).run
    small_watch = mine.WatchRun(pb.WatchRunRequest(run_id=small.id))
    assert (await small_watch.read()).run.id == small.id
    assert srv.limits.watch_bytes_of("default") - held < 2 * PAGE_BYTES
    small_watch.cancel()

    # The other tenant watches a large run of its own and is served meanwhile.
    their_large = (await theirs.CreateRun(create_request(1, graders=large_graders()))).run
    their_watch = theirs.WatchRun(pb.WatchRunRequest(run_id=their_large.id))
    assert (await their_watch.read()).run.id == their_large.id
    assert (await theirs.GetRun(pb.GetRunRequest(run_id=their_large.id))).run.id == their_large.id
    their_watch.cancel()

    # A stream's bytes are given back when it ends: the tenant may open one again.
    first.cancel()
    await until(lambda: srv.limits.watch_bytes_of("default") < held)
    again = mine.WatchRun(pb.WatchRunRequest(run_id=large.id))
    assert (await again.read()).run.id == large.id
    again.cancel()
    second.cancel()
    await until(lambda: srv.limits.watch_bytes_of("default") == 0 and srv.limits.watch_bytes_of("other") == 0)


async def test_rest_watches_past_the_budget_get_429_with_the_quota(tmp_path: Path) -> None:
    """SSE watches are WatchRun streams of the in-process gateway, counted the same way: past the
    tenant's budget the watch is 429 with Retry-After and the quota named, as the stream quotas are."""
    settings = make_settings(
        tmp_path, http_addr="127.0.0.1:0", max_watch_bytes_per_tenant=BUDGET, max_watch_bytes=4 * BUDGET
    )
    async with serving_gateway(settings) as (srv, client):
        await srv.executor.stop()  # runs stay pending: their watches stay open
        graders = [{"name": g.name, "contains": {"values": list(g.contains.values)}} for g in large_graders()]
        body = {"items": [{"id": "i1", "input": "hi", "expectedOutput": "hello"}], "target": {"echo": {}}}
        created = await client.post("/v1/runs", json={**body, "graders": graders})
        assert created.status_code == 200, created.text[:300]
        run_id = created.json()["run"]["id"]
        opened: list[httpx.Response] = []
        readers: list[AsyncIterator[str]] = []
        try:
            for _ in range(2):
                watch = await client.send(client.build_request("GET", f"/v1/runs/{run_id}:watch"), stream=True)
                opened.append(watch)
                assert watch.status_code == 200
                lines = watch.aiter_lines()  # kept: a generator left behind would close its response
                readers.append(lines)
                while not (await anext(lines)).startswith("data: "):
                    pass  # up to the first event: the stream is open and counted
            refused = await client.send(client.build_request("GET", f"/v1/runs/{run_id}:watch"), stream=True)
            opened.append(refused)
            assert refused.status_code == 429
            await refused.aread()
            assert refused.headers["retry-after"] == "1"
            info = next(d for d in refused.json()["details"] if d["@type"].endswith("ErrorInfo"))
            assert info["reason"] == "TENANT_QUOTA_EXCEEDED"
            assert info["metadata"] == {"quota": "max_watch_bytes_per_tenant"}
            # Other calls of the tenant are served meanwhile.
            assert (await client.get(f"/v1/runs/{run_id}")).status_code == 200

            await readers.pop().aclose()
            await opened.pop().aclose()  # a watch ends: its bytes come back
            await until(lambda: srv.limits.watch_bytes_of("default") <= BUDGET // 2)
            again = await client.send(client.build_request("GET", f"/v1/runs/{run_id}:watch"), stream=True)
            opened.append(again)
            assert again.status_code == 200
        finally:
            for response in opened:
                await response.aclose()


def test_the_budget_counts_bytes_per_tenant_and_in_all(tmp_path: Path) -> None:
    """A tenant's share is at most half of all tenants' bytes, so one tenant's watches leave room for the
    others'; the total is kept too (UNAVAILABLE, as for the stream count); a first stream always fits."""
    limits = TenantLimits(make_settings(tmp_path, max_watch_bytes_per_tenant=1000, max_watch_bytes=200))
    with limits.watch_memory("a", 150):  # more than the tenant's share (100), but its first stream
        with pytest.raises(ServiceError) as err:
            limits.watch_memory("a", 1).__enter__()
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.value.metadata == {"quota": "max_watch_bytes_per_tenant"}
        with limits.watch_memory("b", 40):
            with pytest.raises(ServiceError) as full:
                limits.watch_memory("c", 20).__enter__()  # within its share, but all tenants' bytes are held
            assert full.value.code == grpc.StatusCode.UNAVAILABLE and full.value.reason == "SERVER_STREAMS_FULL"
            assert limits.watch_bytes_of("c") == 0
    assert limits.watch_bytes_of("a") == limits.watch_bytes_of("b") == 0
    with limits.watch_memory("c", 100):  # given back: room again
        assert limits.watch_bytes_of("c") == 100
