"""Typed, frozen records of stored rows, as the store's queries return them, and their messages.

The SQLModel classes in `models.py` define the tables (and Alembic's target metadata); a record is
what one row of a table reads as: every column, typed, read by attribute, never changed. A record is
built from the row's mapping by keyword (`from_row`), so a column the table gains or loses without
its record fails on the first read instead of going unnoticed (tests/unit/store/test_records.py
checks the two agree column by column).

Records are shared: the run cache (`run_cache.py`) hands the same `RunRecord` to every GetRun of an
unchanged run. Their map columns are plain dicts typed read-only; never change one.

The messages of run records are built here, beside the record, rather than in evalsvc.messages: the
messages layer sits below the store and cannot name its types.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

from sqlalchemy import RowMapping

from evalsvc.messages.convert import etag, pass_rate, timestamp
from evalsvc.v1 import run_pb2


@dataclass(frozen=True, slots=True)
class RunRecord:
    """A row of `runs` (models.RunRow): a run's definition, status and live counters."""

    id: str
    tenant: str
    request_id: str | None
    request_hash: str
    dataset_id: str
    run_number: int
    display_name: str
    description: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    spec: bytes  # the run_pb2.Run definition as validated at creation
    status: int  # a run_pb2.RunStatus
    total_items: int
    total_evaluations: int
    completed: int
    passed: int
    failed: int
    errored: int
    skipped: int
    aggregate: bytes | None
    overall_passed: bool | None
    error_code: str
    error_message: str
    create_time: float
    start_time: float | None
    end_time: float | None
    update_time: float
    last_seq: int
    cost_usd: float
    delete_time: float | None
    version: int

    @classmethod
    def from_row(cls, row: RowMapping) -> RunRecord:
        """The record of a `runs` row read with all its columns (`select(RUNS)`, `RETURNING *RUNS.c`)."""
        return cls(**row)


def counts_from(run: RunRecord) -> run_pb2.RunCounts:
    """A run's counters as RunCounts."""
    return run_pb2.RunCounts(
        total_items=run.total_items,
        total_evaluations=run.total_evaluations,
        completed_evaluations=run.completed,
        passed=run.passed,
        failed=run.failed,
        errored=run.errored,
        skipped=run.skipped,
    )


def run_from(run: RunRecord) -> run_pb2.Run:
    """The Run message of a run record; `spec` holds the definition as validated at creation."""
    message = run_pb2.Run.FromString(run.spec)
    message.id = run.id
    message.display_name = run.display_name
    message.description = run.description
    message.labels.update(run.labels or {})
    message.annotations.update(run.annotations or {})
    message.dataset_id = run.dataset_id
    message.run_number = run.run_number
    message.status = cast("run_pb2.RunStatus", run.status)
    message.counts.CopyFrom(counts_from(run))
    if run.aggregate:
        message.aggregate.ParseFromString(run.aggregate)
    else:
        message.aggregate.pass_rate = pass_rate(run.passed, run.failed)
    if run.overall_passed is not None:
        message.overall_passed = bool(run.overall_passed)
    if run.error_code:
        message.error.code = run.error_code
        message.error.message = run.error_message
    for name, seconds in (
        ("create_time", run.create_time),
        ("start_time", run.start_time),
        ("end_time", run.end_time),
        ("update_time", run.update_time),
        ("delete_time", run.delete_time),
    ):
        ts = timestamp(seconds)
        if ts is not None:
            getattr(message, name).CopyFrom(ts)
    message.last_seq = run.last_seq
    message.request_id = run.request_id or ""
    message.cost_usd = run.cost_usd
    message.etag = etag(run.version)
    return message
