"""A large CreateRun's items and jobs, written in chunks before its run row.

A run of 100,000 items x 2 repetitions is 300,000 rows. Inserted in the transaction that creates the
run, they held SQLite's one writer 1.5-3 s (6-10 s on PostgreSQL, where the group holds the writers'
lock), and every other tenant's writes - its CreateRuns, claims, recordings - waited behind them: another
tenant's 10-item runs went from 0.07 s to 6 s. So a large run's rows go first, a chunk per transaction
(each about as long as any other group), under the id the run will have, and the run row comes last, in
an ordinary CreateRun group.

Nothing reads a run's items or jobs but through its run row - claims start from the active runs, reads
from a run the caller names - so staged rows are invisible until that row exists. What ties them
together is a `staged_runs` row, written with the first chunk:

- the CreateRun group that inserts the run row deletes it (`take`), in the same transaction: the run and
  all its rows appear at one commit;
- a CreateRun refused in its group (a replayed request_id, a tenant at a limit) or failed after staging
  `abandon`s it: the row goes and a `run_purges` row takes its place, so the purge (evalsvc.store.retention)
  deletes what was staged, in chunks, as it does for a purged run;
- a staging row older than STAGED_FOR_AT_MOST_S (its server crashed, or its CreateRun stalled that long) is
  abandoned by the purge (`abandon_stale`); a SQLite server abandons at start whatever an earlier process
  left. A chunk or a run row that comes after its staging row was abandoned finds it gone and writes
  nothing: `stage` and `take` say so, and the CreateRun fails (the caller may send it again).

Every step is a delete or insert keyed by the run id, so whichever of two PostgreSQL replicas (a CreateRun
on one, the purge on another) deletes the staging row first wins, and the other finds nothing.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.store.bulk import insert_tuples
from evalsvc.store.models import JOB_QUEUED, JobRow, RunItemRow, RunPurgeRow, StagedRunRow

STAGED = StagedRunRow.__table__  # type: ignore[attr-defined]
PURGES = RunPurgeRow.__table__  # type: ignore[attr-defined]
ITEMS = RunItemRow.__table__  # type: ignore[attr-defined]
JOBS = JobRow.__table__  # type: ignore[attr-defined]

# How long a CreateRun may take to stage before the purge takes its rows for a dead server's: far more
# than any CreateRun takes (its deadline is the client's; a staging of 300,000 rows takes seconds).
STAGED_FOR_AT_MOST_S = 3600.0

ITEM_COLUMNS = ("run_id", "idx", "tenant", "item", "digest_with_metadata", "digest_without_metadata")


class ItemDigests(NamedTuple):
    """An item's digests as comparisons compare items (evalsvc.runs.compare `item_digests`), stored with it
    (models.RunItemRow)."""

    with_metadata: bytes
    without_metadata: bytes


JOB_COLUMNS = ("tenant", "run_id", "item_idx", "repetition", "state", "attempt")


@dataclass(frozen=True)
class Chunk:
    """Rows of one staged run for one transaction: its items' rows (ITEM_COLUMNS) and jobs' (JOB_COLUMNS).
    The first chunk of a run writes its staging row."""

    run_id: str
    tenant: str
    items: list[tuple[Any, ...]]
    jobs: list[tuple[Any, ...]]
    first: bool


def item_rows(
    run_id: str, tenant: str, items: Sequence[bytes], digests: Sequence[ItemDigests]
) -> Iterator[tuple[Any, ...]]:
    """A run's items' rows, in ITEM_COLUMNS order, each with its digests (`digests[i]` of `items[i]`)."""
    return ((run_id, idx, tenant, item, *digest) for idx, (item, digest) in enumerate(zip(items, digests, strict=True)))


def job_rows(run_id: str, tenant: str, item_count: int, repetitions: int) -> Iterator[tuple[Any, ...]]:
    """A run's jobs' rows, in JOB_COLUMNS order: every item of the first repetition, then of the next."""
    return ((tenant, run_id, idx, rep, JOB_QUEUED, 0) for rep in range(1, repetitions + 1) for idx in range(item_count))


def chunks(
    run_id: str,
    tenant: str,
    items: Sequence[bytes],
    digests: Sequence[ItemDigests],
    repetitions: int,
    *,
    rows: int,
    item_bytes: int,
) -> Iterator[Chunk]:
    """A run's rows in chunks of at most `rows` rows, and `item_bytes` bytes of items (or one item): its
    items first, then its jobs in the order `job_rows` gives them. Built as they are taken, so the
    rows of a chunk the caller never writes are never built."""
    pending: list[tuple[Any, ...]] = []
    size = 0
    first = True
    for row in item_rows(run_id, tenant, items, digests):
        if pending and (len(pending) >= rows or size + len(row[3]) > item_bytes):
            yield Chunk(run_id, tenant, items=pending, jobs=[], first=first)
            pending, size, first = [], 0, False
        pending.append(row)
        size += len(row[3])
    if pending:
        yield Chunk(run_id, tenant, items=pending, jobs=[], first=first)
        first = False
    jobs = job_rows(run_id, tenant, len(items), repetitions)
    while batch := list(itertools.islice(jobs, rows)):
        yield Chunk(run_id, tenant, items=[], jobs=batch, first=first)
        first = False


async def stage(conn: AsyncConnection, chunk: Chunk) -> bool:
    """Write a chunk of a staged run; False (nothing written) when its staging row is gone: the run
    was abandoned (see the module docstring)."""
    if chunk.first:
        await conn.execute(insert(STAGED).values(run_id=chunk.run_id, tenant=chunk.tenant, stage_time=time.time()))
    else:
        held = select(STAGED.c.run_id).where(STAGED.c.run_id == chunk.run_id)
        if conn.dialect.name == "postgresql":  # an abandon on another replica waits for this commit
            held = held.with_for_update(key_share=True, read=True)
        if (await conn.execute(held)).first() is None:
            return False
    await insert_tuples(conn, ITEMS, ITEM_COLUMNS, chunk.items)
    await insert_tuples(conn, JOBS, JOB_COLUMNS, chunk.jobs)
    return True


async def take(conn: AsyncConnection, run_ids: Sequence[str]) -> set[str]:
    """Delete the staging rows of runs whose run rows this transaction inserts: the ids it found (a run
    whose staging row is gone was abandoned, and must not be inserted)."""
    if not run_ids:
        return set()
    taken = await conn.execute(delete(STAGED).where(STAGED.c.run_id.in_(run_ids)).returning(STAGED.c.run_id))
    return set(taken.scalars())


async def abandon(conn: AsyncConnection, run_ids: Sequence[str]) -> list[str]:
    """Hand staged runs to the purge: their staging rows become `run_purges` rows. The ids of those still
    staged (a run that was inserted, or abandoned already, has no staging row: nothing to do)."""
    if not run_ids:
        return []
    taken = await conn.execute(
        delete(STAGED).where(STAGED.c.run_id.in_(run_ids)).returning(STAGED.c.run_id, STAGED.c.tenant)
    )
    found = sorted(taken.all())
    if found:
        now = time.time()
        await conn.execute(
            insert(PURGES), [{"run_id": run_id, "tenant": tenant, "purge_time": now} for run_id, tenant in found]
        )
    return [run_id for run_id, _ in found]


async def abandon_stale(conn: AsyncConnection, before: float, limit: int) -> list[str]:
    """Abandon up to `limit` runs staged before `before` (see the module docstring)."""
    stale = await conn.execute(
        select(STAGED.c.run_id).where(STAGED.c.stage_time < before).order_by(STAGED.c.stage_time).limit(limit)
    )
    return await abandon(conn, list(stale.scalars()))


async def any_stale(conn: AsyncConnection, before: float) -> bool:
    """Whether a run staged before `before` waits to be abandoned."""
    return (
        await conn.execute(select(STAGED.c.run_id).where(STAGED.c.stage_time < before).limit(1))
    ).first() is not None
