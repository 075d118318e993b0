"""Per-tenant limits give RESOURCE_EXHAUSTED (with RetryInfo where waiting helps) without disturbing
other tenants; global limits and deadlines hold."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from evalsvc.server import EvalServer
from evalsvc.v1 import dataset_service_pb2 as ds
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc as stubs
from evalsvc.v1 import grader_pb2
from evalsvc.v1.dataset_service_pb2_grpc import DatasetServiceStub
from tests.conftest import make_settings
from tests.helpers import (
    create_request,
    error_reason,
    keyed_channel,
    provided_items,
    retry_delay,
    rich_error,
    serving_gateway,
    two_tenants_idle,
)


async def quota_error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
    assert error_reason(err.value) == "TENANT_QUOTA_EXCEEDED"
    return err.value


@pytest.fixture
async def limited(
    tmp_path: Path,
) -> AsyncIterator[tuple[EvalServer, stubs.EvalRunServiceStub, stubs.EvalRunServiceStub]]:
    settings = make_settings(
        tmp_path,
        create_run_rate=0.5,
        create_run_burst=2,
        max_watch_streams=1,
        max_active_runs=3,
        max_items_per_run=5,
        max_graders_per_run=2,
    )
    async with two_tenants_idle(settings) as served:  # runs stay active, so the active-run limit can be reached
        yield served


async def test_create_run_rate_limit_with_retry_info(limited) -> None:
    _, mine, theirs = limited
    await mine.CreateRun(create_request(1))
    await mine.CreateRun(create_request(1))
    error = await quota_error(mine.CreateRun(create_request(1)))
    delay = retry_delay(error)
    assert delay is not None and 0 < delay <= 2.0
    await theirs.CreateRun(create_request(1))  # the other tenant's bucket is its own


async def test_run_size_limits_have_no_retry_info(limited) -> None:
    _, mine, _ = limited
    too_many_items = await quota_error(mine.CreateRun(create_request(6)))
    assert retry_delay(too_many_items) is None
    graders = [grader_pb2.Grader(name=f"g{i}", exact_match=grader_pb2.ExactMatch()) for i in range(3)]
    too_many_graders = await quota_error(mine.CreateRun(create_request(1, graders=graders)))
    assert retry_delay(too_many_graders) is None


async def test_jobs_per_run_count_repetitions(tmp_path: Path) -> None:
    """Items were bounded but repetitions multiplied them: one CreateRun of 20,000 items x 100 repetitions
    wrote 2,000,000 jobs in one transaction, and every other tenant's writes waited 9 s behind it."""
    srv = EvalServer(make_settings(tmp_path, max_jobs_per_run=8))
    await srv.start()
    try:
        assert srv.bootstrap_key
        async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
            await _jobs_bounded(stubs.EvalRunServiceStub(channel), DatasetServiceStub(channel))
    finally:
        await srv.stop(grace=0.5)


async def _jobs_bounded(mine: stubs.EvalRunServiceStub, datasets: DatasetServiceStub) -> None:
    assert (await mine.CreateRun(create_request(4, repetitions=2))).job_count == 8  # at the bound
    over = await quota_error(mine.CreateRun(create_request(3, repetitions=3)))
    assert retry_delay(over) is None and rich_error(over).metadata == {"quota": "max_jobs_per_run"}
    assert "at most 8 jobs" in (over.details() or "") and "3 x 3" in (over.details() or "")
    # The same bound for a run of a dataset's items, counted once the dataset is read.
    created = (await datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset(display_name="d")))).dataset
    await datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=created.id, items=provided_items(3)))
    request = create_request(1, repetitions=3)
    request.ClearField("items")
    request.dataset_id = created.id
    dataset_over = await quota_error(mine.CreateRun(request))
    assert rich_error(dataset_over).metadata == {"quota": "max_jobs_per_run"}
    # Repetitions out of their range stay INVALID_ARGUMENT, not a quota.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mine.CreateRun(create_request(1, repetitions=10_000))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_active_runs_limit(tmp_path: Path) -> None:
    srv = EvalServer(make_settings(tmp_path, max_active_runs=2))
    await srv.start()
    await srv.executor.stop()
    try:
        assert srv.bootstrap_key
        other_key, _ = await srv.keys.create("other")
        async with keyed_channel(srv.port, srv.bootstrap_key) as a, keyed_channel(srv.port, other_key) as b:
            mine, theirs = stubs.EvalRunServiceStub(a), stubs.EvalRunServiceStub(b)
            first = await mine.CreateRun(create_request(1))
            await mine.CreateRun(create_request(1))
            error = await quota_error(mine.CreateRun(create_request(1)))
            assert retry_delay(error) is not None
            await theirs.CreateRun(create_request(1))
            await mine.CancelRun(pb.CancelRunRequest(run_id=first.run.id))  # frees a slot
            await mine.CreateRun(create_request(1))
    finally:
        await srv.stop(grace=0.5)


