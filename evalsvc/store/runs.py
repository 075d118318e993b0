"""Queries on runs, their items, labels and results."""

from __future__ import annotations

import operator
import sqlite3
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, cast

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import (
    ColumnElement,
    Float,
    FromClause,
    Integer,
    RowMapping,
    Select,
    and_,
    case,
    exists,
    func,
    insert,
    literal,
    select,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from evalsvc import statuses
from evalsvc.limits import StoredCap
from evalsvc.messages.convert import timestamp
from evalsvc.messages.run_filter import Term
from evalsvc.store import events, staging, usage
from evalsvc.store import jobs as job_store
from evalsvc.store import webhooks as webhook_store
from evalsvc.store.bulk import execute_many, fetch_all, insert_tuples
from evalsvc.store.db import Database, read_in_index_order
from evalsvc.store.models import (
    JOB_CANCELLED,
    JOB_LEASED,
    JOB_QUEUED,
    JobRow,
    OutputRow,
    ResultRow,
    RunCounterRow,
    RunItemRow,
    RunLabelRow,
    RunRow,
    TenantRunTotalsRow,
)
from evalsvc.store.records import GraderTally, ResultRecord, RunListing, RunRecord, counts_from, run_from
from evalsvc.store.run_cache import remember
from evalsvc.turns import mapped
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import item_pb2, run_pb2

RUNS = RunRow.__table__  # type: ignore[attr-defined]
LABELS = RunLabelRow.__table__  # type: ignore[attr-defined]
COUNTERS = RunCounterRow.__table__  # type: ignore[attr-defined]
ITEMS = RunItemRow.__table__  # type: ignore[attr-defined]
JOBS = JobRow.__table__  # type: ignore[attr-defined]
RESULTS = ResultRow.__table__  # type: ignore[attr-defined]
OUTPUTS = OutputRow.__table__  # type: ignore[attr-defined]
TOTALS = TenantRunTotalsRow.__table__  # type: ignore[attr-defined]


def _first(row: RowMapping | None) -> RunRecord | None:
    """The record of a run row a query may not have found."""
    return None if row is None else RunRecord.from_row(row)


async def find_by_request_id(conn: AsyncConnection, tenant: str, request_id: str) -> RunRecord | None:
    """The run created with this idempotency key, if any."""
    found = await conn.execute(select(RUNS).where(RUNS.c.tenant == tenant, RUNS.c.request_id == request_id))
    return _first(found.mappings().first())


async def find_by_request_ids(
    conn: AsyncConnection, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], RunRecord]:
    """The runs created with these (tenant, request_id) idempotency keys, by key: one statement."""
    if not keys:
        return {}
    rows = await conn.execute(select(RUNS).where(tuple_(RUNS.c.tenant, RUNS.c.request_id).in_(list(set(keys)))))
    found: dict[tuple[str, str], RunRecord] = {}
    for row in rows.mappings():
        run = RunRecord.from_row(row)
        assert run.request_id is not None  # it was found by it
        found[(run.tenant, run.request_id)] = run
    return found


@dataclass(frozen=True)
class TenantRuns:
    """What CreateRun checks a tenant's limits against: its PENDING or RUNNING runs, the runs it stores
    (deleted ones included until they are purged), and the bytes it stores (evalsvc.store.usage)."""

    active: int = 0
    stored: int = 0
    stored_bytes: int = 0


async def tenant_runs(conn: AsyncConnection, tenants: Sequence[str]) -> dict[str, TenantRuns]:
    """The active and stored runs of each of these tenants: two statements, under the tenants' locks
    (store.quotas) so that two replicas' CreateRuns cannot both take a tenant's last place (with a
    limit of 1, one CreateRun on each of two replicas left 2 active runs in 9 trials of 10). The
    stored count is the tenant's `tenant_run_totals` row, kept by `insert_runs` and the purge: a
    tenant's 100,000 runs are never counted on CreateRun's path. The purge lowers it without the lock,
    which can only make a count taken meanwhile too high for an instant, never too low."""
    await usage.lock(conn, tenants)
    wanted = sorted(set(tenants))
    rows = await conn.execute(
        select(RUNS.c.tenant, func.count())
        .where(RUNS.c.tenant.in_(wanted), RUNS.c.status.in_(list(statuses.ACTIVE)))
        .group_by(RUNS.c.tenant)
    )
    active = {tenant: int(n) for tenant, n in rows}
    totals = await conn.execute(
        select(TOTALS.c.tenant, TOTALS.c.runs, TOTALS.c.stored_bytes).where(TOTALS.c.tenant.in_(wanted))
    )
    stored = {tenant: (int(n), int(size)) for tenant, n, size in totals}
    return {tenant: TenantRuns(active.get(tenant, 0), *stored.get(tenant, (0, 0))) for tenant in tenants}


async def allocate_run_numbers(conn: AsyncConnection, tenant: str, dataset_id: str, count: int = 1) -> int:
    """Allocate the next `count` run_numbers of a dataset (or of the tenant's inline runs) atomically;
    returns the first.

    One upsert, not update-then-insert: on PostgreSQL two first runs of a dataset would otherwise
    both find no counter and one would fail on the primary key."""
    dialect_insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    statement = dialect_insert(COUNTERS).values(tenant=tenant, dataset_id=dataset_id, last=count)
    bumped = await conn.execute(
        statement.on_conflict_do_update(
            index_elements=[COUNTERS.c.tenant, COUNTERS.c.dataset_id], set_={"last": COUNTERS.c.last + count}
        ).returning(COUNTERS.c.last)
    )
    return int(bumped.scalar_one()) - count + 1


