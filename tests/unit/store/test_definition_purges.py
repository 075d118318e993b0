"""Deleted datasets and saved graders (evalsvc.store.retention.definition_purge_step) over a bare database,
on either engine: the dataset (grader) is gone in the first small transaction, its items (versions) go a
chunk of at most CHUNK_ROWS rows (about CHUNK_BYTES) per transaction, the tenant's stored bytes given back
whole in the first (a review: given back chunk by chunk, a tenant that deleted a dataset to make room was
refused until its purge ended, and a run could fail STORAGE_QUOTA_EXCEEDED meanwhile); a server that
stopped between chunks (kill -9: what is committed is all there is) leaves a state the purge loop of the
next one finishes, its tenant's stored bytes exact."""

from __future__ import annotations

import functools
import time
from pathlib import Path

from sqlalchemy import func, select

from evalsvc.limits import StoredCap
from evalsvc.metrics import Metrics
from evalsvc.runs.retention import RunPurger
from evalsvc.store import datasets as dataset_store
from evalsvc.store import definitions as definition_store
from evalsvc.store import retention, usage
from evalsvc.store.db import Database
from evalsvc.store.records import DatasetRecord, GraderVersionRecord, SavedGraderRecord
from tests import dbs

ROOM = StoredCap("max_stored_bytes_per_tenant", "bytes", 1 << 40)


async def stored(db: Database, tenant: str) -> int:
    async with db.read() as conn:
        return (await usage.stored_bytes(conn, [tenant]))[tenant]


async def count(db: Database, table: object, column: str, owner_id: str) -> int:
    async with db.read() as conn:
        found = await conn.execute(select(func.count()).select_from(table).where(table.c[column] == owner_id))  # type: ignore[attr-defined]
        return int(found.scalar_one())


async def dataset_of(db: Database, tenant: str, items: int, size: int) -> str:
    now = time.time()
    dataset = DatasetRecord(
        f"ds-{tenant}-{items}", tenant, None, "", "name", "about", {"k": "v"}, {"a": "b"}, 0, now, now
    )
    await db.transact(lambda conn: dataset_store.insert_dataset(conn, dataset, ROOM))
    rows = [(f"i{n}", bytes([n % 256]) * size) for n in range(items)]
    for start in range(0, items, 100):
        await db.transact(
            lambda conn, part=rows[start : start + 100]: dataset_store.append_items(conn, tenant, dataset.id, part, now)
        )
    return dataset.id


async def step_of(db: Database, owner: tuple[str, str], **budgets: int) -> retention.DefinitionPurgeStep:
    """One chunk, in its own transaction, of the purge loop's next deleted dataset (grader): `owner`, the
    only one the test has deleted."""
    step = await db.transact(functools.partial(retention.definition_purge_step, **budgets))
    assert step is not None and (step.kind, step.owner_id) == owner, step
    return step


async def steps_of(db: Database, owner: tuple[str, str], **budgets: int) -> list[retention.DefinitionPurgeStep]:
    """The chunks of one deleted dataset (grader), one transaction each, to the last (at most 1,000)."""
    steps = []
    for _ in range(1000):
        step = await step_of(db, owner, **budgets)
        steps.append(step)
        if step.finished:
            return steps
    raise AssertionError("the purge did not finish")


async def test_a_deleted_dataset_is_gone_at_once_and_its_items_go_a_chunk_per_transaction(db: Database) -> None:
    kept = await dataset_of(db, "t1", 3, 10)
    after_kept = await stored(db, "t1")
    dataset_id = await dataset_of(db, "t1", 25, 100)
    other = await dataset_of(db, "t2", 5, 10)
    other_bytes = await stored(db, "t2")

    assert await db.transact(lambda conn: dataset_store.remove(conn, "t1", dataset_id))
    # NOT_FOUND from this commit on, its items still there (the one transaction did not delete them).
    async with db.read() as conn:
        assert await dataset_store.get(conn, "t1", dataset_id) is None
        assert [d for d, _ in await dataset_store.list_sizes(conn, "t1", before_id=None, limit=10)] == [kept]
    assert await count(db, dataset_store.ITEMS, "dataset_id", dataset_id) == 25
    assert await stored(db, "t1") == after_kept  # its own bytes and its items', at once
    assert not await db.transact(lambda conn: dataset_store.remove(conn, "t1", dataset_id))  # deleted once

    steps: list[int] = []
    owner = (dataset_store.DATASET_PARTS, dataset_id)
    for _ in range(100):
        step = await step_of(db, owner, budget=4)
        steps.append(step.rows)
        left = await count(db, dataset_store.ITEMS, "dataset_id", dataset_id)
        assert left == 25 - sum(steps)
        assert await stored(db, "t1") == after_kept  # nothing taken twice
        if step.finished:
            break
    assert steps == [4, 4, 4, 4, 4, 4, 1]
    assert await stored(db, "t1") == after_kept
    assert await count(db, dataset_store.ITEMS, "dataset_id", kept) == 3
    assert await count(db, dataset_store.ITEMS, "dataset_id", other) == 5 and await stored(db, "t2") == other_bytes
    async with db.read() as conn:
        assert not await retention.pending(conn, time.time() - 86400)


