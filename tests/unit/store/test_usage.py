"""A tenant's stored bytes and cache bytes (evalsvc.store.usage) over a bare database, on either engine: every
write that stores a tenant's data raises them by what it stores (saved definitions too), DeleteDataset,
DeleteGrader, DeleteTarget, the purge and the response cache's eviction take theirs back, and revisions 0018
and 0025 fill them on an upgraded database exactly as the service counts them."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable

import grpc
import pytest
from alembic import command
from sqlalchemy import func, select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.errors import ServiceError
from evalsvc.execution import recorder
from evalsvc.execution.recorder import FinishedJob
from evalsvc.graders import Grade
from evalsvc.limits import StoredCap
from evalsvc.metrics import Metrics
from evalsvc.runs.retention import RunPurger
from evalsvc.store import cache as cache_store
from evalsvc.store import datasets as dataset_store
from evalsvc.store import definitions as definition_store
from evalsvc.store import migrate, retention, usage
from evalsvc.store import runs as run_store
from evalsvc.store.cache import CacheEntry
from evalsvc.store.db import Database
from evalsvc.store.jobs import ClaimedJob
from evalsvc.store.models import CACHE_TARGET_OUTPUT
from evalsvc.store.records import DatasetRecord, GraderVersionRecord, SavedGraderRecord, SavedTargetRecord
from evalsvc.v1 import item_pb2, run_pb2
from tests.unit.execution.test_recorder import ONE_GRADER, claim, done, record
from tests.unit.stored import insert, new_run

UNBOUNDED = StoredCap("max_stored_bytes_per_tenant", "bytes stored", 1 << 62)
# A dataset with no names, labels or annotations: its row, and its two maps as the JSON `{}`.
# The purge loop (evalsvc.runs.retention) as the server runs it: its passes delete what deleted
# definitions left; no run here was deleted that long ago.
RETENTION_S = 30 * 86400.0
EMPTY_DATASET_BYTES = usage.SAVED_ROW_BYTES + 2 * len("{}")
EXPLAINED = Grade(run_pb2.RESULT_STATE_FAILED, 0.0, 0.0, "the answer names the wrong city " * 20)


async def stored(db: Database, tenant: str) -> int:
    async with db.read() as conn:
        return (await usage.stored_bytes(conn, [tenant]))[tenant]


async def runs_bytes(db: Database) -> dict[str, int]:
    async with db.read() as conn:
        rows = await conn.execute(select(run_store.RUNS.c.id, run_store.RUNS.c.stored_bytes))
        return {run_id: int(n) for run_id, n in rows}


def test_a_new_run_counts_its_definition_and_descriptions_four_times_its_items_once_and_each_job() -> None:
    """Its row and the events of its creation, start and end each hold the whole run: a run whose definition
    or annotations are large costs that four times (cancelled at once, it has already stored three). Each
    item counts with its comparison digests, in its row and their index (64 bytes an item went uncounted)."""
    plain, described = new_run("t1", items=2, repetitions=3), new_run("t1", items=2, repetitions=3)
    row = {**described.row, "annotations": {"notes": "n" * 1000}, "labels": {"team": "search"}, "description": "d"}
    grown = usage.new_run_bytes(row, described.items, 6) - plain.stored_bytes
    assert grown == usage.RUN_COPIES * (
        len(json.dumps(row["annotations"])) - 2 + len(json.dumps(row["labels"])) - 2 + 1
    )
    assert plain.stored_bytes == (
        usage.RUN_COPIES * (len(plain.row["spec"]) + 2 + 2)
        + sum(map(len, plain.items))
        + 2 * 128  # two items' digests, 64 bytes in the row and 64 in ix_run_items_digests
        + 6 * usage.JOB_BYTES
    )


async def test_update_run_adds_the_change_of_its_descriptions_and_gives_it_back(db: Database) -> None:
    """UpdateRun's annotations (up to 64 KiB a run) counted nothing: 40 runs' 5 MB of events uncounted."""
    new = new_run("t1")
    [run] = await insert(db, new)
    before = await stored(db, "t1")

    async def update(values: dict[str, object]) -> None:
        await db.transact(lambda conn: run_store.update_fields(conn, "t1", run.run.id, values))

    await update({"annotations": {"notes": "n" * 1000}, "display_name": "nightly"})
    grown = usage.RUN_COPIES * (len(json.dumps({"notes": "n" * 1000})) - len("{}") + len("nightly"))
    assert await stored(db, "t1") == before + grown
    assert (await runs_bytes(db))[run.run.id] == new.stored_bytes + grown
    await update({"annotations": {}, "display_name": ""})
    assert await stored(db, "t1") == before
    await update({"delete_time": 1.0})  # not a descriptive column: nothing changes
    assert await stored(db, "t1") == before


async def add_dataset(db: Database, tenant: str, items: list[bytes], annotations: dict[str, str] | None = None) -> str:
    dataset_id = f"ds_{tenant}"
    now = time.time()
    record = DatasetRecord(dataset_id, tenant, None, "", "", "", {}, annotations or {}, 0, now, now)

    async def work(conn: AsyncConnection) -> None:
        await dataset_store.insert_dataset(conn, record, UNBOUNDED)
        await dataset_store.append_items(conn, tenant, dataset_id, [(f"i{n}", b) for n, b in enumerate(items)], now)

    await db.transact(work)
    return dataset_id


async def test_each_write_adds_what_it_stores_to_its_tenant_and_deleting_takes_it_back(db: Database) -> None:
    mine, theirs = new_run("t1", items=3), new_run("t2", items=1)
    created = await insert(db, mine, theirs)
    mine_size, theirs_size = mine.stored_bytes, theirs.stored_bytes
    assert await stored(db, "t1") == mine_size
    assert await stored(db, "t2") == theirs_size

    jobs = await claim(db, {created[0].run.id: 3})
    batch = [done(job, EXPLAINED) for job in jobs]
    await record(db, batch, {created[0].run.id: ONE_GRADER})
    recorded = sum(f.output.ByteSize() + usage.RESULT_BYTES + 2 * len(EXPLAINED.explanation) for f in batch)
    assert len(EXPLAINED.explanation) == 640 and recorded > 3 * 1280  # the texts count, twice
    run_size = mine_size + recorded
    assert (await runs_bytes(db))[created[0].run.id] == run_size
    assert await stored(db, "t1") == run_size

    items = [item_pb2.Item(id=f"i{n}", input="x" * 100 * n).SerializeToString() for n in range(4)]
    dataset_id = await add_dataset(db, "t1", items)
    assert await stored(db, "t1") == run_size + EMPTY_DATASET_BYTES + sum(map(len, items))
    assert await db.transact(lambda conn: dataset_store.remove(conn, "t1", dataset_id))
    assert await stored(db, "t1") == run_size  # its items' too, at once, before the purge deletes them
    await RunPurger(db, RETENTION_S, Metrics()).purge()
    assert await stored(db, "t1") == run_size

    async def delete_long_ago(conn: AsyncConnection) -> None:
        await conn.execute(
            update(run_store.RUNS).where(run_store.RUNS.c.id == created[0].run.id).values(delete_time=1.0)
        )

    await db.transact(delete_long_ago)
    assert await db.transact(lambda conn: retention.expire(conn, time.time(), 10)) == [created[0].run.id]
    assert await stored(db, "t1") == 0
    assert await stored(db, "t2") == theirs_size  # another tenant's writes never counted


def cached(job: ClaimedJob, key: str, size: int) -> FinishedJob:
    """The job done, writing a cache entry of `size` bytes under `key`."""
    entry = CacheEntry(job.tenant, key, CACHE_TARGET_OUTPUT, b"o" * size, 0.0)
    return dataclasses.replace(done(job, EXPLAINED), cache_writes=[entry])


def results_bytes(finished: list[FinishedJob]) -> int:
    return sum(f.output.ByteSize() + usage.result_bytes(EXPLAINED.explanation, "") for f in finished)


async def cache_held(db: Database, tenant: str) -> tuple[int, int]:
    """A tenant's cache bytes as its totals count them, and as its entries hold them."""
    async with db.read() as conn:
        counted = (await usage.cache_bytes(conn, [tenant]))[tenant]
        rows = await conn.execute(
            select(func.coalesce(func.sum(func.length(cache_store.ENTRIES.c.payload)), 0)).where(
                cache_store.ENTRIES.c.tenant == tenant
            )
        )
        return counted, int(rows.scalar_one())


