"""The comparison reads (evalsvc.store.comparisons) over a bare database: a key range of a run's
evaluations costs the rows it returns, whatever the run's size and the planner's statistics."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.store import comparisons
from evalsvc.store import runs as run_store
from evalsvc.store.comparisons import Key
from evalsvc.store.db import Database
from evalsvc.v1 import item_pb2, run_pb2
from tests.unit.stored import forget_digests, insert, jobs_of, new_run, plan_nodes, unanalyzed

ITEMS = 5_000
GRADERS = ("exact", "similar")


def result(run_id: str, item_id: str, index: int, grader: str, job: int | None = None) -> tuple[Any, ...]:
    """A PASSED result of job `job` (by default the number in `item_id`, for runs without job rows)."""
    job = int(item_id[4:]) if job is None else job
    return run_store.result_tuple(
        id=job * 1024 + index, tenant="t1", run_id=run_id, job_id=job, item_id=item_id, repetition=0,
        grader=grader, state=run_pb2.RESULT_STATE_PASSED, score=1.0, raw_score=1.0, explanation="",
        error_reason="", attempt=1, cost_usd=0.0, latency_ms=0.0, complete_time=1.0, scoring_cost_usd=0.0,
        confidence=None, cached=False, verdict_cached=False, human_verdict=None,
    )  # fmt: skip


async def large_run(db: Database, items: int = ITEMS) -> str:
    """A run of `items` x GRADERS evaluations (10,000 by default), recorded straight into `results`."""
    run = new_run(graders=GRADERS)
    await insert(db, run)
    run_id: str = run.row["id"]
    rows = [result(run_id, f"item{i:05d}", g, grader) for i in range(items) for g, grader in enumerate(GRADERS)]

    async def work(conn: AsyncConnection) -> None:
        await run_store.insert_results(conn, rows)

    await db.transact(work)
    return run_id


async def graded_by_jobs(db: Database, items: int) -> run_store.NewRun:
    """A run of `items` items, each graded by GRADERS through its own job (item ids item0, item1...), as
    CreateRun and the recorder would store it: its results reach its run_items through their jobs."""
    run = new_run(items=items, graders=GRADERS)
    await insert(db, run)
    rows = [
        result(run.row["id"], f"item{job['item_idx']}", g, grader, job=job["id"])
        for job in await jobs_of(db, run.row["id"])
        for g, grader in enumerate(GRADERS)
    ]

    async def work(conn: AsyncConnection) -> None:
        await run_store.insert_results(conn, rows)

    await db.transact(work)
    return run


async def plan(conn: AsyncConnection, run_id: str, after: Key | None, grader: str, limit: int) -> Any:
    """The plan of `evaluations_after`'s statement on this connection, after the store's own read on
    it (which may set how the rest of its transaction is planned): rows visited on PostgreSQL (EXPLAIN
    ANALYZE), the steps on SQLite (EXPLAIN QUERY PLAN)."""
    rows = await comparisons.evaluations_after(conn, "t1", run_id, after, grader, limit)
    assert len(rows) == limit and (after is None or rows[0][:3] > after)
    query = comparisons.evaluations_after_query("t1", run_id, after, grader, limit)
    sql = str(query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    if conn.dialect.name == "postgresql":
        explained = (await conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + sql)).scalar_one()
        return max(int(node["Actual Rows"]) for node in plan_nodes(explained))
    return [row[-1] for row in await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)]


async def test_a_key_range_read_visits_only_the_rows_it_returns_whatever_the_statistics(db: Database) -> None:
    """ListComparisonItems reads each run's next keys after a page token's key, page after page. With
    no statistics of a large run's rows yet, PostgreSQL planned that read as a bitmap scan of every
    later row of the run and a sort (97,999 rows visited for 101, ~47 ms); it must go down the index
    in key order. SQLite must search the index by the key range, with no sort."""
    await unanalyzed(db, "results")
    run_id = await large_run(db)
    cases: list[tuple[Key | None, str]] = [
        (None, ""),
        (("item01000", 0, "exact"), ""),
        (("item01000", 0, "a"), "similar"),
    ]
    async with db.read() as conn:
        for after, grader in cases:
            found = await plan(conn, run_id, after, grader, 101)
            if conn.dialect.name == "postgresql":
                assert found <= 101, f"a read of 101 keys visited {found} rows ({after}, {grader!r})"
            else:
                searches = [step for step in found if "results" in step]
                assert searches and all("USING INDEX" in step for step in searches), found
                assert not any("TEMP B-TREE" in step for step in found), found
                if after is not None:
                    assert all("(item_id,repetition,grader)>(?,?,?)" in step for step in searches), found


async def test_a_page_reads_the_results_of_its_own_evaluations_only(db: Database) -> None:
    """A ListComparisonItems page read the results of its items: every repetition and grader of each,
    each with its job's output (2,000 rows and 84 MB for a page of one item of 100 repetitions and 20
    graders). It reads its evaluations' results, by the ids read with their keys, whatever else the items
    have; and only its tenant's."""
    run_id = await large_run(db, 3)
    async with db.read() as conn:
        evaluations = await comparisons.evaluations_after(conn, "t1", run_id, None, "", 10)
        wanted = [evaluations[3], evaluations[4]]  # ("item00001", 0, "similar"), ("item00002", 0, "exact")
        found = await comparisons.results_by_id(conn, "t1", [e[5] for e in wanted])
        assert sorted((r.id, r.item_id, r.repetition, r.grader) for r, _ in found) == [(e[5], *e[:3]) for e in wanted]
        assert await comparisons.results_by_id(conn, "t2", [e[5] for e in wanted]) == []  # another tenant's


