"""Per-tenant limits give RESOURCE_EXHAUSTED (with RetryInfo where waiting helps) without disturbing
other tenants; global limits and deadlines hold."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

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
    srv = EvalServer(
        make_settings(
            tmp_path,
            create_run_rate=0.5,
            create_run_burst=2,
            max_watch_streams=1,
            max_active_runs=3,
            max_items_per_run=5,
            max_graders_per_run=2,
        )
    )
    await srv.start()
    await srv.executor.stop()  # runs stay active, so the active-run limit can be reached
    assert srv.bootstrap_key
    other_key, _ = await srv.keys.create("other")
    try:
        async with keyed_channel(srv.port, srv.bootstrap_key) as a, keyed_channel(srv.port, other_key) as b:
            yield srv, stubs.EvalRunServiceStub(a), stubs.EvalRunServiceStub(b)
    finally:
        await srv.stop(grace=0.5)


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


async def test_max_concurrent_rpcs_rejects_the_excess(tmp_path: Path) -> None:
    srv = EvalServer(make_settings(tmp_path, max_concurrent_rpcs=2))
    await srv.start()
    await srv.executor.stop()
    try:
        assert srv.bootstrap_key
        async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
            stub = stubs.EvalRunServiceStub(channel)
            run = (await stub.CreateRun(create_request(1))).run
            watches = [stub.WatchRun(pb.WatchRunRequest(run_id=run.id)) for _ in range(2)]
            for watch in watches:
                await watch.read()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetRun(pb.GetRunRequest(run_id=run.id))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for watch in watches:
                watch.cancel()
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
