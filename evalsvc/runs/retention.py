"""The purge of deleted runs: a supervised loop in every server process (evalsvc.liveness).

DeleteRun only marks a run deleted (AIP-164), so that UndeleteRun can restore it. After
--deleted-run-retention-s the run and every row of it are deleted for good: without that, a tenant that
creates and deletes runs grew the database by 28 MB/s, until the disk was full for every tenant. The
store's two steps (evalsvc.store.retention) take the runs out of the service, then delete their rows in
chunks of about its CHUNK_ROWS, each its own transaction through the one writer, so the purge of a
200,000-job run holds every other write for one chunk at a time, never for the whole run. A pass also
abandons what a stopped (or stalled) server's CreateRuns staged (evalsvc.store.staging), whose rows the
same steps then delete, and deletes the items (versions) of deleted datasets (graders): DeleteDataset
(DeleteGrader) answers once the row is gone and wakes the loop (`wake`). The loop makes a pass every
PASS_EVERY_S, and at once when woken; a pass goes on until nothing is left to purge (or the server stops). On
PostgreSQL every replica runs it, and their passes share the work (see the store module). The runs a
commit takes out of the service are NOT_FOUND from then on: `on_expired` ends their watches in this
process (the server hands it EventBus.end_runs), and on PostgreSQL the commit notifies the other replicas
(evalsvc.events.listener), which end theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from evalsvc.liveness import Progress, Watched, supervise
from evalsvc.metrics import Metrics
from evalsvc.store import retention as store
from evalsvc.store import staging
from evalsvc.store.db import Database

log = logging.getLogger(__name__)

LOOP_NAME = "run-purge"
PASS_EVERY_S = 60.0
# Runs one transaction takes out of the service (their run rows, labels; a run_purges row each).
EXPIRE_BATCH = 100


def retention_words(seconds: float) -> str:
    """A retention as the operator would say it: "30 days", "12 hours", "90 s", "within a minute"."""
    if seconds <= 0:
        return "within a minute"
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds:g} s"


@dataclass(frozen=True)
class Purged:
    """What one pass purged: runs taken out of the service, and rows deleted (of purged runs, and the
    items and versions of deleted datasets and graders)."""

    runs: int = 0
    rows: int = 0


class RunPurger:
    """Purges the deleted runs past their retention, together with any other replicas."""

    def __init__(
        self,
        db: Database,
        retention_s: float,
        metrics: Metrics,
        *,
        chunk_rows: int | None = None,
        expire_batch: int = EXPIRE_BATCH,
        pass_every_s: float = PASS_EVERY_S,
        on_expired: Callable[[list[str]], None] = lambda run_ids: None,
    ) -> None:
        self._db = db
        self._retention_s = retention_s
        self._metrics = metrics
        self._chunk_rows = chunk_rows  # None: store.CHUNK_ROWS as of each pass
        self._expire_batch = expire_batch
        self._pass_every_s = pass_every_s
        self._on_expired = on_expired  # told of the runs each commit took out of the service
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._passes: list[asyncio.Future[Purged]] = []  # callers of `next_pass`
        self._progress = Progress()  # a pass or a chunk completed
        self._failing: set[tuple[str, str]] = set()  # deleted definitions whose purge failed, warned of once
        # Before the server serves (it makes its purger first): what is staged before this, on SQLite, a
        # previous process staged.
        self._started = time.time()

    def watched(self, stall_s: float) -> Watched:
        """The loop, for the watchdog: it beats after every chunk and every pass, and passes come every
        PASS_EVERY_S, so a loop silent past `stall_s` (or two passes) while something waits for the
        purge is stuck, and health turns NOT_SERVING."""
        return Watched(LOOP_NAME, self._progress, self._pending, max(stall_s, 2 * self._pass_every_s))

    async def _pending(self) -> bool:
        async with self._db.read() as conn:
            return await store.pending(conn, time.time() - self._retention_s) or await staging.any_stale(
                conn, self._staged_before()
            )

    def _staged_before(self) -> float:
        """Runs staged before this are abandoned (evalsvc.store.staging): staged longer than
        STAGED_FOR_AT_MOST_S, or on SQLite, whose file one server serves at a time, by a process before
        this one."""
        stale = time.time() - staging.STAGED_FOR_AT_MOST_S
        return max(stale, self._started) if self._db.is_sqlite else stale

    async def start(self) -> None:
        """Start the loop; its first pass begins at once (what a stopped server left half-purged, too)."""
        self._stopping.clear()
        self._progress.beat()
        self._loop = asyncio.create_task(
            supervise(LOOP_NAME, self._pass_loop, self._stopping, self._metrics), name=LOOP_NAME
        )

    async def stop(self) -> None:
        """Stop after the chunk in progress: a SQLite write transaction must not be abandoned half-way, so
        the loop is not cancelled, it stops at its next check (a chunk is short)."""
        self._stopping.set()
        if self._loop is not None:
            await self._loop
            self._loop = None
        for waiter in self._passes:
            waiter.cancel()
        self._passes.clear()

    def wake(self) -> None:
        """Have a pass start now (or, when one is under way, start again once it ends): DeleteDataset
        (DeleteGrader) answers once the dataset (grader) is out of the service, and its items (versions)
        go in this loop's passes, a chunk per transaction."""
        self._wake.set()

    def next_pass(self) -> asyncio.Future[Purged]:
        """What the loop's next whole pass purges, once it ends: a pass starts now (tests, operators
        waiting for the disk to be freed)."""
        waiter: asyncio.Future[Purged] = asyncio.get_running_loop().create_future()
        self._passes.append(waiter)
        self._wake.set()
        return waiter

    async def _pass_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            waiting, self._passes = self._passes, []
            try:
                purged = await self.purge()
            except BaseException:
                self._passes = waiting + self._passes  # the restarted loop's next pass answers them
                raise
            self._progress.beat()
            for waiter in waiting:
                if not waiter.done():
                    waiter.set_result(purged)
            if self._stopping.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_or_stop(), self._pass_every_s)

    async def _wake_or_stop(self) -> None:
        waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(self._stopping.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    async def purge(self) -> Purged:
        """One pass: every run deleted more than the retention ago is taken out of the service, then the
        rows of every purged run are deleted, a chunk per transaction. Stops early only when the server
        stops (the next start goes on from there)."""
        cutoff = time.time() - self._retention_s
        chunk_rows = self._chunk_rows or store.CHUNK_ROWS
        runs = rows = 0
        abandoned = await self._db.transact(
            functools.partial(staging.abandon_stale, before=self._staged_before(), limit=self._expire_batch)
        )
        if abandoned:
            log.warning("%d CreateRuns staged by a server that stopped (or stalled) are discarded", len(abandoned))
        while not self._stopping.is_set():
            taken = await self._db.transact(functools.partial(store.expire, cutoff=cutoff, limit=self._expire_batch))
            runs += len(taken)
            if taken:
                self._on_expired(taken)  # NOT_FOUND from this commit on: their watches here end
            self._metrics.purged.labels("runs").inc(len(taken))
            self._progress.beat()  # a large backlog of expired runs is many turns, not one silent one
            if len(taken) < self._expire_batch:
                break
        while not self._stopping.is_set():
            # Alone: a chunk's failure must not have the writes queued beside it applied again one by one.
            step = await self._db.transact(functools.partial(store.purge_step, budget=chunk_rows), alone=True)
            if step is None:
                break
            rows += step.rows
            self._metrics.purged.labels("rows").inc(step.rows)
            self._progress.beat()
        failed: set[tuple[str, str]] = set()  # this pass skips them: each would block every purge after it
        while not self._stopping.is_set():
            try:
                parts = await self._db.transact(
                    functools.partial(store.definition_purge_step, budget=chunk_rows, skip=frozenset(failed)),
                    alone=True,
                )
            except store.DefinitionPurgeFailed as exc:
                failed.add(exc.owner)
                if exc.owner not in self._failing:
                    self._failing.add(exc.owner)
                    log.warning(
                        "purging the parts of deleted %s %s failed (skipped; retried every pass): %r",
                        *exc.owner,
                        exc.__cause__,
                    )
                continue
            if parts is None:
                break
            self._failing.discard((parts.kind, parts.owner_id))
            rows += parts.rows
            self._metrics.purged.labels("rows").inc(parts.rows)
            self._progress.beat()
        if runs or rows:
            log.info("purged %d deleted runs (%d rows of purged runs and deleted definitions deleted)", runs, rows)
        return Purged(runs, rows)
