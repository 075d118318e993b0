"""The per-run event log. Appends happen inside the transaction of the change they record."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import ColumnElement, Select, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.ids import PROCESS_ID
from evalsvc.store.bulk import build_rows, insert_tuples
from evalsvc.store.models import EventRow
from evalsvc.v1 import eval_run_service_pb2 as pb

EVENTS = EventRow.__table__  # type: ignore[attr-defined]

# PostgreSQL channel on which every commit that appends events announces "<process>|<run id>|<last seq>".
EVENTS_CHANNEL = "evalsvc_events"


async def append(conn: AsyncConnection, tenant: str, run_id: str, events: Sequence[pb.WatchRunResponse]) -> None:
    """Insert one run's events (see `append_many`)."""
    await append_many(conn, [(tenant, run_id, events)])


async def append_many(conn: AsyncConnection, batches: Sequence[tuple[str, str, Sequence[pb.WatchRunResponse]]]) -> None:
    """Insert events of several runs - (tenant, run id, events) each - whose seqs the caller allocated
    from runs.last_seq in this same transaction: one statement for all of them.

    On PostgreSQL the transaction also notifies EVENTS_CHANNEL once per run (in one statement); NOTIFY
    is delivered only at commit, so a replica that hears it reads events that are already visible. A
    lost notification only delays a watcher on another replica until its next wake-up; it never
    loses an event."""
    batches = [batch for batch in batches if batch[2]]
    if not batches:
        return
    rows = await build_rows(
        lambda row: (row[1], row[2].seq, row[0], row[2].SerializeToString()),
        ((tenant, run_id, e) for tenant, run_id, events in batches for e in events),
    )
    await insert_tuples(conn, EVENTS, ("run_id", "seq", "tenant", "payload"), rows)
    if conn.dialect.name == "postgresql":
        notices = [
            func.pg_notify(EVENTS_CHANNEL, f"{PROCESS_ID}|{run_id}|{events[-1].seq}") for _, run_id, events in batches
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


def page_query(tenant: str, run_id: str, after_seq: int, limit: int, max_bytes: int) -> Select[bytes, int]:
    """The statement `read_page` runs: each event's payload and how many of `limit` were fetched."""
    first = (
        select(EVENTS.c.seq, EVENTS.c.payload)
        .where(EVENTS.c.run_id == run_id, *_next_seqs(after_seq, limit), EVENTS.c.tenant == tenant)
        .order_by(EVENTS.c.seq)
        .limit(limit)
        .subquery()
    )
    size = func.length(first.c.payload)
    sized = select(
        first.c.seq,
        first.c.payload,
        size.label("size"),
        func.sum(size).over(order_by=first.c.seq).label("through"),
        func.count().over().label("fetched"),
    ).subquery()
    return (
        select(sized.c.payload, sized.c.fetched)
        .where(or_(sized.c.through <= max_bytes, sized.c.through == sized.c.size))  # or it is the first
        .order_by(sized.c.seq)
    )


async def read_page(
    conn: AsyncConnection, tenant: str, run_id: str, after_seq: int, limit: int, max_bytes: int
) -> tuple[list[bytes], bool]:
    """Serialized events with seq > after_seq, in order: at most `limit` of them and, past the first,
    at most `max_bytes` in all; and whether more may follow. For watchers, which hold what they read
    until their client takes it: kept serialized, an event is ~10x smaller than parsed."""
    rows = (await conn.execute(page_query(tenant, run_id, after_seq, limit, max_bytes))).all()
    if not rows:
        return [], False
    fetched = rows[0][1]
    return [payload for payload, _ in rows], fetched == limit or len(rows) < fetched
