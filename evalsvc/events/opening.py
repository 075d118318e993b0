"""The first database page of watchers that open on the same run at the same moment, read once.

A fan-out opens many watchers on one run at once (a dashboard per person, a pipeline per shard), and
each first reads the log from its after_seq. Committed events never change, so watchers asking for
the same page of the same run, having found the same last_seq, get the same rows: one read serves
them all. Later ones take the finished read; ones that arrive while it runs await it. Each read was
made after a watcher found the run at that last_seq, so it holds every event up to it (or a full
page); whatever commits later reaches each watcher's own subscription, opened before its check.
A watcher that cancels does not cancel the read the others await, and a failed read is not kept.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from evalsvc.store import events as event_log
from evalsvc.store.db import Database

PAGES = 256  # first pages kept (each at most the watcher's page bytes: ~8 MiB with WatchRun's 32 KiB)

Page = tuple[list[bytes], bool]  # serialized events, and whether more may follow
PageKey = tuple[str, str, int, int, int, int]  # tenant, run id, after_seq, last_seq, rows, bytes


class OpeningPages:
    """Recently read first pages, by run, after_seq and the last_seq the watcher found."""

    def __init__(self, capacity: int = PAGES) -> None:
        self._capacity = capacity
        self._pages: OrderedDict[PageKey, asyncio.Task[Page]] = OrderedDict()

    async def read(
        self, db: Database, tenant: str, run_id: str, after_seq: int, last_seq: int, rows: int, page_bytes: int
    ) -> Page:
        """The page `read_page` would return to a watcher that found the run at `last_seq`. The
        caller must not change the list it gets: every watcher of the page holds the same one."""
        key = (tenant, run_id, after_seq, last_seq, rows, page_bytes)
        page = self._pages.get(key)
        if page is None:
            page = asyncio.create_task(read_page(db, tenant, run_id, after_seq, rows, page_bytes))
            page.add_done_callback(lambda done: self._forget_failed(key, done))
            self._pages[key] = page
            if len(self._pages) > self._capacity:
                self._pages.popitem(last=False)
        else:
            self._pages.move_to_end(key)
        return await asyncio.shield(page)

    def _forget_failed(self, key: PageKey, page: asyncio.Task[Page]) -> None:
        if (page.cancelled() or page.exception() is not None) and self._pages.get(key) is page:
            del self._pages[key]


async def read_page(db: Database, tenant: str, run_id: str, after_seq: int, rows: int, page_bytes: int) -> Page:
    """One page of the run's log from the database (`store.events.read_page`)."""
    async with db.read() as conn:
        return await event_log.read_page(conn, tenant, run_id, after_seq, rows, page_bytes)
