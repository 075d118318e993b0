"""Cheap aggregate counts for the metrics endpoint, across tenants.

Both queries are answered from an index (`ix_runs_active` on runs.status, `ix_jobs_claimable` on
jobs.state), so a scrape costs an index scan, not a table scan of run definitions.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.store.models import JOB_QUEUED, JobRow, RunRow
from evalsvc.store.staging import PURGES, STAGED

RUNS = RunRow.__table__  # type: ignore[attr-defined]
JOBS = JobRow.__table__  # type: ignore[attr-defined]


async def runs_by_status(conn: AsyncConnection) -> dict[int, int]:
    """Number of runs per `RunStatus` value; statuses with no run are absent."""
    rows = await conn.execute(select(RUNS.c.status, func.count()).group_by(RUNS.c.status))
    return {int(status): int(count) for status, count in rows}


async def queued_jobs(conn: AsyncConnection) -> int:
    """Jobs waiting for a worker (not leased, done or cancelled): not those of a CreateRun still staging
    or abandoned (evalsvc.store.staging), which no worker takes."""
    unclaimable = select(STAGED.c.run_id).union_all(select(PURGES.c.run_id))
    waiting = select(func.count()).where(JOBS.c.state == JOB_QUEUED, JOBS.c.run_id.not_in(unclaimable))
    return int((await conn.execute(waiting)).scalar_one())
