"""The resumable watch over a bare database and an in-process bus: every event after after_seq once and in
order, live events through the bus, the database whenever the bus cannot be trusted, the end after the
terminal event. Runs and events are written as rows, the way the store records them, with no service."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import insert, update

from evalsvc.errors import ServiceError
from evalsvc.events import opening
from evalsvc.events.bus import EventBus
from evalsvc.events.watch import Chunk, Logged, batched_message, watch
from evalsvc.store import run_cache
from evalsvc.store import runs as run_store
from evalsvc.store.db import Database
from evalsvc.store.models import EventRow, RunRow
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import run_pb2
from tests import dbs

TENANT = "acme"
RUN = "run_1"
RUNS = RunRow.__table__
EVENTS = EventRow.__table__


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(dbs.db_url(tmp_path))
    try:
        yield database
    finally:
        await database.close()


def status_event(seq: int, status: int) -> pb.WatchRunResponse:
    return pb.WatchRunResponse(seq=seq, run=run_pb2.Run(id=RUN, status=status))


def result_event(seq: int) -> pb.WatchRunResponse:
    return pb.WatchRunResponse(seq=seq, result=run_pb2.Result(run_id=RUN, item_id=f"i{seq}", explanation="x" * 200))


async def commit(db: Database, *events: pb.WatchRunResponse, tenant: str = TENANT) -> None:
    """Append events to the run's log and move the run to the status of the last run event, as one write
    (not published: a test publishes what its watchers should see live)."""
    async with db.write() as conn:
        if events[0].seq == 1:
            await conn.execute(insert(RUNS).values(id=RUN, tenant=tenant, labels={}, spec=b"", status=0))
        statuses = [e.run.status for e in events if e.HasField("run")]
        values = {"last_seq": events[-1].seq, **({"status": statuses[-1]} if statuses else {})}
        await conn.execute(update(RUNS).where(RUNS.c.id == RUN).values(**values))
        rows = [{"run_id": RUN, "seq": e.seq, "tenant": tenant, "payload": e.SerializeToString()} for e in events]
        await conn.execute(insert(EVENTS), rows)
        changed = await run_store.get_any_tenant(conn, RUN)
        assert changed is not None
        run_cache.remember(conn, changed)  # as every write of the store does: the run cache stays current


FINISHED = [
    status_event(1, run_pb2.RUN_STATUS_PENDING),
    status_event(2, run_pb2.RUN_STATUS_RUNNING),
    result_event(3),
    result_event(4),
    status_event(5, run_pb2.RUN_STATUS_SUCCEEDED),
]


def watching(db: Database, bus: EventBus, after_seq: int = 0, **options: int) -> AsyncIterator[Chunk]:
    settings = {"heartbeat_s": 30, "buffer": 64, **options}
    return watch(db, bus, tenant=TENANT, run_id=RUN, after_seq=after_seq, **settings)


async def chunks_to_end(db: Database, bus: EventBus, after_seq: int = 0, **options: int) -> list[list[int]]:
    """The seqs of every chunk the watch yields, until it ends (at most 10 s)."""
    async with asyncio.timeout(10):
        return [[event.seq for event in chunk] async for chunk in watching(db, bus, after_seq, **options)]


async def test_a_finished_run_is_read_in_order_from_after_seq_and_the_watch_ends_at_its_terminal_event(
    db: Database,
) -> None:
    await commit(db, *FINISHED)
    assert [seq for chunk in await chunks_to_end(db, EventBus()) for seq in chunk] == [1, 2, 3, 4, 5]
    assert [seq for chunk in await chunks_to_end(db, EventBus(), after_seq=2) for seq in chunk] == [3, 4, 5]
    assert await chunks_to_end(db, EventBus(), after_seq=5) == []  # at its end already: nothing, at once


async def test_database_pages_are_bounded_by_count_and_by_bytes(db: Database) -> None:
    await commit(db, *FINISHED)
    assert await chunks_to_end(db, EventBus(), max_events=2) == [[1, 2], [3, 4], [5]]
    # Smaller than any event: one event per page, never none.
    assert await chunks_to_end(db, EventBus(), page_bytes=1) == [[1], [2], [3], [4], [5]]


async def test_after_seq_outside_the_log_is_out_of_range_naming_the_last_seq(db: Database) -> None:
    await commit(db, *FINISHED)
    for after_seq in (6, -1):
        with pytest.raises(ServiceError) as refused:
            await chunks_to_end(db, EventBus(), after_seq=after_seq)
        assert refused.value.code == grpc.StatusCode.OUT_OF_RANGE
        assert refused.value.reason == "SEQ_OUT_OF_RANGE" and refused.value.metadata == {"last_seq": "5"}


async def test_an_unknown_run_or_another_tenants_run_is_not_found(db: Database) -> None:
    await commit(db, *FINISHED, tenant="someone-else")
    with pytest.raises(ServiceError) as refused:
        await chunks_to_end(db, EventBus())
    assert refused.value.code == grpc.StatusCode.NOT_FOUND


async def test_live_events_come_through_the_bus_and_the_watch_ends_after_the_terminal_one(db: Database) -> None:
    await commit(db, FINISHED[0])
    bus = EventBus()
    stream = watching(db, bus)
    assert [e.seq for e in await anext(stream)] == [1]
    # Published, never committed: only the bus can deliver it.
    bus.publish(RUN, [FINISHED[1]])
    assert await anext(stream) == [FINISHED[1]]
    # A batch that goes past the terminal event is cut after it (nothing follows it in a run's log).
    bus.publish(RUN, [status_event(3, run_pb2.RUN_STATUS_CANCELLED), result_event(4)])
    assert [e.seq for e in await anext(stream)] == [3]
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    assert not bus.has_watchers(RUN)


async def test_live_batches_are_split_by_count_and_by_bytes(db: Database) -> None:
    await commit(db, FINISHED[0])
    bus = EventBus()
    by_count = watching(db, bus, max_events=2)
    by_bytes = watching(db, bus, live_bytes=1)  # smaller than any event: one per chunk
    for stream in (by_count, by_bytes):
        await anext(stream)
    bus.publish(RUN, FINISHED[1:])
    assert [[e.seq for e in chunk] async for chunk in by_count] == [[2, 3], [4, 5]]
    assert [[e.seq for e in chunk] async for chunk in by_bytes] == [[2], [3], [4], [5]]


async def test_a_duplicate_is_skipped_and_a_gap_sends_the_watcher_to_the_database(db: Database) -> None:
    await commit(db, FINISHED[0])
    bus = EventBus()
    stream = watching(db, bus)
    await anext(stream)
    bus.publish(RUN, [FINISHED[0]])  # already sent: dropped
    await commit(db, *FINISHED[1:])
    bus.publish(RUN, [FINISHED[4]])  # seq 5 after seq 1: 2-4 were lost on the way; the database has them
    async with asyncio.timeout(10):
        chunk = await anext(stream)
    assert isinstance(chunk, Logged) and [e.seq for e in chunk] == [2, 3, 4, 5]
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_an_overflowed_buffer_sends_the_watcher_to_the_database(db: Database) -> None:
    await commit(db, FINISHED[0])
    bus = EventBus()
    stream = watching(db, bus, buffer=2)
    await anext(stream)
    await commit(db, *FINISHED[1:])
    for event in FINISHED[1:]:  # four single-event commits into a buffer of two, unread: overflow
        bus.publish(RUN, [event])
    async with asyncio.timeout(10):
        assert [e.seq for e in await anext(stream)] == [2, 3, 4, 5]


async def test_an_idle_watch_sends_heartbeats_with_the_last_seq(db: Database) -> None:
    await commit(db, *FINISHED[:3])
    stream = watching(db, EventBus(), heartbeat_s=0.01)
    await anext(stream)
    async with asyncio.timeout(10):
        [heartbeat] = await anext(stream)
    assert heartbeat == pb.WatchRunResponse(heartbeat=pb.Heartbeat(last_seq=3))
    await stream.aclose()


async def test_a_closed_bus_ends_the_watch_with_unavailable(db: Database) -> None:
    await commit(db, FINISHED[0])
    bus = EventBus()
    stream = watching(db, bus)
    await anext(stream)
    bus.close()
    with pytest.raises(ServiceError) as ended:
        await anext(stream)
    assert ended.value.code == grpc.StatusCode.UNAVAILABLE


class CountedReads:
    """The database page reads of `evalsvc.events.opening`, counted; `hold` makes them wait for `release`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, hold: bool = False, fail_first: bool = False) -> None:
        self.count = 0
        self.started = asyncio.Event()  # set once a read has begun
        self.release = asyncio.Event()
        if not hold:
            self.release.set()
        self._fail_first = fail_first
        self._read_page = opening.event_log.read_page
        monkeypatch.setattr(opening.event_log, "read_page", self._counted)

    async def _counted(self, *args: Any) -> tuple[list[bytes], bool]:
        self.count += 1
        self.started.set()
        await self.release.wait()
        if self._fail_first and self.count == 1:
            raise ConnectionError("the database went away")
        return await self._read_page(*args)


