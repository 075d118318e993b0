"""Counted slots (worker slots, endpoint concurrency slots) that cancellation can never leak.

`Slots` is a first-come-first-served counting semaphore whose capacity may change while it is in use
(an endpoint's adaptive limit grows and shrinks). Its `release` is synchronous, so a `finally:` that
gives a slot back cannot itself be interrupted by a second cancellation halfway, and a waiter that is
granted a slot and cancelled in the same instant hands the slot on instead of keeping it.

`Hold` is one holder's claim on a slot: it knows whether it holds one, so it can be given back early
(while its holder waits for something else) and taken again, and giving it back twice is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class Slots:
    """At most `capacity` holders at once; waiters are served in arrival order."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        """Holders waiting for a slot now."""
        return len(self._waiters)

    def available(self) -> bool:
        """Whether `acquire` would return at once."""
        return self.held < self.capacity and not self._waiters

    async def acquire(self) -> None:
        """Wait for a slot. Cancelled while waiting, it holds none (and takes none from others)."""
        if self.available():
            self.held += 1
            return
        granted = asyncio.get_running_loop().create_future()
        self._waiters.append(granted)
        try:
            await granted  # `_grant` counts the slot as held before it resolves the future
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release()  # granted and cancelled at the same moment: pass the slot on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(granted)
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
        while self._waiters and self.held < self.capacity:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.held += 1
                waiter.set_result(None)


class Hold:
    """One holder's slot of a `Slots`, which it may give back while it waits for something else and take again."""

    def __init__(self, slots: Slots) -> None:
        self._slots = slots
        self.held = False

    async def take(self) -> None:
        """Wait for a slot (no-op when already held)."""
        if not self.held:
            await self._slots.acquire()
            self.held = True

    def give_back(self) -> None:
        """Release the slot if held; safe to call in any `finally`."""
        if self.held:
            self.held = False
            self._slots.release()
