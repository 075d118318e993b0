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

from sqlalchemy import ColumnElement, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.store.bulk import in_driver_style, insert_tuples
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
    """Lease up to `quotas[run_id]` claimable jobs of each run: its jobs whose lease expired, then its
    queued jobs, each oldest first. Jobs are returned by id.

    One statement leases every run's share (see `claim_statement`), so a claim under many small runs
    is one statement, not one per run, and it costs the jobs it takes, not the jobs the runs have. On
    PostgreSQL a job another transaction holds is skipped, not waited for (`SKIP LOCKED`), and only
    the jobs taken are locked."""
    postgres = conn.dialect.name == "postgresql"
    shares = sorted(quotas.items())
    step = CLAIM_RUNS if not postgres else max(1, len(shares))  # PostgreSQL: any number in one
    claimed: list[ClaimedJob] = []
    for start in range(0, len(shares), step):
        sql, parameters = claim_statement(
            shares[start : start + step],
            postgres=postgres,
            owner=owner,
            claim_id=claim_id,
            now=now,
            lease_ttl_s=lease_ttl_s,
        )
        leased = await conn.exec_driver_sql(in_driver_style(conn, sql), parameters)
        claimed.extend(map(ClaimedJob.from_columns, leased))  # it returns CLAIMED_COLUMNS
    return sorted(claimed, key=lambda job: job.id)


def claim_statement(
    shares: Sequence[tuple[str, int]],
    *,
    postgres: bool,
    owner: str,
    claim_id: str,
    now: float,
    lease_ttl_s: float,
) -> tuple[str, tuple[Any, ...]]:
    """`claim`'s statement for (run id, quota) shares, as SQL text with `?` placeholders, and its
    parameters. On SQLite at most CLAIM_RUNS shares.

    A run's share is read as two ranges of `ix_jobs_run` (run_id, state, id), each in id order and
    stopped at the share: its lease-expired jobs, then its queued ones. Written as one range with an
    OR of the two states, both engines read and sorted every job of the run for each claim (~70 ms of
    the one SQLite writer per claim of a 200,000-job run, which every other tenant's writes waited
    behind). The text is one of a few, whatever the number of runs: PostgreSQL takes the shares as
    two arrays (a text per number of runs was a prepared statement per number on every connection,
    3 MB of the server's memory per 100 runs each), SQLite's are padded to the next of
    SQLITE_CLAIM_SIZES with empty shares."""
    lease = [JOB_LEASED, claim_id, owner, now + lease_ttl_s]
    if postgres:
        runs = [run_id for run_id, _ in shares]
        limits = [quota for _, quota in shares]
        return _POSTGRES_CLAIM, (*lease, runs, limits, JOB_LEASED, now, JOB_QUEUED)
    size = next(size for size in SQLITE_CLAIM_SIZES if size >= len(shares))
    parameters = lease
    for run_id, quota in [*shares, *[("", 0)] * (size - len(shares))]:
        parameters += [run_id, JOB_LEASED, now, quota, run_id, JOB_QUEUED, quota, quota]
    return _sqlite_claim_sql(size), tuple(parameters)


