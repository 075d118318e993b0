"""Row <-> protobuf conversions for results, and the pieces of a run's message (timestamps, etags, pass
rates; a run record's message is built beside it, in evalsvc.store.records). Pure functions, no I/O."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp


def timestamp(seconds: float | None) -> Timestamp | None:
    """UNIX seconds -> Timestamp (None stays None)."""
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(nanoseconds(seconds))
    return ts


def nanoseconds(seconds: float) -> int:
    """The nanoseconds since the epoch that the API shows for stored UNIX seconds (`timestamp`): what
    ListRuns' time filters compare with (evalsvc.messages.run_filter)."""
    return int(seconds * 1e9)


def etag(version: int) -> str:
    """The etag of a run at a version of its row (AIP-154; opaque to clients)."""
    return str(version)


def version_of(etag: str) -> int | None:
    """The row version an etag names, or None for a string this service never issued as an etag."""
    return int(etag) if etag.isascii() and etag.isdigit() and len(etag) <= 18 else None


def pass_rate(passed: int, failed: int) -> float:
    """Passed / (passed + failed); errors are not in the denominator. 0 when nothing was graded."""
    graded = passed + failed
    return passed / graded if graded else 0.0
