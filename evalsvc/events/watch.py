"""The resumable watch of a run, with etcd's guarantees: every event with seq > after_seq, once, in
order, then live events, ending after the terminal status event; or NOT_FOUND, when the purge takes the
run out of the service meanwhile (the purge ends its watches, and a watcher that finds the run's
committed events missing from the log checks the run: see `_gone`).

The subscription is opened before the first database read, so an event committed at any moment is
either in that read or in the buffer; duplicates are skipped by seq and a gap (a lost or overflowed
buffer) sends the watcher back to the database.

What a watcher holds is bounded, so one whose client stops reading costs little memory: gRPC takes a
message into its send path only as the client's HTTP/2 window allows (a write is awaited before the
next event is taken), live events are shared with every other watcher of the run (the watcher keeps
references, at most `--watch-buffer` of them and 128 bytes each of their size, before it leaves the live
fan-out: evalsvc.events.bus), and what it reads
from the database stays serialized (a parsed event costs ~1.2 KiB, ~10x its bytes) in pages of at
most PAGE_BYTES, parsed one event at a time as they are sent. WatchRunBatched messages are at most
BATCH_BYTES (and max_events), since a message is held whole, parsed, until gRPC has sent it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from itertools import pairwise
from typing import NoReturn

import grpc

from evalsvc.errors import Reason, ServiceError, not_found
from evalsvc.events.bus import TYPICAL_EVENT_BYTES, EventBus
from evalsvc.events.opening import read_page
from evalsvc.messages.encoded import Encoded
from evalsvc.statuses import TERMINAL
from evalsvc.store import runs as run_store
from evalsvc.store.db import Database
from evalsvc.store.records import RunRecord
from evalsvc.v1 import eval_run_service_pb2 as pb

CATCH_UP_PAGE = 1000
MAX_BATCH_EVENTS = 10_000
PAGE_BYTES = 32 * 1024  # serialized events a WatchRun watcher holds from one database read
BATCH_BYTES = 12 * 1024  # serialized events in one WatchRunBatched message (or one larger event)
RUN_OVERHEAD_BYTES = 1024  # a run event's ids, counters, times and framing, roughly
RUN_COPIES = 5  # copies of a run event a non-reading stream holds, as measured (see `watch_cost`)
_EVENTS_FIELD_TAG = b"\x0a"  # WatchRunBatchedResponse.events: field 1, length-delimited


class Logged:
    """Consecutive events as read from the log, kept serialized until they are sent."""

    __slots__ = ("payloads",)

    def __init__(self, payloads: list[bytes]) -> None:
        self.payloads = payloads

    def __iter__(self) -> Iterator[pb.WatchRunResponse]:
        """The events, each parsed when it is reached."""
        for payload in self.payloads:
            yield pb.WatchRunResponse.FromString(payload)

    def encoded(self) -> Iterator[Encoded[pb.WatchRunResponse]]:
        """The events as WatchRun sends them: their bytes as read, never parsed (`Encoded`)."""
        for payload in self.payloads:
            yield Encoded(payload, pb.WatchRunResponse)

    def last(self) -> pb.WatchRunResponse:
        return pb.WatchRunResponse.FromString(self.payloads[-1])

    def take_batched(self) -> Encoded[pb.WatchRunBatchedResponse]:
        """The events as one WatchRunBatched message, framed from their bytes and never parsed (a parsed
        multi-MB run event is a second copy per stream, held while gRPC sends it). It takes them: the
        bytes are let go at once, not held beside the message while gRPC sends it."""
        framed = _framed(self.payloads)
        self.payloads = []
        return Encoded(framed, pb.WatchRunBatchedResponse)


def _framed(payloads: list[bytes]) -> bytes:
    """Serialized events as the bytes of a WatchRunBatchedResponse holding them (its repeated field 1)."""
    return b"".join(_EVENTS_FIELD_TAG + _varint(len(p)) + p for p in payloads)


def _varint(value: int) -> bytes:
    """A non-negative int in protobuf's base-128 varint encoding (a length prefix)."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


Chunk = list[pb.WatchRunResponse] | Logged


