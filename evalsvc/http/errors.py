"""The errors of outbound calls, apart from the modules that raise them (`outbound`, `replies`)."""

from __future__ import annotations


class OutboundError(Exception):
    """A call that failed for good; `reason` is safe to record (no secrets, no bodies)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnusableReply(OutboundError):
    """The endpoint was reached and answered a success (2xx), but with a body that is not usable JSON (an
    empty 204, text): a caller can tell it from one that could not be reached, which it is not."""
