"""Retention of deleted runs and the cap on stored runs, on a real server (two replicas of one database on
PostgreSQL): a purged run is NOT_FOUND to every call, UndeleteRun included; --max-runs-per-tenant counts
deleted runs until they are purged, refuses with the stored caps' one shape and writes nothing, holds
under concurrent CreateRuns across replicas, and bounds one tenant without touching another; the purge
loop is supervised (a failing chunk restarts it, and it finishes the run); a watcher of a run purged
under it ends NOT_FOUND, on the purging replica and on another, also one that missed the purge's notice."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.errors import ServiceError
from evalsvc.runs import retention as purge_loop
from evalsvc.store import retention as purge_store
from evalsvc.store import runs as run_store
from evalsvc.testing import EvalServiceTestServer
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc
from tests import dbs
from tests.helpers import create_request, error_reason, keyed_channel, watch_all
from tests.test_tenant_caps import assert_over

CAP = 3


@dataclass
class Served:
    servers: list[EvalServiceTestServer]  # one on SQLite, two replicas of one database on PostgreSQL
    mine: list[eval_run_service_pb2_grpc.EvalRunServiceStub]  # the same tenant, on each server
    theirs: eval_run_service_pb2_grpc.EvalRunServiceStub

    async def purged(self) -> purge_loop.Purged:
        """A whole pass of the first server's purge loop, started now."""
        return await asyncio.wait_for(self.servers[0].server.purger.next_pass(), 60)

    async def count(self, table: Any, **where: str) -> int:
        async with self.servers[0].server.db.read() as conn:
            query = select(func.count()).select_from(table)
            for column, value in where.items():
                query = query.where(table.c[column] == value)
            return int((await conn.execute(query)).scalar_one())


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    """Servers that purge deleted runs at once, and hold CAP runs per tenant; no workers (the runs stay
    PENDING until deleted: DeleteRun cancels them)."""
    replicas = 2 if dbs.USE_POSTGRES else 1
    url = dbs.db_url(tmp_path)
    async with AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(
                EvalServiceTestServer(database_url=url, max_runs_per_tenant=CAP, deleted_run_retention_s=0, workers=0)
            )
            for _ in range(replicas)
        ]
        other_key, _ = await servers[0].server.keys.create("other")
        theirs = await stack.enter_async_context(keyed_channel(servers[0].server.port, other_key))
        yield Served(
            servers,
            [server.runs for server in servers],
            eval_run_service_pb2_grpc.EvalRunServiceStub(theirs),
        )


