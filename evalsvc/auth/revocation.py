"""Ending the open watch streams of keys that stopped being valid.

A stream checks its key once, when it opens; without this it would keep delivering events after its
key was revoked or expired. The watch streams of this process are filed under the key that opened
them (`EventBus.subscribe(owner=...)`). Twice per auth-cache period one query reads those keys past
the cache, and the streams of a revoked, expired or deleted key end with the UNAUTHENTICATED status a
new call with that key would get: within --auth-cache-s, as new calls are refused. One query per
period for every stream of the process, instead of one per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from evalsvc.auth.service import KeyService
from evalsvc.events.bus import EventBus

log = logging.getLogger(__name__)

MIN_PERIOD_S = 0.25


class StreamRevoker:
    """Closes the watches of keys that were revoked or expired since the watch opened."""

    def __init__(self, keys: KeyService, bus: EventBus, auth_cache_s: float) -> None:
        self._keys = keys
        self._bus = bus
        # With no auth cache (0 s) revocation is immediate for calls; streams are checked 4 times a second.
        self._period_s = max(auth_cache_s / 2, MIN_PERIOD_S)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start checking in the background."""
        self._task = asyncio.create_task(self._loop(), name="stream-revoker")

    async def stop(self) -> None:
        """Stop checking."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def check(self) -> None:
        """End the watches of every key among their owners that is no longer valid."""
        owners = self._bus.owners()
        if not owners:
            return
        for key_id, error in (await self._keys.refused_now(owners)).items():
            ended = self._bus.close_owner(key_id, error)
            log.info("ended %d watch streams of API key %s: %s", ended, key_id, error.reason)

    async def _loop(self) -> None:
        """Check every period until stopped; a failed check (the database away) is logged and retried."""
        while True:
            await asyncio.sleep(self._period_s)
            try:
                await self.check()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # stop() cancelled this loop
                log.warning("stream revocation check was cancelled from below; checking again next period")
            except Exception as exc:
                log.warning(
                    "stream revocation check failed (%s: %s); checking again next period", type(exc).__name__, exc
                )