@dataclass(frozen=True)
class NewRun:
    """A run to store: its row (every column CreateRun sets, run_number included), its copied items and
    their digests (`digests[i]` of `items[i]`, staging.ItemDigests), how many times each is evaluated, the
    bytes it stores (`usage.new_run_bytes`), and whether its items and jobs were staged (written before,
    evalsvc.store.staging)."""

    row: Mapping[str, Any]
    items: Sequence[bytes]
    digests: Sequence[staging.ItemDigests]
    repetitions: int
    stored_bytes: int
    staged: bool = False


def _as_is(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return row


async def insert_runs(conn: AsyncConnection, runs: Sequence[NewRun]) -> list[pb.WatchRunResponse]:
    """Store new runs, their copied items, one job per item x repetition, each run's first event (seq 1)
    and the webhook deliveries that report them: one multi-row statement per table for all of them,
    and each tenant's stored runs and bytes raised (`usage.add_to_totals`). Returns each run's first event,
    in order."""
    if not runs:
        return []
    inserted = await conn.execute(
        insert(RUNS).returning(*RUNS.c, sort_by_parameter_order=True),
        [
            {**new.row, "last_seq": 1, "update_time": new.row["create_time"], "stored_bytes": new.stored_bytes}
            for new in runs
        ],
    )
    stored = [RunRecord.from_row(row) for row in inserted.mappings()]
    labels = [
        {"run_id": new.row["id"], "key": k, "value": v, "tenant": new.row["tenant"]}
        for new in runs
        for k, v in new.row["labels"].items()
    ]
    if labels:
        await conn.execute(insert(LABELS), labels)
    # A run may hold 100,000 items x repetitions: their rows are built in turns (evalsvc.turns). A staged
    # run's rows are written already (evalsvc.store.staging).
    unstaged = [new for new in runs if not new.staged]
    item_rows = await mapped(
        _as_is,
        (
            row
            for new in unstaged
            for row in staging.item_rows(new.row["id"], new.row["tenant"], new.items, new.digests)
        ),
    )
    await insert_tuples(conn, ITEMS, staging.ITEM_COLUMNS, item_rows)
    job_rows = await mapped(
        _as_is,
        (
            row
            for new in unstaged
            for row in staging.job_rows(new.row["id"], new.row["tenant"], len(new.items), new.repetitions)
        ),
    )
    await insert_tuples(conn, JOBS, staging.JOB_COLUMNS, job_rows)
    size: Counter[str] = Counter()
    for run in stored:
        size[run.tenant] += run.stored_bytes
    await usage.add_to_totals(conn, runs=Counter(run.tenant for run in stored), stored_bytes=size)
    return await _record_changes(conn, stored)


def run_event(run: RunRecord) -> pb.WatchRunResponse:
    """The event recording a run's state, with seq = the run's last_seq."""
    return pb.WatchRunResponse(
        seq=run.last_seq,
        event_time=timestamp(run.update_time),
        counts=counts_from(run),
        run=run_from(run),
    )


async def get(conn: AsyncConnection, tenant: str, run_id: str, *, lock: bool = False) -> RunRecord | None:
    """A tenant's run, or None (also for another tenant's run). `lock` holds the row until the write
    transaction ends (PostgreSQL's FOR UPDATE; SQLite's one writer holds everything already), so a
    read-check-write on it is atomic. Lock jobs before their run (see `cancel_jobs`)."""
    query = select(RUNS).where(RUNS.c.id == run_id, RUNS.c.tenant == tenant)
    found = await conn.execute(query.with_for_update() if lock else query)
    return _first(found.mappings().first())


async def get_current_row(db: Database, tenant: str, run_id: str) -> RunRecord | None:
    """A tenant's run row as last committed, for a caller that needs no transaction: from the run cache
    where the database has one (see evalsvc.store.run_cache), else read (and cached).

    "Not yours" is "does not exist", in the answer and in the time it takes. Another tenant's run is
    looked up in the database as an id with no run is, by id and tenant, so nothing of it is read:
    answered from the cache it took half the time of a missing id, and read whole (a 2.8 MB definition,
    decoded, then cached) twice the time, either of which told that it exists."""
    cache = db.run_rows
    row = cache.get(run_id) if cache is not None else None
    if row is not None and row.tenant == tenant:
        return row
    started = cache.read_started() if cache is not None else 0
    async with db.read() as conn:
        row = await get(conn, tenant, run_id)
    if row is not None and cache is not None:
        cache.fill(row, started)
    return row


async def get_current_run(db: Database, tenant: str, run_id: str) -> run_pb2.Run | None:
    """A tenant's run as a message (see `get_current_row`). Where the database has a run cache the
    message is built once per change and shared: copy it before changing it."""
    row = await get_current_row(db, tenant, run_id)
    if row is None:
        return None
    return db.run_rows.derived(row, run_from) if db.run_rows is not None else run_from(row)


# A page position of ListRuns: the last listed run's (create_time, id); a bare id in tokens issued before
# ListRuns had order_by, which listed by id (ids sort by creation time: evalsvc.ids).
RunPosition = tuple[float, str] | str


@dataclass(frozen=True)
class RunsWanted:
    """What ListRuns asks for, but the page position: its filters (all of which a run must match), its
    order, and whether it wants RunListings (RUN_VIEW_BASIC) rather than whole RunRecords."""

    statuses: Sequence[int] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    dataset_id: str = ""
    show_deleted: bool = False
    terms: Sequence[Term] = ()  # of the filter (evalsvc.messages.run_filter)
    newest_first: bool = True
    basic: bool = False


# The columns of a listed run that can be large, by what a page reads (RUN_VIEW_BASIC: RunListing's): what a
# page chooses its runs by before reading them (`list_sizes`).
BASIC_SIZED = ("aggregate", "description", "labels", "error_message")
FULL_SIZED = (*BASIC_SIZED, "spec", "annotations")


async def list_sizes(
    conn: AsyncConnection, tenant: str, wanted: RunsWanted, *, after: RunPosition | None, limit: int
) -> list[tuple[tuple[float, str], int]]:
    """The position (create_time, id) and size of the runs a ListRuns page would answer, in its order
    (`list_sizes_query`): what the page chooses its runs by before it reads them (`list_page`). A run's
    definition may be a quarter of --max-message-bytes: read whole, a page of 1,000 such runs read ~4 GB to
    answer with the few that fit in a message."""
    rows: Any = await conn.execute(list_sizes_query(tenant, wanted, after=after, limit=limit))
    return [((create_time, run_id), int(size)) for create_time, run_id, size in rows]


async def list_page(
    conn: AsyncConnection, tenant: str, ids: Sequence[str], wanted: RunsWanted
) -> list[RunRecord | RunListing]:
    """A tenant's runs of these ids (chosen by `list_sizes` for `wanted`), in their order: every column of
    RunRecord, or for `basic` RunListing's, so that the definition's columns are not read. Those purged
    meanwhile are left out, and unless `show_deleted` those soft-deleted meanwhile (each statement reads the
    latest commit: the sizes read saw them live)."""
    record = RunListing if wanted.basic else RunRecord
    query = select(*(RUNS.c[field.name] for field in fields(record))).where(RUNS.c.tenant == tenant, RUNS.c.id.in_(ids))
    if not wanted.show_deleted:
        query = query.where(RUNS.c.delete_time.is_(None))
    by_id = {row["id"]: row for row in (await conn.execute(query)).mappings()}
    return [record.from_row(by_id[run_id]) for run_id in ids if run_id in by_id]


def list_sizes_query(tenant: str, wanted: RunsWanted, *, after: RunPosition | None, limit: int) -> Select[Any]:
    """ListRuns' query: a tenant's runs by (create_time, id), newest or oldest first, after a keyset position,
    matching every filter wanted, as (create_time, id, size), the size of what the page reads of each
    (FULL_SIZED, or BASIC_SIZED for `basic`, so that a basic page never reads the definition). The order is
    the index `ix_runs_tenant_create_time`'s: a page reads its `limit` rows from it (a time range is a range
    of it) rather than sorting the tenant's runs."""
    key = tuple_(RUNS.c.create_time, RUNS.c.id)
    newest_first = wanted.newest_first
    size = usage.stored_size(RUNS, BASIC_SIZED if wanted.basic else FULL_SIZED)
    query = select(RUNS.c.create_time, RUNS.c.id, size).where(RUNS.c.tenant == tenant)
    if not wanted.show_deleted:
        query = query.where(RUNS.c.delete_time.is_(None))
    if isinstance(after, str):
        query = query.where(RUNS.c.id < after if newest_first else RUNS.c.id > after)
    elif after is not None:
        mark = tuple_(literal(after[0], Float), literal(after[1]))
        query = query.where(key < mark if newest_first else key > mark)
    if wanted.statuses:
        query = query.where(RUNS.c.status.in_(list(wanted.statuses)))
    if wanted.dataset_id:
        query = query.where(RUNS.c.dataset_id == wanted.dataset_id)
    if wanted.labels:
        query = query.where(*_having_labels(wanted.labels))
    query = query.where(*map(_matching, wanted.terms))
    order = (RUNS.c.create_time.desc(), RUNS.c.id.desc()) if newest_first else (RUNS.c.create_time, RUNS.c.id)
    return query.order_by(*order).limit(limit)


_COMPARED = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "=": operator.eq}


