"""Typed, frozen records of stored rows, as the store's queries return them, and their messages.

The SQLModel classes in `models.py` define the tables (and Alembic's target metadata); a record is
what one row of a table reads as: every column, typed, read by attribute, never changed. A record is
built from the row's mapping by keyword (`from_row`), so a column the table gains or loses without
its record fails on the first read instead of going unnoticed (tests/unit/store/test_records.py
checks the two agree column by column). A query that reads only some columns, or computes them
(a claim, a listing without values, a GROUP BY), returns a record of exactly those, named for what it
is, never a full record with holes.

Records are shared: the run cache (`run_cache.py`) hands the same `RunRecord` to every GetRun of an
unchanged run. Their map columns are plain dicts typed read-only; never change one.

The messages of run records are built here, beside the record, rather than in evalsvc.messages: the
messages layer sits below the store and cannot name its types.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self, cast

from sqlalchemy import RowMapping

from evalsvc.messages.convert import etag, pass_rate, timestamp
from evalsvc.v1 import run_pb2


class FromRow:
    """A record read from a row of exactly its fields' columns: `from_row` builds it by keyword, so a
    column its query returns without a field (or the other way round) fails at once."""

    __slots__ = ()

    @classmethod
    def from_row(cls, row: RowMapping) -> Self:
        return cls(**row)

    @classmethod
    def from_columns(cls, row: Sequence[Any]) -> Self:
        """From a row whose columns are the fields, in order: for a hot read whose query lists its
        columns from the fields (jobs.CLAIMED_COLUMNS), where building by keyword through the row's
        mapping cost 5% of the loop."""
        return cls(*row)


@dataclass(frozen=True, slots=True)
class RunRecord(FromRow):
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
    rerun_of: str
    stored_bytes: int  # what the run stores (evalsvc.store.usage)


@dataclass(frozen=True, slots=True)
class RunListing(FromRow):
    """A run as ListRuns' RUN_VIEW_BASIC reads it: the `runs` columns of RunRecord but the definition
    (`spec`: target and graders, up to a quarter of --max-message-bytes), the annotations (up to 64 KiB)
    and the bookkeeping no message shows, so that a page of 1,000 runs reads kilobytes, not megabytes."""

    id: str
    request_id: str | None
    dataset_id: str
    run_number: int
    display_name: str
    description: str
    labels: Mapping[str, str]
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
    rerun_of: str


@dataclass(frozen=True, slots=True)
class ResultRecord(FromRow):
    """A row of `results` (models.ResultRow): one evaluation's outcome."""

    id: int  # job id x 1024 + grader index
    tenant: str
    run_id: str
    job_id: int
    item_id: str
    repetition: int
    grader: str
    state: int  # a run_pb2.ResultState
    score: float
    raw_score: float
    explanation: str
    error_reason: str
    attempt: int
    cost_usd: float
    latency_ms: float
    complete_time: float
    scoring_cost_usd: float
    confidence: float | None
    cached: bool
    verdict_cached: bool
    human_verdict: bool | None  # a person's verdict on the output for this grader, when the item had one


@dataclass(frozen=True, slots=True)
class GraderTally:
    """A run's results of one grader in one state with one person's verdict (or none), summed
    (`runs.aggregate_inputs`): what the run's aggregate is computed from. The costs and hits count
    verdicts paid for and verdicts from the response cache apart."""

    run_id: str
    grader: str
    state: int  # a run_pb2.ResultState
    human_verdict: bool | None  # the people's verdict these results were compared with, if any
    n: int
    score_sum: float
    score_sq_sum: float
    scoring_cost: float  # of the verdicts paid for
    scoring_saved: float  # what the cached verdicts cost when they were recorded
    verdict_hits: int  # verdicts from the response cache

    @classmethod
    def from_row(cls, row: RowMapping) -> GraderTally:
        """The record of a row of the GROUP BY query (columns named as the fields). SUMs are read as the
        field's type and NULL as 0: what a database returns for a sum varies (an integer, a Decimal)."""
        return cls(
            run_id=row["run_id"],
            grader=row["grader"],
            state=row["state"],
            human_verdict=None if row["human_verdict"] is None else bool(row["human_verdict"]),
            n=int(row["n"]),
            score_sum=float(row["score_sum"] or 0.0),
            score_sq_sum=float(row["score_sq_sum"] or 0.0),
            scoring_cost=float(row["scoring_cost"] or 0.0),
            scoring_saved=float(row["scoring_saved"] or 0.0),
            verdict_hits=int(row["verdict_hits"] or 0),
        )


@dataclass(frozen=True, slots=True)
class SavedGraderRecord(FromRow):
    """A row of `saved_graders` (models.SavedGraderRow): a saved grader; its definitions are its versions."""

    id: str
    tenant: str
    request_id: str | None
    request_hash: str
    display_name: str
    description: str
    labels: Mapping[str, str]
    latest_version: int
    create_time: float


@dataclass(frozen=True, slots=True)
class GraderVersionRecord(FromRow):
    """A row of `saved_grader_versions` (models.SavedGraderVersionRow): one immutable grader definition."""

    grader_id: str
    version: int
    tenant: str
    definition: bytes  # a serialized grader_pb2.Grader
    create_time: float


@dataclass(frozen=True, slots=True)
class SavedTargetRecord(FromRow):
    """A row of `saved_targets` (models.SavedTargetRow): a saved target definition."""

    id: str
    tenant: str
    request_id: str | None
    request_hash: str
    display_name: str
    description: str
    labels: Mapping[str, str]
    definition: bytes  # a serialized target_pb2.Target
    create_time: float


