"""Large CreateRuns write their items and jobs a chunk per transaction before their run row (evalsvc.store.
staging), so another tenant's writes go between the chunks instead of waiting for the whole run; a large
CreateRun that does not become a run leaves nothing behind."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select

from evalsvc.runs import service as run_service
from evalsvc.runs.service import request_fingerprint
from evalsvc.server import EvalServer
from evalsvc.store import runs as run_store
from evalsvc.store import staging
from evalsvc.store.db import Database
from evalsvc.store.runs import RUNS
from evalsvc.testing import EvalServiceTestServer
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc
from tests import dbs
from tests.helpers import Tenant, create_request, error_reason, keyed_channel, retry_delay, rich_error, until, watch_all
from tests.procs import start_server
from tests.unit.stored import new_run

ITEMS = 300  # with repetitions 2: 900 rows, staged in chunks of 50


@pytest.fixture(autouse=True)
def small_stagings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs of a few hundred items are staged, in chunks of 50 rows: the code of a 100,000-item run,
    at the cost of a small one."""
    monkeypatch.setattr(run_service, "STAGE_ABOVE_ROWS", 200)
    monkeypatch.setattr(run_service, "STAGE_CHUNK_ROWS", 50)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[EvalServer]:
    async with EvalServiceTestServer(database_url=dbs.db_url(tmp_path), max_runs_per_tenant=2) as started:
        yield started.server


def gate_chunks(monkeypatch: pytest.MonkeyPatch, before_chunk: Callable[[int], Awaitable[None]]) -> list[int]:
    """Have every staged chunk await `before_chunk(its index)` in the writer first; the chunks written."""
    written: list[int] = []
    stage = staging.stage

    async def gated(conn: Any, chunk: staging.Chunk) -> bool:
        await before_chunk(len(written))
        written.append(len(chunk.items) + len(chunk.jobs))
        return await stage(conn, chunk)

    monkeypatch.setattr(staging, "stage", gated)
    return written


async def orphans_in(db: Database) -> int:
    """Rows of items and jobs with no run row: what a CreateRun staged and nobody created or purged."""
    async with db.read() as conn:
        found = 0
        for table in (staging.ITEMS, staging.JOBS):
            orphans = select(func.count()).where(table.c.run_id.not_in(select(RUNS.c.id)))
            found += int((await conn.execute(orphans)).scalar_one())
        return found