def _matching(term: Term) -> ColumnElement[bool]:
    """The WHERE clause of one term of a ListRuns filter (evalsvc.messages.run_filter). `display_name:` is a
    case-insensitive substring whose LIKE wildcards (% and _) are escaped, so they match themselves;
    `labels.KEY` is an EXISTS on the run's label rows (`labels.KEY:*`: any value)."""
    if term.field == "labels":
        having = [LABELS.c.run_id == RUNS.c.id, LABELS.c.key == term.key]
        if term.value is not None:
            having.append(LABELS.c.value == term.value)
        return exists().where(*having)
    column = RUNS.c[term.field]
    if term.op == ":":
        return cast("ColumnElement[bool]", column.icontains(term.value, autoescape=True))
    return cast("ColumnElement[bool]", _COMPARED[term.op](column, cast(Any, term.value)))


def _having_labels(labels: Mapping[str, str]) -> list[ColumnElement[bool]]:
    """WHERE clauses for runs that have every one of these labels: the first as an EXISTS (which the
    planner may drive from `ix_run_labels_lookup` when the label is rare), the rest counted in one
    correlated subquery of the run's own label rows (a run has each key at most once). One EXISTS per
    label made PostgreSQL's planning grow with their number: 428 ms for 64 labels on empty tables,
    8 s for 150."""
    (key, value), *rest = sorted(labels.items())
    clauses: list[ColumnElement[bool]] = [
        exists().where(and_(LABELS.c.run_id == RUNS.c.id, LABELS.c.key == key, LABELS.c.value == value))
    ]
    if rest:
        matched = (
            select(func.count())
            .where(LABELS.c.run_id == RUNS.c.id, tuple_(LABELS.c.key, LABELS.c.value).in_(rest))
            .scalar_subquery()
        )
        clauses.append(matched == len(rest))
    return clauses


async def set_status(
    conn: AsyncConnection,
    tenant: str,
    run_id: str,
    status: int,
    *,
    from_statuses: Sequence[int],
    version: int | None = None,
    **values: Any,
) -> pb.WatchRunResponse | None:
    """Move a run to `status` if it is in one of `from_statuses` (and at `version`, when given),
    recording the change as an event and the webhook deliveries that report it.

    Returns the event, or None when the run was not in a status it may leave this way."""
    conditions = [RUNS.c.id == run_id, RUNS.c.tenant == tenant]
    if version is not None:
        conditions.append(RUNS.c.version == version)
    changed = await _change_status(conn, conditions, from_statuses, {**values, "status": status})
    return changed[0] if changed else None