# Runs per claim statement on SQLite, under its limit of 500 terms in one compound SELECT; the sizes a
# statement is padded to.
CLAIM_RUNS = 400
SQLITE_CLAIM_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, CLAIM_RUNS)
_RETURNED = ", ".join(column.name for column in CLAIMED_COLUMNS)
_LEASE = f"UPDATE {JOBS.name} SET state = ?, claim_id = ?, lease_owner = ?, lease_expiry = ?, attempt = attempt + 1"
_EXPIRED = (
    f"SELECT id FROM {JOBS.name} WHERE run_id = {{run}} AND state = ? AND lease_expiry < ? ORDER BY id LIMIT {{quota}}"
)
_QUEUED = f"SELECT id FROM {JOBS.name} WHERE run_id = {{run}} AND state = ? ORDER BY id LIMIT {{quota}}"
# PostgreSQL runs the ranges in order and stops at the share (a LIMIT over a UNION ALL with no ORDER
# BY), so it locks exactly the jobs it takes: locked and left, they kept other replicas' claims short.
_POSTGRES_CLAIM = (
    f"{_LEASE} WHERE id IN (SELECT share.id FROM unnest(?::text[], ?::int[]) AS s(run_id, quota) CROSS JOIN LATERAL "
    f"(SELECT id FROM ({_EXPIRED.format(run='s.run_id', quota='s.quota')} FOR UPDATE SKIP LOCKED) AS expired "
    f"UNION ALL SELECT id FROM ({_QUEUED.format(run='s.run_id', quota='s.quota')} FOR UPDATE SKIP LOCKED) AS queued "
    "LIMIT s.quota) AS share) "
    f"RETURNING {_RETURNED}"
)


@functools.cache
def _sqlite_claim_sql(runs: int) -> str:
    """The SQLite claim of `runs` shares (see `claim_statement`)."""
    expired = _EXPIRED.format(run="?", quota="?")
    queued = _QUEUED.format(run="?", quota="?")
    share = f"SELECT id FROM (SELECT id FROM ({expired}) UNION ALL SELECT id FROM ({queued}) LIMIT ?)"
    return f"{_LEASE} WHERE id IN ({' UNION ALL '.join([share] * runs)}) RETURNING {_RETURNED}"


async def extend(conn: AsyncConnection, claim_ids: Sequence[str], expiry: float) -> None:
    """Keep the leases of claims still being worked on."""
    if claim_ids:
        await conn.execute(
            update(JOBS)
            .where(*in_lock_order(conn, JOBS.c.claim_id.in_(list(claim_ids)), JOBS.c.state == JOB_LEASED))
            .values(lease_expiry=expiry)
        )


async def complete(conn: AsyncConnection, jobs: Iterable[tuple[int, str]]) -> set[int]:
    """Mark jobs done where (job id, claim id) still holds the lease; return the ids that did.

    COMPLETE_CHUNK pairs per statement, in id order (so PostgreSQL locks them in id order across
    statements too): on PostgreSQL one statement of 8,000 pairs exceeded the stack depth limit, so a
    `--claim-batch` that large recorded nothing."""
    pairs = sorted(jobs)
    done: set[int] = set()
    for start in range(0, len(pairs), COMPLETE_CHUNK):
        chunk = pairs[start : start + COMPLETE_CHUNK]
        completed = await conn.execute(
            update(JOBS)
            .where(*in_lock_order(conn, tuple_(JOBS.c.id, JOBS.c.claim_id).in_(chunk), JOBS.c.state == JOB_LEASED))
            .values(state=JOB_DONE, claim_id=None, lease_expiry=None)
            .returning(JOBS.c.id)
        )
        done.update(job_id for (job_id,) in completed)
    return done


# (job id, claim id) pairs per `complete` statement.
COMPLETE_CHUNK = 1000


async def done_in(conn: AsyncConnection, attempts: Iterable[tuple[int, int]]) -> set[tuple[int, int]]:
    """Of these (job id, attempt) pairs, those whose job is done by that very attempt: each claim of a job
    is a new attempt, so a job `complete` refused that is done in the attempt that finished it was
    recorded before, by an earlier commit of the same finished job (a batch retried after part of it
    committed), not fenced out."""
    pairs = sorted(set(attempts))
    done: set[tuple[int, int]] = set()
    for start in range(0, len(pairs), COMPLETE_CHUNK):
        found = await conn.execute(
            select(JOBS.c.id, JOBS.c.attempt).where(
                tuple_(JOBS.c.id, JOBS.c.attempt).in_(pairs[start : start + COMPLETE_CHUNK]), JOBS.c.state == JOB_DONE
            )
        )
        done.update((job_id, attempt) for job_id, attempt in found)
    return done


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