async def test_a_pages_results_are_looked_up_whatever_the_runs_size(db: Database) -> None:
    """A ListComparisonItems page reads the results of its evaluations. Read by their keys, a row-value
    IN, neither engine looked them up: SQLite searched ix_results_run_state by run_id and tested every
    result of the run against the keys, PostgreSQL searched uq_results_evaluation by run_id (and the keys'
    one repetition) and filtered out all but the page's (two runs of 100,000 evaluations: 98-111 ms a
    100-key page on SQLite, 326-521 ms on PostgreSQL). A page's read of 100 results of a 50,000-result run
    must visit no more rows than that on PostgreSQL, and search results by its primary key alone on SQLite.
    (PostgreSQL rightly reads a table of 10,000 results whole for 100 of them: it costs less than 100
    lookups by its estimates; the run here is large enough for the lookups to cost less.)"""
    await unanalyzed(db, "results", "outputs")
    run_id = await large_run(db, items=25_000)
    statements: list[tuple[str, Any]] = []

    def seen(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    async with db.read() as conn:
        page = await comparisons.evaluations_after(conn, "t1", run_id, ("item01000", 0, "a"), "", 100)
        event.listen(conn.sync_connection, "before_cursor_execute", seen)
        found = await comparisons.results_by_id(conn, "t1", [e[5] for e in page])
        event.remove(conn.sync_connection, "before_cursor_execute", seen)
        assert sorted((r.item_id, r.repetition, r.grader) for r, _ in found) == [e[:3] for e in page]
        [(statement, parameters)] = statements
        if conn.dialect.name == "postgresql":
            explained = (
                await conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters)
            ).scalar_one()
            visited = {
                f"{node['Node Type']} {node.get('Relation Name', '')}": int(node["Actual Rows"])
                + int(node.get("Rows Removed by Filter", 0))
                for node in plan_nodes(explained)
            }
            assert max(visited.values()) <= len(page), visited
        else:
            steps = [row[-1] for row in await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)]
            reads = [step for step in steps if step.split(" ")[1] == "results"]
            assert reads == ["SEARCH results USING INTEGER PRIMARY KEY (rowid=?)"], steps