async def start_runs(conn: AsyncConnection, run_ids: Sequence[str], now: float) -> list[pb.WatchRunResponse]:
    """Move the PENDING runs among these to RUNNING (their first job was claimed): one statement for all,
    then one insert of their events. Returns the events, by run id."""
    if not run_ids:
        return []
    return await _change_status(
        conn,
        runs_in_lock_order(conn, run_ids),
        [run_pb2.RUN_STATUS_PENDING],
        {"status": run_pb2.RUN_STATUS_RUNNING, "start_time": now},
    )


@dataclass(frozen=True)
class Ending:
    """How a run ends: its final status, verdict and aggregate (see `finish_runs`)."""

    run_id: str
    status: int
    overall_passed: bool | None
    error_code: str
    error_message: str
    aggregate: bytes
    end_time: float
    # Spend no result carries, added to its cost_usd as it ends (a run ended over its budget: what its
    # stopped jobs' answered calls cost, see `recorder.fail_early`).
    added_cost_usd: float = 0.0


_FINISH = (
    "UPDATE runs SET status = ?, overall_passed = ?, error_code = ?, error_message = ?, aggregate = ?, "
    "end_time = ?, update_time = ?, cost_usd = cost_usd + ?, last_seq = last_seq + 1, version = version + 1 "
    "WHERE id = ?"
)


async def finish_runs(conn: AsyncConnection, endings: Sequence[Ending]) -> list[pb.WatchRunResponse]:
    """End active runs, each with its own status, verdict and aggregate, then insert their events.
    Runs no longer active are left as they are. Returns the events, in run id order.

    Three statements however many runs: the active ones among them (locked, in id order, on
    PostgreSQL), one UPDATE per run in one driver executemany, one read of the ended runs. Not one
    UPDATE with a CASE per column over every run: building and compiling that grew with the runs a
    recording ends (5% of the event loop under CreateRun load)."""
    if not endings:
        return []
    found = await conn.execute(
        select(RUNS.c.id).where(
            *runs_in_lock_order(conn, [e.run_id for e in endings]), RUNS.c.status.in_(list(statuses.ACTIVE))
        )
    )
    active = {run_id for (run_id,) in found}
    if not active:
        return []
    now = time.time()
    await execute_many(
        conn,
        _FINISH,
        [
            (
                e.status,
                e.overall_passed,
                e.error_code,
                e.error_message,
                e.aggregate,
                e.end_time,
                now,
                e.added_cost_usd,
                e.run_id,
            )
            for e in sorted(endings, key=lambda e: e.run_id)
            if e.run_id in active
        ],
    )
    ended = await conn.execute(select(RUNS).where(RUNS.c.id.in_(sorted(active))))
    runs = sorted((RunRecord.from_row(row) for row in ended.mappings()), key=lambda run: run.id)
    return await _record_changes(conn, runs)


def runs_in_lock_order(conn: AsyncConnection, run_ids: Sequence[str]) -> list[ColumnElement[bool]]:
    """WHERE clauses for a multi-run UPDATE that locks its rows in id order on PostgreSQL (see
    evalsvc.store.jobs.in_lock_order: two such statements over overlapping runs must not deadlock)."""
    ids = sorted(set(run_ids))
    if conn.dialect.name != "postgresql":
        return [RUNS.c.id.in_(ids)]
    locked = select(RUNS.c.id).where(RUNS.c.id.in_(ids)).order_by(RUNS.c.id).with_for_update()
    return [RUNS.c.id.in_(locked.scalar_subquery())]


async def _change_status(
    conn: AsyncConnection,
    conditions: list[ColumnElement[bool]],
    from_statuses: Sequence[int],
    values: Mapping[str, Any],
) -> list[pb.WatchRunResponse]:
    """The one status change of every run row matching `conditions` and in `from_statuses`: the rows,
    their events (seq = last_seq + 1) and webhook deliveries, in run id order."""
    changed = await conn.execute(
        update(RUNS)
        .where(*conditions, RUNS.c.status.in_(list(from_statuses)))
        .values(
            update_time=time.time(),
            last_seq=RUNS.c.last_seq + 1,
            version=RUNS.c.version + 1,
            **values,
        )
        .returning(*RUNS.c)
    )
    runs = sorted((RunRecord.from_row(row) for row in changed.mappings()), key=lambda run: run.id)
    return await _record_changes(conn, runs)


async def _record_changes(conn: AsyncConnection, runs: Sequence[RunRecord]) -> list[pb.WatchRunResponse]:
    """What follows every change of runs in its transaction: the records noted for the run cache, one
    event per run (its state at seq = last_seq) and the webhook deliveries that report them."""
    tenant_events = []
    for run in runs:
        remember(conn, run)
        tenant_events.append((run.tenant, run_event(run)))
    await events.append_many(conn, [(tenant, event.run.id, [event]) for tenant, event in tenant_events])
    await webhook_store.enqueue_many(conn, tenant_events)
    return [event for _, event in tenant_events]


