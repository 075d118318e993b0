"""The one error of outbound calls, apart from the modules that raise it (`outbound`, `replies`)."""

from __future__ import annotations


class OutboundError(Exception):
    """A call that failed for good; `reason` is safe to record (no secrets, no bodies)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
