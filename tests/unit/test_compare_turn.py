"""CompareRuns' turn (CompareService._turn): a comparison whose caller left keeps it until its merge
thread ends, and a comparison that waited for it reads its runs again once it has it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.errors import ServiceError
from evalsvc.ids import PageTokens
from evalsvc.runs.compare import CompareService, Pairing
from evalsvc.store import retention
from evalsvc.store import runs as run_store
from evalsvc.store.db import Database
from evalsvc.v1 import comparison_pb2 as cpb
from evalsvc.v1 import run_pb2
from tests.unit.test_compare_items import two_runs


class HeldMerges:
    """Pairing.merge, held in its thread until `go_on` is set; counts the merges under way at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.loop = asyncio.get_running_loop()
        self.merging = asyncio.Event()  # a merge is in its thread
        self.go_on = threading.Event()
        self.running = self.most = 0
        self.log: list[str] = []
        self._lock = threading.Lock()
        self._real = Pairing.merge
        held = self._merge

        def merge(pairing: Pairing, *args: Any) -> Any:  # a function, bound to the pairing as the real one
            return held(pairing, *args)

        monkeypatch.setattr(Pairing, "merge", merge)

    def _merge(self, *args: Any) -> Any:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            self.loop.call_soon_threadsafe(self.merging.set)
            self.go_on.wait(30)  # a bound only for a failing test: set by the test
            return self._real(*args)
        finally:
            with self._lock:
                self.running -= 1
                self.log.append("merge ended")


@pytest.fixture
async def compare(db: Database) -> AsyncIterator[CompareService]:
    yield CompareService(db, PageTokens(b"k" * 32))


async def queued(compare: CompareService, monkeypatch: pytest.MonkeyPatch, call: Any) -> asyncio.Future[Any]:
    """`call` started, once it has asked for its turn (and has it, or waits for it)."""
    asked = asyncio.Event()
    real = compare._pairing.acquire

    async def acquire(key: str = "") -> None:
        asked.set()
        await real(key)

    monkeypatch.setattr(compare._pairing, "acquire", acquire)
    started = asyncio.ensure_future(call)
    await asked.wait()
    return started


def request(b_id: str, c_id: str) -> cpb.CompareRunsRequest:
    return cpb.CompareRunsRequest(baseline_run_id=b_id, candidate_run_id=c_id)


async def test_a_cancelled_comparison_keeps_its_turn_until_its_merge_thread_ends(
    db: Database, compare: CompareService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread cannot be stopped: a comparison whose caller left (a deadline, a cancelled call) gave its
    turn back at once, and the next comparison's merge ran beside its merge."""
    b_id, c_id, _, _ = await two_runs(db, seed=5)
    merges = HeldMerges(monkeypatch)
    released = asyncio.Event()
    real_release = compare._pairing.release

    def release(key: str = "") -> None:
        merges.log.append("turn given back")
        released.set()
        real_release(key)

    monkeypatch.setattr(compare._pairing, "release", release)
    try:
        first = asyncio.ensure_future(compare.compare("t1", request(b_id, c_id)))
        await merges.merging.wait()
        first.cancel()
        # Nothing marks a turn kept: it was given back as soon as the first closed its connection
        # (milliseconds), so half a second without it is the thread's.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(released.wait(), 0.5)
        second = await queued(compare, monkeypatch, compare.compare("t1", request(b_id, c_id)))
        assert compare._pairing.waiting == 1 and not first.done()  # the second waits for the first's thread
    finally:
        merges.go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await first
    answer = await second
    assert merges.most == 1 and answer.overall.pairs > 0
    assert merges.log[:2] == ["merge ended", "turn given back"]
    assert compare._pairing.held == 0 and compare._pairing.waiting == 0


async def test_a_comparison_reads_its_runs_again_once_it_has_its_turn(
    db: Database, compare: CompareService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The turn may be waited for long. A run purged meanwhile was an empty comparison (NO_PAIRS, 200 OK):
    it is NOT_FOUND, as a missing run. `partial` was the status read before the wait."""
    busy = await two_runs(db, seed=6)
    b_id, c_id, _, _ = await two_runs(db, seed=7)
    merges = HeldMerges(monkeypatch)
    ended = run_pb2.RUN_STATUS_SUCCEEDED

    async def end_both(conn: AsyncConnection) -> None:
        for run_id in (b_id, c_id):
            assert await run_store.set_status(conn, "t1", run_id, ended, from_statuses=[run_pb2.RUN_STATUS_PENDING])

    async def purge_baseline(conn: AsyncConnection) -> None:
        await conn.execute(update(run_store.RUNS).where(run_store.RUNS.c.id == b_id).values(delete_time=1.0))
        assert await retention.expire(conn, cutoff=2.0, limit=10) == [b_id]

    merges.go_on.set()
    assert (await compare.compare("t1", request(b_id, c_id))).partial  # both runs PENDING
    for change, check in ((end_both, "partial"), (purge_baseline, "not found")):
        merges.go_on.clear()
        merges.merging.clear()
        try:
            first = asyncio.ensure_future(compare.compare("t1", request(busy[0], busy[1])))
            await merges.merging.wait()
            waiting = await queued(compare, monkeypatch, compare.compare("t1", request(b_id, c_id)))
            assert compare._pairing.waiting == 1
            await db.transact(change)
        finally:
            merges.go_on.set()
        await first
        if check == "partial":
            answer = await waiting
            assert not answer.partial and answer.overall.pairs > 0
        else:
            with pytest.raises(ServiceError) as err:
                await waiting
            assert err.value.code.name == "NOT_FOUND" and b_id in str(err.value)