async def test_another_tenants_create_run_commits_between_a_large_runs_chunks(
    server: EvalServer, tenants: tuple[Tenant, Tenant], monkeypatch: pytest.MonkeyPatch
) -> None:
    mine, theirs = (tenant.runs for tenant in tenants)
    first_written, theirs_queued = asyncio.Event(), asyncio.Event()

    async def before_chunk(index: int) -> None:
        if index == 1:
            first_written.set()
            # Held until their CreateRun is on the writer's queue: it must commit before our next chunk.
            await asyncio.wait_for(theirs_queued.wait(), 15)

    written = gate_chunks(monkeypatch, before_chunk)
    submit = server.db.submit

    async def submit_noting_theirs(batch: Any, draft: Any) -> Any:
        if draft.tenant == "other":
            theirs_queued.set()  # the submit below queues it before this task yields
        return await submit(batch, draft)

    monkeypatch.setattr(server.db, "submit", submit_noting_theirs)
    await watch_all(theirs, (await theirs.CreateRun(create_request(1))).run.id)  # their key's first use written
    large = asyncio.ensure_future(mine.CreateRun(create_request(ITEMS, repetitions=2)))
    await asyncio.wait_for(first_written.wait(), 15)
    small = (await theirs.CreateRun(create_request(3))).run

    assert not large.done()  # theirs came between our chunks, not after our whole run
    created = (await large).run
    assert written == [50] * (ITEMS * 3 // 50)
    final = (await watch_all(mine, created.id))[-1].run
    assert final.counts.completed_evaluations == final.counts.total_evaluations == ITEMS * 2
    assert (await watch_all(theirs, small.id))[-1].run.counts.completed_evaluations == 3
    assert await orphans_in(server.db) == 0


def count_abandons(
    monkeypatch: pytest.MonkeyPatch, server: EvalServer, then: Callable[[], None] = lambda: None
) -> list[int]:
    """Note every abandon sent to the writer (and call `then` as it is sent); the list of them."""
    abandons: list[int] = []
    transact = server.db.transact

    async def transact_noting_abandons(work: Any, **options: Any) -> Any:
        if isinstance(work, functools.partial) and work.func is staging.abandon:
            abandons.append(1)
            then()
        return await transact(work, **options)

    monkeypatch.setattr(server.db, "transact", transact_noting_abandons)
    return abandons


async def test_a_large_create_run_past_a_limit_writes_nothing_also_beside_another(
    server: EvalServer, tenants: tuple[Tenant, Tenant], monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_runs_per_tenant=2, one run stored: of two large CreateRuns at once, the one past the limit is
    refused before it stages (it waits for the other's run row, then counts it)."""
    mine = tenants[0].runs
    written = gate_chunks(monkeypatch, lambda index: asyncio.sleep(0))
    abandons = count_abandons(monkeypatch, server)
    await mine.CreateRun(create_request(3))
    answers = await asyncio.gather(
        mine.CreateRun(create_request(ITEMS)), mine.CreateRun(create_request(ITEMS)), return_exceptions=True
    )
    refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    assert len(refused) == 1 and error_reason(refused[0]) == "TENANT_QUOTA_EXCEEDED"
    assert len(written) == ITEMS * 2 // 50  # one run's chunks
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await mine.CreateRun(create_request(ITEMS))
    assert error_reason(again.value) == "TENANT_QUOTA_EXCEEDED"
    assert len(written) == ITEMS * 2 // 50 and abandons == []
    assert await orphans_in(server.db) == 0


async def test_the_same_large_create_run_sent_twice_at_once_stages_once(
    server: EvalServer, tenants: tuple[Tenant, Tenant], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both find no run with their request_id at first; the second, its turn come, finds the first's run
    and is answered with it without writing (it staged it all again, and the purge deleted it, before)."""
    mine = tenants[0].runs
    looked_up = 0
    second_looked_up = asyncio.Event()
    find = run_store.find_by_request_id

    async def find_noting_lookups(*args: Any) -> Any:
        nonlocal looked_up
        found = await find(*args)
        looked_up += 1
        if looked_up == 3:  # the first's two looks (before and in its turn) and the second's first
            second_looked_up.set()
        return found

    async def before_chunk(index: int) -> None:
        if index == 1:  # the first staging waits until the second request has looked for the run too
            await asyncio.wait_for(second_looked_up.wait(), 15)

    monkeypatch.setattr(run_store, "find_by_request_id", find_noting_lookups)
    written = gate_chunks(monkeypatch, before_chunk)
    abandons = count_abandons(monkeypatch, server)
    request = create_request(ITEMS, request_id="twice")
    first, second = await asyncio.gather(mine.CreateRun(request), mine.CreateRun(request))

    assert first.run.id == second.run.id
    assert len(written) == ITEMS * 2 // 50 and abandons == []
    assert await orphans_in(server.db) == 0
    assert (await watch_all(mine, first.run.id))[-1].run.counts.completed_evaluations == ITEMS


async def test_a_large_create_run_answered_by_another_servers_run_leaves_nothing_behind(
    server: EvalServer, tenants: tuple[Tenant, Tenant], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another replica stores the request_id's run while this one stages: the answer is that run, and what
    this one staged goes to the purge."""
    mine = tenants[0].runs
    request = create_request(ITEMS, request_id="raced")
    theirs = dataclasses.replace(new_run("default", request_id="raced"))
    theirs = dataclasses.replace(theirs, row={**theirs.row, "request_hash": request_fingerprint(request)})

    async def replica_commits_its_run(conn: Any, chunk: staging.Chunk) -> bool:
        if not chunk.first:
            return await stage(conn, chunk)
        await run_store.insert_runs(conn, [theirs])  # in this chunk's transaction: as if committed beside it
        return await stage(conn, chunk)

    stage = staging.stage
    monkeypatch.setattr(staging, "stage", replica_commits_its_run)
    abandons = count_abandons(monkeypatch, server)
    answered = (await mine.CreateRun(request)).run

    assert answered.id == theirs.row["id"]
    assert abandons == [1] and await orphans_in(server.db) > 0
    await server.purger.next_pass()
    assert await orphans_in(server.db) == 0
    assert [run.id for run in (await mine.ListRuns(pb.ListRunsRequest())).runs] == [answered.id]


async def test_a_tenants_large_create_runs_waiting_their_turn_are_bounded(
    server: EvalServer, tenants: tuple[Tenant, Tenant], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes are shielded: a caller that goes away leaves its CreateRun going on, request and all. A
    tenant's large ones wait their turn, so only MAX_LARGE_CREATES_PER_TENANT may be in progress."""
    mine, theirs = (tenant.runs for tenant in tenants)
    release = asyncio.Event()

    async def before_chunk(index: int) -> None:
        if index == 0:
            await asyncio.wait_for(release.wait(), 15)

    gate_chunks(monkeypatch, before_chunk)
    request = create_request(ITEMS, request_id="once")
    waiting = [asyncio.ensure_future(mine.CreateRun(request)) for _ in range(run_service.MAX_LARGE_CREATES_PER_TENANT)]
    await until(lambda: server.runs._stagings.users("default") == run_service.MAX_LARGE_CREATES_PER_TENANT)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await mine.CreateRun(request)
    assert error_reason(refused.value) == "TENANT_QUOTA_EXCEEDED"
    assert rich_error(refused.value).metadata["quota"] == "large_creates_in_flight"
    assert retry_delay(refused.value)
    # Not another tenant's: it stages at once (its first chunk waits behind the gate with ours).
    others = asyncio.ensure_future(theirs.CreateRun(create_request(ITEMS)))
    release.set()
    created = {answer.run.id for answer in await asyncio.gather(*waiting)}
    assert len(created) == 1
    assert (await others).run.id not in created
    assert server.runs._stagings.users("default") == 0


async def staged_count(db: Database) -> int:
    async with db.read() as conn:
        return int((await conn.execute(select(func.count()).select_from(staging.STAGED))).scalar_one())


@pytest.mark.slow
async def test_kill_9_while_a_large_run_stages_then_a_retry_creates_it_whole(tmp_path: Path) -> None:
    """A server killed while a CreateRun stages acknowledged nothing: after a restart no run is there, the
    retry (same request_id) creates the run with every item and job, and on SQLite the restarted server
    purges what the dead one staged (on PostgreSQL, where replicas may be staging, after an hour)."""
    url = dbs.db_url(tmp_path, "staged.db")
    items = 60_000  # x 2 repetitions: 180,000 rows, 36 chunks of the server's 5,000
    request = create_request(items, request_id="large", repetitions=2)
    first = await start_server(url, tmp_path / "first.log")
    key = first.bootstrap_key()
    assert key
    observer = Database(url, pool_size=1)
    try:
        async with keyed_channel(first.port, key) as channel:
            stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            creating = asyncio.ensure_future(stub.CreateRun(request))
            try:
                while await orphans_in(observer) < 40_000:  # a few chunks in: polled across processes
                    assert not creating.done(), "the CreateRun ended before the kill"
                    await asyncio.sleep(0.01)
            finally:
                first.kill()
            with pytest.raises(grpc.aio.AioRpcError):
                await creating
        assert await staged_count(observer) == 1

        second = await start_server(url, tmp_path / "second.log")
        try:
            async with keyed_channel(second.port, key) as channel:
                stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
                assert not (await stub.ListRuns(pb.ListRunsRequest())).runs
                if dbs.USE_POSTGRES:
                    assert await staged_count(observer) == 1  # another replica's, for all it knows
                else:  # the restart's first purge pass
                    await asyncio.wait_for(_until_no_orphans(observer), 60)
                created = await stub.CreateRun(request)
                assert created.job_count == items * 2
                assert (await stub.CreateRun(request)).run.id == created.run.id
        finally:
            assert second.terminate() == 0
        async with observer.read() as conn:
            for table, rows in ((staging.ITEMS, items), (staging.JOBS, items * 2)):
                found = select(func.count()).where(table.c.run_id == created.run.id)
                assert (await conn.execute(found)).scalar_one() == rows
    finally:
        await observer.close()


async def _until_no_orphans(db: Database) -> None:
    while await orphans_in(db) or await staged_count(db):
        await asyncio.sleep(0.05)  # the other process's purge: no event crosses processes
