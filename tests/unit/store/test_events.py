"""The event log (evalsvc.store.events) over a bare database: the pages a watcher reads."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.store import bulk
from evalsvc.store import events as event_log
from evalsvc.store.db import Database
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import run_pb2
from tests.unit.stored import plan_nodes, unanalyzed


def result_event(seq: int) -> pb.WatchRunResponse:
    return pb.WatchRunResponse(seq=seq, result=run_pb2.Result(item_id=f"item-{seq}", grader="exact", score=1.0))


async def append(db: Database, tenant: str, run_id: str, first: int, last: int) -> None:
    """Events first..last of a run, committed in one transaction."""

    async def work(conn: AsyncConnection) -> None:
        await event_log.append(conn, tenant, run_id, [result_event(seq) for seq in range(first, last + 1)])

    await db.transact(work)


async def read_page(db: Database, tenant: str, after_seq: int, limit: int, max_bytes: int) -> tuple[list[int], bool]:
    async with db.read() as conn:
        payloads, more = await event_log.read_page(conn, tenant, "run-a", after_seq, limit, max_bytes)
    return [pb.WatchRunResponse.FromString(p).seq for p in payloads], more


async def test_pages_hold_the_next_events_in_order_bounded_by_count_and_bytes(db: Database) -> None:
    await append(db, "t1", "run-a", 1, 300)
    await append(db, "t1", "run-b", 1, 50)
    size = len(result_event(100).SerializeToString())

    assert await read_page(db, "t1", 0, 100, 1 << 20) == (list(range(1, 101)), True)
    assert await read_page(db, "t1", 250, 100, 1 << 20) == (list(range(251, 301)), False)
    assert await read_page(db, "t1", 300, 100, 1 << 20) == ([], False)
    # The byte bound cuts the page (the first event is always taken), and more follow.
    assert await read_page(db, "t1", 99, 100, size * 10) == (list(range(100, 110)), True)
    assert await read_page(db, "t1", 99, 100, 1) == ([100], True)
    # Another tenant's run is indistinguishable from one with no events.
    assert await read_page(db, "t2", 0, 100, 1 << 20) == ([], False)


async def test_a_page_read_visits_only_the_rows_it_may_return_whatever_the_statistics(db: Database) -> None:
    """A watcher catching up on a large run reads it page by page; each read must cost its own page,
    not every event after it. PostgreSQL, planning with statistics taken before a run's inserts,
    chose a bitmap scan of all later events plus a sort: minutes to catch up on 250,000 events."""
    await unanalyzed(db, "events")
    await append(db, "t1", "run-a", 1, 20_000)
    parameters = event_log.page_parameters("t1", "run-a", 5_000, 96, 12 * 1024)
    async with db.read() as conn:
        if conn.dialect.name == "postgresql":
            sql = bulk.in_driver_style(conn, "EXPLAIN (ANALYZE, FORMAT JSON) " + event_log.PAGE_SQL)
            plan = (await conn.exec_driver_sql(sql, parameters)).scalar_one()
            visited = max(int(node["Actual Rows"]) for node in plan_nodes(plan))
            assert visited <= 96, f"a 96-event page visited {visited} rows"
        else:
            steps = [
                row[-1] for row in await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + event_log.PAGE_SQL, parameters)
            ]
            searches = [step for step in steps if "events" in step and ("SEARCH" in step or "SCAN" in step)]
            assert searches and all("seq>? AND seq<?" in step for step in searches), steps
