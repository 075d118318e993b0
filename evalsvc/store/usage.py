"""A tenant's totals (`tenant_run_totals`): its stored runs, its purged runs' spend, and the bytes it stores.

The bytes a tenant stores bound it (--max-stored-bytes-per-tenant), so that one tenant cannot fill the
disk every tenant shares. They are counted as data is written, never by reading it back:

- a run: its definition and its copied items when it is created (`new_run_bytes`); every recording adds
  its outputs, serialized, and per result `RESULT_BYTES` plus its explanation and error reason twice (the
  result's row and its event each hold them: `result_bytes`). A run keeps its own sum (`runs.stored_bytes`),
  which its tenant's total loses when the run is purged (deleted runs count until then).
- a dataset's items, serialized, as they are appended; DeleteDataset takes them back.
- the response cache's entries (outputs and verdicts, evalsvc.store.cache), as they are stored or
  replaced; eviction and `evalsvc cache prune` take them back.

It is what the tenant's data takes, not the database's pages (free space, the engine's own overhead;
each result's share of its rows and indexes is estimated by RESULT_BYTES), and text is counted in
characters. Saved graders, targets, secrets and webhooks are bounded by their counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.store import quotas
from evalsvc.store.models import RunRow, TenantRunTotalsRow

RUNS = RunRow.__table__  # type: ignore[attr-defined]
TOTALS = TenantRunTotalsRow.__table__  # type: ignore[attr-defined]
# What a result takes beyond its texts: its row, its event, its job's row and their index entries (ids,
# state, scores, times, counts). An estimate, so that a run of many small results counts what it takes:
# with 160, a SQLite file of runs with 100-byte replies was 2.6 times the bytes counted (docs/operations.md).
RESULT_BYTES = 512


def new_run_bytes(spec: bytes, items: Sequence[bytes]) -> int:
    """What a new run stores: its serialized definition and its copied items."""
    return len(spec) + sum(map(len, items))


def result_bytes(explanation: str, error_reason: str) -> int:
    """What one result stores (see the module docstring)."""
    return RESULT_BYTES + 2 * (len(explanation) + len(error_reason))


async def lock(conn: AsyncConnection, tenants: Sequence[str]) -> None:
    """Hold the lock under which a tenant's stored bytes (and stored runs) are checked and raised, so that
    two replicas' writes cannot both take the last room (store.quotas): the runs table's, which CreateRun
    takes first."""
    await quotas.lock(conn, RUNS, tenants)


async def held_bytes(conn: AsyncConnection, tenant: str) -> int:
    """The bytes a tenant stores, read under its lock (`lock`) in the transaction that adds to them."""
    await lock(conn, [tenant])
    found = await conn.execute(select(TOTALS.c.stored_bytes).where(TOTALS.c.tenant == tenant))
    return int(found.scalar() or 0)


async def stored_bytes(conn: AsyncConnection, tenants: Sequence[str]) -> dict[str, int]:
    """The bytes each of these tenants stores, as last committed (no lock: for the executor's view)."""
    found = await conn.execute(
        select(TOTALS.c.tenant, TOTALS.c.stored_bytes).where(TOTALS.c.tenant.in_(sorted(set(tenants))))
    )
    held = {tenant: int(n) for tenant, n in found}
    return {tenant: held.get(tenant, 0) for tenant in tenants}


async def add_to_totals(
    conn: AsyncConnection,
    *,
    runs: Mapping[str, int] | None = None,
    purged_cost_usd: Mapping[str, float] | None = None,
    stored_bytes: Mapping[str, int] | None = None,
) -> None:
    """Add to tenants' totals (creating a tenant's row at its first write): `runs` stored (negative when
    purged), the spend of runs purged, and `stored_bytes` (negative when taken back). One upsert per tenant
    in one driver executemany, in tenant order (the lock order on PostgreSQL)."""
    runs, purged_cost_usd, stored_bytes = runs or {}, purged_cost_usd or {}, stored_bytes or {}
    tenants = sorted(set(runs) | set(purged_cost_usd) | set(stored_bytes))
    if not tenants:
        return
    dialect_insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    statement = dialect_insert(TOTALS)
    await conn.execute(
        statement.on_conflict_do_update(
            index_elements=[TOTALS.c.tenant],
            set_={
                "runs": TOTALS.c.runs + statement.excluded.runs,
                "purged_cost_usd": TOTALS.c.purged_cost_usd + statement.excluded.purged_cost_usd,
                "stored_bytes": TOTALS.c.stored_bytes + statement.excluded.stored_bytes,
            },
        ),
        [
            {
                "tenant": tenant,
                "runs": runs.get(tenant, 0),
                "purged_cost_usd": purged_cost_usd.get(tenant, 0.0),
                "stored_bytes": stored_bytes.get(tenant, 0),
            }
            for tenant in tenants
        ],
    )