async def test_watch_stream_limit_and_deadline_frees_the_slot(limited) -> None:
    _, mine, theirs = limited
    run = (await mine.CreateRun(create_request(1))).run
    other_run = (await theirs.CreateRun(create_request(1))).run
    first = mine.WatchRun(pb.WatchRunRequest(run_id=run.id), timeout=1.0)
    assert (await first.read()).seq == 1
    second = mine.WatchRun(pb.WatchRunRequest(run_id=run.id))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await second.read()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retry_delay(err.value) is not None
    theirs_watch = theirs.WatchRun(pb.WatchRunRequest(run_id=other_run.id))
    assert (await theirs_watch.read()).seq == 1  # the other tenant still watches
    theirs_watch.cancel()
    # The first watch's deadline passes: the server ends it and gives its slot back.
    with pytest.raises(grpc.aio.AioRpcError) as deadline:
        while True:
            await first.read()
    assert deadline.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    again = mine.WatchRun(pb.WatchRunRequest(run_id=run.id), timeout=5.0)
    assert (await again.read()).seq == 1
    again.cancel()


async def test_streams_leave_room_for_every_tenants_calls(tmp_path: Path) -> None:
    """--max-concurrent-rpcs 8: WatchRun streams of all tenants take at most 5 (a tenant at most 2), health
    Watch streams (no key) at most 1, so ordinary calls always have room. Before, three tenants' watches
    within their quota, or one anonymous client's 5,000 health Watch streams, took every place and every
    other tenant's GetRun got RESOURCE_EXHAUSTED."""
    srv = EvalServer(make_settings(tmp_path, max_concurrent_rpcs=8))
    await srv.start()
    await srv.executor.stop()
    try:
        assert srv.bootstrap_key
        keys = [srv.bootstrap_key] + [(await srv.keys.create(name))[0] for name in ("b", "c", "d")]
        async with contextlib.AsyncExitStack() as stack:
            channels = [await stack.enter_async_context(keyed_channel(srv.port, key)) for key in keys]
            tenants = [stubs.EvalRunServiceStub(channel) for channel in channels]
            runs = [(await stub.CreateRun(create_request(1))).run.id for stub in tenants]
            opened = []

            async def watch(tenant: int) -> None:
                call = tenants[tenant].WatchRun(pb.WatchRunRequest(run_id=runs[tenant]))
                opened.append(call)
                await call.read()

            for tenant in (0, 0, 1, 1, 2):
                await watch(tenant)
            with pytest.raises(grpc.aio.AioRpcError) as over_share:
                await watch(0)
            assert over_share.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_reason(over_share.value) == "TENANT_QUOTA_EXCEEDED"
            with pytest.raises(grpc.aio.AioRpcError) as all_taken:
                await watch(2)  # within its share, but all tenants' part is full
            assert all_taken.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_reason(all_taken.value) == "SERVER_STREAMS_FULL"

            health = health_pb2_grpc.HealthStub(channels[3])
            first = health.Watch(health_pb2.HealthCheckRequest())
            opened.append(first)
            await first.read()
            second = health.Watch(health_pb2.HealthCheckRequest())
            opened.append(second)
            with pytest.raises(grpc.aio.AioRpcError) as health_full:
                await second.read()
            # UNIMPLEMENTED: client-side health checking turns itself off (UNAVAILABLE would fail its calls)
            assert health_full.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert error_reason(health_full.value) == "SERVER_STREAMS_FULL"

            for _ in range(3):  # the fourth tenant's calls, and a free place: 8 - 5 - 1
                assert (await tenants[3].GetRun(pb.GetRunRequest(run_id=runs[3]))).run.id == runs[3]
            for call in opened:
                call.cancel()
    finally:
        await srv.stop(grace=0.5)


async def test_rate_limited_http_calls_say_when_to_retry(tmp_path: Path) -> None:
    """Over HTTP the RetryInfo becomes `Retry-After`, on native routes and in every dialect's shape."""
    settings = make_settings(tmp_path, http_addr="127.0.0.1:0", create_run_rate=0.2, create_run_burst=1)
    async with serving_gateway(settings) as (_, client):
        run = {"items": [{"input": "q"}], "target": {"echo": {}}, "graders": [{"exactMatch": {}}]}
        assert (await client.post("/v1/runs", json=run)).status_code == 200  # the burst
        native = await client.post("/v1/runs", json=run)
        assert native.status_code == 429 and int(native.headers["retry-after"]) >= 1
        assert native.json()["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        target = {"target": {"displayName": "agent", "target": {"echo": {}}}}
        agent = (await client.post("/v1/targets", json=target)).json()["target"]["id"]
        agno = await client.post("/eval-runs", json={"eval_type": "performance", "input": "q", "agent_id": agent})
        assert agno.status_code == 429 and int(agno.headers["retry-after"]) >= 1
        assert isinstance(agno.json()["detail"], str)  # Agno's error shape
