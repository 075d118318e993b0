"""Counted slots (worker slots, endpoint concurrency slots, grading processes) that cancellation can
never leak, handed to waiting tenants fairly.

`Slots` is a counting semaphore whose capacity may change while it is in use (an endpoint's adaptive
limit grows and shrinks). Its waiters are served fairly across keys (tenants): a freed slot goes to
the next key in round-robin order among those with waiters, first come first served within a key. So
a tenant's one call waits for at most one slot release per tenant ahead of it in the rotation, never
for another tenant's whole backlog. Waiters that all pass the same key (the default) are served first
come, first served.

Its `release` is synchronous, so a `finally:` that gives a slot back cannot itself be interrupted by a
second cancellation halfway, and a waiter that is granted a slot and cancelled in the same instant
hands the slot on (to the next waiter in the rotation) instead of keeping it.

`Hold` is one holder's claim on a slot: it knows whether it holds one, so it can be given back early
(while its holder waits for something else) and taken again, and giving it back twice is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque


class Slots:
    """At most `capacity` holders at once; waiters are served round-robin across keys, in arrival order
    within one."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0
        # Keys with waiters, in rotation order: the first is served next, then moves to the end.
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()

    @property
    def waiting(self) -> int:
        """Holders waiting for a slot now."""
        return sum(len(queue) for queue in self._waiting.values())

    def available(self) -> bool:
        """Whether `acquire` would return at once."""
        return self.held < self.capacity and not self._waiting

    async def acquire(self, key: str = "") -> None:
        """Wait for a slot, in `key`'s turn (`key`: whose wait this is, e.g. a tenant). Cancelled while
        waiting, it holds none (and takes none from others)."""
        if self.available():
            self.held += 1
            return
        granted = asyncio.get_running_loop().create_future()
        queue = self._waiting.get(key)
        if queue is None:
            queue = self._waiting[key] = deque()  # a key that starts waiting joins the end of the rotation
        queue.append(granted)
        try:
            await granted  # `_grant` counts the slot as held before it resolves the future
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release()  # granted and cancelled at the same moment: pass the slot on
            else:
                self._forget(key, granted)
            raise

    def release(self) -> None:
        """Give a slot back and wake the next waiters that now fit."""
        self.held -= 1
        self._grant()

    def set_capacity(self, capacity: int) -> None:
        """Change how many may hold a slot; holders above a lowered capacity keep theirs until released."""
        self.capacity = capacity
        self._grant()

    def _grant(self) -> None:
        """Hand free slots to waiters: each to the first key in the rotation, which then goes to the end
        if it has more waiters. Waiters cancelled before they could leave the queue are skipped without
        using up their key's turn."""
        while self._waiting and self.held < self.capacity:
            key, queue = next(iter(self._waiting.items()))
            waiter = queue.popleft()
            if not queue:
                del self._waiting[key]
            elif not waiter.done():
                self._waiting.move_to_end(key)
            if not waiter.done():
                self.held += 1
                waiter.set_result(None)

    def _forget(self, key: str, waiter: asyncio.Future[None]) -> None:
        """Take a cancelled waiter out of its key's queue (if `_grant` has not already skipped it)."""
        queue = self._waiting.get(key)
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(waiter)
        if not queue:
            del self._waiting[key]


class Hold:
    """One holder's slot of a `Slots`, which it may give back while it waits for something else and take again."""

    def __init__(self, slots: Slots, key: str = "") -> None:
        self._slots = slots
        self._key = key  # whose turn it waits in (a tenant), every time it takes the slot
        self.held = False

    async def take(self) -> None:
        """Wait for a slot, in its key's turn (no-op when already held)."""
        if not self.held:
            await self._slots.acquire(self._key)
            self.held = True

    def give_back(self) -> None:
        """Release the slot if held; safe to call in any `finally`."""
        if self.held:
            self.held = False
            self._slots.release()
