"""Queries on saved graders (with their versions) and saved targets."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.store.models import SavedGraderRow, SavedGraderVersionRow, SavedTargetRow

GRADERS = SavedGraderRow.__table__  # type: ignore[attr-defined]
VERSIONS = SavedGraderVersionRow.__table__  # type: ignore[attr-defined]
TARGETS = SavedTargetRow.__table__  # type: ignore[attr-defined]


async def insert_grader(conn: AsyncConnection, row: dict[str, Any], definition: bytes) -> None:
    """Store a saved grader and its version 1."""
    await conn.execute(insert(GRADERS).values(**row, latest_version=1))
    await conn.execute(
        insert(VERSIONS).values(
            grader_id=row["id"], version=1, tenant=row["tenant"], definition=definition, create_time=row["create_time"]
        )
    )


async def add_version(
    conn: AsyncConnection, tenant: str, grader_id: str, definition: bytes, now: float
) -> Mapping[str, Any] | None:
    """Append a version; the grader row (with its new latest_version), or None when missing."""
    bumped = await conn.execute(
        update(GRADERS)
        .where(GRADERS.c.id == grader_id, GRADERS.c.tenant == tenant)
        .values(latest_version=GRADERS.c.latest_version + 1)
        .returning(*GRADERS.c)
    )
    row = bumped.mappings().first()
    if row is not None:
        await conn.execute(
            insert(VERSIONS).values(
                grader_id=grader_id,
                version=row["latest_version"],
                tenant=tenant,
                definition=definition,
                create_time=now,
            )
        )
    return cast("Mapping[str, Any] | None", row)


async def get_grader(
    conn: AsyncConnection, tenant: str, grader_id: str, version: int
) -> tuple[Mapping[str, Any], Mapping[str, Any]] | None:
    """(grader row, version row) of a tenant's grader at a version (0 = latest), or None."""
    found = await conn.execute(select(GRADERS).where(GRADERS.c.id == grader_id, GRADERS.c.tenant == tenant))
    grader = found.mappings().first()
    if grader is None:
        return None
    wanted = version or grader["latest_version"]
    found_version = await conn.execute(
        select(VERSIONS).where(VERSIONS.c.grader_id == grader_id, VERSIONS.c.version == wanted)
    )
    row = found_version.mappings().first()
    return None if row is None else (cast("Mapping[str, Any]", grader), cast("Mapping[str, Any]", row))


async def find_by_request_id(
    conn: AsyncConnection, table: Any, tenant: str, request_id: str
) -> Mapping[str, Any] | None:
    """The saved grader or target created with this idempotency key."""
    found = await conn.execute(select(table).where(table.c.tenant == tenant, table.c.request_id == request_id))
    return cast("Mapping[str, Any] | None", found.mappings().first())


async def list_graders(
    conn: AsyncConnection, tenant: str, *, before_id: str | None, limit: int
) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """Graders with their latest version, newest first."""
    query = (
        select(GRADERS, VERSIONS.c.definition, VERSIONS.c.create_time.label("version_create_time"))
        .join(VERSIONS, (VERSIONS.c.grader_id == GRADERS.c.id) & (VERSIONS.c.version == GRADERS.c.latest_version))
        .where(GRADERS.c.tenant == tenant)
    )
    if before_id:
        query = query.where(GRADERS.c.id < before_id)
    rows = await conn.execute(query.order_by(GRADERS.c.id.desc()).limit(limit))
    return [
        (
            cast("Mapping[str, Any]", row),
            {
                "definition": row["definition"],
                "version": row["latest_version"],
                "create_time": row["version_create_time"],
            },
        )
        for row in rows.mappings()
    ]


async def insert_target(conn: AsyncConnection, row: dict[str, Any]) -> None:
    """Store a saved target."""
    await conn.execute(insert(TARGETS).values(**row))


async def get_target(conn: AsyncConnection, tenant: str, target_id: str) -> Mapping[str, Any] | None:
    """A tenant's saved target, or None."""
    found = await conn.execute(select(TARGETS).where(TARGETS.c.id == target_id, TARGETS.c.tenant == tenant))
    return cast("Mapping[str, Any] | None", found.mappings().first())


async def list_targets(
    conn: AsyncConnection, tenant: str, *, before_id: str | None, limit: int
) -> list[Mapping[str, Any]]:
    """Saved targets, newest first."""
    query = select(TARGETS).where(TARGETS.c.tenant == tenant)
    if before_id:
        query = query.where(TARGETS.c.id < before_id)
    return cast(
        "list[Mapping[str, Any]]",
        list((await conn.execute(query.order_by(TARGETS.c.id.desc()).limit(limit))).mappings()),
    )
