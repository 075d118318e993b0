"""Queries on saved graders (with their versions) and saved targets. What they store is added to their
tenant's stored bytes as they are written, and taken back when the grader (target) is deleted
(evalsvc.store.usage)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from sqlalchemy import RowMapping, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.limits import StoredCap
from evalsvc.store import quotas, usage
from evalsvc.store.models import DefinitionPurgeRow, SavedGraderRow, SavedGraderVersionRow, SavedTargetRow
from evalsvc.store.records import GraderVersionRecord, SavedGraderRecord, SavedTargetRecord

GRADERS = SavedGraderRow.__table__  # type: ignore[attr-defined]
VERSIONS = SavedGraderVersionRow.__table__  # type: ignore[attr-defined]
TARGETS = SavedTargetRow.__table__  # type: ignore[attr-defined]
PURGES = DefinitionPurgeRow.__table__  # type: ignore[attr-defined]
# The kind of a deleted grader's `definition_purges` row: its versions are being deleted.
GRADER_PARTS = "grader"


async def insert_grader(
    conn: AsyncConnection, grader: SavedGraderRecord, version: GraderVersionRecord, bytes_cap: StoredCap
) -> None:
    """Store a saved grader and its first version, unless they would take the tenant past `bytes_cap`."""
    row, first = asdict(grader), asdict(version)
    size = usage.saved_bytes(row, usage.GRADER_COLUMNS) + usage.saved_bytes(first, usage.VERSION_COLUMNS)
    await usage.take_room(conn, bytes_cap, grader.tenant, size)
    await conn.execute(insert(GRADERS).values(**row))
    await conn.execute(insert(VERSIONS).values(**first))


async def count_graders(conn: AsyncConnection, tenant: str) -> int:
    """How many saved graders the tenant holds, for its cap (a write transaction: evalsvc.store.quotas)."""
    return await quotas.held(conn, GRADERS, tenant)


async def remove_grader(conn: AsyncConnection, tenant: str, grader_id: str) -> bool:
    """Take a tenant's saved grader out of the service; False when it has none of that id. Its versions
    (up to 1,000 of 256 KiB) stay, for `evalsvc.store.retention.definition_purge_step` to delete in
    chunks (a `definition_purges` row says so); from this commit on the grader is NOT_FOUND, at any
    version. On PostgreSQL deleting the grader row waits for an UpdateGrader holding it, whose new
    version the purge then finds, and an UpdateGrader that comes later finds no grader. The tenant's
    stored bytes lose the grader's and its versions' here; the purge only deletes rows."""
    deleted = await conn.execute(
        delete(GRADERS).where(GRADERS.c.id == grader_id, GRADERS.c.tenant == tenant).returning(*GRADERS.c)
    )
    grader = deleted.mappings().first()
    if grader is None:
        return False
    await conn.execute(
        insert(PURGES).values(kind=GRADER_PARTS, owner_id=grader_id, tenant=tenant, purge_time=time.time())
    )
    # Its versions' bytes too, at once (as for a dataset's items: evalsvc.store.datasets.remove).
    versions = await conn.execute(
        select(func.coalesce(func.sum(usage.stored_size(VERSIONS, usage.VERSION_COLUMNS)), 0), func.count()).where(
            VERSIONS.c.grader_id == grader_id
        )
    )
    sizes, count = versions.one()
    freed = usage.saved_bytes(grader, usage.GRADER_COLUMNS) + int(sizes) + int(count) * usage.SAVED_ROW_BYTES
    await usage.add_to_totals(conn, stored_bytes={tenant: -freed})
    return True


async def bump_version(conn: AsyncConnection, tenant: str, grader_id: str) -> SavedGraderRecord | None:
    """Raise a grader's latest_version for a version about to be stored (`insert_version`), holding its row
    to the end of the transaction; the grader as it is then, or None when missing."""
    bumped = await conn.execute(
        update(GRADERS)
        .where(GRADERS.c.id == grader_id, GRADERS.c.tenant == tenant)
        .values(latest_version=GRADERS.c.latest_version + 1)
        .returning(*GRADERS.c)
    )
    row = bumped.mappings().first()
    return None if row is None else SavedGraderRecord.from_row(row)


async def insert_version(conn: AsyncConnection, version: GraderVersionRecord, bytes_cap: StoredCap) -> None:
    """Store a grader's new version (`bump_version` numbered it), unless it would take the tenant past
    `bytes_cap`."""
    row = asdict(version)
    await usage.take_room(conn, bytes_cap, version.tenant, usage.saved_bytes(row, usage.VERSION_COLUMNS))
    await conn.execute(insert(VERSIONS).values(**row))


async def get_grader(
    conn: AsyncConnection, tenant: str, grader_id: str, version: int
) -> tuple[SavedGraderRecord, GraderVersionRecord] | None:
    """A tenant's grader and its version (0 = latest), or None."""
    found = await conn.execute(select(GRADERS).where(GRADERS.c.id == grader_id, GRADERS.c.tenant == tenant))
    grader_row = found.mappings().first()
    if grader_row is None:
        return None
    grader = SavedGraderRecord.from_row(grader_row)
    found_version = await conn.execute(
        select(VERSIONS).where(
            VERSIONS.c.grader_id == grader_id, VERSIONS.c.version == (version or grader.latest_version)
        )
    )
    row = found_version.mappings().first()
    return None if row is None else (grader, GraderVersionRecord.from_row(row))