async def test_the_response_cache_is_bounded_by_bytes_and_never_counts_towards_stored_bytes(db: Database) -> None:
    """Entries are disposable: they are evicted (least recently used first) past --cache-max-bytes as past
    --cache-max-entries, and kept out of the tenant's stored bytes, so a tenant whose bytes were its own
    cache was refused everything with nothing it could delete (a probe)."""
    [run] = await insert(db, new_run("t1", items=5))
    before = await stored(db, "t1")
    jobs = await claim(db, {run.run.id: 5})
    # k1 written twice (REFRESH, or two runs that missed at once): the later 3000 bytes replace the 1000.
    first = [cached(jobs[0], "k1", 1000), cached(jobs[1], "k1", 3000), cached(jobs[2], "k2", 500)]
    await recorder.record(db, first, {run.run.id: ONE_GRADER}, cache_bounds=recorder.CacheBounds(100, 10_000))
    assert await cache_held(db, "t1") == (3500, 3500)
    assert await stored(db, "t1") == before + results_bytes(first)  # the cache is not in it
    # Replaced in a later transaction: the 3000 bytes are given back, the 200 counted.
    await recorder.record(
        db, [cached(jobs[3], "k1", 200)], {run.run.id: ONE_GRADER}, cache_bounds=recorder.CacheBounds(100, 10_000)
    )
    assert await cache_held(db, "t1") == (700, 700)
    # Past 1,000 bytes the least recently used go until it fits: k2 (500); k1's 200 and k3's 600 stay.
    await recorder.record(
        db, [cached(jobs[4], "k3", 600)], {run.run.id: ONE_GRADER}, cache_bounds=recorder.CacheBounds(100, 1000)
    )
    async with db.read() as conn:
        assert await cache_store.counts(conn) == {"t1": 2}
    assert await cache_held(db, "t1") == (800, 800)
    # The operator's prune returns what it freed, by tenant (`evalsvc cache prune` takes it off the totals).
    removed = await db.transact(lambda conn: cache_store.delete_unused_since(conn, time.time() + 1))
    assert removed.rows == 2 and dict(removed.freed) == {"t1": 800}


