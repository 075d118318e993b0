"""The per-run event log. Appends happen inside the transaction of the change they record."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.ids import PROCESS_ID
from evalsvc.statuses import TERMINAL
from evalsvc.store.bulk import fetch_all, insert_tuples
from evalsvc.store.models import EventRow
from evalsvc.turns import mapped
from evalsvc.v1 import eval_run_service_pb2 as pb

EVENTS = EventRow.__table__  # type: ignore[attr-defined]

# PostgreSQL channel on which every commit that appends events announces "<process>|<run id>|<last seq>".
EVENTS_CHANNEL = "evalsvc_events"
# PostgreSQL channel on which a commit that ends runs announces "<process>|<run id>" for each: the
# replicas executing them stop their work at once. A channel of its own rather than a field in
# EVENTS_CHANNEL's payload, which replicas of earlier versions parse as exactly "origin|run|seq".
RUNS_ENDED_CHANNEL = "evalsvc_runs_ended"
# PostgreSQL channel on which the purge's commit that takes runs out of the service announces
# "<process>|<run id>" for each (evalsvc.store.retention.expire): the replicas end their watches.
RUNS_PURGED_CHANNEL = "evalsvc_runs_purged"


async def append(conn: AsyncConnection, tenant: str, run_id: str, events: Sequence[pb.WatchRunResponse]) -> None:
    """Insert one run's events (see `append_many`)."""
    await append_many(conn, [(tenant, run_id, events)])


async def append_many(conn: AsyncConnection, batches: Sequence[tuple[str, str, Sequence[pb.WatchRunResponse]]]) -> None:
    """Insert events of several runs - (tenant, run id, events) each - whose seqs the caller allocated
    from runs.last_seq in this same transaction: one statement for all of them.

    On PostgreSQL the transaction also notifies EVENTS_CHANNEL once per run, and RUNS_ENDED_CHANNEL once
    per run that these events end (a terminal status), in one statement; NOTIFY is delivered only at
    commit, so a replica that hears it reads events that are already visible. A lost notification only
    delays a watcher on another replica until its next wake-up; it never loses an event."""
    batches = [batch for batch in batches if batch[2]]
    if not batches:
        return
    rows = await mapped(
        lambda row: (row[1], row[2].seq, row[0], row[2].SerializeToString()),
        ((tenant, run_id, e) for tenant, run_id, events in batches for e in events),
    )
    await insert_tuples(conn, EVENTS, ("run_id", "seq", "tenant", "payload"), rows)
    if conn.dialect.name == "postgresql":
        notices = [
            func.pg_notify(EVENTS_CHANNEL, f"{PROCESS_ID}|{run_id}|{events[-1].seq}") for _, run_id, events in batches
        ]
        notices += [
            func.pg_notify(RUNS_ENDED_CHANNEL, f"{PROCESS_ID}|{run_id}")
            for _, run_id, events in batches
            # A run's terminal event is its last: nothing is appended after it, so only the last of a
            # batch can be one (not a scan of every result event of a large recording).
            if events[-1].HasField("run") and events[-1].run.status in TERMINAL
        ]
        await conn.execute(select(*notices))


def _next_seqs(after_seq: int, limit: int) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    """The seqs of the next `limit` events after `after_seq`, as a closed range.

    A run's seqs are gap-free, so the range names exactly the rows the LIMIT takes; bounding it keeps
    a read's cost at `limit` rows whatever plan the database picks. Without the upper bound,
    PostgreSQL planned a large run's reads (statistics older than the run's inserts) as a bitmap scan
    of every later event plus a sort: ~30 ms per page with 50,000 events to go, so a watcher catching
    up on 250,000 events took minutes after the run had finished."""
    return EVENTS.c.seq > after_seq, EVENTS.c.seq <= after_seq + limit


async def read_after(
    conn: AsyncConnection, tenant: str | None, run_id: str, after_seq: int, limit: int
) -> list[pb.WatchRunResponse]:
    """Up to `limit` committed events with seq > after_seq, in order. `tenant` None reads any tenant's
    run: only for the cross-replica relay, which hands events to watchers already checked for it."""
    query = select(EVENTS.c.payload).where(EVENTS.c.run_id == run_id, *_next_seqs(after_seq, limit))
    if tenant is not None:
        query = query.where(EVENTS.c.tenant == tenant)
    rows = await conn.execute(query.order_by(EVENTS.c.seq).limit(limit))
    return [pb.WatchRunResponse.FromString(payload) for (payload,) in rows]


# `read_page` as the driver's own SQL text: built as a SQLAlchemy construct (two subqueries, window
# functions) it cost more to build and key for the statement cache than to run, ~35% of the loop
# while watchers opened streams. Parameters: run id, after_seq, after_seq + limit (see `_next_seqs`),
# tenant, limit, max_bytes.
PAGE_SQL = """\
SELECT payload, fetched FROM (
  SELECT seq, payload, length(payload) AS size, sum(length(payload)) OVER (ORDER BY seq) AS through,
         count(*) OVER () AS fetched
  FROM (
    SELECT seq, payload FROM events
    WHERE run_id = ? AND seq > ? AND seq <= ? AND tenant = ? ORDER BY seq LIMIT ?
  ) AS page
) AS sized
WHERE through <= ? OR through = size
ORDER BY seq"""


def page_parameters(tenant: str, run_id: str, after_seq: int, limit: int, max_bytes: int) -> tuple[Any, ...]:
    """PAGE_SQL's parameters, in order."""
    return (run_id, after_seq, after_seq + limit, tenant, limit, max_bytes)


async def read_page(
    conn: AsyncConnection, tenant: str, run_id: str, after_seq: int, limit: int, max_bytes: int
) -> tuple[list[bytes], bool]:
    """Serialized events with seq > after_seq, in order: at most `limit` of them and, past the first,
    at most `max_bytes` in all; and whether more may follow. For watchers, which hold what they read
    until their client takes it: kept serialized, an event is ~10x smaller than parsed."""
    rows = await fetch_all(conn, PAGE_SQL, page_parameters(tenant, run_id, after_seq, limit, max_bytes))
    if not rows:
        return [], False
    fetched = rows[0][1]
    return [bytes(payload) for payload, _ in rows], fetched == limit or len(rows) < fetched