async def update_fields(
    conn: AsyncConnection,
    tenant: str,
    run_id: str,
    values: Mapping[str, Any],
    bytes_cap: StoredCap | None = None,
) -> RunRecord | None:
    """Change a run's descriptive columns (not its status: that is `set_status`, which records an event);
    new labels replace the run's label rows, and the change of their size is added to the run's and its
    tenant's stored bytes (evalsvc.store.usage): with `bytes_cap`, growth past it is refused and the change
    rolled back (a tenant at its cap grew 4 x 64 KiB of annotations a run, for every run it held). Returns
    the changed run, or None when there is no such run."""
    described = [column for column in usage.DESCRIPTIVE if column in values]
    grown = 0
    if described:
        before = select(*(RUNS.c[column] for column in described)).where(RUNS.c.id == run_id, RUNS.c.tenant == tenant)
        old = (await conn.execute(before.with_for_update() if conn.dialect.name == "postgresql" else before)).first()
        if old is None:
            return None
        grown = usage.RUN_COPIES * sum(
            usage.column_bytes(values[column]) - usage.column_bytes(was)
            for column, was in zip(described, old, strict=True)
        )
        values = {**values, "stored_bytes": RUNS.c.stored_bytes + grown}
    changed = await conn.execute(
        update(RUNS)
        .where(RUNS.c.id == run_id, RUNS.c.tenant == tenant)
        .values(**values, update_time=time.time(), version=RUNS.c.version + 1)
        .returning(*RUNS.c)
    )
    run = _first(changed.mappings().first())
    if run is not None:
        remember(conn, run)
    if run is not None and grown > 0 and bytes_cap is not None:  # after the run's row: the lock order
        await usage.take_room(conn, bytes_cap, tenant, grown)
    elif run is not None and grown:
        await usage.add_to_totals(conn, stored_bytes={tenant: grown})
    if run is not None and "labels" in values:
        await conn.execute(LABELS.delete().where(LABELS.c.run_id == run_id))
        if values["labels"]:
            await conn.execute(
                insert(LABELS),
                [{"run_id": run_id, "key": k, "value": v, "tenant": tenant} for k, v in values["labels"].items()],
            )
    return run


async def cancel_jobs(conn: AsyncConnection, tenant: str, run_id: str) -> None:
    """Stop every job of a run that has not finished: queued ones never start, leased ones lose their fence.

    Call it before `set_status` in the same transaction: jobs are locked before their run everywhere
    (see evalsvc.store.jobs), or a cancel and a claim or a recording deadlock on PostgreSQL."""
    await conn.execute(
        update(JOBS)
        .where(
            *job_store.in_lock_order(
                conn, JOBS.c.run_id == run_id, JOBS.c.tenant == tenant, JOBS.c.state.in_([JOB_QUEUED, JOB_LEASED])
            )
        )
        .values(state=JOB_CANCELLED, claim_id=None, lease_expiry=None)
    )


class byte_length(FunctionElement[int]):  # a SQL function, named as one
    """The UTF-8 bytes of a text column, read from its stored size where the engine can: PostgreSQL's
    `octet_length` reads the TOAST header (its `length` counts characters, so it would detoast the whole
    text), SQLite's `octet_length` (3.43 and later) the record header. An older SQLite has no way to size a
    text without loading it: `length(CAST(x AS BLOB))` loads it inside the engine and hands Python the
    number alone. Explanations are stored as text, so pages size them with this."""

    type = Integer()
    inherit_cache = True


@compiles(byte_length)
def _octet_length(element: byte_length, compiler: Any, **kw: Any) -> str:
    return f"octet_length({compiler.process(element.clauses, **kw)})"


@compiles(byte_length, "sqlite")
def _sqlite_byte_length(element: byte_length, compiler: Any, **kw: Any) -> str:
    column = compiler.process(element.clauses, **kw)
    return f"octet_length({column})" if sqlite3.sqlite_version_info >= (3, 43) else f"length(CAST({column} AS BLOB))"


@dataclass(frozen=True, slots=True)
class StoredSizes:
    """What a listed result's large parts take stored, read before them (`results_sized`): a page is
    chosen by these and then reads the outputs (`outputs_of`) and explanations (`explanations_of`) of the
    results it keeps alone."""

    output: int | None  # the job's serialized output; None before it was recorded
    explanation: int  # the explanation's UTF-8 bytes


# The results' columns a page reads before it chooses its rows: all but the explanation, which may be a
# quarter of --max-message-bytes (a judge's), sized instead (`byte_length`).
SIZED_COLUMNS = tuple(field.name for field in fields(ResultRecord) if field.name != "explanation")


def results_sized(results: FromClause = RESULTS) -> Select[Any]:
    """Results (the table, or a selection of its rows that has `SIZED_COLUMNS` and `explanation_bytes`:
    `sized_results`), each with the size of its explanation and of its job's serialized output (None before
    it was recorded), not the explanation or the output: read the rows with `result_with_size`, and then
    the outputs and explanations of those a page keeps with `outputs_of` and `explanations_of`. `length`
    of a blob reads its stored size alone (SQLite's record header, PostgreSQL's TOAST header). Joined with
    the outputs themselves, a page read every output of its `page_size` results before its byte bound
    dropped all but what fitted: 1,000 results with 4 MiB outputs to answer with two of them; and with
    their explanations, 1,000 judges' explanations of up to 4 MiB each (a quarter of
    --max-message-bytes) for a page of two."""
    explanation = (
        results.c.explanation_bytes
        if "explanation_bytes" in results.c
        else byte_length(results.c.explanation).label("explanation_bytes")
    )
    return select(
        *(results.c[column] for column in SIZED_COLUMNS),
        explanation,
        func.length(OUTPUTS.c.output).label("output_bytes"),
    ).outerjoin(OUTPUTS, OUTPUTS.c.job_id == results.c.job_id)


def sized_results() -> Select[Any]:
    """The results table's `SIZED_COLUMNS` and its explanations' sizes (`explanation_bytes`), to select
    rows from and join with `results_sized`: a subquery that selected the whole rows read every
    explanation of them, whatever the outer query kept."""
    return select(
        *(RESULTS.c[column] for column in SIZED_COLUMNS), byte_length(RESULTS.c.explanation).label("explanation_bytes")
    )


def result_with_size(row: RowMapping) -> tuple[ResultRecord, StoredSizes]:
    """A row of `results_sized`: the result's record without its explanation (""), and its sizes."""
    record = ResultRecord(**{column: row[column] for column in SIZED_COLUMNS}, explanation="")
    output = row["output_bytes"]
    return record, StoredSizes(None if output is None else int(output), int(row["explanation_bytes"] or 0))