def _migrate_to(revision: str, *, down: bool) -> Callable[[Connection], None]:
    def step(connection: Connection) -> None:
        config = migrate.alembic_config()
        config.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(config, revision)

    return step


async def test_revision_0018_fills_stored_bytes_as_the_service_counts_them(db: Database) -> None:
    """An upgraded database starts with what its tenants already store counted (an empty column would give
    every tenant a fresh --max-stored-bytes-per-tenant on top of it): the revision's SQL and the service's
    counting agree, run by run and tenant by tenant, datasets and a tenant with only a dataset included."""
    labelled = new_run("t1", items=2, repetitions=2, labels={"team": "search", "größe": "groß"})
    runs = (new_run("t1", items=3), labelled, new_run("t2", items=1))
    created = await insert(db, *runs)
    jobs = await claim(db, {created[0].run.id: 3, created[2].run.id: 1})
    finished = [cached(job, f"k{n}", 100 * n) for n, job in enumerate(jobs)]
    await record(db, finished, {r.run.id: ONE_GRADER for r in created})
    await add_dataset(db, "t1", [b"a" * 500, b"b" * 20])
    await add_dataset(db, "t3", [b"c" * 70])
    by_run = await runs_bytes(db)
    by_tenant = {tenant: await stored(db, tenant) for tenant in ("t1", "t2", "t3")}
    cache = {tenant: await cache_held(db, tenant) for tenant in ("t1", "t2")}
    assert all(counted == held > 0 for counted, held in cache.values())
    assert by_tenant["t3"] == EMPTY_DATASET_BYTES + 70 and all(by_run.values())

    async with db.write() as conn:
        await conn.run_sync(_migrate_to("0017", down=True))
        await conn.run_sync(_migrate_to("head", down=False))
        # The revision fills what the service would have counted: nothing survives from before the downgrade.
        assert (await conn.execute(text("SELECT COUNT(*) FROM tenant_run_totals WHERE tenant = 't3'"))).scalar() == 1
    # The items' digests went with the downgrade (revision 0028 adds them empty): the runs store the rest.
    digests = {new.row["id"]: usage.ITEM_DIGEST_BYTES * len(new.items) for new in runs}
    assert await runs_bytes(db) == {run_id: held - digests[run_id] for run_id, held in by_run.items()}
    by_tenant["t1"] -= digests[runs[0].row["id"]] + digests[runs[1].row["id"]]
    by_tenant["t2"] -= digests[runs[2].row["id"]]
    assert {tenant: await stored(db, tenant) for tenant in ("t1", "t2", "t3")} == by_tenant
    assert {tenant: await cache_held(db, tenant) for tenant in ("t1", "t2")} == cache


GRADER = b"g" * 1000  # a serialized grader, as the store sees it
TARGET = b"t" * 2000


async def save_grader(db: Database, tenant: str, grader_id: str, *versions: bytes, cap: StoredCap = UNBOUNDED) -> None:
    """A saved grader of `tenant` with these versions (the first created with it), through the store."""
    grader = SavedGraderRecord(grader_id, tenant, None, "", "nightly", "", {"team": "search"}, 1, 0.0)

    async def work(conn: AsyncConnection) -> None:
        await definition_store.insert_grader(
            conn, grader, GraderVersionRecord(grader_id, 1, tenant, versions[0], 0.0), cap
        )
        for definition in versions[1:]:
            bumped = await definition_store.bump_version(conn, tenant, grader_id)
            assert bumped is not None
            version = GraderVersionRecord(grader_id, bumped.latest_version, tenant, definition, 0.0)
            await definition_store.insert_version(conn, version, cap)

    await db.transact(work)


