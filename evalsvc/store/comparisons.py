"""Queries behind CompareRuns and ListComparisonItems: a key range of each of two runs' evaluations, the
items behind a key range, and a page of results."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any

from sqlalchemy import Select, func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.store.db import read_in_index_order
from evalsvc.store.records import ResultRecord
from evalsvc.store.runs import ITEMS, JOBS, RESULTS, StoredSizes, result_with_size, results_sized

# (item_id, repetition, grader, state, score): what pairing needs of one evaluation.
Evaluation = tuple[str, int, str, int, float]
# (item_id, repetition, grader): an evaluation's key, in the order comparisons list them.
Key = tuple[str, int, str]
# The most item bytes `items_between` holds at once (one larger item is read alone).
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


async def items_between(
    conn: AsyncConnection, tenant: str, run_id: str, first: str, last: str
) -> AsyncGenerator[list[tuple[str, bytes]], None]:
    """The stored items (item id, serialized Item) of a tenant's run whose ids are from `first` to `last`
    and that have a result, in batches of at most ITEM_BATCH_BYTES (or one item): CompareRuns digests the
    items behind each chunk of evaluations it pairs, and a chunk's items may be large (a long context or
    conversation each), so they are never all held at once. Their sizes are read first, without the
    items; then each batch, a narrower range of ids, with its items.

    Item ids reach run_items (stored by position) through one job of each item's results, one index lookup
    each way (`_items_of`). Reading a batch by its positions (`idx IN (...)`) instead had PostgreSQL filter every
    item of the run for each batch: ~45 ms a batch of 1,000, and CompareRuns of two 100,000-evaluation
    runs took 4-7 s instead of ~1 s."""
    sized = await conn.execute(_items_of(tenant, run_id, first, last, func.length(ITEMS.c.item)))
    ranges: list[list[str]] = []  # [first id, last id] of each batch
    held = 0
    for item_id, size in sorted(sized, key=lambda row: str(row[0])):  # code point order, as the key columns
        if ranges and held + size <= ITEM_BATCH_BYTES:
            ranges[-1][1] = item_id
            held += size
        else:
            ranges.append([item_id, item_id])
            held = size
    for low, high in ranges:
        batch = await conn.execute(_items_of(tenant, run_id, low, high, ITEMS.c.item))
        yield [(item_id, bytes(item)) for item_id, item in batch]


def _items_of(tenant: str, run_id: str, first: str, last: str, column: Any) -> Select[Any]:
    """(item id, `column` of its run_items row) for the items of a run with a result and an id from `first`
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
        select(keys.c.item_id, column)
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