async def outputs_of(conn: AsyncConnection, tenant: str, job_ids: Sequence[int]) -> dict[int, bytes]:
    """The serialized outputs of these jobs of a tenant that have one, by job id."""
    found = await _column_of(conn, OUTPUTS.c.job_id, OUTPUTS.c.output, OUTPUTS.c.tenant, tenant, job_ids)
    return {job_id: bytes(output) for job_id, output in found.items()}


async def explanations_of(conn: AsyncConnection, tenant: str, result_ids: Sequence[int]) -> dict[int, str]:
    """The explanations of these results of a tenant that still exist, by result id: read for the results
    a page keeps alone (`results_sized`)."""
    return await _column_of(conn, RESULTS.c.id, RESULTS.c.explanation, RESULTS.c.tenant, tenant, result_ids)


async def _column_of(
    conn: AsyncConnection,
    key: ColumnElement[Any],
    value: ColumnElement[Any],
    tenant_column: ColumnElement[Any],
    tenant: str,
    keys: Sequence[int],
) -> dict[int, Any]:
    """`value` of the rows of a tenant whose `key` is one of `keys`, by key, 500 keys a statement."""
    found: dict[int, Any] = {}
    unique = sorted(set(keys))
    for start in range(0, len(unique), 500):
        rows = await conn.execute(
            select(key, value).where(key.in_(unique[start : start + 500]), tenant_column == tenant)
        )
        found.update((int(k), v) for k, v in rows)
    return found


async def results_page(
    conn: AsyncConnection, tenant: str, run_id: str, *, after_id: int | None, limit: int, states: Sequence[int]
) -> list[tuple[ResultRecord, StoredSizes]]:
    """Results of a run by id (the order jobs were claimed), without their explanations, each with the
    sizes of its explanation and its job's output (`results_sized`): the page keeps what fits and reads
    those explanations and outputs alone (`explanations_of`, `outputs_of`). `states` empty means every state."""
    await read_in_index_order(conn)
    rows = await conn.execute(results_page_query(tenant, run_id, after_id=after_id, limit=limit, states=states))
    return [result_with_size(row) for row in rows.mappings()]


def results_page_query(
    tenant: str, run_id: str, *, after_id: int | None, limit: int, states: Sequence[int]
) -> Select[Any]:
    """The statement of `results_page`: a page costs the rows it returns, not the run's size.

    Results are indexed by (run_id, state, id) and not by (run_id, id) (one index less on the table
    every evaluation writes a row to), so a page of every state is the first `limit` of each state's
    ordered range after the position, merged: one index range per state. Reading `run_id = ?`
    and sorting by id instead read and sorted every later result of the run for each page, on both
    engines, so paging through a run was quadratic in its size. The page is chosen first and only its
    rows are joined with their outputs' sizes (joined before the LIMIT, every later result got an output
    lookup too: 400 ms a page at the start of a 250,000-result run on PostgreSQL). The ranges select the
    rows' explanations' sizes, not the explanations (`sized_results`)."""
    ranges = []
    for each in sorted(set(states)) if states else sorted(run_pb2.ResultState.values()):
        one = sized_results().where(RESULTS.c.run_id == run_id, RESULTS.c.state == each, RESULTS.c.tenant == tenant)
        if after_id is not None:
            one = one.where(RESULTS.c.id > after_id)
        ranges.append(select(one.order_by(RESULTS.c.id).limit(limit).subquery()))
    merged = union_all(*ranges).subquery() if len(ranges) > 1 else ranges[0].subquery()
    chosen = select(merged).order_by(merged.c.id).limit(limit).subquery()
    return results_sized(chosen).order_by(chosen.c.id)


@dataclass
class AggregateInputs:
    """What a run's summary is computed from, gathered with a few GROUP BY queries."""

    grader_tallies: list[GraderTally]
    latencies: list[float]  # one per output that has a latency
    target_cost_usd: float  # outputs paid for (not from the response cache)
    item_scores: list[float]  # one weighted score per output that had a gradable result
    memory_mib: list[float]  # what targets reported, per output that reported it
    cached_outputs: int = 0  # outputs from the response cache
    target_cost_saved_usd: float = 0.0  # what those cost when recorded


# The GROUP BY columns of `aggregate_inputs` (a GraderTally's fields), per run, grader and state.
TALLY_COLUMNS = (
    RESULTS.c.run_id,
    RESULTS.c.grader,
    RESULTS.c.state,
    RESULTS.c.human_verdict,
    func.count().label("n"),
    func.sum(RESULTS.c.score).label("score_sum"),
    func.sum(RESULTS.c.score * RESULTS.c.score).label("score_sq_sum"),
    func.sum(case((RESULTS.c.verdict_cached, 0.0), else_=RESULTS.c.scoring_cost_usd)).label("scoring_cost"),
    func.sum(case((RESULTS.c.verdict_cached, RESULTS.c.scoring_cost_usd), else_=0.0)).label("scoring_saved"),
    func.sum(case((RESULTS.c.verdict_cached, 1), else_=0)).label("verdict_hits"),
)


async def aggregate_inputs(conn: AsyncConnection, run_ids: Sequence[str]) -> dict[str, AggregateInputs]:
    """The inputs of these runs' aggregates, by run id: two GROUP BY queries for all of them."""
    per_grader = await conn.execute(
        select(*TALLY_COLUMNS)
        .where(RESULTS.c.run_id.in_(sorted(set(run_ids))))
        .group_by(RESULTS.c.run_id, RESULTS.c.grader, RESULTS.c.state, RESULTS.c.human_verdict)
    )
    inputs = {run_id: AggregateInputs([], [], 0.0, [], []) for run_id in run_ids}
    for row in per_grader.mappings():
        tally = GraderTally.from_row(row)
        inputs[tally.run_id].grader_tallies.append(tally)
    for run_id in inputs:
        await _add_output_figures(conn, run_id, inputs[run_id])
    return inputs


