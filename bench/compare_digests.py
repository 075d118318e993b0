"""CompareRuns and ListComparisonItems with run items' stored digests (revision 0028) and without them.

    .venv/bin/python -m bench.compare_digests --db sqlite
    .venv/bin/python -m bench.compare_digests --db postgres [--pg-url postgresql://postgres@127.0.0.1:5432/test]
    .venv/bin/python -m bench.compare_digests --db sqlite --page-only

Stores two runs of `--items` items (~1 KB each: a 700-character input, a 200-character expected output,
one metadata entry) x 2 graders straight through the run store (one evaluation per item and grader,
PASSED or FAILED at random, the candidate's first 100 items different), then times, best of 3, on the
in-process CompareService: a CompareRuns, and the first ListComparisonItems page of 100 keys. First as
the runs were stored (their items' digests read), then with the digests set to NULL, as runs stored
before revision 0028 are (their items read and hashed). Both must give the same answers. `--page-only`
times the page alone, as stored (what a page costs does not depend on the comparison's). The database
is a scratch one: a file under a temporary directory, or a database created and dropped on the
PostgreSQL server at `--pg-url` (EVALSVC_TEST_PG_URL by default, as the tests use).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.ids import PageTokens, new_id
from evalsvc.runs.compare import CompareService, item_digests
from evalsvc.store import migrate, usage
from evalsvc.store import runs as run_store
from evalsvc.store.db import Database
from evalsvc.v1 import comparison_pb2 as cpb
from evalsvc.v1 import grader_pb2, item_pb2, run_pb2

T = TypeVar("T")
GRADERS = ("exact", "similar")
SCRATCH = "evalsvc_bench_compare_digests"


def _items(count: int, changed: int) -> list[bytes]:
    """`count` items of ~1 KB; the first `changed` of them different (another dataset's edit)."""
    items = [
        item_pb2.Item(
            id=f"item{i:06d}", input=f"question {i} " + "x" * 700, expected_output="y" * 200, metadata={"k": "v"}
        )
        for i in range(count)
    ]
    for item in items[:changed]:
        item.input = f"other {item.id}"
    return [item.SerializeToString() for item in items]


async def _store_run(db: Database, tenant: str, items: list[bytes], rng: random.Random) -> str:
    """A finished run of `items` x GRADERS with its results, stored as CreateRun and recordings store them."""
    spec = run_pb2.Run(graders=[grader_pb2.Grader(name=name, exact_match=grader_pb2.ExactMatch()) for name in GRADERS])
    row: dict[str, Any] = {
        "id": new_id("run"), "tenant": tenant, "request_id": None, "request_hash": "", "dataset_id": "",
        "run_number": 0, "display_name": "", "description": "", "labels": {}, "annotations": {},
        "spec": spec.SerializeToString(), "status": run_pb2.RUN_STATUS_PENDING, "total_items": len(items),
        "total_evaluations": len(items) * len(GRADERS), "create_time": time.time(),
    }  # fmt: skip
    digests = [item_digests(item) for item in items]
    new = run_store.NewRun(row, items, digests, 1, usage.new_run_bytes(row, items, len(items)))
    await db.transact(lambda conn: run_store.insert_runs(conn, [new]))
    run_id: str = row["id"]
    async with db.read() as conn:
        jobs = (await conn.execute(run_store.JOBS.select().where(run_store.JOBS.c.run_id == run_id))).mappings().all()
    states = (run_pb2.RESULT_STATE_PASSED, run_pb2.RESULT_STATE_FAILED)
    rows = [
        run_store.result_tuple(
            id=job["id"] * 1024 + g,
            tenant=tenant,
            run_id=run_id,
            job_id=job["id"],
            item_id=f"item{job['item_idx']:06d}",
            repetition=0,
            grader=grader,
            state=rng.choice(states),
            score=1.0,
            raw_score=1.0,
            explanation="",
            error_reason="",
            attempt=1,
            cost_usd=0.0,
            latency_ms=0.0,
            complete_time=1.0,
            scoring_cost_usd=0.0,
            confidence=None,
            cached=False,
            verdict_cached=False,
            human_verdict=None,
        )
        for job in jobs
        for g, grader in enumerate(GRADERS)
    ]
    for start in range(0, len(rows), 20_000):
        part = rows[start : start + 20_000]

        async def record(conn: AsyncConnection, part: list[Any] = part) -> None:
            await run_store.insert_results(conn, part)

        await db.transact(record)
    finished = update(run_store.RUNS).where(run_store.RUNS.c.id == run_id).values(status=run_pb2.RUN_STATUS_SUCCEEDED)
    await db.transact(lambda conn: conn.execute(finished))
    return run_id


async def _best_of_3(call: Callable[[], Awaitable[T]]) -> tuple[float, T]:
    times, answer = [], None
    for _ in range(3):
        started = time.perf_counter()
        answer = await call()
        times.append(time.perf_counter() - started)
    assert answer is not None
    return min(times), answer


async def _measure(db: Database, items: int, postgres: bool, page_only: bool) -> None:
    rng = random.Random(1)
    tenant = "t1"
    baseline = await _store_run(db, tenant, _items(items, 0), rng)
    candidate = await _store_run(db, tenant, _items(items, 100), rng)
    if postgres:
        async with db.write() as conn:
            await conn.exec_driver_sql("ANALYZE")
    service = CompareService(db, PageTokens(b"k" * 32))
    compare = cpb.CompareRunsRequest(baseline_run_id=baseline, candidate_run_id=candidate)
    page = cpb.ListComparisonItemsRequest(baseline_run_id=baseline, candidate_run_id=candidate, page_size=100)

    if page_only:
        paged, _ = await _best_of_3(lambda: service.list_items(tenant, page))
        print(f"digests stored: a 100-key page {paged * 1000:.1f} ms")
        return

    async def both(label: str) -> tuple[Any, ...]:
        compared, comparison = await _best_of_3(lambda: service.compare(tenant, compare))
        paged, listed = await _best_of_3(lambda: service.list_items(tenant, page))
        print(f"{label}: CompareRuns {compared:.2f} s, a 100-key page {paged * 1000:.1f} ms")
        return comparison, listed

    stored = await both("digests stored")

    async def forget(conn: AsyncConnection) -> None:
        await conn.execute(update(run_store.ITEMS).values(digest_with_metadata=None, digest_without_metadata=None))

    await db.transact(forget)
    assert await both("digests NULL (before revision 0028: items read and hashed)") == stored


async def _admin(url: str, statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--items", type=int, default=50_000, help="items of each run (default: 50,000)")
    parser.add_argument(
        "--pg-url", default=os.environ.get("EVALSVC_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
    )
    parser.add_argument("--page-only", action="store_true", help="time the ListComparisonItems page alone")
    args = parser.parse_args()
    print(f"{args.db}: two runs of {args.items} items of ~1 KB x {len(GRADERS)} graders; best of 3")
    with tempfile.TemporaryDirectory() as scratch:
        if args.db == "sqlite":
            url = f"sqlite+aiosqlite:///{Path(scratch) / 'bench.db'}"
        else:
            await _admin(args.pg_url, f"DROP DATABASE IF EXISTS {SCRATCH}")
            await _admin(args.pg_url, f"CREATE DATABASE {SCRATCH}")
            url = make_url(args.pg_url).set(drivername="postgresql+asyncpg", database=SCRATCH).render_as_string(False)
        db = Database(url)
        try:
            await migrate.upgrade(db)
            await _measure(db, args.items, args.db == "postgres", args.page_only)
        finally:
            await db.close()
            if args.db == "postgres":
                await _admin(args.pg_url, f"DROP DATABASE {SCRATCH}")


if __name__ == "__main__":
    asyncio.run(main())