def batched_message(chunk: Chunk) -> Encoded[pb.WatchRunBatchedResponse]:
    """A chunk of `watch` as one WatchRunBatched message, serialized (a database page is taken, see
    `take_batched`; live events, which every watcher of the run shares, are serialized, not copied into
    a message of this watcher's own first)."""
    if isinstance(chunk, Logged):
        return chunk.take_batched()
    return Encoded(_framed([event.SerializeToString() for event in chunk]), pb.WatchRunBatchedResponse)


def ending(page: Logged) -> tuple[int, bool]:
    """The seq of a page's last event, and whether it is terminal (parsed apart from the generator, so
    a multi-MB run event is not held parsed beside its bytes while a stalled write waits)."""
    last = page.last()
    return last.seq, is_terminal(last)


def is_terminal(event: pb.WatchRunResponse) -> bool:
    """True for the event that records a run's final status."""
    return event.HasField("run") and event.run.status in TERMINAL


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
    page_bytes: int = PAGE_BYTES,
    live_bytes: int | None = None,
    owner: str = "",
    hold: Callable[[int], AbstractContextManager[object]] | None = None,
) -> AsyncIterator[Chunk]:
    """The run's events after `after_seq`, then live ones as they commit, and heartbeats when idle, in
    chunks of at most `max_events`: a page read from the database (at most `page_bytes`, serialized),
    or what one commit published (split at `live_bytes` serialized, when given). The last chunk ends
    with the terminal event. (Chunks, not single events: WatchRunBatched sends them as they are and
    WatchRun one by one, with no extra generator layer holding memory per idle stream.)
    `owner` is the API key id of the watcher: the watch ends when the bus closes that owner's watches.
    `hold`, when given, is entered with the watch's `watch_cost` once the run is found, and left when the
    watch ends (the tenant's watch memory: evalsvc.limits.TenantLimits.watch_memory); it may refuse."""
    cursor = after_seq
    # Rows asked of the database per page: about what fits in page_bytes, from the events' size so far
    # (the database reads every row it is asked for, even those past the byte bound).
    rows = max(1, min(max_events, page_bytes // TYPICAL_EVENT_BYTES))
    with ExitStack() as stack, bus.subscribe(run_id, buffer, owner) as subscription:
        # Subscribed first: every event committed after this check reaches the subscription, so the
        # database is read only when the run already has events past after_seq (a watcher of a new
        # run, or one resuming where it left off, reads nothing but the run's cached row).
        found = await _checked_last_seq(db, tenant, run_id, after_seq, page_bytes)
        if found is None:
            return
        last_seq, cost = found
        if hold is not None:
            stack.enter_context(hold(cost))
        # Seqs up to here are committed, and a run's seqs are gap-free: the log holds every one of them,
        # unless the purge has deleted the run (see `_gone`).
        committed = last_seq
        from_database = after_seq < last_seq
        opening = from_database  # the first page is shared with watchers opening on the run with it
        while True:
            if from_database:
                subscription.raise_if_closed()
                if opening:
                    opening = False
                    read = bus.opening_pages.read(db, tenant, run_id, cursor, last_seq, rows, page_bytes)
                else:
                    read = read_page(db, tenant, run_id, cursor, rows, page_bytes)
                try:
                    payloads, from_database = await read
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is not None and not task.cancelling():
                        subscription.raise_if_closed()  # not ours: the server stopped the shared read
                    raise
                if payloads:
                    average = sum(map(len, payloads)) / len(payloads)
                    rows = max(1, min(max_events, int(page_bytes / average) + 1))
                    page = Logged(payloads)
                    payloads = []  # the page holds them: not a second reference held by the frame
                    last_seq, terminal = ending(page)  # nothing follows a terminal event in a run's log
                    if last_seq != cursor + len(page.payloads):
                        await _gone(db, tenant, run_id, cursor)  # events in order, with seqs missing
                    cursor = last_seq
                    yield page
                    page = Logged([])
                    if terminal:
                        return
                elif cursor < committed:
                    await _gone(db, tenant, run_id, cursor)  # no events where committed ones must be
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
            live = None  # the generator's frame outlives a stalled write: hold one list, not two
            if (fresh and fresh[0].seq != cursor + 1) or any(b.seq != a.seq + 1 for a, b in pairwise(fresh)):
                from_database = True  # a gap: what is missing is in the database
                committed = max(committed, fresh[-1].seq)
                continue
            for chunk in _split(fresh, max_events, live_bytes):
                chunk = _through_terminal(chunk)
                cursor = chunk[-1].seq
                yield chunk
                if is_terminal(chunk[-1]):
                    return


def _split(
    events: list[pb.WatchRunResponse], max_events: int, max_bytes: int | None
) -> Iterator[list[pb.WatchRunResponse]]:
    """Consecutive runs of at most `max_events` events and (when given, past the first) `max_bytes`."""
    if max_bytes is None and len(events) <= max_events:
        if events:
            yield events  # no copy: a stalled watcher holds it until its client reads
        return
    chunk: list[pb.WatchRunResponse] = []
    size = 0
    for event in events:
        event_bytes = event.ByteSize() if max_bytes is not None else 0
        if chunk and (len(chunk) == max_events or (max_bytes is not None and size + event_bytes > max_bytes)):
            yield chunk
            chunk, size = [], 0
        chunk.append(event)
        size += event_bytes
    if chunk:
        yield chunk


async def _checked_last_seq(
    db: Database, tenant: str, run_id: str, after_seq: int, page_bytes: int
) -> tuple[int, int] | None:
    """Check the watch request against the run; its last_seq and the watch's `watch_cost`, or None when
    the run ended at `after_seq`. (Apart from the generator, so its frame holds no run row for the life
    of an idle stream.)"""
    row = await run_store.get_current_row(db, tenant, run_id)
    if row is None:
        raise not_found("run", run_id)
    if after_seq < 0 or after_seq > row.last_seq:
        raise ServiceError(
            grpc.StatusCode.OUT_OF_RANGE,
            Reason.SEQ_OUT_OF_RANGE,
            f"after_seq {after_seq} is outside 0..{row.last_seq} (the run's last_seq)",
            metadata={"last_seq": str(row.last_seq)},
        )
    if row.status in TERMINAL and after_seq == row.last_seq:
        return None
    return int(row.last_seq), watch_cost(row, page_bytes)


def watch_cost(row: RunRecord, page_bytes: int) -> int:
    """The bytes a watch of this run may hold, roughly (what its tenant's watch memory is charged).

    Every run event (created, running, each update, the terminal one) carries the whole run, so the
    run's largest event is about the run's size: its definition, annotations, aggregate and texts. A
    stream whose client does not read holds what it is sending while its write waits: the page it read
    (at most `page_bytes`, or one event past it), handed on to grpc as read (`Encoded`), or a live event
    serialized for it; and grpc's core a copy of that message and of the one before it, which it has
    taken but not yet sent. Measured, a non-reading stream on a run of 3.8 MB of graders added 16-19 MB
    to the server's peak (4-5x the run: docs/operations.md), hence RUN_COPIES. A run grows after the
    watch opens only by its annotations and aggregate, small beside the definition it is counted by."""
    annotations = sum(len(k) + len(v) for k, v in row.annotations.items())
    labels = sum(len(k) + len(v) for k, v in row.labels.items())
    texts = len(row.display_name) + len(row.description) + len(row.error_message)
    run = len(row.spec) + len(row.aggregate or b"") + annotations + labels + texts + RUN_OVERHEAD_BYTES
    return RUN_COPIES * run + page_bytes


async def _gone(db: Database, tenant: str, run_id: str, cursor: int) -> NoReturn:
    """End a watch whose database read lacks events known to be committed. Only the purge deletes a
    run's events, and only after its run row (evalsvc.store.retention), so the run is gone: NOT_FOUND,
    as for a run that never existed. (Without this a watcher catching up on a run purged under it took
    the empty page for "caught up" and sent heartbeats for good.) The purge also ends the watches of the
    runs it takes at once (EventBus.end_runs); this covers a watcher that missed that, e.g. on a
    replica whose listener was reconnecting."""
    if await run_store.get_current_row(db, tenant, run_id) is None:
        raise not_found("run", run_id)
    raise RuntimeError(f"run {run_id} lacks committed events after seq {cursor} and still exists")


def _through_terminal(events: list[pb.WatchRunResponse]) -> list[pb.WatchRunResponse]:
    """The events up to and including a terminal one (nothing follows it in a run's log)."""
    for i, event in enumerate(events):
        if is_terminal(event):
            return events[: i + 1]
    return events