async def test_a_purged_run_is_not_found_to_every_call_undelete_included(served: Served) -> None:
    me = served.mine[0]
    run = (await me.CreateRun(create_request(4))).run
    kept = (await me.CreateRun(create_request(2))).run
    await me.GetRun(pb.GetRunRequest(run_id=run.id))  # in the run cache (SQLite): the purge must drop it there
    await me.DeleteRun(pb.DeleteRunRequest(run_id=run.id))
    purged = await served.purged()
    assert purged.runs == 1 and purged.rows > 0
    registry = served.servers[0].server.metrics.registry  # what an operator's dashboard reads
    counted = [registry.get_sample_value("evalsvc_purged_total", {"what": what}) for what in ("runs", "rows")]
    assert counted == [1, purged.rows], counted
    for call in (
        lambda: me.GetRun(pb.GetRunRequest(run_id=run.id)),
        lambda: me.UndeleteRun(pb.UndeleteRunRequest(run_id=run.id)),
        lambda: me.DeleteRun(pb.DeleteRunRequest(run_id=run.id)),
        lambda: me.ListRunResults(pb.ListRunResultsRequest(run_id=run.id)),
        lambda: anext(aiter(me.WatchRun(pb.WatchRunRequest(run_id=run.id)))),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND and error_reason(caught.value) == "RUN_NOT_FOUND"
    listed = await me.ListRuns(pb.ListRunsRequest(show_deleted=True))
    assert [r.id for r in listed.runs] == [kept.id]
    assert await served.count(run_store.JOBS, run_id=run.id) == 0
    assert await served.count(run_store.JOBS, run_id=kept.id) == 2


async def test_the_run_cap_counts_deleted_runs_until_purged_and_refuses_writing_nothing(served: Served) -> None:
    me, them = served.mine[0], served.theirs
    made = [(await me.CreateRun(create_request(2))).run.id for _ in range(CAP)]
    await me.DeleteRun(pb.DeleteRunRequest(run_id=made[0]))  # deleted, not purged yet: still held
    stored = await served.count(run_store.RUNS), await served.count(run_store.JOBS)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await me.CreateRun(create_request(2, request_id="refused"))
    assert_over(caught.value, "max_runs_per_tenant")
    details = caught.value.details() or ""
    assert "delete runs" in details and "--deleted-run-retention-s" in details and f"has {CAP} runs" in details
    assert (await served.count(run_store.RUNS), await served.count(run_store.JOBS)) == stored  # nothing written
    async with served.servers[0].server.db.read() as conn:
        assert await run_store.find_by_request_id(conn, "default", "refused") is None
    await them.CreateRun(create_request(1))  # another tenant's cap is its own

    assert (await served.purged()).runs == 1  # the deleted run goes, and frees its place
    await me.CreateRun(create_request(2))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await me.CreateRun(create_request(2))
    assert_over(caught.value, "max_runs_per_tenant")


async def test_concurrent_create_runs_take_the_last_run_place_once(served: Served) -> None:
    """At CAP - 1 stored runs, many CreateRuns at once (over both replicas on PostgreSQL): exactly one
    succeeds, as the count is read under the tenant's lock in CreateRun's transaction."""
    me = served.mine[0]
    for _ in range(3):  # a few rounds: each a fresh race at the boundary
        for _ in range(CAP - 1):
            await me.CreateRun(create_request(1))
        answers = await asyncio.gather(
            *(stub.CreateRun(create_request(1)) for stub in served.mine * 8), return_exceptions=True
        )
        created = [a for a in answers if not isinstance(a, BaseException)]
        assert len(created) == 1, answers
        for error in answers:
            if isinstance(error, BaseException):
                assert_over(error, "max_runs_per_tenant")
        for run in (await me.ListRuns(pb.ListRunsRequest())).runs:
            await me.DeleteRun(pb.DeleteRunRequest(run_id=run.id))
        assert (await served.purged()).runs == CAP


async def test_the_purge_loop_survives_a_failing_chunk_and_finishes_the_run(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    me, server = served.mine[0], served.servers[0].server
    run = (await me.CreateRun(create_request(5))).run
    await me.DeleteRun(pb.DeleteRunRequest(run_id=run.id))
    real = purge_store.purge_step
    faults = [RuntimeError("injected")]

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        if faults:
            raise faults.pop(0)
        return await real(*args, **kwargs)

    monkeypatch.setattr(purge_store, "purge_step", flaky)
    restarts = {"loop": purge_loop.LOOP_NAME}
    before = server.metrics.registry.get_sample_value("evalsvc_loop_restarts_total", restarts)
    purged = await asyncio.wait_for(server.purger.next_pass(), 60)  # answered by the pass after the restart
    assert faults == []
    assert server.metrics.registry.get_sample_value("evalsvc_loop_restarts_total", restarts) == (before or 0) + 1
    assert purged.rows > 0
    assert await served.count(run_store.JOBS, run_id=run.id) == 0
    assert await served.count(purge_store.PURGES) == 0


async def test_the_watchdog_sees_runs_waiting_for_the_purge(served: Served) -> None:
    """The purge loop is watched like the other loops: work waits for it while an expired deleted run (or
    a purged run's rows) is left, so a purge loop that stops making progress turns health NOT_SERVING."""
    watched = served.servers[0].server.purger.watched(stall_s=30)
    assert watched.name == purge_loop.LOOP_NAME and watched.stall_s == 2 * purge_loop.PASS_EVERY_S
    me = served.mine[0]
    run = (await me.CreateRun(create_request(2))).run
    assert not await watched.has_work()
    await me.DeleteRun(pb.DeleteRunRequest(run_id=run.id))  # expired at once (retention 0)
    assert await watched.has_work()
    assert (await served.purged()).runs == 1
    assert not await watched.has_work()


# A client that reads nothing and accepts only ~1 KiB in flight: the server's writes to it stall, so its
# watcher stays in the middle of the run's log (tests/test_watch.py).
STALLED_READER = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
WATCHED_ITEMS = 1000  # ~2,000 events, ~250 KiB: far more than the stalled stream takes in


@pytest.fixture
async def working(tmp_path: Path) -> AsyncIterator[list[EvalServiceTestServer]]:
    """Servers that purge deleted runs at once: one on SQLite, two replicas of one database on PostgreSQL,
    the first executing the runs (the second, API-only, watches and purges: the tests' runs end where
    they are watched to their end). Heartbeats every 0.2 s: a watcher that took a purged run for caught
    up shows at once."""
    replicas = 2 if dbs.USE_POSTGRES else 1
    url = dbs.db_url(tmp_path)
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                EvalServiceTestServer(
                    database_url=url, deleted_run_retention_s=0, heartbeat_s=0.2, **({"workers": 0} if i else {})
                )
            )
            for i in range(replicas)
        ]


async def _deleted_finished_run(server: EvalServiceTestServer) -> tuple[str, int]:
    """A finished run of WATCHED_ITEMS items, deleted (not purged yet): its id and last seq."""
    run = (await server.runs.CreateRun(create_request(WATCHED_ITEMS))).run
    last_seq = (await asyncio.wait_for(watch_all(server.runs, run.id), 60))[-1].seq
    await server.runs.DeleteRun(pb.DeleteRunRequest(run_id=run.id))
    return run.id, last_seq


