"""Job leases: claim, extend, complete (fenced) and release.

A claim gives a batch of jobs one fresh `claim_id`; how many jobs of each run it takes is the
executor's choice (evalsvc.execution.fairness). Completing a job only succeeds while the job is
still leased under that claim, so a worker that stalled past its lease (and was superseded) or whose
run was cancelled records nothing: the completion is fenced.

Lock order on PostgreSQL, which has row locks and many writers: a transaction locks the jobs it
changes first, in id order (`in_lock_order`; claims skip locked jobs instead of waiting), and only
then their runs, in id order. Claims, recordings, heartbeats and cancels all follow it, so they
wait for each other but never deadlock. SQLite has one writer at a time and needs none of this.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import ColumnElement, or_, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.store.bulk import insert_tuples
from evalsvc.store.models import JOB_DONE, JOB_LEASED, JOB_QUEUED, JobRow, OutputRow, RunItemRow
from evalsvc.store.records import FromRow

JOBS = JobRow.__table__  # type: ignore[attr-defined]
ITEMS = RunItemRow.__table__  # type: ignore[attr-defined]
OUTPUTS = OutputRow.__table__  # type: ignore[attr-defined]


def in_lock_order(conn: AsyncConnection, *conditions: ColumnElement[bool]) -> list[ColumnElement[bool]]:
    """WHERE clauses for a multi-job UPDATE that locks its rows in id order on PostgreSQL.

    A plain UPDATE locks rows in whatever order its plan visits them, so two of them over overlapping
    jobs can deadlock; `id IN (SELECT ... ORDER BY id FOR UPDATE)` takes the locks in one order."""
    if conn.dialect.name != "postgresql":
        return list(conditions)
    locked = select(JOBS.c.id).where(*conditions).order_by(JOBS.c.id).with_for_update()
    return [JOBS.c.id.in_(locked.scalar_subquery())]


def claimable(now: float) -> ColumnElement[bool]:
    """A job any worker may lease now: queued, or leased under a lease that expired."""
    return or_(JOBS.c.state == JOB_QUEUED, (JOBS.c.state == JOB_LEASED) & (JOBS.c.lease_expiry < now))


@dataclass(frozen=True, slots=True)
class ClaimedJob(FromRow):
    """A leased job, as `claim` returns it: one item x repetition of a run, under one claim. Its fields
    are the `jobs` columns the claim returns (`CLAIMED_COLUMNS`), by name."""

    id: int
    tenant: str
    run_id: str
    item_idx: int
    repetition: int
    attempt: int
    claim_id: str


CLAIMED_COLUMNS = tuple(JOBS.c[field.name] for field in fields(ClaimedJob))


async def claim(
    conn: AsyncConnection,
    *,
    owner: str,
    claim_id: str,
    quotas: Mapping[str, int],
    now: float,
    lease_ttl_s: float,
) -> list[ClaimedJob]:
    """Lease up to `quotas[run_id]` claimable jobs of each run, oldest first; jobs are returned by id.

    Each run's share is an index range of that run's jobs. On SQLite the runs' ranges are leased by
    one statement (a UNION ALL of them, SQLITE_CLAIM_RUNS at a time): a claim under many small runs
    is one statement, not one per run. On PostgreSQL it is one statement per run, since a job another
    transaction holds must be skipped, not waited for (`SKIP LOCKED`, which UNION does not allow)."""
    if not quotas:
        return []
    lease_expiry = now + lease_ttl_s
    claimed: list[ClaimedJob] = []
    if conn.dialect.name != "postgresql":
        shares = sorted(quotas.items())
        for start in range(0, len(shares), SQLITE_CLAIM_RUNS):
            params: list[Any] = [JOB_LEASED, claim_id, owner, lease_expiry]
            for run_id, quota in shares[start : start + SQLITE_CLAIM_RUNS]:
                params += [run_id, JOB_QUEUED, JOB_LEASED, now, quota]
            runs = min(SQLITE_CLAIM_RUNS, len(shares) - start)
            leased = await conn.exec_driver_sql(_sqlite_claim_sql(runs), tuple(params))
            claimed.extend(map(ClaimedJob.from_row, leased.mappings()))
        return sorted(claimed, key=lambda job: job.id)
    for run_id, quota in sorted(quotas.items()):
        oldest = (
            select(JOBS.c.id)
            .where(JOBS.c.run_id == run_id, claimable(now))
            .order_by(JOBS.c.id)
            .limit(quota)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        leased = await conn.execute(
            update(JOBS)
            .where(JOBS.c.id.in_(oldest))
            .values(
                state=JOB_LEASED,
                claim_id=claim_id,
                lease_owner=owner,
                lease_expiry=lease_expiry,
                attempt=JOBS.c.attempt + 1,
            )
            .returning(*CLAIMED_COLUMNS)
        )
        claimed.extend(map(ClaimedJob.from_row, leased.mappings()))
    return sorted(claimed, key=lambda job: job.id)


# Runs per claim statement on SQLite, under its limit of 500 terms in one compound SELECT.
SQLITE_CLAIM_RUNS = 400


@functools.cache
def _sqlite_claim_sql(runs: int) -> str:
    """`claim`'s statement on SQLite for `runs` runs, as SQL text (its WHERE is `claimable`, written
    out): built as a SQLAlchemy statement, a UNION of a varying number of ranges was compiled anew
    for most claims (its cache key changes with the count), which cost more of the event loop than
    running it."""
    one_range = (
        f"SELECT id FROM (SELECT id FROM {JOBS.name} WHERE run_id = ? "
        "AND (state = ? OR (state = ? AND lease_expiry < ?)) ORDER BY id LIMIT ?)"
    )
    returned = ", ".join(column.name for column in CLAIMED_COLUMNS)
    return (
        f"UPDATE {JOBS.name} SET state = ?, claim_id = ?, lease_owner = ?, lease_expiry = ?, attempt = attempt + 1 "
        f"WHERE id IN ({' UNION ALL '.join([one_range] * runs)}) RETURNING {returned}"
    )


async def extend(conn: AsyncConnection, claim_ids: Sequence[str], expiry: float) -> None:
    """Keep the leases of claims still being worked on."""
    if claim_ids:
        await conn.execute(
            update(JOBS)
            .where(*in_lock_order(conn, JOBS.c.claim_id.in_(list(claim_ids)), JOBS.c.state == JOB_LEASED))
            .values(lease_expiry=expiry)
        )


async def complete(conn: AsyncConnection, jobs: Iterable[tuple[int, str]]) -> set[int]:
    """Mark jobs done where (job id, claim id) still holds the lease; return the ids that did."""
    pairs = list(jobs)
    if not pairs:
        return set()
    done = await conn.execute(
        update(JOBS)
        .where(*in_lock_order(conn, tuple_(JOBS.c.id, JOBS.c.claim_id).in_(pairs), JOBS.c.state == JOB_LEASED))
        .values(state=JOB_DONE, claim_id=None, lease_expiry=None)
        .returning(JOBS.c.id)
    )
    return {job_id for (job_id,) in done}


OUTPUT_COLUMNS = ("job_id", "tenant", "run_id", "output", "latency_ms", "cost_usd", "item_score", "cached")


def output_tuple(
    *,
    job_id: int,
    tenant: str,
    run_id: str,
    output: bytes,
    latency_ms: float,
    cost_usd: float,
    item_score: float | None,
    cached: bool,
) -> tuple[Any, ...]:
    """An `outputs` row for `store_outputs`: its values in OUTPUT_COLUMNS order, given by name."""
    return (job_id, tenant, run_id, output, latency_ms, cost_usd, item_score, cached)


async def store_outputs(conn: AsyncConnection, rows: list[tuple[Any, ...]]) -> None:
    """Insert the target outputs of completed jobs: tuples in OUTPUT_COLUMNS order (`output_tuple`)."""
    await insert_tuples(conn, OUTPUTS, OUTPUT_COLUMNS, rows)


async def release(conn: AsyncConnection, claim_ids: Sequence[str]) -> None:
    """Hand unfinished jobs of these claims back to the queue (graceful shutdown)."""
    if claim_ids:
        await conn.execute(
            update(JOBS)
            .where(*in_lock_order(conn, JOBS.c.claim_id.in_(list(claim_ids)), JOBS.c.state == JOB_LEASED))
            .values(state=JOB_QUEUED, claim_id=None, lease_owner=None, lease_expiry=None)
        )


async def release_all(conn: AsyncConnection) -> int:
    """Requeue every leased job. Only safe where this process is the database's one server (SQLite)."""
    released = await conn.execute(
        update(JOBS)
        .where(JOBS.c.state == JOB_LEASED)
        .values(state=JOB_QUEUED, claim_id=None, lease_owner=None, lease_expiry=None)
    )
    return int(released.rowcount or 0)


async def run_items(conn: AsyncConnection, run_id: str) -> list[bytes]:
    """A run's copied items, by index."""
    rows = await conn.execute(select(ITEMS.c.item).where(ITEMS.c.run_id == run_id).order_by(ITEMS.c.idx))
    return [item for (item,) in rows]
