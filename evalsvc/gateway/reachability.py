"""Whether a standalone gateway (`evalsvc gateway --grpc-target`) can reach its gRPC service, in its log.

A gateway that cannot reach the service answers every call 503 UPSTREAM_UNAVAILABLE, whose message never
names the upstream (not the caller's business), and docs/errors.md sends the operator to the gateway's
`--grpc-target` and the server. The log said nothing at all (the server down, or a TLS server and no
`--grpc-ca`: the "listening" line, then silence). Now it says, per target:

- a WARNING at the first call that could not reach it, naming the target and grpc's own cause, then at
  most one every `REPEAT_S` while it stays unreachable, with how many calls failed since the last line;
- an INFO line once a connection to it is up again (grpc reconnects by itself, with backoff).

`UpstreamLog.channel` registers each channel the gateway makes (`remote_channels` does) and follows its
connectivity for the INFO line; `note_unreached` is told of each call that never reached a service
(`upstream.never_reached`) and passes it to the logs whose channels are failing to connect.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
from collections.abc import Callable

import grpc

log = logging.getLogger(__name__)

REPEAT_S = 30.0  # at most one WARNING per target this often while it stays unreachable

_logs: weakref.WeakSet[UpstreamLog] = weakref.WeakSet()  # every log with a channel, by `note_unreached`
_noted: weakref.WeakSet[BaseException] = weakref.WeakSet()  # calls counted (one error is looked at twice)

_FAILING = (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.CONNECTING)


class UpstreamLog:
    """What the operator is told about one `--grpc-target`: see the module's docstring."""

    def __init__(self, target: str, *, every_s: float = REPEAT_S, clock: Callable[[], float] = time.monotonic):
        self.target = target
        self._every_s = every_s
        self._clock = clock
        self._channels: weakref.WeakSet[grpc.aio.Channel] = weakref.WeakSet()
        self._watches: set[asyncio.Task[None]] = set()
        self._down_since: float | None = None  # when the first call failed to reach it (None: reachable)
        self._last_line = -math.inf
        self._failed = 0  # calls that failed to reach it since the last line

    def channel(self, channel: grpc.aio.Channel) -> grpc.aio.Channel:
        """Follow `channel` (one of the gateway's to this target) until it is closed; returns it."""
        self._channels.add(channel)
        _logs.add(self)
        try:
            watch = asyncio.get_running_loop().create_task(self._watch(channel))
        except RuntimeError:  # no loop running: nothing to follow it with (the app opens its channels in one)
            return channel
        self._watches.add(watch)
        watch.add_done_callback(self._watches.discard)
        return channel

    def failing(self) -> bool:
        """Whether a channel of this log is failing to connect (a call that never reached a service is its)."""
        return any(channel.get_state() in _FAILING for channel in list(self._channels))

    def failed(self, details: str) -> None:
        """A call could not reach the service, grpc said why (`details`): the WARNING, when one is due."""
        self._failed += 1
        now = self._clock()
        if self._down_since is None:
            self._down_since = now
            log.warning(
                "the REST gateway cannot reach its gRPC service at %s (--grpc-target): %s; its calls are "
                "answered 503 UPSTREAM_UNAVAILABLE until it can (check that the server is up, and --grpc-ca "
                "when it serves TLS)",
                self.target,
                details,
            )
        elif now - self._last_line >= self._every_s:
            log.warning(
                "the REST gateway still cannot reach its gRPC service at %s (for %d s; %d calls answered 503 "
                "UPSTREAM_UNAVAILABLE since the last line): %s",
                self.target,
                round(now - self._down_since),
                self._failed,
                details,
            )
        else:
            return
        self._last_line, self._failed = now, 0

    def reached(self) -> None:
        """A connection to the service is up: the INFO line, when the last word was that it could not be."""
        if self._down_since is None:
            return
        log.info(
            "the REST gateway reaches its gRPC service at %s again (after %d s; %d calls answered 503 "
            "UPSTREAM_UNAVAILABLE since the last line)",
            self.target,
            round(self._clock() - self._down_since),
            self._failed,
        )
        self._down_since, self._last_line, self._failed = None, -math.inf, 0

    async def _watch(self, channel: grpc.aio.Channel) -> None:
        """`reached` whenever `channel` is READY, until it is closed (SHUTDOWN): grpc reconnects on its own."""
        state = channel.get_state()
        while state is not grpc.ChannelConnectivity.SHUTDOWN:
            await channel.wait_for_state_change(state)
            state = channel.get_state()
            if state is grpc.ChannelConnectivity.READY:
                self.reached()


def note_unreached(error: BaseException, details: str) -> None:
    """A call that never reached a service (`error`, grpc's `details`): counted once by each log whose
    channels are failing to connect (in a gateway process, the one target; a test process may hold more)."""
    if error in _noted:
        return
    _noted.add(error)
    for upstream in list(_logs):
        if upstream.failing():
            upstream.failed(details)
