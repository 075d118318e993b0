"""A large CreateRun's rows written in chunks before its run row (evalsvc.store.staging): invisible and
unclaimed until the run row comes, all of them there when it does, and gone through the purge when the
run never comes."""

from __future__ import annotations

import dataclasses
import functools
import time

from sqlalchemy import func, select, update

from evalsvc.metrics import Metrics
from evalsvc.runs.retention import RunPurger
from evalsvc.store import runs as run_store
from evalsvc.store import staging, stats
from evalsvc.store.db import Database
from tests.unit.stored import jobs_of, new_run

ITEMS, JOBS, STAGED, PURGES = staging.ITEMS, staging.JOBS, staging.STAGED, staging.PURGES


def test_chunks_hold_every_row_once_in_order_within_their_bounds() -> None:
    items = [b"x" * size for size in (10, 10, 30, 5, 5, 5, 40)]
    digests = [staging.ItemDigests(bytes([i]), bytes([i + 1])) for i in range(len(items))]
    chunks = list(staging.chunks("run-1", "t1", items, digests, 2, rows=3, item_bytes=35))
    assert [len(c.items) for c in chunks if c.items] == [2, 2, 2, 1]  # 10+10, 30+5, 5+5, 40 (alone, over)
    assert [len(c.jobs) for c in chunks if c.jobs] == [3, 3, 3, 3, 2]
    assert [c.first for c in chunks] == [True] + [False] * (len(chunks) - 1)
    assert not any(c.items and c.jobs for c in chunks)
    assert [row for c in chunks for row in c.items] == list(staging.item_rows("run-1", "t1", items, digests))
    assert [row for c in chunks for row in c.jobs] == list(staging.job_rows("run-1", "t1", len(items), 2))


async def stage_all(db: Database, new: run_store.NewRun, *, rows: int = 4) -> int:
    """Stage a run's rows as CreateRun does, a chunk per transaction; how many chunks."""
    chunks = list(
        staging.chunks(
            new.row["id"], new.row["tenant"], new.items, new.digests, new.repetitions, rows=rows, item_bytes=1 << 20
        )
    )
    for chunk in chunks:
        assert await db.transact(functools.partial(staging.stage, chunk=chunk), alone=True)
    return len(chunks)


async def count(db: Database, table: object, run_id: str) -> int:
    async with db.read() as conn:
        found = await conn.execute(select(func.count()).select_from(table).where(table.c.run_id == run_id))  # type: ignore[attr-defined]
        return int(found.scalar_one())


async def test_staged_rows_are_invisible_and_unclaimed_until_the_run_row_comes_with_all_of_them(db: Database) -> None:
    new = dataclasses.replace(new_run(items=7, repetitions=2), staged=True)
    plain = new_run(items=3)  # inserted in the same transaction as the staged run's row, its rows with it
    assert await stage_all(db, new) == 2 + 4  # 7 items in 2 chunks, 14 jobs in 4
    async with db.read() as conn:
        assert await run_store.claimable_runs(conn, time.time()) == []
        assert await run_store.get_any_tenant(conn, new.row["id"]) is None
        assert await stats.queued_jobs(conn) == 0  # no worker takes them yet

    async def create(conn):  # type: ignore[no-untyped-def]
        assert await staging.take(conn, [new.row["id"]]) == {new.row["id"]}
        return await run_store.insert_runs(conn, [new, plain])

    await db.transact(create)
    assert await count(db, ITEMS, new.row["id"]) == 7
    assert [(j["item_idx"], j["repetition"]) for j in await jobs_of(db, new.row["id"])] == [
        (i, rep) for rep in (1, 2) for i in range(7)
    ]
    assert len(await jobs_of(db, plain.row["id"])) == 3
    async with db.read() as conn:
        assert {run_id for _, run_id in await run_store.claimable_runs(conn, time.time())} == {
            new.row["id"],
            plain.row["id"],
        }
        assert await stats.queued_jobs(conn) == 14 + 3
    assert await count(db, STAGED, new.row["id"]) == 0
    # Abandoning a run that was created does nothing: its rows are the run's.
    assert await db.transact(functools.partial(staging.abandon, run_ids=[new.row["id"]])) == []
    assert await count(db, JOBS, new.row["id"]) == 14


async def test_an_abandoned_staging_is_purged_and_later_chunks_or_its_run_row_find_it_gone(db: Database) -> None:
    new = dataclasses.replace(new_run(items=6, repetitions=1), staged=True)
    chunks = list(staging.chunks(new.row["id"], "t1", new.items, new.digests, 1, rows=4, item_bytes=1 << 20))
    assert await db.transact(functools.partial(staging.stage, chunk=chunks[0]))
    assert await db.transact(functools.partial(staging.abandon, run_ids=[new.row["id"]])) == [new.row["id"]]
    # A chunk after the abandon writes nothing; the run's CreateRun group finds no staging row to take.
    assert not await db.transact(functools.partial(staging.stage, chunk=chunks[1]))
    assert await db.transact(lambda conn: staging.take(conn, [new.row["id"]])) == set()
    assert await count(db, ITEMS, new.row["id"]) == 4
    async with db.read() as conn:
        assert await stats.queued_jobs(conn) == 0

    purged = await RunPurger(db, 30 * 86400.0, Metrics(), chunk_rows=3).purge()

    assert purged.rows == 4
    for table in (ITEMS, JOBS, STAGED, PURGES):
        assert await count(db, table, new.row["id"]) == 0


async def test_the_purge_abandons_a_staging_left_by_a_server_that_stopped(db: Database) -> None:
    dead = dataclasses.replace(new_run(items=3), staged=True)
    await stage_all(db, dead)
    if not db.is_sqlite:  # replicas may be staging now: only a staging past the hour is another's dead one
        await db.transact(lambda conn: conn.execute(update(STAGED).values(stage_time=time.time() - 3601)))
    # On SQLite, whatever was staged before the server made its purger (before it serves) is a dead
    # server's; a CreateRun staging while the server starts up is not.
    purger = RunPurger(db, 30 * 86400.0, Metrics())
    live = dataclasses.replace(new_run(items=3), staged=True)
    await stage_all(db, live)
    await purger.start()
    try:
        purged = await purger.next_pass()
    finally:
        await purger.stop()
    assert purged.rows in (0, 6)  # the start's first pass may have deleted the dead rows already
    for table in (ITEMS, JOBS, STAGED, PURGES):
        assert await count(db, table, dead.row["id"]) == 0
    assert await count(db, STAGED, live.row["id"]) == 1  # a CreateRun staging now is left alone
    assert await count(db, JOBS, live.row["id"]) == 3
