"""Queries behind CompareRuns and ListComparisonItems: a key range of each of two runs' evaluations, the
digests of the items behind a key range, and a page of results."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any

from sqlalchemy import Select, func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.selectable import Alias, FromClause

from evalsvc.store.db import read_in_index_order
from evalsvc.store.models import DIGESTS_INDEX
from evalsvc.store.records import ResultRecord
from evalsvc.store.runs import ITEMS, JOBS, RESULTS, StoredSizes, result_with_size, results_sized
from evalsvc.store.staging import ItemDigests

# (item_id, repetition, grader, state, score, result id): what pairing needs of one evaluation, and the
# id by which a ListComparisonItems page reads the rest of its result (`results_by_id`).
Evaluation = tuple[str, int, str, int, float, int]
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
    query = select(*key, RESULTS.c.state, RESULTS.c.score, RESULTS.c.id).where(
        RESULTS.c.run_id == run_id, RESULTS.c.tenant == tenant
    )
    if after is not None:
        query = query.where(tuple_(*key) > tuple_(*after))
    if grader:
        query = query.where(RESULTS.c.grader == grader)
    return query.order_by(*key).limit(limit)


async def item_digests_between(
    conn: AsyncConnection, tenant: str, run_id: str, first: str, last: str
) -> tuple[dict[str, ItemDigests], list[str]]:
    """The digests stored with a tenant's run's items (models.RunItemRow) whose ids are from `first` to
    `last` and that have a result, by item id; and the ids of those stored without them (before revision
    0028), for the caller to read (`undigested_items`) and hash. CompareRuns and ListComparisonItems check
    that a chunk of evaluations they pair is of the same items in both runs: 64 bytes an item read here,
    where every item was read and parsed on every call (two runs of 50,000 items of ~1 KB: CompareRuns
    5.3 -> 2.3 s on PostgreSQL, 4.5 -> 1.6 s on SQLite; revision 0028).

    Read from DIGESTS_INDEX alone (a covering index: `digests_read`), never the item's column: on
    SQLite the digests stored after a large item are reached through its overflow pages (60 items of 1 MB:
    20-26 ms a read through the table, 1.2 ms from the index; PostgreSQL, which keeps large items apart,
    ~1.3 ms either way).

    Item ids reach run_items (stored by position) through one job of each item's results, one index lookup
    each way (`_items_of`). Reading by positions (`idx IN (...)`) instead had PostgreSQL filter every item
    of the run for each batch: ~45 ms a batch of 1,000, and CompareRuns of two 100,000-evaluation runs took
    4-7 s instead of ~1 s."""
    rows = await conn.execute(digests_read(tenant, run_id, first, last))
    digests: dict[str, ItemDigests] = {}
    undigested: list[str] = []
    for item_id, with_metadata, without_metadata in rows:
        if with_metadata is None:
            undigested.append(item_id)
        else:
            digests[item_id] = ItemDigests(bytes(with_metadata), bytes(without_metadata))
    return digests, undigested


def digests_read(tenant: str, run_id: str, first: str, last: str) -> Select[Any]:
    """The statement of `item_digests_between` (tests read its plan)."""
    return _items_of(
        tenant, run_id, first, last, _DIGESTS.c.digest_with_metadata, _DIGESTS.c.digest_without_metadata, items=_DIGESTS
    )


class _IndexedBy(Alias):
    """run_items read through DIGESTS_INDEX, named to SQLite (INDEXED BY): without statistics it prefers the
    primary key's index, unique on the same (run_id, idx), and reads the digests from the table. PostgreSQL
    chooses the index itself (an index-only scan)."""

    inherit_cache = True


@compiles(_IndexedBy, "sqlite")
def _indexed_by(element: _IndexedBy, compiler: Any, **kw: Any) -> str:
    aliased: str = compiler.visit_alias(element, **kw)
    return f"{aliased} INDEXED BY {DIGESTS_INDEX}" if kw.get("asfrom") else aliased


_DIGESTS = _IndexedBy._construct(ITEMS, name="run_item_digests")


async def undigested_items(
    conn: AsyncConnection, tenant: str, run_id: str, item_ids: Sequence[str]
) -> AsyncGenerator[list[tuple[str, bytes]], None]:
    """The stored items (item id, serialized Item) of a tenant's run stored without their digests, of the
    ids `item_digests_between` gave, in batches of at most ITEM_BATCH_BYTES (or one item): a chunk's items
    may be large (a long context or conversation each), so they are never all held at once. Their sizes
    are read first (only these rows' items are touched: a run stored with digests reads none), then each
    batch, a range of ids, with its items; read as `item_digests_between` reads."""
    if not item_ids:
        return
    undigested = ITEMS.c.digest_with_metadata.is_(None)
    sized = await conn.execute(
        _items_of(tenant, run_id, min(item_ids), max(item_ids), func.length(ITEMS.c.item)).where(undigested)
    )
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
        batch = await conn.execute(_items_of(tenant, run_id, low, high, ITEMS.c.item).where(undigested))
        yield [(item_id, bytes(item)) for item_id, item in batch]


def _items_of(tenant: str, run_id: str, first: str, last: str, *columns: Any, items: FromClause = ITEMS) -> Select[Any]:
    """(item id, `columns` of its run_items row, read as `items`) for the items of a run with a result and
    an id from `first` to `last`: the results' key range (an index range), grouped by item id in index
    order, one job of each item by its primary key, and its run_items row by (run_id, idx). A lookup per
    item, not per result: joining every result to its job cost PostgreSQL a lookup per evaluation (20
    graders, 5 repetitions: 100 per item)."""
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
        .join(items, (items.c.run_id == run_id) & (items.c.idx == JOBS.c.item_idx))
    )


def _evaluation(row: Any) -> Evaluation:
    item_id, rep, grader, state, score, result_id = row
    return item_id, rep, grader, state, score, result_id


async def results_by_id(
    conn: AsyncConnection, tenant: str, result_ids: Sequence[int]
) -> list[tuple[ResultRecord, StoredSizes]]:
    """The results of some evaluations of a tenant's run, by the ids `evaluations_after` gave with their
    keys, without their explanations, each with the sizes of its explanation and its job's serialized
    output (store.runs `results_sized`; the page reads the explanations and outputs of the items it keeps
    alone). By the page's evaluations, not its items: every repetition and grader of a page's items, each
    with its output, was 2,000 rows and 84 MB for a page of one item of 100 repetitions and 20 graders.

    One primary key lookup a result, whatever the run's size. By their keys, a row-value
    `(item_id, repetition, grader) IN (...)`, neither engine looked them up: SQLite searched
    ix_results_run_state by run_id and tested every result of the run against the list, PostgreSQL
    searched uq_results_evaluation by run_id (and a repetition common to all keys) and filtered the
    rest: with two runs of 100,000 evaluations, 98-111 ms a 100-key page on SQLite, 326-521 ms on
    PostgreSQL, nearly all of it there. No condition on run_id: the ids are the run's (read from it), and
    beside one SQLite, without statistics, still searched ix_results_run_state by it and every result of
    the run (an equality on an indexed column looks like ~10 rows to it)."""
    if not result_ids:
        return []
    rows = await conn.execute(
        results_sized().where(RESULTS.c.id.in_(sorted(set(result_ids))), RESULTS.c.tenant == tenant)
    )
    return [result_with_size(row) for row in rows.mappings()]
