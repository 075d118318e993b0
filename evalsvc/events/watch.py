"""The resumable watch of a run, with etcd's guarantees: every event with seq > after_seq, once, in
order, then live events, ending after the terminal status event.

The subscription is opened before the first database read, so an event committed at any moment is
either in that read or in the buffer; duplicates are skipped by seq and a gap (a lost or overflowed
buffer) sends the watcher back to the database.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from itertools import pairwise

import grpc

from evalsvc.errors import ServiceError, not_found
from evalsvc.events.bus import EventBus
from evalsvc.store import events as event_log
from evalsvc.store import runs as run_store
from evalsvc.store.db import Database
from evalsvc.v1 import eval_run_service_pb2 as pb

CATCH_UP_PAGE = 1000
MAX_BATCH_EVENTS = 10_000


def is_terminal(event: pb.WatchRunResponse) -> bool:
    """True for the event that records a run's final status."""
    return event.HasField("run") and event.run.status in run_store.TERMINAL_STATUSES


async def watch(
    db: Database,
    bus: EventBus,
    *,
    tenant: str,
    run_id: str,
    after_seq: int,
    heartbeat_s: float,
    buffer: int,
    max_events: int = CATCH_UP_PAGE,
    owner: str = "",
) -> AsyncIterator[list[pb.WatchRunResponse]]:
    """The run's events after `after_seq`, then live ones as they commit, and heartbeats when idle, in
    lists of at most `max_events`: a page read from the database, or what one commit published. The
    last list ends with the terminal event. (Lists, not single events: WatchRunBatched sends them as
    they are and WatchRun one by one, with no extra generator layer holding memory per idle stream.)
    `owner` is the API key id of the watcher: the watch ends when the bus closes that owner's watches."""
    if not await _anything_after(db, tenant, run_id, after_seq):
        return
    cursor = after_seq
    with bus.subscribe(run_id, buffer, owner) as subscription:
        from_database = True
        while True:
            if from_database:
                subscription.raise_if_closed()
                async with db.read() as conn:
                    page = await event_log.read_after(conn, tenant, run_id, cursor, max_events)
                if page:
                    chunk = _through_terminal(page)
                    cursor = chunk[-1].seq
                    yield chunk
                    if is_terminal(chunk[-1]):
                        return
                from_database = len(page) == max_events
                continue
            try:
                live = await subscription.next(heartbeat_s)
            except TimeoutError:
                yield [pb.WatchRunResponse(heartbeat=pb.Heartbeat(last_seq=cursor))]
                continue
            if live is None:
                from_database = True
                continue
            fresh = [event for event in live if event.seq > cursor]
            if (fresh and fresh[0].seq != cursor + 1) or any(b.seq != a.seq + 1 for a, b in pairwise(fresh)):
                from_database = True  # a gap: what is missing is in the database
                continue
            for start in range(0, len(fresh), max_events):
                chunk = _through_terminal(fresh[start : start + max_events])
                cursor = chunk[-1].seq
                yield chunk
                if is_terminal(chunk[-1]):
                    return


async def _anything_after(db: Database, tenant: str, run_id: str, after_seq: int) -> bool:
    """Check the watch request against the run; False when the run ended at `after_seq`. (Apart from the
    generator, so its frame holds no run row for the life of an idle stream.)"""
    async with db.read() as conn:
        row = await run_store.get(conn, tenant, run_id)
    if row is None:
        raise not_found("run", run_id)
    if after_seq < 0 or after_seq > row["last_seq"]:
        raise ServiceError(
            grpc.StatusCode.OUT_OF_RANGE,
            "SEQ_OUT_OF_RANGE",
            f"after_seq {after_seq} is outside 0..{row['last_seq']} (the run's last_seq)",
            metadata={"last_seq": str(row["last_seq"])},
        )
    return not (row["status"] in run_store.TERMINAL_STATUSES and after_seq == row["last_seq"])


def _through_terminal(events: list[pb.WatchRunResponse]) -> list[pb.WatchRunResponse]:
    """The events up to and including a terminal one (nothing follows it in a run's log)."""
    for i, event in enumerate(events):
        if is_terminal(event):
            return events[: i + 1]
    return events
