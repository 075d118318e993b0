"""Counting what a tenant holds, for its caps (evalsvc.limits.StoredCap), race-free.

A cap is checked by counting the tenant's rows and adding one in the same write transaction. On
SQLite that transaction is alone: one writer per file, whose transactions the group writer runs one
after another. On PostgreSQL two replicas' transactions run at once, and at READ COMMITTED each counts
without the other's uncommitted row: both would see room for one and both insert. So the count is
taken under a transaction-scoped advisory lock of (table, tenant): the second waits until the first
commits, then counts its row too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection


async def lock(conn: AsyncConnection, table: Any, tenants: Iterable[str]) -> None:
    """On PostgreSQL, hold the (table, tenant) lock of each of these tenants, in sorted order, to the end
    of this transaction: counts of their rows taken afterwards miss no concurrent addition."""
    if conn.dialect.name != "postgresql":
        return
    for tenant in sorted(set(tenants)):
        await conn.execute(
            text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": f"{table.name}\x1f{tenant}"}
        )


async def held(conn: AsyncConnection, table: Any, tenant: str) -> int:
    """How many rows of `table` the tenant has, counted so that no concurrent transaction adds one
    the count misses before this one ends (see the module docstring)."""
    await lock(conn, table, [tenant])
    found = await conn.execute(select(func.count()).select_from(table).where(table.c.tenant == tenant))
    return int(found.scalar_one())