# A run's outputs, for its aggregate, found through its jobs (`ix_jobs_run`, then each output by its
# job id): `outputs` has no index on run_id, and reading them by run_id scanned every output of every
# run, in the writer's transaction, for each run that ended. The driver's own SQL and rows:
# SQLAlchemy's per-row result processing was a third of the time for a run of 100,000 outputs.
OUTPUT_FIGURES_SQL = (
    "SELECT o.latency_ms, o.cost_usd, o.item_score, o.cached, o.output"
    " FROM jobs AS j JOIN outputs AS o ON o.job_id = j.id WHERE j.run_id = ?"
)


async def _add_output_figures(conn: AsyncConnection, run_id: str, run: AggregateInputs) -> None:
    """Add the run's outputs to its aggregate inputs: latencies, costs paid and saved, item scores and
    the memory its target reported (inside each stored output).

    A run ends (or is cancelled) in the writer's transaction, so this is on every other tenant's
    write path: it costs the run's own outputs (a run of 100,000: 566 -> 472 ms, the parse in turns of
    the event loop), not the outputs of every run in the database."""
    rows = await fetch_all(conn, OUTPUT_FIGURES_SQL, (run_id,))
    # Only outputs with a latency: a failed target call stores an empty output (0 ms), which took the
    # mean 10% low in a run with a tenth of its items failing; so does a recorded response without one.
    run.latencies.extend([float(latency) for latency, *_ in rows if latency])
    run.item_scores.extend([float(row[2]) for row in rows if row[2] is not None])
    cached = [row for row in rows if row[3]]
    run.cached_outputs += len(cached)
    run.target_cost_saved_usd += sum(float(row[1] or 0.0) for row in cached)
    run.target_cost_usd += sum(float(row[1] or 0.0) for row in rows if not row[3])
    reported = await mapped(lambda row: item_pb2.Response.FromString(row[4]).memory_mib, rows)
    run.memory_mib.extend([mib for mib in reported if mib > 0])


async def claimable_runs(conn: AsyncConnection, now: float) -> list[tuple[str, str]]:
    """(tenant, run id) of every active run with a claimable job: a scan of the active runs
    (`ix_runs_active`) with two index probes of its jobs each (`ix_jobs_run`), never of all jobs.
    SQL text: built as a SQLAlchemy construct for every claim, it cost 2-3% of the loop."""
    rows = await fetch_all(conn, CLAIMABLE_RUNS_SQL, claimable_runs_parameters(now))
    return [(tenant, run_id) for tenant, run_id in rows]


# Whether a run has a claimable job: a queued one, or a leased one whose lease expired, each its own
# probe of `ix_jobs_run` (run_id, state, id): as one OR of the states, both engines read the run's jobs
# up to the first match, every done job of a large run near its end.
CLAIMABLE_RUNS_SQL = (
    f"SELECT tenant, id FROM runs WHERE status IN ({', '.join('?' * len(statuses.ACTIVE))}) AND ("
    "EXISTS (SELECT 1 FROM jobs WHERE jobs.run_id = runs.id AND jobs.state = ?) OR "
    "EXISTS (SELECT 1 FROM jobs WHERE jobs.run_id = runs.id AND jobs.state = ? AND jobs.lease_expiry < ?))"
)


def claimable_runs_parameters(now: float) -> tuple[Any, ...]:
    """CLAIMABLE_RUNS_SQL's parameters, in order."""
    return (*statuses.ACTIVE, JOB_QUEUED, JOB_LEASED, now)


@dataclass(frozen=True)
class Progress:
    """New results of one run in a recording: how many in each state, and what they cost."""

    passed: int = 0
    failed: int = 0
    errored: int = 0
    skipped: int = 0
    cost_usd: float = 0.0
    stored_bytes: int = 0  # what the recording stores of the run (evalsvc.store.usage)

    @property
    def results(self) -> int:
        return self.passed + self.failed + self.errored + self.skipped


_ADD_PROGRESS = (
    "UPDATE runs SET completed = completed + ?, passed = passed + ?, failed = failed + ?, errored = errored + ?, "
    "skipped = skipped + ?, last_seq = last_seq + ?, cost_usd = cost_usd + ?, stored_bytes = stored_bytes + ?, "
    "update_time = ?, version = version + 1 WHERE id = ?"
)


async def add_progress(conn: AsyncConnection, progress: Mapping[str, Progress], now: float) -> dict[str, RunRecord]:
    """Count new results on their runs and allocate one seq per result, atomically: one UPDATE per
    run in one driver executemany (in id order: the lock order on PostgreSQL), then one read of the
    updated runs. Returns them by id; the seqs of a run's results are last_seq - (its results) + 1 ..
    last_seq of its record.

    Not one multi-row UPDATE: with a CASE per column over every run of a recording, building and
    compiling it took more of the event loop than the database took to run it (a recording of many
    small runs, under CreateRun load)."""
    if not progress:
        return {}
    await execute_many(
        conn,
        _ADD_PROGRESS,
        [
            (p.results, p.passed, p.failed, p.errored, p.skipped, p.results, p.cost_usd, p.stored_bytes, now, run_id)
            for run_id, p in sorted(progress.items())
        ],
    )
    updated = await conn.execute(select(RUNS).where(RUNS.c.id.in_(list(progress))))
    runs = {run.id: run for run in map(RunRecord.from_row, updated.mappings())}
    for run_id in sorted(runs):
        remember(conn, runs[run_id])
    return runs


async def item_outcomes(conn: AsyncConnection, run_id: str) -> dict[str, dict[int, int]]:
    """A run's results counted per item id and state, for RerunRun's choice of items: one GROUP BY over
    the run's rows of `uq_results_evaluation` (run_id, item_id, ...). An item without results is absent."""
    rows = await conn.execute(
        select(RESULTS.c.item_id, RESULTS.c.state, func.count())
        .where(RESULTS.c.run_id == run_id)
        .group_by(RESULTS.c.item_id, RESULTS.c.state)
    )
    outcomes: dict[str, dict[int, int]] = {}
    for item_id, state, n in rows:
        outcomes.setdefault(item_id, {})[int(state)] = int(n)
    return outcomes