async def test_watchers_opening_together_on_a_run_share_one_read_of_its_first_page(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    await commit(db, *FINISHED[:3])
    reads = CountedReads(monkeypatch, hold=True)
    bus = EventBus()
    streams = [watching(db, bus) for _ in range(50)]
    opening_reads = [asyncio.ensure_future(anext(stream)) for stream in streams]
    async with asyncio.timeout(10):
        await reads.started.wait()
        reads.release.set()
        firsts = await asyncio.gather(*opening_reads)
    assert [[e.seq for e in first] for first in firsts] == [[1, 2, 3]] * 50
    assert reads.count == 1
    # Live events reach each of them through its own subscription, once and in order.
    await commit(db, *FINISHED[3:])
    bus.publish(RUN, FINISHED[3:])
    async with asyncio.timeout(10):
        rests = [[e.seq for chunk in [c async for c in stream] for e in chunk] for stream in streams]
    assert rests == [[4, 5]] * 50
    # A watcher opening after the run moved on finds a new last_seq: it reads, and sees the new events.
    assert [seq for chunk in await chunks_to_end(db, bus) for seq in chunk] == [1, 2, 3, 4, 5]
    assert reads.count == 2


async def test_a_watcher_that_cancels_its_opening_does_not_fail_the_others_sharing_its_read(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    await commit(db, *FINISHED)
    reads = CountedReads(monkeypatch, hold=True)
    bus = EventBus()
    sharing = 0
    both_sharing = asyncio.Event()
    shared_read = bus.opening_pages.read

    async def counted_read(*args: Any) -> tuple[list[bytes], bool]:
        nonlocal sharing
        sharing += 1
        if sharing == 2:
            both_sharing.set()
        return await shared_read(*args)

    monkeypatch.setattr(bus.opening_pages, "read", counted_read)
    async with asyncio.timeout(10):
        leaving = asyncio.ensure_future(chunks_to_end(db, bus))
        await reads.started.wait()  # the leaving watcher started the read, and it is held
        staying = asyncio.ensure_future(chunks_to_end(db, bus))
        await both_sharing.wait()  # the staying watcher awaits the same read
        leaving.cancel()
        reads.release.set()
        assert await staying == [[1, 2, 3, 4, 5]]
    assert leaving.cancelled() and reads.count == 1


async def test_a_shared_read_cut_short_by_shutdown_ends_its_watchers_with_unavailable(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    await commit(db, *FINISHED)
    reads = CountedReads(monkeypatch, hold=True)
    bus = EventBus()
    async with asyncio.timeout(10):
        watcher = asyncio.ensure_future(chunks_to_end(db, bus))
        await reads.started.wait()
        bus.close()
        with pytest.raises(ServiceError) as ended:
            await watcher
    assert ended.value.code == grpc.StatusCode.UNAVAILABLE


async def test_a_first_page_too_large_to_keep_is_shared_only_while_it_is_read(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    await commit(db, *FINISHED)  # two results of ~220 bytes among them
    reads = CountedReads(monkeypatch)
    bus = EventBus()
    bus.opening_pages = opening.OpeningPages(kept_bytes=300)
    assert await chunks_to_end(db, bus) == [[1, 2, 3, 4, 5]]
    assert await chunks_to_end(db, bus) == [[1, 2, 3, 4, 5]]
    assert reads.count == 2  # over the byte bound: read again, not kept


async def test_a_failed_first_page_read_is_not_shared_with_later_watchers(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    await commit(db, *FINISHED)
    reads = CountedReads(monkeypatch, fail_first=True)
    bus = EventBus()
    with pytest.raises(ConnectionError):
        await chunks_to_end(db, bus)
    assert await chunks_to_end(db, bus) == [[1, 2, 3, 4, 5]]
    assert reads.count == 2


async def test_watchers_opening_and_leaving_at_random_moments_of_a_run_see_every_event_once_in_order(
    db: Database,
) -> None:
    """A seeded random interleaving: a run commits and publishes its events in random batches while
    watchers open at random moments from random after_seqs (many on the same page at once, sharing
    their first read), some with small buffers that overflow, some leaving early. Every watcher that
    stays sees exactly after_seq+1 .. the terminal event, once and in order; one that leaves ends
    cleanly. Replay a failure with EVALSVC_WATCH_SEED=<seed>."""
    seed = int(os.environ.get("EVALSVC_WATCH_SEED") or random.SystemRandom().randrange(2**32))
    print(f"watch interleaving seed {seed}: replay with EVALSVC_WATCH_SEED={seed}")
    rng = random.Random(seed)
    bus = EventBus()
    events = [status_event(1, run_pb2.RUN_STATUS_PENDING), status_event(2, run_pb2.RUN_STATUS_RUNNING)]
    events += [result_event(seq) for seq in range(3, 300)]
    events.append(status_event(300, run_pb2.RUN_STATUS_SUCCEEDED))
    committed = 0

    async def produce() -> None:
        nonlocal committed
        while committed < len(events):
            batch = events[committed : committed + rng.randint(1, 40)]
            await commit(db, *batch)
            committed += len(batch)
            bus.publish(RUN, batch)
            progressed.set()
            for _ in range(rng.randint(0, 3)):
                await asyncio.sleep(0)

    async def follow(after_seq: int, buffer: int, leave_after: int | None) -> tuple[int, list[int]]:
        seen: list[int] = []
        async for chunk in watching(db, bus, after_seq, buffer=buffer, max_events=rng.choice([1000, 7])):
            seen += [event.seq for event in chunk if not event.HasField("heartbeat")]
            if leave_after is not None and len(seen) >= leave_after:
                break
        return after_seq, seen

    await commit(db, events[0])
    committed = 1
    progressed = asyncio.Event()
    watchers: list[asyncio.Task[tuple[int, list[int]]]] = []
    leaving: set[asyncio.Task[tuple[int, list[int]]]] = set()
    producer = asyncio.ensure_future(produce())
    async with asyncio.timeout(30):
        while len(watchers) < 80:
            if not producer.done() and rng.random() < 0.5:
                progressed.clear()
                await progressed.wait()  # open the next ones after the run moved on
            for _ in range(rng.randint(1, 8)):  # several at once: they share a first page
                after_seq = rng.choice([0, 0, rng.randint(0, committed)])
                leave_after = rng.choice([None, None, None, rng.randint(1, 50)])
                task = asyncio.ensure_future(follow(after_seq, rng.choice([2, 64, 1000]), leave_after))
                watchers.append(task)
                if leave_after is not None:
                    leaving.add(task)
            for _ in range(rng.randint(1, 5)):
                await asyncio.sleep(0)
        await producer
        for after_seq in (0, 0, rng.randint(0, 300)):  # and some once the run has finished
            watchers.append(asyncio.ensure_future(follow(after_seq, 64, None)))
        results = await asyncio.gather(*watchers)
    for task, (after_seq, seen) in zip(watchers, results, strict=True):
        expected = list(range(after_seq + 1, 301))
        if task in leaving:
            assert seen == expected[: len(seen)], f"seed {seed}: after_seq {after_seq}"
        else:
            assert seen == expected, f"seed {seed}: after_seq {after_seq} saw {len(seen)} of {len(expected)}"


def test_a_database_page_becomes_one_batched_message_framed_from_its_bytes() -> None:
    events = [result_event(seq) for seq in range(1, 4)]  # each over 127 bytes: two-byte length prefixes
    payloads = [e.SerializeToString() for e in events]
    assert all(len(p) > 127 for p in payloads)
    page = Logged(list(payloads))
    assert list(page) == events and page.last() == events[-1]
    assert [e.data for e in page.encoded()] == payloads  # WatchRun sends the very bytes read
    assert all(e.data is p for e, p in zip(page.encoded(), payloads, strict=True))
    assert batched_message(page).parse() == pb.WatchRunBatchedResponse(events=events)
    assert page.payloads == []  # taken: the bytes are let go
    assert batched_message(events).parse() == pb.WatchRunBatchedResponse(events=events)
