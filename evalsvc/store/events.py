"""The per-run event log. Appends happen inside the transaction of the change they record."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, or_, select
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


async def read_after(
    conn: AsyncConnection, tenant: str | None, run_id: str, after_seq: int, limit: int
) -> list[pb.WatchRunResponse]:
    """Up to `limit` committed events with seq > after_seq, in order. `tenant` None reads any tenant's
    run: only for the cross-replica relay, which hands events to watchers already checked for it."""
    query = select(EVENTS.c.payload).where(EVENTS.c.run_id == run_id, EVENTS.c.seq > after_seq)
    if tenant is not None:
        query = query.where(EVENTS.c.tenant == tenant)
    rows = await conn.execute(query.order_by(EVENTS.c.seq).limit(limit))
    return [pb.WatchRunResponse.FromString(payload) for (payload,) in rows]


async def read_page(
    conn: AsyncConnection, tenant: str, run_id: str, after_seq: int, limit: int, max_bytes: int
) -> tuple[list[bytes], bool]:
    """Serialized events with seq > after_seq, in order: at most `limit` of them and, past the first,
    at most `max_bytes` in all; and whether more may follow. For watchers, which hold what they read
    until their client takes it: kept serialized, an event is ~10x smaller than parsed."""
    first = (
        select(EVENTS.c.seq, EVENTS.c.payload)
        .where(EVENTS.c.run_id == run_id, EVENTS.c.seq > after_seq, EVENTS.c.tenant == tenant)
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
    rows = (
        await conn.execute(
            select(sized.c.payload, sized.c.fetched)
            .where(or_(sized.c.through <= max_bytes, sized.c.through == sized.c.size))  # or it is the first
            .order_by(sized.c.seq)
        )
    ).all()
    if not rows:
        return [], False
    fetched = rows[0][1]
    return [payload for payload, _ in rows], fetched == limit or len(rows) < fetched
