"""Long loops of CPU work on the event loop, cut into turns so that other calls run in between.

One request may carry 100,000 items (a CreateRun), and checking each of them - for NUL characters,
ids, measurements - in one stretch held the event loop for ~0.8 s: every other tenant's call waited
that long (measured: another tenant's GetRun took 790 ms). A loop over a request's parts holds a
`Turns` and awaits `tick()` once per part; every YIELD_EVERY_S of work the event loop gets a turn,
so a large request delays others by a few milliseconds at a time, and a small one never yields.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Longest stretch a loop over many parts holds the event loop before letting others run.
YIELD_EVERY_S = 0.005
# Parts between two looks at the clock: each part costs microseconds, a look ~0.1 us.
_PARTS_PER_LOOK = 64


class Turns:
    """The clock of one long loop: `await tick()` after each part of the work."""

    __slots__ = ("_parts", "_since")

    def __init__(self) -> None:
        self._parts = 0
        self._since = time.perf_counter()

    async def tick(self, parts: int = 1) -> None:
        """`parts` parts done (one, or a part's size in parts: an item and its thousands of conversation
        turns): give the event loop a turn if this stretch has lasted YIELD_EVERY_S. The clock is read
        once every _PARTS_PER_LOOK parts; counted one per item, a run of items of 10,000 turns each was
        checked 64 items (~200 ms) at a stretch."""
        before = self._parts
        self._parts += parts
        if (
            self._parts // _PARTS_PER_LOOK != before // _PARTS_PER_LOOK
            and time.perf_counter() - self._since > YIELD_EVERY_S
        ):
            await asyncio.sleep(0)
            self._since = time.perf_counter()


async def mapped(build: Callable[[T], R], parts: Iterable[T]) -> list[R]:
    """`[build(part) for part in parts]`, giving the event loop a turn every YIELD_EVERY_S. For the
    hottest loops (a large run's recording builds ~500,000 rows with it): the clock is read inline,
    with no call per part. A recording serializes tens of thousands of events (~5 us each), which in
    one stretch would stall every other call for a tenth of a second."""
    built: list[R] = []
    since = time.perf_counter()
    for i, part in enumerate(parts):
        if i % _PARTS_PER_LOOK == _PARTS_PER_LOOK - 1 and time.perf_counter() - since > YIELD_EVERY_S:
            await asyncio.sleep(0)
            since = time.perf_counter()
        built.append(build(part))
    return built