async def save_target(db: Database, tenant: str, target_id: str, cap: StoredCap = UNBOUNDED) -> None:
    target = SavedTargetRecord(target_id, tenant, None, "", "prod", "", {}, TARGET, 0.0)
    await db.transact(lambda conn: definition_store.insert_target(conn, target, cap))


# What the saved grader of `save_grader` stores, without its versions: its row, "nightly" and its labels' JSON.
GRADER_ROW_BYTES = usage.SAVED_ROW_BYTES + len("nightly") + len('{"team": "search"}')
TARGET_BYTES = usage.SAVED_ROW_BYTES + len("prod") + len("{}") + len(TARGET)


async def test_saved_definitions_count_what_they_store_and_deleting_them_gives_it_back(db: Database) -> None:
    """Saved graders (each version), targets and datasets' descriptive fields counted nothing: a tenant at a
    1 MiB cap stored 400 grader versions of 256 KB (104 MB) and the quota said 0 bytes."""
    await save_grader(db, "t1", "grd_1", GRADER, GRADER[:500])
    versions = 2 * usage.SAVED_ROW_BYTES + 1500
    assert await stored(db, "t1") == GRADER_ROW_BYTES + versions
    await save_target(db, "t1", "tgt_1")
    assert await stored(db, "t1") == GRADER_ROW_BYTES + versions + TARGET_BYTES
    annotations = {"notes": "n" * 5000}
    dataset_id = await add_dataset(db, "t1", [b"i" * 10], annotations)
    dataset_bytes = EMPTY_DATASET_BYTES - len("{}") + len(json.dumps(annotations)) + 10
    assert await stored(db, "t1") == GRADER_ROW_BYTES + versions + TARGET_BYTES + dataset_bytes

    # Past the cap a definition is refused (the quota named) and nothing of it is written.
    held = await stored(db, "t1")
    full = StoredCap("max_stored_bytes_per_tenant", "bytes stored", held + usage.SAVED_ROW_BYTES + len(GRADER) - 1)
    for write in (
        save_grader(db, "t1", "grd_2", GRADER, cap=full),
        save_target(db, "t1", "tgt_2", cap=full),
    ):
        with pytest.raises(ServiceError) as refused:
            await write
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.metadata == {"quota": "max_stored_bytes_per_tenant"}
    async with db.read() as conn:
        assert await definition_store.get_grader(conn, "t1", "grd_2", 0) is None
        assert await definition_store.get_target(conn, "t1", "tgt_2") is None
    assert await stored(db, "t1") == held

    await save_target(db, "t2", "tgt_3")  # another tenant's: never counted for t1
    assert await db.transact(lambda conn: definition_store.remove_grader(conn, "t1", "grd_1"))
    assert await db.transact(lambda conn: definition_store.remove_target(conn, "t1", "tgt_1"))
    assert await db.transact(lambda conn: dataset_store.remove(conn, "t1", dataset_id))
    assert await stored(db, "t1") == 0  # at once: the purges only delete rows
    assert (
        await RunPurger(db, RETENTION_S, Metrics()).purge()
    ).rows == 3  # the grader's 2 versions, the dataset's item
    assert await stored(db, "t1") == 0
    assert await stored(db, "t2") == TARGET_BYTES


async def test_revision_0025_counts_the_definitions_already_stored_as_the_service_does(db: Database) -> None:
    """Definitions saved before the service counted them: the revision adds what the service would have
    counted (else deleting one took back bytes never added), with a row for a tenant that has only
    definitions; its downgrade takes them back."""
    await save_grader(db, "t1", "grd_1", GRADER, GRADER[:10], b"")
    await save_target(db, "t1", "tgt_1")
    await add_dataset(db, "t1", [b"a" * 300], {"notes": "ü" * 100})
    run = new_run("t2", items=2, labels={"größe": "groß"})
    await insert(db, run)
    await save_target(db, "t2", "tgt_2")
    await save_target(db, "t3", "tgt_3")
    tenants = ("t1", "t2", "t3")
    counted = {tenant: await stored(db, tenant) for tenant in tenants}
    assert counted["t2"] == run.stored_bytes + TARGET_BYTES and counted["t3"] == TARGET_BYTES

    async with db.write() as conn:
        await conn.run_sync(_migrate_to("0024", down=True))
        # Before the service counted definitions, a tenant that held only definitions had no totals row.
        await conn.execute(text("DELETE FROM tenant_run_totals WHERE tenant = 't3'"))
    assert {tenant: await stored(db, tenant) for tenant in tenants} == {"t1": 300, "t2": run.stored_bytes, "t3": 0}
    async with db.write() as conn:
        await conn.run_sync(_migrate_to("head", down=False))
    assert {tenant: await stored(db, tenant) for tenant in tenants} == counted