async def test_the_items_behind_a_key_range_are_read_by_index_lookups(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CompareRuns reads the digests of the items behind each chunk of evaluations it pairs, and the items
    of a run stored without them (before revision 0028) a batch at a time. Read by their positions
    (`idx IN (...)`), PostgreSQL filtered every item of the run for each batch (~45 ms a batch of 1,000:
    two 100,000-evaluation runs compared in 4-7 s instead of ~1 s). They are reached through a job of each
    item by index lookups: on PostgreSQL no step visits more rows than the range's results, and SQLite
    scans no table. The digests are those the run stored; without them, the batches hold every item of
    the range once."""
    await unanalyzed(db, "results", "jobs", "run_items")
    run = await graded_by_jobs(db, ITEMS)
    run_id: str = run.row["id"]
    # "item1000" to "item1099" in code point order: the 100 items item1000..item1099.
    wanted = sorted(f"item{i}" for i in range(ITEMS) if "item1000" <= f"item{i}" <= "item1099")
    monkeypatch.setattr(comparisons, "ITEM_BATCH_BYTES", 16 * len(run.items[1000]))
    statements: list[tuple[str, Any]] = []

    def seen(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    async with db.read() as conn:
        event.listen(conn.sync_connection, "before_cursor_execute", seen)
        digests, undigested = await comparisons.item_digests_between(conn, "t1", run_id, "item1000", "item1099")
        event.remove(conn.sync_connection, "before_cursor_execute", seen)
        assert undigested == []
        assert digests == {item_id: run.digests[int(item_id[4:])] for item_id in wanted}
    await forget_digests(db, run_id)
    async with db.read() as conn:
        event.listen(conn.sync_connection, "before_cursor_execute", seen)
        digests, undigested = await comparisons.item_digests_between(conn, "t1", run_id, "item1000", "item1099")
        assert digests == {} and sorted(undigested) == wanted
        batches = [batch async for batch in comparisons.undigested_items(conn, "t1", run_id, undigested)]
        event.remove(conn.sync_connection, "before_cursor_execute", seen)
        assert all(len(batch) <= 16 for batch in batches) and len(batches) == -(-len(wanted) // 16)
        got = [(item_id, item_pb2.Item.FromString(raw).id) for batch in batches for item_id, raw in batch]
        assert sorted(got) == [(item_id, item_id) for item_id in wanted]

        assert len(statements) > 3
        for statement, parameters in statements:
            if conn.dialect.name == "postgresql":
                explained = (
                    await conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters)
                ).scalar_one()
                visited = max(int(node["Actual Rows"]) for node in plan_nodes(explained))
                assert visited <= len(wanted) * len(GRADERS), f"{visited} rows visited: {statement}"
            else:
                steps = [row[-1] for row in await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)]
                tables = [step for step in steps if step.split(" ")[1] in ("results", "jobs", "run_items")]
                assert tables and all(step.startswith("SEARCH") for step in tables), steps


async def test_the_digests_are_read_from_their_covering_index_never_the_items(db: Database) -> None:
    """A comparison reads the stored digests of the items behind each chunk it pairs, and ListComparisonItems
    of each page. In the table they follow the item: SQLite reached them through each large item's overflow
    pages (60 items of 1 MB: 20-26 ms a read, 1.2 ms from the index). Both engines must read them from
    ix_run_items_digests alone: SQLite's plan says COVERING INDEX, PostgreSQL's an index-only scan."""
    await unanalyzed(db, "results", "jobs", "run_items")
    run = await graded_by_jobs(db, 50)
    run_id: str = run.row["id"]
    async with db.read() as conn:
        digests, _ = await comparisons.item_digests_between(conn, "t1", run_id, "item0", "item9")
        assert len(digests) == 50
        sql = str(
            comparisons.digests_read("t1", run_id, "item0", "item9").compile(
                dialect=conn.dialect, compile_kwargs={"literal_binds": True}
            )
        )
        if conn.dialect.name == "postgresql":
            explained = (await conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + sql)).scalar_one()
            reads = [node["Node Type"] for node in plan_nodes(explained) if node.get("Relation Name") == "run_items"]
            assert reads == ["Index Only Scan"], reads
        else:
            steps = [row[-1] for row in await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)]
            reads = [step for step in steps if "run_item" in step]
            assert reads and all("USING COVERING INDEX ix_run_items_digests" in step for step in reads), steps
