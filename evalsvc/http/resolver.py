"""DNS lookups of outbound destinations: on threads of their own, bounded per tenant, in fair turns,
one lookup per host at a time, each waited for at most a timeout.

`getaddrinfo` blocks a thread for as long as the name's resolver takes, and a tenant chooses the name:
its own authoritative server can answer after 20 s, or never. Lookups ran on the event loop's default
executor (6 threads on 2 cores, shared with everything that uses `asyncio.to_thread`, CompareRuns
included) with no timeout, so one tenant's 64 slow names held those threads for minutes and every
other tenant's lookups (and comparisons) queued behind them: runs stalled for 37 to 217 s.

Now a lookup runs on RESOLVER_THREADS threads no other work uses; a tenant's lookups hold at most
LOOKUPS_PER_TENANT of them at once, a tenant's second one only while RESERVED_THREADS stay free for
tenants with no lookup running, and waiting lookups take the free threads round-robin across tenants
(`_Threads`). A thread is the tenant's until the lookup returns, even when nobody waits for the
answer any more (a thread cannot be interrupted): that is what the per-tenant bound bounds. Concurrent
lookups of one host by one tenant share one lookup (single-flight), so a run of 1,000 calls to one slow name holds
one thread; lookups are shared within a tenant only (a lookup waits in its tenant's turn, and another
tenant joining it waited behind that tenant's queue of slow names until its own call timed out, with
resolver threads free). Each caller waits at most its timeout (TimeoutError); nothing is cached, so every call
sees the name's current addresses.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import socket
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from evalsvc.slots import Slots

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Threads for lookups, and how many of them one tenant's lookups may hold at once.
RESOLVER_THREADS = 8
LOOKUPS_PER_TENANT = 2
# Threads a tenant's second (and later) lookup leaves free for tenants with no lookup running: four
# tenants with slow names held 2 threads each, all 8, and another tenant's lookups waited for one to
# return (its deliveries 2 to 14 s late, some attempts failed).
RESERVED_THREADS = RESOLVER_THREADS // 2


def getaddrinfo(host: str) -> list[IPAddress]:
    """What the system resolver says host is (blocking)."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    # Scoped IPv6 results ("fe80::1%eth0") carry their zone, which ip_address does not parse.
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


class _Threads(Slots):
    """The resolver threads, handed out round-robin across tenants (`Slots`): a tenant's first lookup
    takes any free thread, a further one only while `reserve` threads stay free after it. So tenants
    whose names resolve slowly hold a thread each and, together, at most `capacity - reserve` more,
    and a tenant with no lookup running finds a free thread unless more than `capacity - reserve`
    tenants each have a slow lookup running."""

    def __init__(self, capacity: int, reserve: int) -> None:
        super().__init__(capacity)
        self.reserve = min(max(0, reserve), capacity - 1)
        self.held_by: dict[str, int] = {}

    def _room(self, key: str) -> bool:
        if self.held >= self.capacity:
            return False
        return not self.held_by.get(key) or self.capacity - self.held - 1 >= self.reserve

    def available(self, key: str = "") -> bool:
        # A tenant with room need not queue behind tenants that have none (their second lookups).
        return self._room(key) and not any(self._room(other) for other in self._waiting)

    def _next_key(self) -> str | None:
        # The first tenant in the rotation that may take a thread now, not only the first tenant.
        return next((key for key in self._waiting if self._room(key)), None)

    def _take(self, key: str) -> None:
        super()._take(key)
        self.held_by[key] = self.held_by.get(key, 0) + 1

    def release(self, key: str = "") -> None:
        left = self.held_by.get(key, 0) - 1
        if left > 0:
            self.held_by[key] = left
        else:
            self.held_by.pop(key, None)
        super().release(key)


@dataclass
class _Flight:
    """One lookup in progress, and how many callers wait for it."""

    task: asyncio.Task[list[IPAddress]]
    waiters: int = 0


@dataclass
class _LoopState:
    """The bounds and lookups in flight of one event loop: a loop that closes with lookups under way
    (a test's) takes its counts with it instead of leaving them held for the next loop."""

    free: _Threads
    tenants: dict[str, Slots] = field(default_factory=dict)
    flights: dict[tuple[str, str], _Flight] = field(default_factory=dict)  # by (tenant, host)


@dataclass
class Resolver:
    """Looks names up with the bounds above; `lookup` is the blocking lookup. The threads are shared by
    every event loop of the process; the bounds are each loop's own (`_LoopState`)."""

    threads: int = RESOLVER_THREADS
    per_tenant: int = LOOKUPS_PER_TENANT
    reserve: int = RESERVED_THREADS
    lookup: Callable[[str], list[IPAddress]] = getaddrinfo
    _pool: concurrent.futures.ThreadPoolExecutor | None = field(default=None, init=False)
    _loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = field(
        default_factory=weakref.WeakKeyDictionary, init=False
    )

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            state = self._loops[loop] = _LoopState(_Threads(self.threads, self.reserve))
        return state

    async def resolve(self, host: str, tenant: str, timeout_s: float) -> list[IPAddress]:
        """host's addresses, looked up in `tenant`'s turn (or with a lookup of host already under way);
        TimeoutError after `timeout_s`, OSError when the resolver fails."""
        state = self._state()
        key = (tenant, host)
        flight = state.flights.get(key)
        if flight is None:
            flight = state.flights[key] = _Flight(asyncio.ensure_future(self._look_up(state, host, tenant)))
            flight.task.add_done_callback(lambda _: _landed(state, key, flight))
        flight.waiters += 1
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            if not flight.waiters and not flight.task.done():
                flight.task.cancel()  # nobody waits: stop queueing (a lookup under way keeps its thread)
                # Out of reach at once: a lookup joining it before its callback ran got a cancellation
                # nobody sent (its job ended as if cancelled and ran again after its lease expired).
                if state.flights.get(key) is flight:
                    del state.flights[key]

    async def _look_up(self, state: _LoopState, host: str, tenant: str) -> list[IPAddress]:
        """Take one of the tenant's lookups and a thread, in the tenant's turn, and look host up. Both
        are given back when the thread is done, not when the waiting is."""
        own = state.tenants.get(tenant)
        if own is None:
            own = state.tenants[tenant] = Slots(self.per_tenant)
        try:
            await own.acquire()
            try:
                await state.free.acquire(tenant)
            except BaseException:
                own.release()
                raise
        finally:
            _forget_if_idle(state, tenant, own)
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="evalsvc-resolver")
        loop = asyncio.get_running_loop()

        def done(_: concurrent.futures.Future[list[IPAddress]]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: its state went with it
                loop.call_soon_threadsafe(_give_back, state, tenant, own)

        lookup = self._pool.submit(self.lookup, host)
        lookup.add_done_callback(done)
        return await asyncio.wrap_future(lookup)


def _landed(state: _LoopState, key: tuple[str, str], flight: _Flight) -> None:
    if state.flights.get(key) is flight:
        del state.flights[key]
    if not flight.task.cancelled():
        flight.task.exception()  # retrieved: a failure nobody waited for is not "never retrieved"


def _give_back(state: _LoopState, tenant: str, own: Slots) -> None:
    state.free.release(tenant)
    own.release()
    _forget_if_idle(state, tenant, own)


def _forget_if_idle(state: _LoopState, tenant: str, own: Slots) -> None:
    """A tenant's bound is kept while it has lookups, so tenants that come and go cost nothing."""
    if not own.held and not own.waiting and state.tenants.get(tenant) is own:
        del state.tenants[tenant]