RESULT_COLUMNS = tuple(field.name for field in fields(ResultRecord))  # the `results` columns, in table order


def result_tuple(
    *,
    id: int,
    tenant: str,
    run_id: str,
    job_id: int,
    item_id: str,
    repetition: int,
    grader: str,
    state: int,
    score: float,
    raw_score: float,
    explanation: str,
    error_reason: str,
    attempt: int,
    cost_usd: float,
    latency_ms: float,
    complete_time: float,
    scoring_cost_usd: float,
    confidence: float | None,
    cached: bool,
    verdict_cached: bool,
    human_verdict: bool | None,
) -> tuple[Any, ...]:
    """A `results` row for `insert_results`: its values in RESULT_COLUMNS order, given by name."""
    return (
        id,
        tenant,
        run_id,
        job_id,
        item_id,
        repetition,
        grader,
        state,
        score,
        raw_score,
        explanation,
        error_reason,
        attempt,
        cost_usd,
        latency_ms,
        complete_time,
        scoring_cost_usd,
        confidence,
        cached,
        verdict_cached,
        human_verdict,
    )


def result_message(row: Sequence[Any], complete_time: Timestamp | None, output: bytes | None = None) -> run_pb2.Result:
    """The Result message of a results row (see `fill_result`)."""
    return fill_result(run_pb2.Result(), row, complete_time, output)


def fill_result(
    result: run_pb2.Result, row: Sequence[Any], complete_time: Timestamp | None, output: bytes | None = None
) -> run_pb2.Result:
    """The one builder of a Result message, filling `result` in place: from a results row (values in
    RESULT_COLUMNS order; the recorder's fresh rows and the rows read back alike), its completion
    time as a Timestamp (the recorder builds one per batch) and its job's serialized output, when the
    caller wants it. In place, so the recorder builds each event's result inside the event: passing
    a built Result to the event's constructor copies it, which cost as much again (~2 us a result)."""
    (
        result_id,
        _tenant,
        run_id,
        _job_id,
        item_id,
        repetition,
        grader,
        state,
        score,
        raw_score,
        explanation,
        error_reason,
        attempt,
        cost_usd,
        latency_ms,
        _complete_time,
        scoring_cost_usd,
        confidence,
        cached,
        verdict_cached,
        human_verdict,
    ) = row
    result.id = str(result_id)
    result.run_id = run_id
    result.item_id = item_id
    result.repetition = repetition
    result.grader = grader
    result.state = state
    result.score = score
    result.raw_score = raw_score
    result.passed = state == run_pb2.RESULT_STATE_PASSED
    result.attempt = attempt
    # Fields most results leave at their default are set only when they differ (a setter call each).
    if explanation:
        result.explanation = explanation
    if error_reason:
        result.error_reason = error_reason
    if cost_usd:
        result.cost_usd = cost_usd
    if latency_ms:
        result.latency_ms = latency_ms
    if scoring_cost_usd:
        result.scoring_cost_usd = scoring_cost_usd
    if cached:
        result.cached = True
    if verdict_cached:
        result.verdict_cached = True
    if complete_time is not None:
        result.complete_time.CopyFrom(complete_time)
    if confidence is not None:
        result.confidence = confidence
    if human_verdict is not None:
        result.human_verdict = bool(human_verdict)
    if output:
        result.output.CopyFrom(item_pb2.Response.FromString(output))
    return result


def result_from(result: ResultRecord, output: bytes | None) -> run_pb2.Result:
    """The Result message of a result read back and its job's output."""
    return result_message(tuple(getattr(result, c) for c in RESULT_COLUMNS), timestamp(result.complete_time), output)


async def insert_results(conn: AsyncConnection, rows: list[tuple[Any, ...]]) -> None:
    """Insert result rows (tuples in RESULT_COLUMNS order: `result_tuple`); the unique evaluation key
    rejects a second result for an evaluation."""
    await insert_tuples(conn, RESULTS, RESULT_COLUMNS, rows)


async def get_any_tenant(conn: AsyncConnection, run_id: str) -> RunRecord | None:
    """A run by id alone: only for the executor, which works for every tenant."""
    found = await conn.execute(select(RUNS).where(RUNS.c.id == run_id))
    return _first(found.mappings().first())


async def existing_among(conn: AsyncConnection, run_ids: Sequence[str]) -> set[str]:
    """Those of `run_ids` that have a run row (any tenant's, deleted or not): not purged."""
    present: set[str] = set()
    for start in range(0, len(run_ids), 1000):
        found = await conn.execute(select(RUNS.c.id).where(RUNS.c.id.in_(list(run_ids[start : start + 1000]))))
        present.update(found.scalars())
    return present


async def ended_among(conn: AsyncConnection, run_ids: Sequence[str]) -> list[str]:
    """Those of `run_ids` that are no longer active (or no longer exist): for the executor's plan sweep."""
    if not run_ids:
        return []
    found = await conn.execute(
        select(RUNS.c.id).where(RUNS.c.id.in_(list(run_ids)), RUNS.c.status.in_(list(statuses.ACTIVE)))
    )
    active = set(found.scalars())
    return [run_id for run_id in run_ids if run_id not in active]


async def count_active(conn: AsyncConnection, tenant: str) -> int:
    """A tenant's PENDING or RUNNING runs."""
    found = await conn.execute(
        select(func.count()).select_from(RUNS).where(RUNS.c.tenant == tenant, RUNS.c.status.in_(list(statuses.ACTIVE)))
    )
    return int(found.scalar_one())
