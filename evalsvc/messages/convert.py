"""Row <-> protobuf conversions for results, and the pieces of a run's message (timestamps, etags, pass
rates; a run record's message is built beside it, in evalsvc.store.records). Pure functions, no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from evalsvc.v1 import item_pb2, run_pb2


def timestamp(seconds: float | None) -> Timestamp | None:
    """UNIX seconds -> Timestamp (None stays None)."""
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


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


def result_from(row: Mapping[str, Any], output: bytes | None) -> run_pb2.Result:
    """The Result message for a results row and its job's serialized output."""
    result = run_pb2.Result(
        id=str(row["id"]),
        run_id=row["run_id"],
        item_id=row["item_id"],
        repetition=row["repetition"],
        grader=row["grader"],
        state=row["state"],
        score=row["score"],
        raw_score=row["raw_score"],
        passed=row["state"] == run_pb2.RESULT_STATE_PASSED,
        explanation=row["explanation"],
        cost_usd=row["cost_usd"],
        latency_ms=row["latency_ms"],
        error_reason=row["error_reason"],
        attempt=row["attempt"],
        complete_time=timestamp(row["complete_time"]),
        scoring_cost_usd=row["scoring_cost_usd"],
        cached=bool(row["cached"]),
        verdict_cached=bool(row["verdict_cached"]),
    )
    if row["confidence"] is not None:
        result.confidence = row["confidence"]
    if output:
        result.output.CopyFrom(item_pb2.Response.FromString(output))
    return result
