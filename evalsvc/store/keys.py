"""Queries on API keys."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.store.models import ApiKeyRow

KEYS = ApiKeyRow.__table__  # type: ignore[attr-defined]


async def insert_key(conn: AsyncConnection, row: dict[str, Any]) -> None:
    """Store a new key."""
    await conn.execute(insert(KEYS).values(**row))


async def get(conn: AsyncConnection, key_id: str) -> Mapping[str, Any] | None:
    """A key's row by id."""
    found = await conn.execute(select(KEYS).where(KEYS.c.id == key_id))
    return cast("Mapping[str, Any] | None", found.mappings().first())


async def get_many(conn: AsyncConnection, key_ids: Sequence[str]) -> list[Mapping[str, Any]]:
    """The rows of the keys among `key_ids` that exist."""
    found = await conn.execute(select(KEYS).where(KEYS.c.id.in_(list(key_ids))))
    return cast("list[Mapping[str, Any]]", list(found.mappings()))


async def list_keys(conn: AsyncConnection, tenant: str | None) -> list[Mapping[str, Any]]:
    """Every key (of one tenant), oldest first."""
    query = select(KEYS).order_by(KEYS.c.create_time)
    if tenant:
        query = query.where(KEYS.c.tenant == tenant)
    return cast("list[Mapping[str, Any]]", list((await conn.execute(query)).mappings()))


async def count(conn: AsyncConnection) -> int:
    """How many keys exist, revoked ones included."""
    return int((await conn.execute(select(func.count()).select_from(KEYS))).scalar_one())


async def revoke(conn: AsyncConnection, key_id: str, now: float) -> bool:
    """Revoke a key; False when there is no such key."""
    done = await conn.execute(
        update(KEYS).where(KEYS.c.id == key_id).values(revoke_time=func.coalesce(KEYS.c.revoke_time, now))
    )
    return bool(done.rowcount)


async def touch(conn: AsyncConnection, key_id: str, now: float) -> None:
    """Record that a key was used."""
    await conn.execute(update(KEYS).where(KEYS.c.id == key_id).values(last_used_time=now))
