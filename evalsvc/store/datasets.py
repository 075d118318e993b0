"""Queries on datasets and their items."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.store.models import DatasetItemRow, DatasetRow

DATASETS = DatasetRow.__table__  # type: ignore[attr-defined]
ITEMS = DatasetItemRow.__table__  # type: ignore[attr-defined]


async def insert_dataset(conn: AsyncConnection, row: dict[str, Any]) -> None:
    """Store a new dataset."""
    await conn.execute(insert(DATASETS).values(**row))


async def get(conn: AsyncConnection, tenant: str, dataset_id: str, *, lock: bool = False) -> Mapping[str, Any] | None:
    """A tenant's dataset, or None (also for another tenant's).

    `lock` holds the row until the transaction ends (PostgreSQL; SQLite's one writer holds everything):
    appending items reads item_count and existing ids first, and a concurrent append must wait."""
    query = select(DATASETS).where(DATASETS.c.id == dataset_id, DATASETS.c.tenant == tenant)
    found = await conn.execute(query.with_for_update() if lock else query)
    return cast("Mapping[str, Any] | None", found.mappings().first())


async def find_by_request_id(conn: AsyncConnection, tenant: str, request_id: str) -> Mapping[str, Any] | None:
    """The dataset created with this idempotency key, if any."""
    found = await conn.execute(select(DATASETS).where(DATASETS.c.tenant == tenant, DATASETS.c.request_id == request_id))
    return cast("Mapping[str, Any] | None", found.mappings().first())


async def list_page(
    conn: AsyncConnection, tenant: str, *, before_id: str | None, limit: int
) -> list[Mapping[str, Any]]:
    """Datasets newest first, after a keyset position."""
    query = select(DATASETS).where(DATASETS.c.tenant == tenant)
    if before_id:
        query = query.where(DATASETS.c.id < before_id)
    rows = await conn.execute(query.order_by(DATASETS.c.id.desc()).limit(limit))
    return cast("list[Mapping[str, Any]]", list(rows.mappings()))


async def existing_item_ids(conn: AsyncConnection, dataset_id: str, item_ids: Sequence[str]) -> set[str]:
    """Which of these item ids the dataset already has."""
    found: set[str] = set()
    for start in range(0, len(item_ids), 500):
        rows = await conn.execute(
            select(ITEMS.c.item_id).where(
                ITEMS.c.dataset_id == dataset_id, ITEMS.c.item_id.in_(item_ids[start : start + 500])
            )
        )
        found.update(item_id for (item_id,) in rows)
    return found


async def append_items(
    conn: AsyncConnection, tenant: str, dataset_id: str, items: Sequence[tuple[str, bytes]], now: float
) -> Mapping[str, Any]:
    """Append (item id, serialized item) pairs after the dataset's last index; return the updated row."""
    bumped = await conn.execute(
        update(DATASETS)
        .where(DATASETS.c.id == dataset_id, DATASETS.c.tenant == tenant)
        .values(item_count=DATASETS.c.item_count + len(items), update_time=now)
        .returning(*DATASETS.c)
    )
    row = cast("Mapping[str, Any]", bumped.mappings().one())
    start = row["item_count"] - len(items)
    await conn.execute(
        insert(ITEMS),
        [
            {"dataset_id": dataset_id, "idx": start + i, "item_id": item_id, "tenant": tenant, "item": item}
            for i, (item_id, item) in enumerate(items)
        ],
    )
    return row


async def items_page(conn: AsyncConnection, dataset_id: str, *, after_idx: int, limit: int) -> list[tuple[int, bytes]]:
    """(index, serialized item) after a position, in insertion order."""
    rows = await conn.execute(
        select(ITEMS.c.idx, ITEMS.c.item)
        .where(ITEMS.c.dataset_id == dataset_id, ITEMS.c.idx > after_idx)
        .order_by(ITEMS.c.idx)
        .limit(limit)
    )
    return [(idx, item) for idx, item in rows]


async def all_items(conn: AsyncConnection, dataset_id: str) -> list[tuple[str, bytes]]:
    """Every (item id, serialized item) of a dataset, in insertion order."""
    rows = await conn.execute(
        select(ITEMS.c.item_id, ITEMS.c.item).where(ITEMS.c.dataset_id == dataset_id).order_by(ITEMS.c.idx)
    )
    return [(item_id, item) for item_id, item in rows]
