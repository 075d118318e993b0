"""Queries behind CompareRuns and ListComparisonItems: a key range of each of two runs' evaluations, the
digests of the items behind a key range, and a page of results."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any

from sqlalchemy import Select, case, func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.store.db import read_in_index_order
from evalsvc.store.records import ResultRecord
from evalsvc.store.runs import ITEMS, JOBS, RESULTS, StoredSizes, result_with_size, results_sized
from evalsvc.store.staging import ItemDigests

# (item_id, repetition, grader, state, score): what pairing needs of one evaluation.
Evaluation = tuple[str, int, str, int, float]
# (item_id, repetition, grader): an evaluation's key, in the order comparisons list them.
Key = tuple[str, int, str]
# The most item bytes `undigested_items` holds at once (one larger item is read alone).
ITEM_BATCH_BYTES = 4 << 20


async def evaluations_after(
    conn: AsyncConnection, tenant: str, run_id: str, after: Key | None, grader: str, limit: int
) -> list[Evaluation]:
    """The first `limit` evaluations of a tenant's run after key `after` (from the first without it),
    in key order, only grader `grader`'s unless it is "": one ordered range of uq_results_evaluation,
    so a read costs the rows it returns (plus, with `grader`, the other graders' rows it passes).

    The order is code point order on both engines (the key columns are COLLATE "C" on PostgreSQL,
    models.code_point_ordered), which is Python's `str` order: callers may merge and compare keys of
    two runs' reads in Python."""
    await read_in_index_order(conn)
    rows = await conn.execute(evaluations_after_query(tenant, run_id, after, grader, limit))
    return [_evaluation(row) for row in rows]


def evaluations_after_query(tenant: str, run_id: str, after: Key | None, grader: str, limit: int) -> Select[Any]:
    """The statement of `evaluations_after` (tests read its plan)."""
    key = (RESULTS.c.item_id, RESULTS.c.repetition, RESULTS.c.grader)
    query = select(*key, RESULTS.c.state, RESULTS.c.score).where(RESULTS.c.run_id == run_id, RESULTS.c.tenant == tenant)
    if after is not None:
        query = query.where(tuple_(*key) > tuple_(*after))
    if grader:
        query = query.where(RESULTS.c.grader == grader)
    return query.order_by(*key).limit(limit)


async def item_digests_between(
    conn: AsyncConnection, tenant: str, run_id: str, first: str, last: str
) -> tuple[dict[str, ItemDigests], list[tuple[str, int]]]:
    """The digests stored with a tenant's run's items (models.RunItemRow) whose ids are from `first` to
    `last` and that have a result, by item id; and the ids and sizes of those stored without them (before
    revision 0028), for the caller to read (`undigested_items`) and hash. CompareRuns and
    ListComparisonItems check that a chunk of evaluations they pair is of the same items in both runs:
    64 bytes an item read here, where every item was read and parsed on every call (two runs of 50,000
    items of ~1 KB: CompareRuns 0.9 -> 3.4 s on PostgreSQL).

    Item ids reach run_items (stored by position) through one job of each item's results, one index lookup
    each way (`_items_of`). Reading by positions (`idx IN (...)`) instead had PostgreSQL filter every item
    of the run for each batch: ~45 ms a batch of 1,000, and CompareRuns of two 100,000-evaluation runs took
    4-7 s instead of ~1 s."""
    undigested = ITEMS.c.digest_with_metadata.is_(None)
    rows = await conn.execute(
        _items_of(
            tenant,
            run_id,
            first,
            last,
            ITEMS.c.digest_with_metadata,
            ITEMS.c.digest_without_metadata,
            case((undigested, func.length(ITEMS.c.item)), else_=0),
        )
    )
    digests: dict[str, ItemDigests] = {}
    sizes: list[tuple[str, int]] = []
    for item_id, with_metadata, without_metadata, size in rows:
        if with_metadata is None:
            sizes.append((item_id, size))
        else:
            digests[item_id] = ItemDigests(bytes(with_metadata), bytes(without_metadata))
    return digests, sizes


async def undigested_items(
    conn: AsyncConnection, tenant: str, run_id: str, sizes: Sequence[tuple[str, int]]
) -> AsyncGenerator[list[tuple[str, bytes]], None]:
    """The stored items (item id, serialized Item) of a tenant's run stored without their digests, as
    `item_digests_between` gave their ids and sizes, in batches of at most ITEM_BATCH_BYTES (or one item):
    a chunk's items may be large (a long context or conversation each), so they are never all held at
    once. Each batch is a range of ids, read as `item_digests_between` reads."""
    ranges: list[list[str]] = []  # [first id, last id] of each batch
    held = 0
    for item_id, size in sorted(sizes, key=lambda row: str(row[0])):  # code point order, as the key columns
        if ranges and held + size <= ITEM_BATCH_BYTES:
            ranges[-1][1] = item_id
            held += size
        else:
            ranges.append([item_id, item_id])
            held = size
    for low, high in ranges:
        batch = await conn.execute(
            _items_of(tenant, run_id, low, high, ITEMS.c.item).where(ITEMS.c.digest_with_metadata.is_(None))
        )
        yield [(item_id, bytes(item)) for item_id, item in batch]


def _items_of(tenant: str, run_id: str, first: str, last: str, *columns: Any) -> Select[Any]:
    """(item id, `columns` of its run_items row) for the items of a run with a result and an id from `first`
    to `last`: the results' key range (an index range), grouped by item id in index order, one job of each
    item by its primary key, and its run_items row by its primary key. A lookup per item, not per result:
    joining every result to its job cost PostgreSQL a lookup per evaluation (20 graders, 5 repetitions:
    100 per item)."""
    keys = (
        select(RESULTS.c.item_id, func.min(RESULTS.c.job_id).label("job_id"))
        .where(
            RESULTS.c.run_id == run_id,
            RESULTS.c.tenant == tenant,
            RESULTS.c.item_id >= first,
            RESULTS.c.item_id <= last,
        )
        .group_by(RESULTS.c.item_id)
        .subquery()
    )
    return (
        select(keys.c.item_id, *columns)
        .join(JOBS, JOBS.c.id == keys.c.job_id)
        .join(ITEMS, (ITEMS.c.run_id == run_id) & (ITEMS.c.idx == JOBS.c.item_idx))
    )


def _evaluation(row: Any) -> Evaluation:
    item_id, rep, grader, state, score = row
    return item_id, rep, grader, state, score


async def results_of_keys(
    conn: AsyncConnection, tenant: str, run_id: str, keys: Sequence[Key]
) -> list[tuple[ResultRecord, StoredSizes]]:
    """The results of some evaluations of a run, by key, without their explanations, each with the sizes
    of its explanation and its job's serialized output (store.runs `results_sized`; the page reads the
    explanations and outputs of the items it keeps alone). By the
    page's keys, not its items: every repetition and grader of a page's items, each with its output,
    was 2,000 rows and 84 MB for a page of one item of 100 repetitions and 20 graders."""
    if not keys:
        return []
    rows = await conn.execute(
        results_sized().where(
            RESULTS.c.run_id == run_id,
            RESULTS.c.tenant == tenant,
            tuple_(RESULTS.c.item_id, RESULTS.c.repetition, RESULTS.c.grader).in_(sorted(set(keys))),
        )
    )
    return [result_with_size(row) for row in rows.mappings()]