async def _watch_through_purge(
    watcher: EvalServiceTestServer, run_id: str, last_seq: int, purge: Any
) -> grpc.aio.AioRpcError:
    """Watch the run from its start on `watcher` with a client that stalls after the first event, purge
    the run (`purge()`), then read on: the events must be 1, 2, ... with no heartbeat (the watcher is
    catching up), the stream must end with an error (returned), and the watch must be gone."""
    async with keyed_channel(watcher.server.port, watcher.api_key, options=STALLED_READER) as channel:
        call = eval_run_service_pb2_grpc.EvalRunServiceStub(channel).WatchRun(pb.WatchRunRequest(run_id=run_id))
        seqs = [(await call.read()).seq]  # catching up on the log; its client reads no more for now
        await purge()

        async def read_on() -> None:
            while (event := await call.read()) is not grpc.aio.EOF:
                assert not event.HasField("heartbeat"), f"heartbeats after seq {seqs[-1]}: the watch never ends"
                seqs.append(event.seq)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(read_on(), 30)
    assert seqs == list(range(1, len(seqs) + 1))
    assert len(seqs) < last_seq  # it was caught in the middle of the log (else this tests nothing)
    assert watcher.server.bus.watcher_count() == 0
    return caught.value


async def test_a_watcher_catching_up_on_a_run_purged_under_it_ends_not_found(
    working: list[EvalServiceTestServer],
) -> None:
    """A slow watcher of a finished run that is deleted and purged got the events before the purge, then
    heartbeats for good, holding its watch slot. It ends NOT_FOUND (RUN_NOT_FOUND), as for a run that
    never existed: on the replica that purged (its watches end at the purge's commit) and, on
    PostgreSQL, on one that did not (it finds the run's events gone from the log)."""
    purger, watcher = working[0], working[-1]
    run_id, last_seq = await _deleted_finished_run(purger)

    async def purge() -> None:
        assert (await asyncio.wait_for(purger.server.purger.next_pass(), 60)).runs == 1

    error = await _watch_through_purge(watcher, run_id, last_seq, purge)
    assert error.code() == grpc.StatusCode.NOT_FOUND and error_reason(error) == "RUN_NOT_FOUND", error


async def test_a_watcher_that_missed_the_purge_ends_not_found_when_it_reads_the_log(
    working: list[EvalServiceTestServer],
) -> None:
    """A purge this process's watchers are not told of (a replica of an earlier version purging, or its
    notice sent while the listener was reconnecting): the store's steps, straight on the database. The
    watcher finds the run's committed events missing from the log, re-reads the run, and ends NOT_FOUND
    rather than taking the empty log for "caught up"."""
    server = working[0]
    run_id, last_seq = await _deleted_finished_run(server)
    db = server.server.db

    async def purge() -> None:
        assert await db.transact(functools.partial(purge_store.expire, cutoff=time.time(), limit=10)) == [run_id]
        while await db.transact(functools.partial(purge_store.purge_step, budget=1000), alone=True) is not None:
            pass

    error = await _watch_through_purge(server, run_id, last_seq, purge)
    assert error.code() == grpc.StatusCode.NOT_FOUND and error_reason(error) == "RUN_NOT_FOUND", error


@pytest.mark.skipif(not dbs.USE_POSTGRES, reason="notifications between replicas: PostgreSQL")
async def test_another_replicas_purge_ends_this_replicas_watches_of_the_run(served: Served) -> None:
    """The purge's commit notifies evalsvc_runs_purged (RUNS_PURGED_CHANNEL); every other replica's
    listener ends its watches of those runs with NOT_FOUND. After its connection comes back it ends the
    watches of runs no longer there (notices sent meanwhile are gone)."""
    here = served.servers[1].server
    run = (await served.mine[0].CreateRun(create_request(1))).run
    kept = (await served.mine[0].CreateRun(create_request(1))).run

    async def notify(conn: AsyncConnection) -> None:  # as the purging replica's expire does
        await conn.execute(select(func.pg_notify("evalsvc_runs_purged", f"another-process|{run.id}")))

    with here.bus.subscribe(run.id, 8) as purged, here.bus.subscribe(kept.id, 8) as watched:
        await served.servers[0].server.db.transact(notify)
        with pytest.raises(ServiceError) as caught:
            await purged.next(30)
        assert caught.value.code == grpc.StatusCode.NOT_FOUND and caught.value.reason == "RUN_NOT_FOUND"
        watched.raise_if_closed()  # another run's watch goes on

    assert here.listener is not None
    with here.bus.subscribe("run-purged-meanwhile", 8) as missed, here.bus.subscribe(kept.id, 8) as watched:
        await here.listener._end_purged_watches()
        with pytest.raises(ServiceError) as caught:
            missed.raise_if_closed()
        assert caught.value.reason == "RUN_NOT_FOUND"
        watched.raise_if_closed()