async def test_a_chunk_holds_about_chunk_bytes_of_items_and_at_least_one(db: Database) -> None:
    dataset_id = await dataset_of(db, "t1", 9, 3000)
    await db.transact(lambda conn: dataset_store.remove(conn, "t1", dataset_id))
    steps = await steps_of(db, (dataset_store.DATASET_PARTS, dataset_id), budget=100, budget_bytes=7000)
    assert [step.rows for step in steps] == [2, 2, 2, 2, 1]
    huge = await dataset_of(db, "t2", 2, 5000)
    await db.transact(lambda conn: dataset_store.remove(conn, "t2", huge))
    steps = await steps_of(db, (dataset_store.DATASET_PARTS, huge), budget=100, budget_bytes=1000)
    assert [step.rows for step in steps] == [1, 1]  # an item larger than the bound goes alone
    assert await stored(db, "t1") == 0 and await stored(db, "t2") == 0


async def test_a_deleted_graders_versions_go_a_chunk_per_transaction(db: Database) -> None:
    grader = SavedGraderRecord("gr-1", "t1", None, "", "name", "", {}, 1, 0.0)
    await db.transact(
        lambda conn: definition_store.insert_grader(
            conn, grader, GraderVersionRecord("gr-1", 1, "t1", b"d" * 500, 0.0), ROOM
        )
    )
    for version in range(2, 11):
        await db.transact(lambda conn, v=version: definition_store.bump_version(conn, "t1", "gr-1"))
        await db.transact(
            lambda conn, v=version: definition_store.insert_version(
                conn, GraderVersionRecord("gr-1", v, "t1", b"d" * 500, 0.0), ROOM
            )
        )
    before = await stored(db, "t1")
    assert before >= 10 * (500 + usage.SAVED_ROW_BYTES)

    assert await db.transact(lambda conn: definition_store.remove_grader(conn, "t1", "gr-1"))
    async with db.read() as conn:
        assert await definition_store.get_grader(conn, "t1", "gr-1", 1) is None
    assert await count(db, definition_store.VERSIONS, "grader_id", "gr-1") == 10
    assert await stored(db, "t1") == 0 < before  # the grader's own bytes and its versions', at once

    steps = await steps_of(db, (definition_store.GRADER_PARTS, "gr-1"), budget=3)
    assert [step.rows for step in steps] == [3, 3, 3, 1]
    assert await count(db, definition_store.VERSIONS, "grader_id", "gr-1") == 0
    assert await stored(db, "t1") == 0 < before


async def test_a_delete_cut_short_by_a_crash_is_finished_by_the_next_servers_purge(
    db: Database, tmp_path: Path
) -> None:
    """kill -9 between chunks leaves what they committed: the dataset gone, some of its items. The next
    server's purge loop (its first pass begins as it starts) deletes the rest; the tenant's bytes are exact."""
    kept = await dataset_of(db, "t1", 4, 50)
    after_kept = await stored(db, "t1")
    dataset_id = await dataset_of(db, "t1", 30, 200)
    await db.transact(lambda conn: dataset_store.remove(conn, "t1", dataset_id))
    await step_of(db, (dataset_store.DATASET_PARTS, dataset_id), budget=7)
    await db.close()  # the server is gone; another opens the database
    restarted = Database(dbs.db_url(tmp_path), pool_size=2)
    try:
        async with restarted.read() as conn:
            assert await dataset_store.get(conn, "t1", dataset_id) is None
            assert await retention.pending(conn, time.time() - 86400)
        assert await count(restarted, dataset_store.ITEMS, "dataset_id", dataset_id) == 23
        purged = await RunPurger(restarted, 30 * 86400.0, Metrics(), chunk_rows=5).purge()
        assert purged.rows == 23
        assert await count(restarted, dataset_store.ITEMS, "dataset_id", dataset_id) == 0
        assert await count(restarted, dataset_store.ITEMS, "dataset_id", kept) == 4
        assert await stored(restarted, "t1") == after_kept
        async with restarted.read() as conn:
            assert not await retention.pending(conn, time.time() - 86400)
    finally:
        await restarted.close()
