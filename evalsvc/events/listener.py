"""Cross-replica delivery: LISTEN for other processes' event commits on PostgreSQL.

A notification carries no event, only the run and its latest seq. For a run that watchers in this
process follow, the listener reads the committed events it has not relayed yet, once, and hands them
to the bus as if they had been committed here: one database read per notification, however many
watchers there are (each reading for itself made 1,000 watchers 1,000 reads per commit). Watchers
still check every seq, so a watcher that is behind, or a relay that failed, sends that watcher to the
database itself: a lost notification delays, it never loses an event.

It also listens for runs that ended (RUNS_ENDED_CHANNEL: cancelled, deleted, failed or finished by
another replica) and hands each run id to `on_run_ended`, with which the executor stops its work on
that run and forgets its plan; a callback that fails is logged and the listener goes on.

Notifications from this very process are ignored (its watchers already got the events in memory, and
its executor heard of the runs it ended itself). After the listening connection drops and comes back,
every watched run is woken, since notifications sent meanwhile are gone; ended runs missed meanwhile
are left to the executor's own sweep (Executor.sweep_plans).

And it listens for runs another replica's purge took out of the service (RUNS_PURGED_CHANNEL): their
watchers here end with NOT_FOUND, as the purging replica's do. After the connection comes back, the
watches of runs that no longer exist end too (their notices were missed); a watcher that missed one
anyway ends when it reads the log and finds the run's events gone (evalsvc.events.watch).

The listening loop is supervised (evalsvc.liveness): whatever ends it before shutdown is logged and
counted, and it starts again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from evalsvc.events.bus import EventBus
from evalsvc.ids import PROCESS_ID
from evalsvc.liveness import supervise
from evalsvc.metrics import Metrics
from evalsvc.store import events as event_log
from evalsvc.store import runs as run_store
from evalsvc.store.db import Database, unavailable_cause
from evalsvc.store.events import EVENTS_CHANNEL, RUNS_ENDED_CHANNEL, RUNS_PURGED_CHANNEL

log = logging.getLogger(__name__)

MAX_RELAY = 5000  # events read per relay; a longer gap sends the watchers to the database instead
# Runs whose relayed position is remembered, the least recently relayed forgotten first. A position is
# dropped when the run's last watcher here leaves (EventBus.on_unwatched: a watch ends with its run);
# runs watched to their end from a replica that did not execute them kept theirs for good (500 runs,
# 500 positions). Forgetting one costs only a read: its watchers read for themselves, as at a run's
# first notification.
REMEMBERED_RELAYS = 10_000


class EventListener:
    """Keeps one LISTEN connection open and turns notifications into bus wake-ups."""

    def __init__(
        self,
        url: str,
        bus: EventBus,
        db: Database,
        metrics: Metrics,
        on_run_ended: Callable[[str], None] = lambda run_id: None,
    ) -> None:
        sa_url = make_url(url)
        self._dsn = sa_url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._bus = bus
        self._db = db
        self._metrics = metrics
        self._on_run_ended = on_run_ended
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._notified: dict[str, int] = {}  # run id -> latest seq notified and not yet relayed
        self._relayed: dict[str, int] = {}  # run id -> latest seq handed to this process's watchers
        self._relays: dict[str, asyncio.Task[None]] = {}  # at most one reader per run at a time
        bus.on_unwatched = self._forget_relayed

    def start(self) -> None:
        """Start listening in the background."""
        self._task = asyncio.create_task(
            supervise("listener", self._run, self._stopping, self._metrics), name="event-listener"
        )

    async def stop(self) -> None:
        """Stop listening and relaying."""
        self._stopping.set()
        if self._task is not None:
            await self._task
        relays = list(self._relays.values())
        for relay in relays:
            relay.cancel()
        await asyncio.gather(*relays, return_exceptions=True)

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        origin, _, rest = payload.partition("|")
        if origin == PROCESS_ID:
            return
        run_id, _, seq = rest.partition("|")
        if not self._bus.has_watchers(run_id):
            self._relayed.pop(run_id, None)
            return
        self._notified[run_id] = max(self._notified.get(run_id, 0), int(seq) if seq.isdigit() else 0)
        if run_id not in self._relays:
            self._relays[run_id] = asyncio.create_task(self._relay(run_id), name=f"relay-{run_id}")

    def _forget_relayed(self, run_id: str) -> None:
        """The run's last watcher here has left: where its watchers stood no longer matters."""
        self._relayed.pop(run_id, None)

    def _remember_relayed(self, run_id: str, seq: int) -> None:
        """Note how far this process's watchers of a run were handed its events (REMEMBERED_RELAYS)."""
        self._relayed.pop(run_id, None)
        self._relayed[run_id] = seq
        while len(self._relayed) > REMEMBERED_RELAYS:
            del self._relayed[next(iter(self._relayed))]

    def _on_run_ended_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        origin, _, run_id = payload.partition("|")
        if origin == PROCESS_ID or not run_id:
            return
        try:
            self._on_run_ended(run_id)
        except Exception as exc:
            log.warning("handling the end of run %s failed (%s: %s)", run_id, type(exc).__name__, exc)

    def _on_run_purged_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        origin, _, run_id = payload.partition("|")
        if origin != PROCESS_ID and run_id:
            self._bus.end_runs([run_id])  # the purge on another replica took it: NOT_FOUND to its watchers

    async def _end_purged_watches(self) -> None:
        """End the watches of runs that no longer exist: purged while notifications were not heard."""
        watched = self._bus.watched_runs()
        if not watched:
            return
        try:
            async with self._db.read() as conn:
                present = await run_store.existing_among(conn, watched)
        except Exception as exc:  # those watchers still end when they read the log (evalsvc.events.watch)
            log.warning("cannot check the watched runs for purged ones (%s: %s)", type(exc).__name__, exc)
            return
        self._bus.end_runs([run_id for run_id in watched if run_id not in present])

    async def _relay(self, run_id: str) -> None:
        """Hand the run's newly notified events to its watchers, until no notification is pending."""
        try:
            while (target := self._notified.pop(run_id, None)) is not None:
                after = self._relayed.get(run_id)
                if after is None or target - after > MAX_RELAY:
                    # Where this process's watchers stand is unknown (first notification here) or far
                    # behind: each reads for itself, and relaying starts from here.
                    self._remember_relayed(run_id, target)
                    self._bus.publish(run_id, None)
                    continue
                if target <= after:
                    continue
                async with self._db.read() as conn:
                    events = await event_log.read_after(conn, None, run_id, after, target - after)
                if events:
                    self._remember_relayed(run_id, events[-1].seq)
                self._bus.publish(run_id, events if events and events[-1].seq >= target else None)
        except (Exception, asyncio.CancelledError) as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # stop() ends the relays
            # The next notification starts a new relay; meanwhile the watchers lose nothing. A database
            # that cannot answer (a dropped connection, a restart) is said in one line: the supervised
            # loops report it too, and a probe's 120 dropped connections had left 7 tracebacks here.
            if (cause := unavailable_cause(exc)) is not None:
                log.warning(
                    "relaying events of run %s failed: the database cannot answer (%s); its watchers read it",
                    run_id,
                    cause,
                    extra={"loop": "relay"},
                )
            else:
                log.exception(
                    "relaying events of run %s failed; its watchers read the database", run_id, extra={"loop": "relay"}
                )
            self._metrics.loop_restarted("relay")
            self._relayed.pop(run_id, None)
            self._bus.publish(run_id, None)
        finally:
            self._relays.pop(run_id, None)

    async def _run(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self._dsn)
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning(
                    "cannot LISTEN for cross-replica events (%s); retrying in %.1f s", type(exc).__name__, backoff
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            try:
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(EVENTS_CHANNEL, self._on_notify)
                await conn.add_listener(RUNS_ENDED_CHANNEL, self._on_run_ended_notify)
                await conn.add_listener(RUNS_PURGED_CHANNEL, self._on_run_purged_notify)
                self._relayed.clear()  # anything sent while we were not listening is gone:
                self._bus.wake_all()  # every watcher reads for itself, relaying starts afresh
                await self._end_purged_watches()  # and purges announced meanwhile are gone too
                stop = asyncio.create_task(self._stopping.wait())
                dropped = asyncio.create_task(lost.wait())
                await asyncio.wait({stop, dropped}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                dropped.cancel()
            finally:
                with contextlib.suppress(Exception):
                    await conn.close(timeout=2)
