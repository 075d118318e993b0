"""Liveness: long-lived loops are supervised, and a watchdog notices one that stopped making progress.

`supervise` runs a loop body until shutdown. Whatever ends the body early - an exception, a
`CancelledError` that was meant for something the loop awaited rather than for the loop itself, or a
plain return - is logged with the loop's name, counted in `evalsvc_loop_restarts_total{loop}`, and the
body starts again after a short backoff. Only shutdown (its `stopping` event) or the cancellation of the
supervising task itself ends it.

A loop that is alive can still be stuck (awaiting a lock that never comes, a query that never returns).
Each watched loop beats a `Progress` on every turn; the `Watchdog` checks, every few seconds, whether a
loop has been silent for its stall limit since it was found with work waiting (e.g. claimable jobs for
the claim loop). Such a loop is logged, counted in `evalsvc_loop_stalls_total{loop}` and flagged in
`evalsvc_loop_stalled{loop}`, and the watchdog reports it so that the server turns its gRPC health
NOT_SERVING: an orchestrator that probes health restarts the process. When every loop makes progress
again, health returns to SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from evalsvc.metrics import Metrics
from evalsvc.store.db import database_lost, unavailable_cause

log = logging.getLogger(__name__)

FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
# A body that ran this long before failing is considered to have recovered: its next failure
# restarts it after the first backoff again, not after the longest.
HEALTHY_RUN_S = 30.0


async def supervise(name: str, body: Callable[[], Awaitable[None]], stopping: asyncio.Event, metrics: Metrics) -> None:
    """Run `body` until `stopping` is set, restarting it whenever it ends before that."""
    metrics.loop_restarts.labels(name)  # exported from the start, zero until a restart
    backoff = FIRST_BACKOFF_S
    while not stopping.is_set():
        started = time.monotonic()
        try:
            await body()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the loop itself is being cancelled: that is the one cancellation that ends it
            log.error(
                "loop %s: a cancellation meant for something it awaited reached it; restarting in %.1f s",
                name,
                backoff,
                exc_info=True,
                extra={"loop": name},
            )
        except Exception as exc:
            if (lost := database_lost(exc)) is not None:
                # No retry can help until a restart, and the watchdog has said so at ERROR once: a loop
                # that went on retrying logged an ERROR every 5 s until shutdown, burying that line.
                log.warning("loop %s stops until shutdown: %s", name, lost, extra={"loop": name})
                await stopping.wait()
                return
            if (cause := unavailable_cause(exc)) is not None:  # the operator's to fix: said in one line
                log.error("loop %s cannot use the database (%s); restarting in %.1f s", name, cause, backoff)
            else:
                log.exception("loop %s failed; restarting in %.1f s", name, backoff, extra={"loop": name})
        else:
            if stopping.is_set():
                return
            log.error("loop %s returned before shutdown; restarting in %.1f s", name, backoff, extra={"loop": name})
        metrics.loop_restarted(name)
        if time.monotonic() - started > HEALTHY_RUN_S:
            backoff = FIRST_BACKOFF_S
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), backoff)
        backoff = min(backoff * 2, MAX_BACKOFF_S)


class Progress:
    """When a loop last completed a turn (monotonic seconds)."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def beat(self) -> None:
        """The loop completed a turn (claimed, recorded, waited its poll interval...)."""
        self.last = time.monotonic()

    def quiet_s(self) -> float:
        """Seconds since the last beat."""
        return time.monotonic() - self.last


@dataclass
class Watched:
    """A loop the watchdog checks: its progress, whether it has work waiting, and its stall limit."""

    name: str
    progress: Progress
    has_work: Callable[[], Awaitable[bool]]
    stall_s: float
    stalled: bool = field(default=False, init=False)
    # When the watchdog first found the loop silent past its limit, and the loop's last beat then.
    quiet_seen_at: float | None = field(default=None, init=False)
    quiet_seen_beat: float = field(default=0.0, init=False)
    # When the watchdog first found work waiting for the silent loop (or could not tell, see `_has_work`).
    work_seen_at: float | None = field(default=None, init=False)
    # A has_work answer still awaited (a database read may block): asked again only once it answers.
    asking: asyncio.Task[bool] | None = field(default=None, init=False)


