"""The per-run event log. Appends happen inside the transaction of the change they record."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.store.models import EventRow
from evalsvc.v1 import eval_run_service_pb2 as pb

EVENTS = EventRow.__table__  # type: ignore[attr-defined]


async def append(conn: AsyncConnection, tenant: str, run_id: str, events: Sequence[pb.WatchRunResponse]) -> None:
    """Insert events whose seq the caller allocated from runs.last_seq in this same transaction."""
    if events:
        await conn.execute(
            insert(EVENTS),
            [{"run_id": run_id, "seq": e.seq, "tenant": tenant, "payload": e.SerializeToString()} for e in events],
        )


async def read_after(
    conn: AsyncConnection, tenant: str, run_id: str, after_seq: int, limit: int
) -> list[pb.WatchRunResponse]:
    """Up to `limit` committed events with seq > after_seq, in order."""
    rows = await conn.execute(
        select(EVENTS.c.payload)
        .where(EVENTS.c.run_id == run_id, EVENTS.c.tenant == tenant, EVENTS.c.seq > after_seq)
        .order_by(EVENTS.c.seq)
        .limit(limit)
    )
    return [pb.WatchRunResponse.FromString(payload) for (payload,) in rows]
