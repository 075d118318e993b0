"""Runs stored straight through the run store, for the unit tests of the store and the recorder."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.ids import new_id
from evalsvc.runs.compare import item_digests
from evalsvc.store import events as event_log
from evalsvc.store import runs as run_store
from evalsvc.store import usage
from evalsvc.store.db import Database
from evalsvc.store.models import JobRow
from evalsvc.store.records import RunRecord
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import grader_pb2, item_pb2, run_pb2

JOBS = JobRow.__table__  # type: ignore[attr-defined]


def run_record(run_id: str, version: int = 1, *, spec_bytes: int = 0) -> RunRecord:
    """A run record the run cache can hold: its id and version (what tells rows apart) and the size of
    its definition (what it weighs) matter to the cache."""
    columns: dict[str, Any] = {field.name: None for field in fields(RunRecord)}
    weighed = {"spec": b"x" * spec_bytes, "annotations": {}, "description": "", "aggregate": None}
    return RunRecord(**{**columns, **weighed, "id": run_id, "tenant": "t", "version": version})


def col(row: Any, name: str) -> Any:
    """A column of a row the store returned, whether it is a mapping or a typed record."""
    return getattr(row, name) if hasattr(row, name) else row[name]


def new_run(
    tenant: str = "t1",
    *,
    items: int = 2,
    repetitions: int = 1,
    graders: Sequence[str] = ("exact",),
    request_id: str | None = None,
    dataset_id: str = "",
    labels: Mapping[str, str] | None = None,
    run_number: int = 0,
) -> run_store.NewRun:
    """A PENDING run as CreateRun would store it: `items` items x `repetitions` x `graders` evaluations."""
    spec = run_pb2.Run(
        graders=[grader_pb2.Grader(name=name, exact_match=grader_pb2.ExactMatch()) for name in graders],
        repetitions=repetitions,
    )
    row = {
        "id": new_id("run"),
        "tenant": tenant,
        "request_id": request_id,
        "request_hash": "",
        "dataset_id": dataset_id,
        "run_number": run_number,
        "display_name": "",
        "description": "",
        "labels": dict(labels or {}),
        "annotations": {},
        "spec": spec.SerializeToString(),
        "status": run_pb2.RUN_STATUS_PENDING,
        "total_items": items,
        "total_evaluations": items * repetitions * len(graders),
        "create_time": time.time(),
    }
    stored_items = [item_pb2.Item(id=f"item{i}", input=f"q{i}").SerializeToString() for i in range(items)]
    digests = [item_digests(item) for item in stored_items]
    return run_store.NewRun(
        row, stored_items, digests, repetitions, usage.new_run_bytes(row, stored_items, items * repetitions)
    )


async def insert(db: Database, *runs: run_store.NewRun) -> list[pb.WatchRunResponse]:
    """Store runs in one transaction; their first events, in order."""

    async def work(conn: AsyncConnection) -> list[pb.WatchRunResponse]:
        return await run_store.insert_runs(conn, runs)

    return await db.transact(work)


async def get(db: Database, run_id: str) -> Any:
    """A run's row as committed (a mapping or a record: read it with `col`)."""
    async with db.read() as conn:
        return await run_store.get_any_tenant(conn, run_id)


async def jobs_of(db: Database, run_id: str) -> list[Mapping[str, Any]]:
    """A run's job rows, by id."""
    async with db.read() as conn:
        rows = await conn.execute(select(JOBS).where(JOBS.c.run_id == run_id).order_by(JOBS.c.id))
        return list(rows.mappings())


async def logged(db: Database, tenant: str, run_id: str) -> list[pb.WatchRunResponse]:
    """A run's committed event log, in seq order."""
    async with db.read() as conn:
        return await event_log.read_after(conn, tenant, run_id, 0, 10_000)


async def unanalyzed(db: Database, *tables: str) -> None:
    """On PostgreSQL, keep the tables without planner statistics while a test fills them, as a fresh
    database's are during a large run's inserts until autovacuum's first ANALYZE: the state in which
    PostgreSQL picked plans that scan every later row of the run. (Statistics of small tables, taken
    with ANALYZE, do not reproduce it: with them the planner chooses an ordered index scan.)"""
    if db.writer.dialect.name != "postgresql":
        return
    async with db.writer.connect() as conn:
        autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
        for table in tables:
            await autocommit.exec_driver_sql(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")


def plan_nodes(plan: Any) -> list[dict[str, Any]]:
    """Every node of a PostgreSQL EXPLAIN (FORMAT JSON) plan, as the driver returned it."""
    if isinstance(plan, str):
        plan = json.loads(plan)
    if isinstance(plan, list):
        return [node for item in plan for node in plan_nodes(item)]
    if not isinstance(plan, dict):
        return []
    nodes = [plan] if "Node Type" in plan else []
    for key in ("Plan", "Plans"):
        if key in plan:
            nodes += plan_nodes(plan[key])
    return nodes


def pg_error(kind: type[Exception], message: str = "...") -> sa_exc.DBAPIError:
    """asyncpg's exception as SQLAlchemy's asyncpg dialect raises it: a plain DBAPIError around it, not
    an OperationalError (only integrity violations, syntax errors and client errors get a more specific
    class); asyncpg's exception carries the SQLSTATE."""
    return sa_exc.DBAPIError("INSERT ...", {}, kind(message))


async def forget_digests(db: Database, *run_ids: str) -> None:
    """Null runs' items' digests, as revision 0028 left the runs stored before it."""

    async def work(conn: AsyncConnection) -> None:
        await conn.execute(
            update(run_store.ITEMS)
            .where(run_store.ITEMS.c.run_id.in_(run_ids))
            .values(digest_with_metadata=None, digest_without_metadata=None)
        )

    await db.transact(work)
