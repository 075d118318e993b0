"""Queries behind CompareRuns and ListComparisonItems: a key range of each of two runs' evaluations, and a
page of results."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.store.db import read_in_index_order
from evalsvc.store.records import ResultRecord
from evalsvc.store.runs import RESULTS, StoredSizes, result_with_size, results_sized

# (item_id, repetition, grader, state, score): what pairing needs of one evaluation.
Evaluation = tuple[str, int, str, int, float]
# (item_id, repetition, grader): an evaluation's key, in the order comparisons list them.
Key = tuple[str, int, str]


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
