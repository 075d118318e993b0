"""Queries on the response cache (cache_entries): look up, store, touch, evict, prune.

Entries are written by the recorder in the transaction that records the results using them, so a
committed result's entry is committed too, and caching costs no extra commit (no extra fsync).

Entries count towards their tenant's stored bytes (evalsvc.store.usage): what stores or deletes them
returns the change in bytes by tenant, and the caller adds it to the tenants' totals where its
transaction takes that row's lock (the recorder: after its runs' rows, the lock order).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Delete, delete, func, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import ReturningDelete

from evalsvc.store.models import CacheEntryRow

ENTRIES = CacheEntryRow.__table__  # type: ignore[attr-defined]
LOOKUP_CHUNK = 400  # (tenant, key) pairs per SELECT: under SQLite's 999-variable floor


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """A cached output or verdict, as the executor reads and the recorder writes it."""

    tenant: str
    key: str
    kind: int
    payload: bytes
    cost_usd: float


async def fetch(conn: AsyncConnection, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], CacheEntry]:
    """The entries of these (tenant, key) pairs that exist."""
    found: dict[tuple[str, str], CacheEntry] = {}
    for start in range(0, len(keys), LOOKUP_CHUNK):
        chunk = keys[start : start + LOOKUP_CHUNK]
        rows = await conn.execute(
            select(ENTRIES.c.tenant, ENTRIES.c.key, ENTRIES.c.kind, ENTRIES.c.payload, ENTRIES.c.cost_usd).where(
                tuple_(ENTRIES.c.tenant, ENTRIES.c.key).in_(chunk)
            )
        )
        for tenant, key, kind, payload, cost in rows:
            found[(tenant, key)] = CacheEntry(tenant, key, kind, payload, cost)
    return found


@dataclass
class Removed:
    """Entries deleted: how many, and their payloads' bytes by tenant (what their tenants' stored bytes lose)."""

    rows: int = 0
    freed: Counter[str] = field(default_factory=Counter)

    def add(self, rows: Iterable[Sequence[Any]]) -> Removed:
        """Count deleted rows given as (tenant, payload length); returns itself."""
        for tenant, size in rows:
            self.rows += 1
            self.freed[tenant] += int(size)
        return self


async def store(conn: AsyncConnection, entries: Sequence[CacheEntry], now: float) -> Counter[str]:
    """Insert entries, replacing any with the same key (REFRESH, or two runs that missed at once);
    returns the change in stored bytes by tenant (a replaced payload's bytes are given back).

    Rows go in key order, as `touch` updates them: two replicas recording the same keys on
    PostgreSQL lock them in one order and wait for each other instead of deadlocking."""
    grown: Counter[str] = Counter()
    if not entries:
        return grown
    latest = {(e.tenant, e.key): e for e in entries}  # one row per key in one statement
    keys = sorted(latest)
    for start in range(0, len(keys), LOOKUP_CHUNK):
        replaced = await conn.execute(
            select(ENTRIES.c.tenant, func.length(ENTRIES.c.payload)).where(
                tuple_(ENTRIES.c.tenant, ENTRIES.c.key).in_(keys[start : start + LOOKUP_CHUNK])
            )
        )
        for tenant, size in replaced:
            grown[tenant] -= int(size)
    for (tenant, _), entry in latest.items():
        grown[tenant] += len(entry.payload)
    dialect_insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    statement = dialect_insert(ENTRIES)
    await conn.execute(
        statement.on_conflict_do_update(
            index_elements=[ENTRIES.c.tenant, ENTRIES.c.key],
            set_={
                "kind": statement.excluded.kind,
                "payload": statement.excluded.payload,
                "cost_usd": statement.excluded.cost_usd,
                "create_time": statement.excluded.create_time,
                "last_used": statement.excluded.last_used,
            },
        ),
        [
            {
                "tenant": e.tenant,
                "key": e.key,
                "kind": e.kind,
                "payload": e.payload,
                "cost_usd": e.cost_usd,
                "create_time": now,
                "last_used": now,
            }
            for _, e in sorted(latest.items())
        ],
    )
    return grown


async def touch(conn: AsyncConnection, keys: Iterable[tuple[str, str]], now: float) -> None:
    """Mark entries used now (what least-recently-used eviction orders by)."""
    pairs = sorted(set(keys))
    for start in range(0, len(pairs), LOOKUP_CHUNK):
        await conn.execute(
            update(ENTRIES)
            .where(tuple_(ENTRIES.c.tenant, ENTRIES.c.key).in_(pairs[start : start + LOOKUP_CHUNK]))
            .values(last_used=now)
        )


def _deleted(query: Delete) -> ReturningDelete[Any, Any]:
    """A delete of entries that returns each one's tenant and payload length."""
    return query.returning(ENTRIES.c.tenant, func.length(ENTRIES.c.payload))


async def evict(conn: AsyncConnection, tenant: str, max_entries: int) -> Removed:
    """Delete a tenant's least recently used entries beyond max_entries."""
    counted = await conn.execute(select(func.count()).select_from(ENTRIES).where(ENTRIES.c.tenant == tenant))
    count = int(counted.scalar_one())
    excess = count - max_entries
    if excess <= 0:
        return Removed()
    oldest = (
        select(ENTRIES.c.key)
        .where(ENTRIES.c.tenant == tenant)
        .order_by(ENTRIES.c.last_used, ENTRIES.c.key)
        .limit(excess)
        .scalar_subquery()
    )
    deleted = await conn.execute(_deleted(delete(ENTRIES).where(ENTRIES.c.tenant == tenant, ENTRIES.c.key.in_(oldest))))
    return Removed().add(deleted)


async def delete_tenant(conn: AsyncConnection, tenant: str) -> Removed:
    """Remove every entry of a tenant."""
    deleted = await conn.execute(_deleted(delete(ENTRIES).where(ENTRIES.c.tenant == tenant)))
    return Removed().add(deleted)


async def delete_unused_since(conn: AsyncConnection, before: float, tenant: str | None = None) -> Removed:
    """Remove entries not used since `before` (UNIX seconds), of one tenant or all."""
    query = delete(ENTRIES).where(ENTRIES.c.last_used < before)
    if tenant is not None:
        query = query.where(ENTRIES.c.tenant == tenant)
    deleted = await conn.execute(_deleted(query))
    return Removed().add(deleted)


async def counts(conn: AsyncConnection) -> Mapping[str, int]:
    """Entries per tenant."""
    rows = await conn.execute(select(ENTRIES.c.tenant, func.count()).group_by(ENTRIES.c.tenant))
    return {tenant: int(n) for tenant, n in rows}
