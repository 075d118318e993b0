"""Cross-replica wake-ups: LISTEN for other processes' event commits on PostgreSQL.

A notification only wakes this process's watchers of that run, who then read committed events from
the database; the payload carries no event. Notifications from this very process are ignored (its
watchers already got the events in memory). After the listening connection drops and comes back,
every watched run is woken, since notifications sent meanwhile are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from evalsvc.events.bus import EventBus
from evalsvc.ids import PROCESS_ID
from evalsvc.store.events import EVENTS_CHANNEL

log = logging.getLogger(__name__)


class EventListener:
    """Keeps one LISTEN connection open and turns notifications into bus wake-ups."""

    def __init__(self, url: str, bus: EventBus) -> None:
        sa_url = make_url(url)
        self._dsn = sa_url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._bus = bus
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def start(self) -> None:
        """Start listening in the background."""
        self._task = asyncio.create_task(self._run(), name="event-listener")

    async def stop(self) -> None:
        """Stop listening."""
        self._stopping.set()
        if self._task is not None:
            await self._task

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        origin, _, rest = payload.partition("|")
        if origin != PROCESS_ID:
            run_id = rest.partition("|")[0]
            self._bus.publish(run_id, None)

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
                self._bus.wake_all()  # anything sent while we were not listening is gone
                stop = asyncio.create_task(self._stopping.wait())
                dropped = asyncio.create_task(lost.wait())
                await asyncio.wait({stop, dropped}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                dropped.cancel()
            finally:
                with contextlib.suppress(Exception):
                    await conn.close(timeout=2)
