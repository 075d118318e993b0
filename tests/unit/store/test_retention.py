"""The purge of deleted runs (evalsvc.store.retention, evalsvc.runs.retention) over a bare database, on
either engine: what it deletes (every row of an expired deleted run, in every table that has a run_id,
and nothing of any other run), in chunks, keeping the tenant's spend and counting its stored runs; and
two replicas purging at once on PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Table, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlmodel import SQLModel

from evalsvc.ids import new_id
from evalsvc.metrics import Metrics
from evalsvc.runs.retention import RunPurger
from evalsvc.store import retention, usage
from evalsvc.store import runs as run_store
from evalsvc.store.db import Database
from evalsvc.store.webhooks import DELIVERIES
from evalsvc.v1 import item_pb2
from tests import dbs
from tests.unit.stored import insert as insert_runs
from tests.unit.stored import jobs_of, new_run

DAY = 86400.0
# Every table with rows of a run, and the column that names it.
RUN_TABLES = {
    table.name: ("id" if table.name == "runs" else "run_id")
    for table in SQLModel.metadata.sorted_tables
    if "run_id" in table.c or table.name == "runs"
}


async def stored_run(
    db: Database, tenant: str, *, cost_usd: float, deleted_days_ago: float | None, items: int = 3
) -> str:
    """A run with rows in every table that has a run's rows: items, jobs, an output and a result per job,
    events, a label and a webhook delivery; deleted that long ago (or not)."""
    (first,) = await insert_runs(db, new_run(tenant, items=items, repetitions=2, labels={"team": tenant}))
    run_id = first.run.id
    jobs = await jobs_of(db, run_id)
    output = item_pb2.Response(content="ok").SerializeToString()

    async def fill(conn: AsyncConnection) -> None:
        await conn.execute(
            insert(run_store.OUTPUTS),
            [{"job_id": j["id"], "tenant": tenant, "run_id": run_id, "output": output} for j in jobs],
        )
        await run_store.insert_results(
            conn,
            [
                run_store.result_tuple(
                    **{
                        **{c: 0 for c in ("state", "score", "raw_score", "attempt", "cost_usd", "latency_ms")},
                        "complete_time": 0.0,
                        "scoring_cost_usd": 0.0,
                    },
                    id=j["id"] * 1024,
                    tenant=tenant,
                    run_id=run_id,
                    job_id=j["id"],
                    item_id=f"item{j['item_idx']}",
                    repetition=j["repetition"],
                    grader="exact",
                    explanation="",
                    error_reason="",
                    confidence=None,
                    cached=False,
                    verdict_cached=False,
                    human_verdict=None,
                )
                for j in jobs
            ],
        )
        await conn.execute(
            insert(DELIVERIES).values(
                id=new_id("msg"), tenant=tenant, webhook_id="wh", event_type="run.created", run_id=run_id, seq=1
            )
        )
        deleted = None if deleted_days_ago is None else time.time() - deleted_days_ago * DAY
        await conn.execute(
            update(run_store.RUNS).where(run_store.RUNS.c.id == run_id).values(cost_usd=cost_usd, delete_time=deleted)
        )
        await usage.add_to_totals(conn, spent_usd={tenant: cost_usd})  # as its recordings add it

    await db.transact(fill)
    return run_id


async def rows_of(db: Database, run_id: str) -> dict[str, int]:
    """How many rows of the run each table holds."""
    counted = {}
    async with db.read() as conn:
        for name, column in RUN_TABLES.items():
            table: Table = SQLModel.metadata.tables[name]
            found = await conn.execute(select(func.count()).select_from(table).where(table.c[column] == run_id))
            counted[name] = int(found.scalar_one())
    return counted


async def spend_and_stored(db: Database, tenant: str) -> tuple[float, int]:
    async with db.read() as conn:
        spend = (await usage.spend(conn, [tenant]))[tenant]
    counts = await db.transact(lambda conn: run_store.tenant_runs(conn, [tenant]))
    return round(spend, 6), counts[tenant].stored


def test_every_table_with_a_run_id_is_purged() -> None:
    """A table that gains rows of a run must be emptied by the purge too, or purged runs leave them
    (`staged_runs` names runs not yet created, and becomes `run_purges` when one is abandoned)."""
    assert set(RUN_TABLES) - {"runs", "run_labels", "run_purges", "staged_runs"} == set(retention.PURGED_TABLES)


async def test_the_purge_removes_every_row_of_an_expired_deleted_run_and_nothing_of_others(db: Database) -> None:
    expired = await stored_run(db, "t1", cost_usd=1.5, deleted_days_ago=31)
    recent = await stored_run(db, "t1", cost_usd=2.0, deleted_days_ago=1)  # within its retention
    kept = await stored_run(db, "t1", cost_usd=0.25, deleted_days_ago=None)
    other = await stored_run(db, "t2", cost_usd=4.0, deleted_days_ago=60)
    before = {run_id: await rows_of(db, run_id) for run_id in (expired, recent, kept, other)}
    assert all(n > 0 for name, n in before[expired].items() if name not in ("run_purges", "staged_runs"))
    assert await spend_and_stored(db, "t1") == (3.75, 3)

    purged = await RunPurger(db, 30 * DAY, Metrics(), chunk_rows=7).purge()

    assert purged.runs == 2  # t1's expired one, and t2's
    assert purged.rows == sum(n for name, n in before[expired].items() if name not in ("runs", "run_labels")) + sum(
        n for name, n in before[other].items() if name not in ("runs", "run_labels")
    )
    for gone in (expired, other):
        assert set((await rows_of(db, gone)).values()) == {0}
    for run_id in (recent, kept):
        assert await rows_of(db, run_id) == before[run_id]
    # The spend of purged runs still counts against the budget; they no longer count against the cap.
    assert await spend_and_stored(db, "t1") == (3.75, 2)
    assert await spend_and_stored(db, "t2") == (4.0, 0)
    async with db.read() as conn:
        assert await run_store.get(conn, "t1", expired) is None
        assert not await retention.pending(conn, time.time() - 30 * DAY)
    assert await RunPurger(db, 30 * DAY, Metrics()).purge() == type(purged)()  # nothing left


async def test_the_purge_deletes_a_runs_rows_a_chunk_per_transaction(db: Database) -> None:
    run_id = await stored_run(db, "t1", cost_usd=0.0, deleted_days_ago=2)
    rows = sum(n for name, n in (await rows_of(db, run_id)).items() if name not in ("runs", "run_labels"))
    taken = await db.transact(lambda conn: retention.expire(conn, time.time() - DAY, 10))
    assert taken == [run_id]
    steps = []
    while (step := await db.transact(lambda conn: retention.purge_step(conn, 4), alone=True)) is not None:
        steps.append(step)
        assert step.rows <= 4
        if not step.finished:  # the run is NOT_FOUND, and its rows go on going
            assert sum((await rows_of(db, run_id)).values()) > 0
    assert sum(step.rows for step in steps) == rows and len(steps) >= rows / 4
    assert [step.finished for step in steps][-1] and not any(step.finished for step in steps[:-1])
    assert set((await rows_of(db, run_id)).values()) == {0}


async def test_a_run_undeleted_before_its_purge_is_kept(db: Database) -> None:
    run_id = await stored_run(db, "t1", cost_usd=1.0, deleted_days_ago=40)
    await db.transact(lambda conn: run_store.update_fields(conn, "t1", run_id, {"delete_time": None}))
    assert (await RunPurger(db, 30 * DAY, Metrics()).purge()).runs == 0
    assert (await rows_of(db, run_id))["runs"] == 1


@pytest.mark.skipif(not dbs.USE_POSTGRES, reason="replicas share a PostgreSQL database (EVALSVC_TEST_DB=postgres)")
async def test_replicas_purging_at_once_each_purge_a_run_once(db: Database, tmp_path: Path) -> None:
    """Two servers' purges (two passes each) over the same expired runs: none fails, every row goes (a
    pass that took another's run for emptied left rows behind), and each run's spend and place are moved
    once (a run purged twice would count twice)."""
    runs = [await stored_run(db, "t1", cost_usd=0.5, deleted_days_ago=40, items=i % 3 * 40 + 1) for i in range(12)]
    alive = await stored_run(db, "t1", cost_usd=0.125, deleted_days_ago=None)
    replica = Database(dbs.db_url(tmp_path), pool_size=2)  # the same database, another process's engine
    try:
        purgers = [
            RunPurger(each, 30 * DAY, Metrics(), chunk_rows=5, expire_batch=3) for each in (db, replica, db, replica)
        ]
        results: list[Any] = await asyncio.gather(*(purger.purge() for purger in purgers))
    finally:
        await replica.close()
    assert sum(purged.runs for purged in results) == 12
    for run_id in runs:
        assert set((await rows_of(db, run_id)).values()) == {0}
    assert (await rows_of(db, alive))["jobs"] == 6
    assert await spend_and_stored(db, "t1") == (6.125, 1)
