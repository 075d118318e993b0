"""In-process fan-out of committed run events to the watchers of this process.

The bus is an accelerator, never the source of truth: the event log in the database is. Whoever
commits events publishes them afterwards; a watcher whose bounded buffer overflows (it reads slower
than the run produces), or that is told "something changed" without the events, drops its buffer
and catches up from the database. So a slow watcher costs neither memory nor other watchers' time.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import grpc

from evalsvc.errors import Reason, ServiceError, not_found
from evalsvc.events.opening import OpeningPages
from evalsvc.v1 import eval_run_service_pb2 as pb


def shutting_down() -> ServiceError:
    """What a watcher gets when the server stops: UNAVAILABLE, so clients resume elsewhere or later."""
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE, Reason.SERVER_SHUTTING_DOWN, "the server is shutting down; resume with after_seq"
    )


# A result event's typical size, serialized: what a watcher's buffer may hold in bytes per event of its
# capacity (and what evalsvc.events.watch sizes its database reads by). Counted in events alone, a
# watcher whose client had stopped reading kept --watch-buffer events however large: result events carry
# the target's output (up to megabytes each) and run events (UpdateRun's too) the run's definition.
# Judged results with explanations are 400-500 bytes, so the buffer holds fewer than --watch-buffer says.
TYPICAL_EVENT_BYTES = 128


class Subscription:
    """One watcher's buffer of events of one run, bounded in events (`capacity`) and in their bytes
    (`capacity` x TYPICAL_EVENT_BYTES)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self.max_bytes = capacity * TYPICAL_EVENT_BYTES
        self._events: deque[pb.WatchRunResponse] = deque()
        self._bytes = 0
        self._stale = False
        self._closed_with: ServiceError | None = None
        self._wake = asyncio.Event()

    def close(self, error: ServiceError | None = None) -> None:
        """End the watch: the next `next()` raises `error` (default UNAVAILABLE, the server is stopping)."""
        self._closed_with = error or shutting_down()
        self._wake.set()

    def raise_if_closed(self) -> None:
        """Raise the error the watch was closed with, if it was: a watcher catching up from the
        database checks between pages, so a long catch-up cannot outlive its key."""
        if self._closed_with is not None:
            raise self._closed_with

    def push(self, events: Sequence[pb.WatchRunResponse] | None, size: int) -> None:
        """Buffer events (`size`: their serialized bytes, or any number over `max_bytes` when they are
        more); None (or an overflow) means: read the database instead.

        A batch over the bounds is still taken into an empty buffer: it is in memory anyway (every
        watcher shares the publisher's messages), and a watcher that keeps up must not be sent to the
        database just because one recording batch (jobs x graders), or one run event of a large
        definition, outgrew them. So a watcher holds at most its bounds, or one batch."""
        if events is None or (
            self._events and (len(self._events) + len(events) > self._capacity or self._bytes + size > self.max_bytes)
        ):
            self._events.clear()
            self._bytes = 0
            self._stale = True
        else:
            self._events.extend(events)
            self._bytes += size
        self._wake.set()

    async def next(self, timeout: float) -> list[pb.WatchRunResponse] | None:
        """The buffered events, or None when the watcher must read the database.

        Raises TimeoutError when nothing arrived within `timeout` seconds, ServiceError when closed."""
        if not self._events and not self._stale and self._closed_with is None:
            self._wake.clear()
            await asyncio.wait_for(self._wake.wait(), timeout)
        self.raise_if_closed()
        if self._stale:
            self._stale = False
            self._events.clear()
            self._bytes = 0
            return None
        events = list(self._events)
        self._events.clear()
        self._bytes = 0
        return events


class EventBus:
    """Run id -> the subscriptions of watchers in this process, and which API key opened each one."""

    def __init__(self) -> None:
        self._subscriptions: dict[str, set[Subscription]] = {}
        self._by_owner: dict[str, set[Subscription]] = {}
        self._closed = False
        self.opening_pages = OpeningPages()  # first pages read once for watchers opening together
        # Told of a run whose last watcher here has left (the listener forgets where it relayed to).
        self.on_unwatched: Callable[[str], None] | None = None

    def close(self) -> None:
        """Server shutdown: end every watch now and refuse new ones."""
        self._closed = True
        self.opening_pages.close()
        for subscriptions in self._subscriptions.values():
            for subscription in subscriptions:
                subscription.close()

    def publish(self, run_id: str, events: Sequence[pb.WatchRunResponse] | None) -> None:
        """Hand committed events (or a bare wake-up, None) to every watcher of the run. Their size is
        measured once, only when the run has watchers here, and only as far as a buffer could take
        (`_size_within`): a recording batch of 50,000 events measured whole held the loop ~70 ms."""
        subscriptions = self._subscriptions.get(run_id)
        if not subscriptions:
            return
        if events is None:
            size = 0
        else:
            size = _size_within(events, max(subscription.max_bytes for subscription in subscriptions))
        for subscription in subscriptions:
            subscription.push(events, size)

    @contextmanager
    def subscribe(self, run_id: str, capacity: int, owner: str = "") -> Iterator[Subscription]:
        """A subscription for the duration of a watch; `owner` (the API key id that opened it, if any)
        lets `close_owner` end it when that key stops being valid."""
        if self._closed:
            raise shutting_down()
        subscription = Subscription(capacity)
        self._subscriptions.setdefault(run_id, set()).add(subscription)
        if owner:
            self._by_owner.setdefault(owner, set()).add(subscription)
        try:
            yield subscription
        finally:
            _discard(self._subscriptions, run_id, subscription)
            if owner:
                _discard(self._by_owner, owner, subscription)
            if self.on_unwatched is not None and run_id not in self._subscriptions:
                self.on_unwatched(run_id)

    def owners(self) -> list[str]:
        """The API key ids that have watches open in this process."""
        return list(self._by_owner)

    def close_owner(self, owner: str, error: ServiceError) -> int:
        """End every watch `owner` opened, with `error` (its key was revoked or has expired); how many."""
        subscriptions = self._by_owner.get(owner, set())
        for subscription in subscriptions:
            subscription.close(error)
        return len(subscriptions)

    def end_runs(self, run_ids: Sequence[str]) -> None:
        """End every watch of these runs with NOT_FOUND (RUN_NOT_FOUND): the purge has taken them out
        of the service (here, or on another replica: evalsvc.events.listener)."""
        for run_id in run_ids:
            for subscription in self._subscriptions.get(run_id, ()):
                subscription.close(not_found("run", run_id))

    def has_watchers(self, run_id: str) -> bool:
        """Whether any watcher in this process follows the run."""
        return run_id in self._subscriptions

    def watched_runs(self) -> list[str]:
        """The ids of the runs watched in this process."""
        return list(self._subscriptions)

    def wake_all(self) -> None:
        """Send every watcher to the database (after notifications may have been missed)."""
        for run_id in list(self._subscriptions):
            self.publish(run_id, None)

    def watcher_count(self) -> int:
        """Open subscriptions in this process."""
        return sum(len(s) for s in self._subscriptions.values())


def _size_within(events: Sequence[pb.WatchRunResponse], limit: int) -> int:
    """The events' serialized size, or a number over `limit` as soon as it is known to be over: at most
    about `limit` bytes' worth of events are measured (ByteSize serializes each one)."""
    size = 0
    for event in events:
        size += event.ByteSize()
        if size > limit:
            break
    return size


def _discard(index: dict[str, set[Subscription]], key: str, subscription: Subscription) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(subscription)
        if not members:
            del index[key]
