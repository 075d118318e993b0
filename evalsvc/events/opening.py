"""The first database page of watchers that open on the same run at the same moment, read once.

A fan-out opens many watchers on one run at once (a dashboard per person, a pipeline per shard), and
each first reads the log from its after_seq. Committed events never change, so watchers asking for
the same page of the same run, having found the same last_seq, get the same rows: one read serves
them all. Later ones take the finished read; ones that arrive while it runs await it. Each read was
made after a watcher found the run at that last_seq, so it holds every event up to it (or a full
page); whatever commits later reaches each watcher's own subscription, opened before its check.
A watcher that cancels does not cancel the read the others await, and a failed read is not kept.

What is kept is bounded in bytes, not only in pages: a page always holds its first event, and a run
event carries the whole run (its spec, annotations, aggregate), so one page can be far larger than
the page size a watcher asked for. Such pages are shared while being read and not kept after.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from evalsvc.store import events as event_log
from evalsvc.store.db import Database

PAGES = 256  # first pages kept at most
KEPT_BYTES = 4 << 20  # serialized events kept in all, across those pages
KEPT_PAGE_BYTES = 64 << 10  # a larger page is shared only while it is being read

Page = tuple[list[bytes], bool]  # serialized events, and whether more may follow
PageKey = tuple[str, str, int, int, int, int]  # tenant, run id, after_seq, last_seq, rows, bytes


class OpeningPages:
    """Recently read first pages, by run, after_seq and the last_seq the watcher found."""

    def __init__(self, capacity: int = PAGES, kept_bytes: int = KEPT_BYTES) -> None:
        self._capacity = capacity
        self._kept_bytes = kept_bytes
        self._pages: OrderedDict[PageKey, asyncio.Task[Page]] = OrderedDict()
        self._sizes: dict[PageKey, int] = {}  # bytes of each finished page kept
        self._bytes = 0

    async def read(
        self, db: Database, tenant: str, run_id: str, after_seq: int, last_seq: int, rows: int, page_bytes: int
    ) -> Page:
        """The page `read_page` would return to a watcher that found the run at `last_seq`. The
        caller must not change the list it gets: every watcher of the page holds the same one."""
        key = (tenant, run_id, after_seq, last_seq, rows, page_bytes)
        page = self._pages.get(key)
        if page is None:
            page = asyncio.create_task(read_page(db, tenant, run_id, after_seq, rows, page_bytes))
            page.add_done_callback(lambda done: self._finished(key, done))
            self._pages[key] = page
            self._evict()
        else:
            self._pages.move_to_end(key)
        return await asyncio.shield(page)

    def close(self) -> None:
        """Server shutdown: cancel reads still running (their watchers are ending) and keep nothing."""
        for page in self._pages.values():
            page.cancel()
        self._pages.clear()
        self._sizes.clear()
        self._bytes = 0

    def _finished(self, key: PageKey, page: asyncio.Task[Page]) -> None:
        failed = page.cancelled() or page.exception() is not None  # retrieved even when no one awaits it
        if self._pages.get(key) is not page:
            return  # evicted or closed while it was read
        size = 0 if failed else sum(map(len, page.result()[0]))
        if size == 0 or size > KEPT_PAGE_BYTES:
            self._forget(key)
            return
        self._sizes[key] = size
        self._bytes += size
        self._evict()

    def _evict(self) -> None:
        """Drop the least recently used pages past the page and byte bounds."""
        while len(self._pages) > self._capacity or self._bytes > self._kept_bytes:
            self._forget(next(iter(self._pages)))

    def _forget(self, key: PageKey) -> None:
        del self._pages[key]
        self._bytes -= self._sizes.pop(key, 0)


async def read_page(db: Database, tenant: str, run_id: str, after_seq: int, rows: int, page_bytes: int) -> Page:
    """One page of the run's log from the database (`store.events.read_page`)."""
    async with db.read() as conn:
        return await event_log.read_page(conn, tenant, run_id, after_seq, rows, page_bytes)
