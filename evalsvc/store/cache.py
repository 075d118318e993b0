"""Queries on the response cache (cache_entries): look up, store, touch, evict, prune.

Entries are written by the recorder in the transaction that records the results using them, so a
committed result's entry is committed too, and caching costs no extra commit (no extra fsync).

A tenant's entries are bounded by count (--cache-max-entries) and by their payloads' bytes
(--cache-max-bytes), least recently used evicted first; they are not part of its stored bytes
(--max-stored-bytes-per-tenant): the cache makes room for itself and never refuses a tenant anything. The
bytes are counted in the tenant's totals (`usage.cache_bytes`): what stores or deletes entries returns the
change by tenant, and the caller adds it to the totals where its transaction takes that row's lock (the
recorder: after its runs' rows, the lock order).
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

from evalsvc.store.bulk import execute_many
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
    """Entries deleted: how many, and their payloads' bytes by tenant (what their tenants' cache bytes lose)."""

    rows: int = 0
    freed: Counter[str] = field(default_factory=Counter)

    def add(self, rows: Iterable[Sequence[Any]]) -> Removed:
        """Count deleted rows given as (tenant, payload length); returns itself."""
        for tenant, size in rows:
            self.rows += 1
            self.freed[tenant] += int(size)
        return self


_REPLACE = (
    "UPDATE cache_entries SET kind = ?, payload = ?, cost_usd = ?, create_time = ?, last_used = ? "
    "WHERE tenant = ? AND key = ?"
)


async def store(conn: AsyncConnection, entries: Sequence[CacheEntry], now: float) -> Counter[str]:
    """Insert entries, replacing any with the same key (REFRESH, or two runs that missed at once);
    returns the change in the tenants' cache bytes (a replaced payload's bytes are given back).

    New keys are inserted, and the keys that exist are read under their row locks and then replaced, so
    each payload is counted once however two replicas' recordings of one key interleave on PostgreSQL (an
    upsert cannot say what it replaced: both counted the whole payload, and the second's was never given
    back). Rows go in key order, as `touch` updates them: two replicas recording the same keys lock them
    in one order and wait for each other instead of deadlocking."""
    grown: Counter[str] = Counter()
    if not entries:
        return grown
    latest = dict(sorted({(e.tenant, e.key): e for e in entries}.items()))  # one row per key, in key order
    dialect_insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    inserted = await conn.execute(
        dialect_insert(ENTRIES)
        .on_conflict_do_nothing(index_elements=[ENTRIES.c.tenant, ENTRIES.c.key])
        .returning(ENTRIES.c.tenant, ENTRIES.c.key),
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
            for e in latest.values()
        ],
    )
    for tenant, key in inserted:
        grown[tenant] += len(latest.pop((tenant, key)).payload)
    existing = list(latest)  # the keys another write stored first: replaced
    for start in range(0, len(existing), LOOKUP_CHUNK):
        query = select(ENTRIES.c.tenant, func.length(ENTRIES.c.payload)).where(
            tuple_(ENTRIES.c.tenant, ENTRIES.c.key).in_(existing[start : start + LOOKUP_CHUNK])
        )
        replaced = await conn.execute(
            query.order_by(ENTRIES.c.tenant, ENTRIES.c.key).with_for_update()
            if conn.dialect.name == "postgresql"
            else query
        )
        for tenant, size in replaced:
            grown[tenant] -= int(size)
    await execute_many(
        conn, _REPLACE, [(e.kind, e.payload, e.cost_usd, now, now, e.tenant, e.key) for e in latest.values()]
    )
    for (tenant, _), entry in latest.items():
        grown[tenant] += len(entry.payload)
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


async def evict(conn: AsyncConnection, tenant: str, max_entries: int, max_bytes: int, held_bytes: int) -> Removed:
    """Delete a tenant's least recently used entries until it holds at most max_entries and max_bytes
    (`held_bytes`: the payload bytes it holds now, as its totals count them: `usage.cache_bytes` plus what
    the caller's transaction stored). Read oldest first a chunk at a time, so a tenant just over its
    bounds reads a few of its entries, not all of them."""
    counted = await conn.execute(select(func.count()).select_from(ENTRIES).where(ENTRIES.c.tenant == tenant))
    rows_over, bytes_over = int(counted.scalar_one()) - max_entries, held_bytes - max_bytes
    doomed: list[str] = []
    after: tuple[float, str] | None = None
    while rows_over > 0 or bytes_over > 0:
        query = (
            select(ENTRIES.c.last_used, ENTRIES.c.key, func.length(ENTRIES.c.payload))
            .where(ENTRIES.c.tenant == tenant)
            .order_by(ENTRIES.c.last_used, ENTRIES.c.key)
            .limit(LOOKUP_CHUNK)
        )
        if after is not None:
            query = query.where(tuple_(ENTRIES.c.last_used, ENTRIES.c.key) > after)
        page = (await conn.execute(query)).all()
        for last_used, key, size in page:
            if rows_over <= 0 and bytes_over <= 0:
                break
            doomed.append(key)
            rows_over, bytes_over = rows_over - 1, bytes_over - int(size)
            after = (last_used, key)
        if len(page) < LOOKUP_CHUNK:
            break
    removed = Removed()
    for start in range(0, len(doomed), LOOKUP_CHUNK):
        chunk = doomed[start : start + LOOKUP_CHUNK]
        removed.add(
            await conn.execute(_deleted(delete(ENTRIES).where(ENTRIES.c.tenant == tenant, ENTRIES.c.key.in_(chunk))))
        )
    return removed


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


async def has_entries(conn: AsyncConnection, tenant: str) -> bool:
    """Whether the tenant has any entry (one row down the primary key, whatever the table's size)."""
    return (await conn.execute(select(ENTRIES.c.key).where(ENTRIES.c.tenant == tenant).limit(1))).first() is not None


async def counts(conn: AsyncConnection) -> Mapping[str, int]:
    """Entries per tenant."""
    rows = await conn.execute(select(ENTRIES.c.tenant, func.count()).group_by(ENTRIES.c.tenant))
    return {tenant: int(n) for tenant, n in rows}