@dataclass(frozen=True, slots=True)
class DatasetRecord(FromRow):
    """A row of `datasets` (models.DatasetRow): a named set of items (the items are rows of their own)."""

    id: str
    tenant: str
    request_id: str | None
    request_hash: str
    display_name: str
    description: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    item_count: int
    create_time: float
    update_time: float


@dataclass(frozen=True, slots=True)
class DatasetAppendRecord(FromRow):
    """A row of `dataset_appends` (models.DatasetAppendRow): the items an AddDatasetItems with a
    request_id added."""

    tenant: str
    request_id: str
    dataset_id: str
    request_hash: str
    first_idx: int
    count: int
    create_time: float

    @property
    def id(self) -> str:
        """What a request_id conflict names (evalsvc.idempotency): the dataset the items went to."""
        return self.dataset_id


@dataclass(frozen=True, slots=True)
class DatasetGenerationRecord(FromRow):
    """A row of `dataset_generations` (models.DatasetGenerationRow): items a model is asked to write
    into a dataset, with the lease of the process working on it."""

    dataset_id: str
    tenant: str
    state: int  # a DatasetGeneration.State
    item_count: int
    generated_count: int
    instructions: str
    error: str
    claim_id: str | None
    lease_expiry: float | None
    create_time: float
    update_time: float


@dataclass(frozen=True, slots=True)
class ClaimableGeneration(FromRow):
    """A generation waiting for a worker, as the claim loop picks one: which dataset, whose. Its
    fields are the `dataset_generations` columns the query reads, by name."""

    dataset_id: str
    tenant: str


@dataclass(frozen=True, slots=True)
class ApiKeyRecord(FromRow):
    """A row of `api_keys` (models.ApiKeyRow): a key's id and tenant, and only a hash of its secret."""

    id: str
    tenant: str
    name: str
    secret_hash: str
    create_time: float
    expire_time: float | None
    revoke_time: float | None
    last_used_time: float | None


@dataclass(frozen=True, slots=True)
class TenantSecretRecord(FromRow):
    """A row of `tenant_secrets` (models.TenantSecretRow): a secret's name in clear, its value sealed."""

    tenant: str
    name: str
    sealed: bytes
    create_time: float


@dataclass(frozen=True, slots=True)
class SecretName(FromRow):
    """A tenant's secret as listings show it, without its value: the `tenant_secrets` columns tenant,
    name and create_time."""

    tenant: str
    name: str
    create_time: float


@dataclass(frozen=True, slots=True)
class WebhookRecord(FromRow):
    """A row of `webhooks` (models.WebhookRow): a tenant's endpoint, with the secrets that sign its
    deliveries."""

    id: str
    tenant: str
    request_id: str | None
    request_hash: str
    url: str
    event_mask: int  # one bit per event type (evalsvc.messages.webhook_events)
    description: str
    enabled: bool
    disabled_reason: str
    secret: bytes
    previous_secret: bytes | None
    previous_secret_expire_time: float | None
    create_time: float
    update_time: float
    consecutive_failures: int  # the circuit breaker (evalsvc.webhooks.sender): failed attempts since a 2xx
    circuit_open_until: float | None  # set while the circuit is open (or half-open: then a past time)
    circuit_opens: int  # openings since the circuit last closed: the cooldown's doubling
    dropped_events: int  # events not queued for it because its tenant's backlog was full


@dataclass(frozen=True, slots=True)
class WebhookDeliveryRecord(FromRow):
    """A row of `webhook_deliveries` (models.WebhookDeliveryRow): one notification of one run event to
    one webhook, with its lease and retry state."""

    id: str
    tenant: str
    webhook_id: str
    event_type: str
    run_id: str
    seq: int
    status: int  # a WebhookDeliveryStatus
    attempts: int
    next_attempt_time: float | None
    claim_id: str | None
    lease_expiry: float | None
    last_response_code: int
    last_error: str
    create_time: float
    last_attempt_time: float | None


@dataclass(frozen=True, slots=True)
class ClaimedDelivery(FromRow):
    """A delivery a sender leased, as `claim_due` returns it: what sending it and recording the outcome
    under the claim need. Its fields are the columns the claim reads (`webhooks.CLAIMED_COLUMNS`): the
    delivery's own, its webhook's url and signing secrets, and the run event it reports; then whether it
    is its webhook's half-open probe (the one attempt whose outcome closes or re-opens the circuit)."""

    id: str
    tenant: str
    webhook_id: str
    event_type: str
    run_id: str
    seq: int
    attempts: int
    claim_id: str
    url: str
    secret: bytes
    previous_secret: bytes | None
    previous_secret_expire_time: float | None
    payload: bytes  # a serialized eval_run_service_pb2.WatchRunResponse, read once per event a claim holds
    probe: bool


def counts_from(run: RunRecord | RunListing) -> run_pb2.RunCounts:
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
    message.annotations.update(run.annotations or {})
    _describe(message, run)
    return message


def listed_run_from(run: RunListing) -> run_pb2.Run:
    """The Run message of ListRuns' RUN_VIEW_BASIC: what the run's row holds outside its definition."""
    message = run_pb2.Run()
    _describe(message, run)
    return message


def _describe(message: run_pb2.Run, run: RunRecord | RunListing) -> None:
    """Set the fields of `message` that come from the run's own columns (all but the definition and the
    annotations): its names, status, counts, aggregate, verdict, times and etag."""
    message.id = run.id
    message.display_name = run.display_name
    message.description = run.description
    message.labels.update(run.labels or {})
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
    message.rerun_of = run.rerun_of
