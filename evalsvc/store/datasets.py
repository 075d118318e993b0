"""Queries on datasets and their items."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, fields
from typing import Any

from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.limits import StoredCap
from evalsvc.store import quotas, usage
from evalsvc.store.models import (
    DatasetAppendRow,
    DatasetGenerationRow,
    DatasetItemRow,
    DatasetRow,
    DefinitionPurgeRow,
)
from evalsvc.store.records import ClaimableGeneration, DatasetAppendRecord, DatasetGenerationRecord, DatasetRecord

DATASETS = DatasetRow.__table__  # type: ignore[attr-defined]
ITEMS = DatasetItemRow.__table__  # type: ignore[attr-defined]
APPENDS = DatasetAppendRow.__table__  # type: ignore[attr-defined]
PURGES = DefinitionPurgeRow.__table__  # type: ignore[attr-defined]
# The kind of a deleted dataset's `definition_purges` row: its items are being deleted.
DATASET_PARTS = "dataset"


async def insert_dataset(conn: AsyncConnection, dataset: DatasetRecord, bytes_cap: StoredCap) -> None:
    """Store a new dataset, unless its descriptive fields would take the tenant past `bytes_cap`."""
    row = asdict(dataset)
    await usage.take_room(conn, bytes_cap, dataset.tenant, usage.saved_bytes(row, usage.DATASET_COLUMNS))
    await conn.execute(insert(DATASETS).values(**row))


async def get(conn: AsyncConnection, tenant: str, dataset_id: str, *, lock: bool = False) -> DatasetRecord | None:
    """A tenant's dataset, or None (also for another tenant's).

    `lock` holds the row until the transaction ends (PostgreSQL; SQLite's one writer holds everything):
    appending items reads item_count and existing ids first, and a concurrent append must wait."""
    query = select(DATASETS).where(DATASETS.c.id == dataset_id, DATASETS.c.tenant == tenant)
    found = await conn.execute(query.with_for_update() if lock else query)
    row = found.mappings().first()
    return None if row is None else DatasetRecord.from_row(row)


async def count(conn: AsyncConnection, tenant: str) -> int:
    """How many datasets the tenant holds, for its cap (a write transaction: evalsvc.store.quotas)."""
    return await quotas.held(conn, DATASETS, tenant)


async def remove(conn: AsyncConnection, tenant: str, dataset_id: str) -> bool:
    """Take a tenant's dataset out of the service, with its generation; False when it has none of that id.
    Its items stay, for `evalsvc.store.retention.definition_purge_step` to delete in chunks (a
    `definition_purges` row says so): from this commit on the dataset is NOT_FOUND everywhere, and its
    id, never reused, reaches nothing. Deleting every item here held SQLite's one writer for ~4.6 s a GB.

    The dataset row first: on PostgreSQL that waits for a transaction holding it (an append, a
    generation being created, both take it with `get(lock=True)`), whose items the purge then finds, and
    one that comes later finds no dataset, so nothing adds items to it after this. Every writer locks the
    dataset before the generation, so this order cannot deadlock with a generation's append. The tenant's
    stored bytes lose the dataset's and its items' here (evalsvc.store.usage); the purge only deletes rows."""
    deleted = await conn.execute(
        delete(DATASETS).where(DATASETS.c.id == dataset_id, DATASETS.c.tenant == tenant).returning(*DATASETS.c)
    )
    dataset = deleted.mappings().first()
    if dataset is None:
        return False
    await conn.execute(delete(GENERATIONS).where(GENERATIONS.c.dataset_id == dataset_id))
    await conn.execute(delete(APPENDS).where(APPENDS.c.dataset_id == dataset_id))
    await conn.execute(
        insert(PURGES).values(kind=DATASET_PARTS, owner_id=dataset_id, tenant=tenant, purge_time=time.time())
    )
    # Its items' bytes too, at once (their sizes, read without the items: a tenant that deletes a dataset
    # to make room has it when the call answers, whenever the purge deletes the rows).
    items = await conn.execute(
        select(func.coalesce(func.sum(func.length(ITEMS.c.item)), 0)).where(ITEMS.c.dataset_id == dataset_id)
    )
    freed = usage.saved_bytes(dataset, usage.DATASET_COLUMNS) + int(items.scalar_one())
    await usage.add_to_totals(conn, stored_bytes={tenant: -freed})
    return True


async def find_by_request_id(conn: AsyncConnection, tenant: str, request_id: str) -> DatasetRecord | None:
    """The dataset created with this idempotency key, if any."""
    found = await conn.execute(select(DATASETS).where(DATASETS.c.tenant == tenant, DATASETS.c.request_id == request_id))
    row = found.mappings().first()
    return None if row is None else DatasetRecord.from_row(row)


async def list_page(conn: AsyncConnection, tenant: str, ids: Sequence[str]) -> list[DatasetRecord]:
    """The datasets of `ids` that still exist, newest first: the ones a page chose by `list_sizes` (read
    again by position, a dataset created between the reads took the first place and pushed the last
    chosen one off the page)."""
    if not ids:
        return []
    query = select(DATASETS).where(DATASETS.c.tenant == tenant, DATASETS.c.id.in_(ids))
    rows = await conn.execute(query.order_by(DATASETS.c.id.desc()))
    return [DatasetRecord.from_row(row) for row in rows.mappings()]


async def list_sizes(conn: AsyncConnection, tenant: str, *, before_id: str | None, limit: int) -> list[tuple[str, int]]:
    """(id, about the serialized size) of each dataset `list_page` would answer, in its order, without reading
    the datasets: what a page chooses its datasets by before it reads them (a dataset's annotations alone
    may be 64 KiB). Its texts' and maps' lengths, as usage.saved_bytes counts them."""
    sized = select(DATASETS.c.id, usage.stored_size(DATASETS, usage.DATASET_COLUMNS)).where(DATASETS.c.tenant == tenant)
    return await usage.sizes_page(conn, sized, DATASETS.c.id, before_id, limit)


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
) -> DatasetRecord:
    """Append (item id, serialized item) pairs after the dataset's last index, adding their bytes to the
    tenant's stored bytes (evalsvc.store.usage); return the updated dataset."""
    bumped = await conn.execute(
        update(DATASETS)
        .where(DATASETS.c.id == dataset_id, DATASETS.c.tenant == tenant)
        .values(item_count=DATASETS.c.item_count + len(items), update_time=now)
        .returning(*DATASETS.c)
    )
    dataset = DatasetRecord.from_row(bumped.mappings().one())
    start = dataset.item_count - len(items)
    await conn.execute(
        insert(ITEMS),
        [
            {"dataset_id": dataset_id, "idx": start + i, "item_id": item_id, "tenant": tenant, "item": item}
            for i, (item_id, item) in enumerate(items)
        ],
    )
    await usage.add_to_totals(conn, stored_bytes={tenant: sum(len(item) for _, item in items)})
    return dataset


async def find_append(conn: AsyncConnection, tenant: str, request_id: str) -> DatasetAppendRecord | None:
    """The AddDatasetItems a tenant made with this request_id, if its dataset still exists."""
    found = await conn.execute(select(APPENDS).where(APPENDS.c.tenant == tenant, APPENDS.c.request_id == request_id))
    row = found.mappings().first()
    return None if row is None else DatasetAppendRecord.from_row(row)


async def insert_append(conn: AsyncConnection, append: DatasetAppendRecord) -> None:
    """Remember what an AddDatasetItems with a request_id added (in the transaction that added it)."""
    await conn.execute(insert(APPENDS).values(**asdict(append)))


async def item_ids_between(conn: AsyncConnection, dataset_id: str, first_idx: int, count: int) -> list[str]:
    """The ids of a dataset's items at indexes first_idx .. first_idx + count - 1, in order."""
    rows = await conn.execute(
        select(ITEMS.c.item_id)
        .where(ITEMS.c.dataset_id == dataset_id, ITEMS.c.idx >= first_idx, ITEMS.c.idx < first_idx + count)
        .order_by(ITEMS.c.idx)
    )
    return [item_id for (item_id,) in rows]


async def item_sizes(conn: AsyncConnection, dataset_id: str, *, after_idx: int, limit: int) -> list[tuple[int, int]]:
    """(index, serialized size) of the first `limit` items after a position, in insertion order, without
    reading the items: what a page chooses its items by before it reads them (`items_page`). `length`
    of a blob reads its stored size alone, on SQLite (the record header) and PostgreSQL (the TOAST
    header)."""
    rows = await conn.execute(
        select(ITEMS.c.idx, func.length(ITEMS.c.item))
        .where(ITEMS.c.dataset_id == dataset_id, ITEMS.c.idx > after_idx)
        .order_by(ITEMS.c.idx)
        .limit(limit)
    )
    return [(idx, int(size)) for idx, size in rows]


async def items_page(conn: AsyncConnection, dataset_id: str, *, after_idx: int, limit: int) -> list[tuple[int, bytes]]:
    """(index, serialized item) after a position, in insertion order."""
    rows = await conn.execute(
        select(ITEMS.c.idx, ITEMS.c.item)
        .where(ITEMS.c.dataset_id == dataset_id, ITEMS.c.idx > after_idx)
        .order_by(ITEMS.c.idx)
        .limit(limit)
    )
    return [(idx, item) for idx, item in rows]


async def items_by_id(conn: AsyncConnection, dataset_id: str, item_ids: Sequence[str]) -> dict[str, bytes]:
    """These items of a dataset that exist, serialized, by id."""
    found: dict[str, bytes] = {}
    for start in range(0, len(item_ids), 500):
        rows = await conn.execute(
            select(ITEMS.c.item_id, ITEMS.c.item).where(
                ITEMS.c.dataset_id == dataset_id, ITEMS.c.item_id.in_(item_ids[start : start + 500])
            )
        )
        found.update((item_id, item) for item_id, item in rows)
    return found


async def all_items(conn: AsyncConnection, dataset_id: str) -> list[tuple[str, bytes]]:
    """Every (item id, serialized item) of a dataset, in insertion order."""
    rows = await conn.execute(
        select(ITEMS.c.item_id, ITEMS.c.item).where(ITEMS.c.dataset_id == dataset_id).order_by(ITEMS.c.idx)
    )
    return [(item_id, item) for item_id, item in rows]


GENERATIONS = DatasetGenerationRow.__table__  # type: ignore[attr-defined]


async def insert_generation(conn: AsyncConnection, generation: DatasetGenerationRecord) -> None:
    """Store a new generation."""
    await conn.execute(insert(GENERATIONS).values(**asdict(generation)))


async def generations_of(conn: AsyncConnection, dataset_ids: Sequence[str]) -> dict[str, DatasetGenerationRecord]:
    """The generations of these datasets, by dataset id (datasets without one are absent)."""
    if not dataset_ids:
        return {}
    rows = await conn.execute(select(GENERATIONS).where(GENERATIONS.c.dataset_id.in_(list(dataset_ids))))
    generations = (DatasetGenerationRecord.from_row(row) for row in rows.mappings())
    return {generation.dataset_id: generation for generation in generations}


CLAIMABLE_COLUMNS = tuple(GENERATIONS.c[field.name] for field in fields(ClaimableGeneration))


def _claimable(states: tuple[int, int], now: float) -> Any:
    pending, running = states
    return or_(
        GENERATIONS.c.state == pending,
        (GENERATIONS.c.state == running) & (GENERATIONS.c.lease_expiry < now),
    )


async def claimable_generations(
    conn: AsyncConnection, states: tuple[int, int], now: float, limit: int
) -> list[ClaimableGeneration]:
    """Generations waiting for a worker (pending, or running under an expired lease), oldest first."""
    rows = await conn.execute(
        select(*CLAIMABLE_COLUMNS).where(_claimable(states, now)).order_by(GENERATIONS.c.create_time).limit(limit)
    )
    return [ClaimableGeneration.from_row(row) for row in rows.mappings()]


async def claim_generation(
    conn: AsyncConnection, dataset_id: str, states: tuple[int, int], claim_id: str, now: float, expiry: float
) -> DatasetGenerationRecord | None:
    """Lease one generation if it is still claimable; the claimed generation, or None when another took it."""
    claimed = await conn.execute(
        update(GENERATIONS)
        .where(GENERATIONS.c.dataset_id == dataset_id, _claimable(states, now))
        .values(state=states[1], claim_id=claim_id, lease_expiry=expiry, update_time=now)
        .returning(*GENERATIONS.c)
    )
    row = claimed.mappings().first()
    return None if row is None else DatasetGenerationRecord.from_row(row)


async def extend_generations(conn: AsyncConnection, claim_ids: Sequence[str], expiry: float) -> None:
    """Keep the leases of generations still being worked on."""
    if claim_ids:
        await conn.execute(
            update(GENERATIONS).where(GENERATIONS.c.claim_id.in_(list(claim_ids))).values(lease_expiry=expiry)
        )


async def held_generation(conn: AsyncConnection, dataset_id: str, claim_id: str) -> DatasetGenerationRecord | None:
    """The generation while this claim still holds it (locked until the transaction ends), else None."""
    found = await conn.execute(
        select(GENERATIONS)
        .where(GENERATIONS.c.dataset_id == dataset_id, GENERATIONS.c.claim_id == claim_id)
        .with_for_update()
    )
    row = found.mappings().first()
    return None if row is None else DatasetGenerationRecord.from_row(row)


async def update_generation(conn: AsyncConnection, dataset_id: str, **values: Any) -> None:
    """Record a generation's progress or outcome."""
    await conn.execute(update(GENERATIONS).where(GENERATIONS.c.dataset_id == dataset_id).values(**values))


async def release_generations(conn: AsyncConnection, running: int, pending: int) -> int:
    """Hand every running generation back to the queue. Only where this process is the one server (SQLite)."""
    released = await conn.execute(
        update(GENERATIONS)
        .where(GENERATIONS.c.state == running)
        .values(state=pending, claim_id=None, lease_expiry=None)
    )
    return int(released.rowcount or 0)
