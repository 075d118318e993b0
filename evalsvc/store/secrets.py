"""Queries on tenants' own secrets. Every query but the start-up key check is scoped to one tenant."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, fields

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.store import quotas
from evalsvc.store.models import TenantSecretRow
from evalsvc.store.records import SecretName, TenantSecretRecord

SECRETS = TenantSecretRow.__table__  # type: ignore[attr-defined]
NAME_COLUMNS = tuple(SECRETS.c[field.name] for field in fields(SecretName))


async def put(conn: AsyncConnection, secret: TenantSecretRecord) -> None:
    """Store a secret, replacing one of the same tenant and name. One upsert: two concurrent sets of a
    new name on PostgreSQL would otherwise both insert and one fail on the primary key."""
    dialect_insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    statement = dialect_insert(SECRETS).values(**asdict(secret))
    await conn.execute(
        statement.on_conflict_do_update(
            index_elements=[SECRETS.c.tenant, SECRETS.c.name],
            set_={"sealed": statement.excluded.sealed, "create_time": statement.excluded.create_time},
        )
    )


async def exists(conn: AsyncConnection, tenant: str, name: str) -> bool:
    """Whether the tenant has a secret of that name."""
    found = await conn.execute(select(SECRETS.c.name).where(SECRETS.c.tenant == tenant, SECRETS.c.name == name))
    return found.first() is not None


async def count(conn: AsyncConnection, tenant: str) -> int:
    """How many secrets the tenant holds, for its cap (a write transaction: evalsvc.store.quotas)."""
    return await quotas.held(conn, SECRETS, tenant)


async def sealed(conn: AsyncConnection, tenant: str, names: Sequence[str]) -> dict[str, bytes]:
    """The sealed values of the tenant's secrets among `names`, by name."""
    found = await conn.execute(
        select(SECRETS.c.name, SECRETS.c.sealed).where(SECRETS.c.tenant == tenant, SECRETS.c.name.in_(list(names)))
    )
    return {row.name: bytes(row.sealed) for row in found}


async def page(conn: AsyncConnection, tenant: str, after_name: str | None, limit: int) -> list[SecretName]:
    """The tenant's secrets by name, after `after_name`; never values."""
    query = select(*NAME_COLUMNS).where(SECRETS.c.tenant == tenant)
    if after_name is not None:
        query = query.where(SECRETS.c.name > after_name)
    found = await conn.execute(query.order_by(SECRETS.c.name).limit(limit))
    return [SecretName.from_row(row) for row in found.mappings()]


async def remove(conn: AsyncConnection, tenant: str, name: str) -> bool:
    """Delete the tenant's secret; False when it had none of that name."""
    done = await conn.execute(delete(SECRETS).where(SECRETS.c.tenant == tenant, SECRETS.c.name == name))
    return bool(done.rowcount)


async def any_sealed(conn: AsyncConnection) -> TenantSecretRecord | None:
    """One stored secret of any tenant (the start-up check that the key opens them), or None."""
    found = await conn.execute(select(SECRETS).limit(1))
    row = found.mappings().first()
    return None if row is None else TenantSecretRecord.from_row(row)


async def listing(conn: AsyncConnection, tenant: str | None) -> list[SecretName]:
    """Every secret (of one tenant) by tenant and name, never values: for the operator's CLI."""
    query = select(*NAME_COLUMNS).order_by(SECRETS.c.tenant, SECRETS.c.name)
    if tenant:
        query = query.where(SECRETS.c.tenant == tenant)
    return [SecretName.from_row(row) for row in (await conn.execute(query)).mappings()]
