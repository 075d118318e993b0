"""Queries behind CompareRuns and ListComparisonItems: two runs' evaluations, and a page of results."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.store.records import ResultRecord
from evalsvc.store.runs import RESULTS, result_with_output, results_with_outputs
from evalsvc.turns import mapped

# (item_id, repetition, grader, state, score): what pairing needs of one evaluation.
Evaluation = tuple[str, int, str, int, float]


async def evaluations(conn: AsyncConnection, tenant: str, run_id: str) -> list[Evaluation]:
    """Every recorded evaluation of a tenant's run, without explanations or outputs."""
    rows = await conn.execute(
        select(RESULTS.c.item_id, RESULTS.c.repetition, RESULTS.c.grader, RESULTS.c.state, RESULTS.c.score).where(
            RESULTS.c.run_id == run_id, RESULTS.c.tenant == tenant
        )
    )
    # In turns (evalsvc.turns): a run of 100,000 evaluations was one stretch of the event loop.
    return await mapped(_evaluation, rows)


def _evaluation(row: Any) -> Evaluation:
    item_id, rep, grader, state, score = row
    return item_id, rep, grader, state, score


async def results_of_items(
    conn: AsyncConnection, tenant: str, run_id: str, item_ids: Sequence[str]
) -> list[tuple[ResultRecord, bytes | None]]:
    """The results of some items of a run, each with its job's serialized output."""
    if not item_ids:
        return []
    rows = await conn.execute(
        results_with_outputs().where(
            RESULTS.c.run_id == run_id, RESULTS.c.tenant == tenant, RESULTS.c.item_id.in_(sorted(set(item_ids)))
        )
    )
    return [result_with_output(row) for row in rows.mappings()]
