"""Purging soft-deleted runs once their retention has passed (AIP-164), in short transactions.

A run of 200,000 jobs has a million rows or more (items, jobs, outputs, results, events), and every
write of the service waits for SQLite's one writer: deleting them in one transaction would hold every
tenant's writes for seconds. So a purge is two kinds of step, each its own short transaction:

1. `expire`: a few runs deleted before the cutoff lose their run row and labels, and each gets a
   `run_purges` row instead. From that commit on the run is NOT_FOUND everywhere (GetRun, ListRuns,
   UndeleteRun, WatchRun: on PostgreSQL the commit notifies RUNS_PURGED_CHANNEL, and every replica
   ends its watches of the run), and its tenant's `tenant_run_totals` row counts one run fewer, keeps
   what the run had spent (its budget must not drop when its runs go) and loses the bytes it stored.
2. `purge_step`: up to a budget of rows of one such run are deleted, table by table; the step that
   finds none left deletes its `run_purges` row.

Replicas of a PostgreSQL database purge at once without stepping on each other: `expire` locks the runs
it takes with SKIP LOCKED (a run another replica is taking, or an UndeleteRun holds, is skipped) and a
run row can be deleted once, so `RETURNING` gives each expired run to one transaction alone and its
spend is added once; `purge_step` holds its `run_purges` row (FOR UPDATE SKIP LOCKED) while it deletes
that run's rows, so two replicas work on different runs. Nothing writes rows of a run whose row is gone
(its jobs were cancelled when it was deleted, and the recorder's fence finds no leased job), so a step
that finds fewer rows than it asked for has emptied that table.

Deleted datasets and saved graders go the same way, without a retention: DeleteDataset (DeleteGrader)
takes the dataset (grader) out of the service in one short transaction, with a `definition_purges` row
in its place (evalsvc.store.datasets.remove, evalsvc.store.definitions.remove_grader), and then
`definition_purge_step` deletes its items (versions), a chunk of at most CHUNK_ROWS rows and about
CHUNK_BYTES per transaction; the bytes left the tenant's stored bytes with the owner's row, so a chunk
only deletes rows and a crash between chunks leaves the total exact. The call answers once the row's
transaction commits and wakes the purge loop (evalsvc.runs.retention), whose passes delete the chunks
(and finish what a stopped server left); an owner whose step fails is skipped, the others still go.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Delete, Select, delete, func, insert, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.ids import PROCESS_ID
from evalsvc.store import datasets as dataset_store
from evalsvc.store import definitions as definition_store
from evalsvc.store import runs as run_store
from evalsvc.store import usage
from evalsvc.store.db import is_conflict, unavailable_cause
from evalsvc.store.events import EVENTS, RUNS_PURGED_CHANNEL
from evalsvc.store.models import RunPurgeRow
from evalsvc.store.run_cache import remember_removed
from evalsvc.store.webhooks import DELIVERIES

RUNS = run_store.RUNS
PURGES = RunPurgeRow.__table__  # type: ignore[attr-defined]
DEFINITION_PURGES = dataset_store.PURGES
# Rows one transaction deletes, at most: ~25 ms of SQLite's writer, against 3.4 s for a 900,000-row run
# deleted whole, which every other write waited for (docs/operations.md, "Retention of deleted runs").
CHUNK_ROWS = 1000
# Bytes of dataset items (grader versions) one transaction deletes, about (one row, when it is larger):
# deleting is ~4.6 s a GB on SQLite, and an item may be megabytes.
CHUNK_BYTES = 8 << 20


def _skip_locked(query: Select[Any], conn: AsyncConnection) -> Select[Any]:
    """On PostgreSQL, the rows the query finds locked to the end of the transaction, skipping those another
    transaction holds; SQLite has one writer, and no row locks."""
    return query.with_for_update(skip_locked=True) if conn.dialect.name == "postgresql" else query


async def expire(conn: AsyncConnection, cutoff: float, limit: int) -> list[str]:
    """Take up to `limit` runs deleted before `cutoff` out of the service (step 1 of the module
    docstring); the ids of the runs this transaction took, oldest deletions first."""
    chosen = _skip_locked(
        select(RUNS.c.id)
        .where(RUNS.c.delete_time.is_not(None), RUNS.c.delete_time < cutoff)
        .order_by(RUNS.c.delete_time)
        .limit(limit),
        conn,
    )
    taken = await conn.execute(
        delete(RUNS)
        .where(RUNS.c.id.in_(chosen.scalar_subquery()), RUNS.c.delete_time < cutoff)
        .returning(RUNS.c.id, RUNS.c.tenant, RUNS.c.cost_usd, RUNS.c.stored_bytes)
    )
    expired = sorted(taken.all())
    if not expired:
        return []
    run_ids = [run_id for run_id, *_ in expired]
    await conn.execute(delete(run_store.LABELS).where(run_store.LABELS.c.run_id.in_(run_ids)))
    now = time.time()
    await conn.execute(
        insert(PURGES), [{"run_id": run_id, "tenant": tenant, "purge_time": now} for run_id, tenant, *_ in expired]
    )
    spent: defaultdict[str, float] = defaultdict(float)
    freed: defaultdict[str, int] = defaultdict(int)
    for _, tenant, cost_usd, stored_bytes in expired:
        spent[tenant] += float(cost_usd or 0.0)
        freed[tenant] -= int(stored_bytes)
    purged = Counter(tenant for _, tenant, *_ in expired)
    await usage.add_to_totals(
        conn, runs={tenant: -n for tenant, n in purged.items()}, purged_cost_usd=spent, stored_bytes=freed
    )
    for run_id in run_ids:
        remember_removed(conn, run_id)
    if conn.dialect.name == "postgresql":  # delivered at commit: every replica ends its watches of them
        await conn.execute(
            select(*(func.pg_notify(RUNS_PURGED_CHANNEL, f"{PROCESS_ID}|{run_id}") for run_id in run_ids))
        )
    return run_ids


@dataclass(frozen=True)
class PurgeStep:
    """What one `purge_step` did: the run it worked on, the rows it deleted, and whether that run is
    gone for good (its `run_purges` row deleted too)."""

    run_id: str
    rows: int
    finished: bool


async def purge_step(conn: AsyncConnection, budget: int) -> PurgeStep | None:
    """Delete up to about `budget` rows of one run whose row was purged (step 2 of the module
    docstring): None when no run is waiting (or, on PostgreSQL, every one is another replica's now)."""
    held = await conn.execute(
        _skip_locked(select(PURGES.c.run_id).order_by(PURGES.c.purge_time, PURGES.c.run_id).limit(1), conn)
    )
    run_id: str | None = held.scalar_one_or_none()
    if run_id is None:
        return None
    left = budget
    for step in _STEPS:
        deleted, emptied = await step(conn, run_id, left)
        left -= deleted
        if not emptied or left <= 0:  # the next step comes back to what is left
            return PurgeStep(run_id, budget - left, finished=False)
    await conn.execute(delete(PURGES).where(PURGES.c.run_id == run_id))
    return PurgeStep(run_id, budget - left, finished=True)


async def pending(conn: AsyncConnection, cutoff: float) -> bool:
    """Whether anything waits for the purge: a run deleted before `cutoff`, or one whose rows remain, or a
    deleted dataset (grader) whose items (versions) remain."""
    deleted = select(RUNS.c.id).where(RUNS.c.delete_time.is_not(None), RUNS.c.delete_time < cutoff).limit(1)
    if (await conn.execute(deleted)).first() is not None:
        return True
    if (await conn.execute(select(PURGES.c.run_id).limit(1))).first() is not None:
        return True
    return (await conn.execute(select(DEFINITION_PURGES.c.owner_id).limit(1))).first() is not None


@dataclass(frozen=True)
class DefinitionPurgeStep:
    """What one `definition_purge_step` did: the deleted dataset (grader) it worked on, the items
    (versions) it deleted, and whether they were its last (its `definition_purges` row deleted too)."""

    kind: str
    owner_id: str
    rows: int
    finished: bool


# Of each kind of `definition_purges` row: the table of its parts, the column naming their owner, the
# column ordering them, and the column of their size (a chunk holds about CHUNK_BYTES of it).
_PARTS: dict[str, tuple[Any, str, str, str]] = {
    dataset_store.DATASET_PARTS: (dataset_store.ITEMS, "dataset_id", "idx", "item"),
    definition_store.GRADER_PARTS: (definition_store.VERSIONS, "grader_id", "version", "definition"),
}


class DefinitionPurgeFailed(Exception):
    """A `definition_purge_step` failed on this (kind, owner id): its cause is the error."""

    def __init__(self, owner: tuple[str, str]) -> None:
        super().__init__(f"purging the parts of deleted {owner[0]} {owner[1]} failed")
        self.owner = owner


async def definition_purge_step(
    conn: AsyncConnection,
    *,
    budget: int = CHUNK_ROWS,
    budget_bytes: int = CHUNK_BYTES,
    skip: Collection[tuple[str, str]] = (),
) -> DefinitionPurgeStep | None:
    """Delete the first parts of the deleted dataset (grader) deleted first, up to `budget` rows and
    about `budget_bytes` (their bytes left the tenant's stored bytes with the owner's row). None when
    none waits (or, on PostgreSQL, every one is another transaction's now: its `definition_purges` row is
    held FOR UPDATE while its parts are deleted, and nothing else writes parts of an owner whose row is
    gone, so what this step reads it deletes), or every one left is in `skip`. Raises
    DefinitionPurgeFailed naming the owner when its step fails (the purge loop skips it, and the owners
    after it still go); a database that is unavailable or a conflict as they are (no owner's fault: the
    loop backs off and tries again)."""
    query = select(DEFINITION_PURGES.c.kind, DEFINITION_PURGES.c.owner_id)
    if skip:
        query = query.where(
            tuple_(DEFINITION_PURGES.c.kind, DEFINITION_PURGES.c.owner_id).not_in([tuple(key) for key in skip])
        )
    query = query.order_by(DEFINITION_PURGES.c.purge_time, DEFINITION_PURGES.c.owner_id).limit(1)
    found = (await conn.execute(_skip_locked(query, conn))).first()
    if found is None:
        return None
    kind, owner_id = found
    try:
        return await _delete_parts(conn, kind, owner_id, budget, budget_bytes)
    except Exception as exc:
        if unavailable_cause(exc) is not None or is_conflict(exc):
            raise  # the database's trouble, not this owner's: the loop's, retried as any of its failures
        raise DefinitionPurgeFailed((kind, owner_id)) from exc


async def _delete_parts(
    conn: AsyncConnection, kind: str, owner_id: str, budget: int, budget_bytes: int
) -> DefinitionPurgeStep:
    table, owner_column, order_column, size_column = _PARTS[kind]
    of_owner = table.c[owner_column] == owner_id
    sized = await conn.execute(
        select(table.c[order_column], func.length(table.c[size_column]))
        .where(of_owner)
        .order_by(table.c[order_column])
        .limit(budget)
    )
    sizes = [(position, int(size)) for position, size in sized]
    kept = freed = 0
    for _, size in sizes:
        if kept and freed + size > budget_bytes:
            break
        kept += 1
        freed += size
    if kept:
        # The first `kept` parts in order: those up to the last of them.
        await conn.execute(delete(table).where(of_owner, table.c[order_column] <= sizes[kept - 1][0]))
    finished = kept == len(sizes) < budget
    if finished:
        await conn.execute(
            delete(DEFINITION_PURGES).where(DEFINITION_PURGES.c.kind == kind, DEFINITION_PURGES.c.owner_id == owner_id)
        )
    return DefinitionPurgeStep(kind, owner_id, kept, finished)


# Each deletes up to `limit` rows of one run from its table(s), through an index that starts with the
# run id (a range of the run's own rows, whatever the table holds besides): how many, and whether that
# emptied the table of the run's rows.
Deleted = tuple[int, bool]


async def _results(conn: AsyncConnection, run_id: str, limit: int) -> Deleted:
    table = run_store.RESULTS  # by ix_results_run_state (run_id, state, id)
    chosen = select(table.c.id).where(table.c.run_id == run_id).limit(limit).scalar_subquery()
    return _of(limit, await _deleted(conn, delete(table).where(table.c.id.in_(chosen))))


async def _events(conn: AsyncConnection, run_id: str, limit: int) -> Deleted:
    chosen = select(EVENTS.c.seq).where(EVENTS.c.run_id == run_id).limit(limit).scalar_subquery()
    return _of(limit, await _deleted(conn, delete(EVENTS).where(EVENTS.c.run_id == run_id, EVENTS.c.seq.in_(chosen))))


async def _jobs_and_outputs(conn: AsyncConnection, run_id: str, limit: int) -> Deleted:
    """Jobs with their outputs (at most one each, so half the limit in jobs): `outputs` has no index on
    run_id, so a run's outputs are found by its jobs' ids (ix_jobs_run), and deleted with them."""
    jobs, outputs = run_store.JOBS, run_store.OUTPUTS
    wanted = limit // 2
    if wanted == 0:
        return 0, False  # no room for a job and its output in this step: the next one comes back
    found = await conn.execute(select(jobs.c.id).where(jobs.c.run_id == run_id).limit(wanted))
    job_ids = list(found.scalars())
    if not job_ids:
        return 0, True
    gone = await _deleted(conn, delete(outputs).where(outputs.c.job_id.in_(job_ids)))
    gone += await _deleted(conn, delete(jobs).where(jobs.c.id.in_(job_ids)))
    return gone, len(job_ids) < wanted


async def _items(conn: AsyncConnection, run_id: str, limit: int) -> Deleted:
    table = run_store.ITEMS  # by its primary key (run_id, idx)
    chosen = select(table.c.idx).where(table.c.run_id == run_id).limit(limit).scalar_subquery()
    return _of(limit, await _deleted(conn, delete(table).where(table.c.run_id == run_id, table.c.idx.in_(chosen))))


async def _deliveries(conn: AsyncConnection, run_id: str, limit: int) -> Deleted:
    chosen = select(DELIVERIES.c.id).where(DELIVERIES.c.run_id == run_id).limit(limit).scalar_subquery()
    return _of(limit, await _deleted(conn, delete(DELIVERIES).where(DELIVERIES.c.id.in_(chosen))))


def _of(limit: int, deleted: int) -> Deleted:
    """A step that deleted fewer rows than it asked for found no more."""
    return deleted, deleted < limit


async def _deleted(conn: AsyncConnection, statement: Delete) -> int:
    done = await conn.execute(statement)
    return int(done.rowcount or 0)


# Every table with rows of a run, but `runs` and `run_labels` (gone in `expire`). A table that gains a
# run_id column needs a step here: tests/unit/store/test_retention.py checks the models for it. Webhook
# deliveries first: one whose event was gone would stay pending (the sender reads the event with it).
_STEPS: tuple[Callable[[AsyncConnection, str, int], Awaitable[Deleted]], ...] = (
    _deliveries,
    _results,
    _events,
    _jobs_and_outputs,
    _items,
)
# The tables the steps empty, for that check.
PURGED_TABLES = ("results", "events", "jobs", "outputs", "run_items", "webhook_deliveries")