async def _by_request_id(conn: AsyncConnection, table: Any, tenant: str, request_id: str) -> RowMapping | None:
    found = await conn.execute(select(table).where(table.c.tenant == tenant, table.c.request_id == request_id))
    return found.mappings().first()


async def find_grader_by_request_id(conn: AsyncConnection, tenant: str, request_id: str) -> SavedGraderRecord | None:
    """The saved grader created with this idempotency key."""
    row = await _by_request_id(conn, GRADERS, tenant, request_id)
    return None if row is None else SavedGraderRecord.from_row(row)


async def find_target_by_request_id(conn: AsyncConnection, tenant: str, request_id: str) -> SavedTargetRecord | None:
    """The saved target created with this idempotency key."""
    row = await _by_request_id(conn, TARGETS, tenant, request_id)
    return None if row is None else SavedTargetRecord.from_row(row)


async def grader_sizes(
    conn: AsyncConnection, tenant: str, *, before_id: str | None, limit: int
) -> list[tuple[str, int]]:
    """(id, about the serialized size) of each grader `list_graders` would answer (its fields and its latest
    version's definition, up to 256 KiB), in its order, without reading them: what a page chooses its
    graders by before it reads them."""
    size = usage.stored_size(GRADERS, usage.GRADER_COLUMNS) + usage.stored_size(VERSIONS, usage.VERSION_COLUMNS)
    sized = (
        select(GRADERS.c.id, size)
        .select_from(GRADERS)
        .join(VERSIONS, (VERSIONS.c.grader_id == GRADERS.c.id) & (VERSIONS.c.version == GRADERS.c.latest_version))
        .where(GRADERS.c.tenant == tenant)
    )
    return await usage.sizes_page(conn, sized, GRADERS.c.id, before_id, limit)


async def list_graders(
    conn: AsyncConnection, tenant: str, ids: Sequence[str]
) -> list[tuple[SavedGraderRecord, GraderVersionRecord]]:
    """The graders of `ids` that still exist, with their latest versions, newest first: the ones a page
    chose by `grader_sizes` (as evalsvc.store.datasets.list_page)."""
    if not ids:
        return []
    query = (
        select(GRADERS, VERSIONS)
        .join(VERSIONS, (VERSIONS.c.grader_id == GRADERS.c.id) & (VERSIONS.c.version == GRADERS.c.latest_version))
        .where(GRADERS.c.tenant == tenant, GRADERS.c.id.in_(ids))
    )
    rows = await conn.execute(query.order_by(GRADERS.c.id.desc()))
    return [
        (
            SavedGraderRecord(**{column.name: row[column] for column in GRADERS.c}),
            GraderVersionRecord(**{column.name: row[column] for column in VERSIONS.c}),
        )
        for row in rows.mappings()
    ]


async def count_targets(conn: AsyncConnection, tenant: str) -> int:
    """How many saved targets the tenant holds, for its cap (a write transaction: evalsvc.store.quotas)."""
    return await quotas.held(conn, TARGETS, tenant)


async def remove_target(conn: AsyncConnection, tenant: str, target_id: str) -> bool:
    """Delete a tenant's saved target; False when it has none of that id."""
    deleted = await conn.execute(
        delete(TARGETS).where(TARGETS.c.id == target_id, TARGETS.c.tenant == tenant).returning(*TARGETS.c)
    )
    target = deleted.mappings().first()
    if target is None:
        return False
    await usage.add_to_totals(conn, stored_bytes={tenant: -usage.saved_bytes(target, usage.TARGET_COLUMNS)})
    return True


async def insert_target(conn: AsyncConnection, target: SavedTargetRecord, bytes_cap: StoredCap) -> None:
    """Store a saved target, unless it would take the tenant past `bytes_cap`."""
    row = asdict(target)
    await usage.take_room(conn, bytes_cap, target.tenant, usage.saved_bytes(row, usage.TARGET_COLUMNS))
    await conn.execute(insert(TARGETS).values(**row))


async def get_target(conn: AsyncConnection, tenant: str, target_id: str) -> SavedTargetRecord | None:
    """A tenant's saved target, or None."""
    found = await conn.execute(select(TARGETS).where(TARGETS.c.id == target_id, TARGETS.c.tenant == tenant))
    row = found.mappings().first()
    return None if row is None else SavedTargetRecord.from_row(row)


async def target_sizes(
    conn: AsyncConnection, tenant: str, *, before_id: str | None, limit: int
) -> list[tuple[str, int]]:
    """(id, about the serialized size) of each target `list_targets` would answer, in its order, without
    reading them: what a page chooses its targets by before it reads them."""
    sized = select(TARGETS.c.id, usage.stored_size(TARGETS, usage.TARGET_COLUMNS)).where(TARGETS.c.tenant == tenant)
    return await usage.sizes_page(conn, sized, TARGETS.c.id, before_id, limit)


async def list_targets(conn: AsyncConnection, tenant: str, ids: Sequence[str]) -> list[SavedTargetRecord]:
    """The saved targets of `ids` that still exist, newest first: the ones a page chose by
    `target_sizes` (as evalsvc.store.datasets.list_page)."""
    if not ids:
        return []
    query = select(TARGETS).where(TARGETS.c.tenant == tenant, TARGETS.c.id.in_(ids))
    rows = await conn.execute(query.order_by(TARGETS.c.id.desc()))
    return [SavedTargetRecord.from_row(row) for row in rows.mappings()]
