"""Queries on API keys."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.store.models import ApiKeyRow
from evalsvc.store.records import ApiKeyRecord

KEYS = ApiKeyRow.__table__  # type: ignore[attr-defined]


async def insert_key(conn: AsyncConnection, key: ApiKeyRecord) -> None:
    """Store a new key."""
    await conn.execute(insert(KEYS).values(**asdict(key)))


async def get(conn: AsyncConnection, key_id: str) -> ApiKeyRecord | None:
    """A key by id."""
    found = await conn.execute(select(KEYS).where(KEYS.c.id == key_id))
    row = found.mappings().first()
    return None if row is None else ApiKeyRecord.from_row(row)


async def get_many(conn: AsyncConnection, key_ids: Sequence[str]) -> list[ApiKeyRecord]:
    """The keys among `key_ids` that exist."""
    found = await conn.execute(select(KEYS).where(KEYS.c.id.in_(list(key_ids))))
    return [ApiKeyRecord.from_row(row) for row in found.mappings()]


async def list_keys(conn: AsyncConnection, tenant: str | None) -> list[ApiKeyRecord]:
    """Every key (of one tenant), oldest first."""
    query = select(KEYS).order_by(KEYS.c.create_time)
    if tenant:
        query = query.where(KEYS.c.tenant == tenant)
    return [ApiKeyRecord.from_row(row) for row in (await conn.execute(query)).mappings()]


async def count(conn: AsyncConnection) -> int:
    """How many keys exist, revoked ones included."""
    return int((await conn.execute(select(func.count()).select_from(KEYS))).scalar_one())


async def revoke(conn: AsyncConnection, key_id: str, now: float) -> bool:
    """Revoke a key; False when there is no such key."""
    done = await conn.execute(
        update(KEYS).where(KEYS.c.id == key_id).values(revoke_time=func.coalesce(KEYS.c.revoke_time, now))
    )
    return bool(done.rowcount)


async def touch_many(conn: AsyncConnection, uses: Mapping[str, float]) -> None:
    """Record when keys were last used (key id -> time), in one statement."""
    if uses:
        await conn.execute(
            update(KEYS).where(KEYS.c.id == bindparam("used_key")).values(last_used_time=bindparam("used_at")),
            [{"used_key": key_id, "used_at": at} for key_id, at in uses.items()],
        )