class Watchdog:
    """Finds loops silent for their stall limit while work waits for them."""

    def __init__(self, metrics: Metrics, on_health: Callable[[bool], Awaitable[None]], check_s: float) -> None:
        self._metrics = metrics
        self._on_health = on_health
        self._check_s = check_s
        self._watched: list[Watched] = []
        self._conditions: list[Callable[[], str | None]] = []
        self._failed_condition: str | None = None
        self.healthy = True

    def watch(self, loop: Watched) -> None:
        """Check this loop from now on."""
        self._watched.append(loop)
        self._metrics.loop_stalls.labels(loop.name)  # exported from the start, zero until a stall
        self._metrics.loop_stalled.labels(loop.name).set(0)

    def require(self, condition: Callable[[], str | None]) -> None:
        """Check `condition` at every check from now on: a reason it returns (the server cannot go on
        serving, whatever its loops do) is logged once at ERROR and makes health NOT_SERVING while it
        holds. It must be quick and must not block (no I/O beyond a stat)."""
        self._conditions.append(condition)

    async def run(self, stopping: asyncio.Event) -> None:
        """Check every loop every `check_s` until `stopping` is set."""
        try:
            while not stopping.is_set():
                await self.check()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), self._check_s)
        finally:
            for loop in self._watched:
                if loop.asking is not None:
                    loop.asking.cancel()
                    loop.asking = None

    async def check(self) -> None:
        """Check every loop once, all at the same time, and report a change of overall health.

        One after another, a loop whose has_work blocked (a database read behind a lock) held up the
        others' checks by as long: every report came about three times its stall limit late."""
        verdicts = await asyncio.gather(*(self._is_stalled(loop) for loop in self._watched))
        for loop, stalled in zip(self._watched, verdicts, strict=True):
            if stalled and not loop.stalled:
                log.error(
                    "loop %s made no progress for %.1f s while work waits for it; reporting NOT_SERVING",
                    loop.name,
                    loop.progress.quiet_s(),
                    extra={"loop": loop.name},
                )
                self._metrics.loop_stalls.labels(loop.name).inc()
            elif loop.stalled and not stalled:
                log.warning("loop %s makes progress again", loop.name, extra={"loop": loop.name})
            loop.stalled = stalled
            self._metrics.loop_stalled.labels(loop.name).set(1 if stalled else 0)
        failed = next((reason for condition in self._conditions if (reason := condition()) is not None), None)
        if failed is not None and self._failed_condition is None:
            log.error("%s; reporting NOT_SERVING", failed)
        elif failed is None and self._failed_condition is not None:
            log.warning("no longer so: %s", self._failed_condition)
        self._failed_condition = failed
        healthy = failed is None and not any(loop.stalled for loop in self._watched)
        if healthy != self.healthy:
            self.healthy = healthy
            await self._on_health(healthy)

    async def _is_stalled(self, loop: Watched) -> bool:
        """Whether the loop has made no progress for its stall limit since work was found waiting for it.

        Silence alone is no stall (an idle loop waits quietly), nor is silence that began before the
        work arrived: a loop idle for a minute that is handed work now gets its full stall limit."""
        if loop.progress.quiet_s() <= loop.stall_s:
            loop.quiet_seen_at = loop.work_seen_at = None
            return False
        now = time.monotonic()
        if loop.quiet_seen_at is None or loop.quiet_seen_beat != loop.progress.last:
            loop.quiet_seen_at, loop.quiet_seen_beat, loop.work_seen_at = now, loop.progress.last, None
        has_work = await self._has_work(loop)
        if has_work is False:
            loop.work_seen_at = None
            return False
        if loop.work_seen_at is None:
            # No answer yet (the read is blocked, most likely on what blocks the loop): the work counts
            # as waiting since the loop was found silent, so a blocked answer delays no report.
            loop.work_seen_at = now if has_work else loop.quiet_seen_at
        return time.monotonic() - loop.work_seen_at >= loop.stall_s

    async def _has_work(self, loop: Watched) -> bool | None:
        """Whether work waits for the loop: None when it does not answer within a check interval
        (asked again at the next check only once this answer came) or fails."""
        if loop.asking is None:
            loop.asking = asyncio.ensure_future(loop.has_work())
        asking = loop.asking
        done, _ = await asyncio.wait({asking}, timeout=self._check_s)
        if not done:
            return None
        loop.asking = None
        if asking.cancelled():
            return None
        if (error := asking.exception()) is not None:
            # Asking may need the database; one that does not answer is no reason to call the loop fine.
            log.warning(
                "cannot tell whether loop %s has work waiting (%s: %s); counting it as waiting",
                loop.name,
                type(error).__name__,
                unavailable_cause(error) or error,
            )
            return None
        return asking.result()
