"""Delivery bodies: built off the event loop, once per event.

A body is the whole run as of its event in proto3 JSON (evalsvc.webhooks.signing.body), which the
pure-Python json_format writes at ~90 ns a byte: ~0.37 s for a run with 2.7 MB of grader definitions.
Built on the event loop at every attempt, a tenant with 50 webhooks on such runs held the loop 16 s in
20 s (another tenant's GetRun took 1.4 s). So, as the gateway's translators do (evalsvc.gateway.
translators), a body of OFF_LOOP_BYTES or more is built in a thread of its own, which hands the GIL back
to the event loop every few milliseconds; and a body is a function of its event alone (the same bytes
to every webhook, at every attempt), so it is built once and kept, by its event, for the other webhooks
and the retries, while the bodies kept hold at most CACHE_BYTES.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from evalsvc.store.records import ClaimedDelivery
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.webhooks import signing

# Smaller events are built on the loop (microseconds), as the gateway's translators keep small bodies.
OFF_LOOP_BYTES = 64 * 1024
CACHE_BYTES = 64 * 1024 * 1024
# One thread: a build is Python holding the GIL but for the loop's turns, so a second thread would only
# take more of the loop's share.
_BUILDERS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="webhook-body")

EventKey = tuple[str, int, str]  # run id, seq, event type


def build(event_type: str, payload: bytes) -> bytes:
    """The body of a delivery of this event (a serialized WatchRunResponse)."""
    return signing.body(event_type, pb.WatchRunResponse.FromString(payload))


class Bodies:
    """The bodies of recent events, each built once (small ones on the loop, large ones in a thread)."""

    def __init__(self, cache_bytes: int = CACHE_BYTES) -> None:
        self._cache_bytes = cache_bytes
        self._kept: OrderedDict[EventKey, asyncio.Future[bytes]] = OrderedDict()  # oldest use first
        self._kept_bytes = 0
        self.built = 0  # bodies built (for tests)

    async def body(self, claimed: ClaimedDelivery) -> bytes:
        """The delivery's body: the one built for its event already, or one built now."""
        key = (claimed.run_id, claimed.seq, claimed.event_type)
        building = self._kept.get(key)
        if building is not None:
            self._kept.move_to_end(key)
            # Shielded: a delivery abandoned while it waits (the server stopping) leaves the build to
            # the others waiting for it.
            return await asyncio.shield(building)
        self.built += 1
        if len(claimed.payload) < OFF_LOOP_BYTES:
            return build(claimed.event_type, claimed.payload)  # microseconds: not worth keeping
        loop = asyncio.get_running_loop()
        building = loop.run_in_executor(_BUILDERS, build, claimed.event_type, claimed.payload)
        self._kept[key] = building
        building.add_done_callback(lambda done: self._built(key, done))
        return await asyncio.shield(building)

    def _built(self, key: EventKey, building: asyncio.Future[bytes]) -> None:
        """A build ended: a failed one is forgotten (the next attempt builds again); a body is counted,
        and the least recently used ones are forgotten while the bodies kept pass CACHE_BYTES."""
        if self._kept.get(key) is not building:
            return
        if building.cancelled() or building.exception() is not None:
            del self._kept[key]
            return
        self._kept_bytes += len(building.result())
        for old in list(self._kept):
            if self._kept_bytes <= self._cache_bytes:
                break
            kept = self._kept[old]
            if old == key or not kept.done():
                continue  # a build still running is counted once it ends
            del self._kept[old]
            self._kept_bytes -= len(kept.result())
