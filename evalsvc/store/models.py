"""The schema, as SQLModel tables. Every row carries its tenant.

The same classes serve SQLite and PostgreSQL. Times are UNIX seconds (float; double precision on
PostgreSQL): one representation on both, and cheap to turn into `google.protobuf.Timestamp`. Job
and result ids, seqs and run counters are 64-bit (`BIG`): a result id is job id x 1024 + grader
index, and a run may hold more evaluations than a 32-bit integer counts. Definitions that the
service never queries by field (a run's target and graders, an item) are stored as serialized
protobuf, so the stored run is exactly what was validated and later contract additions need no
migration.

The database schema is created and changed only by the Alembic revisions in `migrations/`; a change
here needs a new revision (tests/test_migrations.py fails until the two agree).
"""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Column, Index, Integer, LargeBinary, String, UniqueConstraint, false, text
from sqlmodel import Field, SQLModel

# BIGINT on PostgreSQL; INTEGER on SQLite, whose INTEGER is already 64-bit and where only an
# `INTEGER PRIMARY KEY` is the autoincrementing rowid (a `BIGINT PRIMARY KEY` would not be).
BIG = BigInteger().with_variant(Integer(), "sqlite")


def big(*, primary_key: bool = False, autoincrement: bool = False, added: bool = False) -> Column:  # type: ignore[type-arg]
    """A NOT NULL 64-bit integer column (see `BIG`); outside primary keys it defaults to 0 on insert,
    as SQLModel's own `int = 0` columns do (Core inserts rely on that). `added`: a column added to an
    existing table by a later revision, whose rows from before get the database default 0 (`ZERO`)."""
    return Column(
        BIG,
        primary_key=primary_key,
        autoincrement=autoincrement,
        nullable=False,
        default=None if primary_key else 0,
        server_default="0" if added else None,
    )


# The database default of columns added to existing tables (revision 0002): rows from before get 0.
# Declared here too, so the models and the migrated schema stay identical (tests/test_migrations.py).
ZERO = {"server_default": "0"}
# The same for boolean columns added later (revision 0006): rows from before are false.
FALSE = {"server_default": false()}


def code_point_ordered(length: int) -> Column:  # type: ignore[type-arg]
    """A NOT NULL string column that sorts and compares by code point on both engines - Python's `str`
    order - so that a key range read in SQL and keys merged in Python agree (ListComparisonItems pages
    by (item_id, repetition, grader), evalsvc.store.comparisons). SQLite's default BINARY collation
    already is code point order for UTF-8 text; PostgreSQL's default is the database's, which may be a
    locale ("en_US.UTF-8" orders "a" < "B" and ignores punctuation), so there the column itself is
    COLLATE "C" and its indexes serve those range reads (an index of the default collation cannot serve
    a `COLLATE "C"` comparison: PostgreSQL scanned and sorted the whole run instead)."""
    return Column(String(length).with_variant(String(length, collation="C"), "postgresql"), nullable=False)


# Job states. A job is one item x repetition; a worker leases it, runs the target and every grader.
JOB_QUEUED = 0
JOB_LEASED = 1
JOB_DONE = 2
JOB_CANCELLED = 3


def json_map() -> Column:  # type: ignore[type-arg]
    """A NOT NULL string-to-string map stored as JSON, `{}` on insert when not given. No server default:
    PostgreSQL cannot compare JSON defaults (Alembic's schema check fails); migrations fill old rows."""
    return Column(JSON, nullable=False, default=dict)


class RunRow(SQLModel, table=True):
    """A run: its definition, status and live counters."""

    __tablename__ = "runs"
    __table_args__ = (
        UniqueConstraint("tenant", "request_id", name="uq_runs_tenant_request_id"),
        # ListRuns' order (create_time, then id) per tenant, newest or oldest first, and its time filters'
        # range: a page reads its rows in order from here, never sorting the tenant's runs.
        Index("ix_runs_tenant_create_time", "tenant", "create_time", "id"),
        # The same per dataset (ListRuns' `dataset_id`): a page of a dataset's runs reads its range in order,
        # neither filtering the tenant's other runs out nor sorting the dataset's.
        Index("ix_runs_tenant_dataset_create_time", "tenant", "dataset_id", "create_time", "id"),
        Index("ix_runs_active", "status"),
        # The soft-deleted runs alone, by deletion time: the purge finds those past their retention without
        # reading every run, and a new run (never deleted) adds no entry to it on either engine.
        Index(
            "ix_runs_deleted",
            "delete_time",
            sqlite_where=text("delete_time IS NOT NULL"),
            postgresql_where=text("delete_time IS NOT NULL"),
        ),
    )

    id: str = Field(primary_key=True, max_length=40)
    tenant: str = Field(max_length=64)
    request_id: str | None = Field(default=None, max_length=128)
    request_hash: str = Field(default="", max_length=64)
    dataset_id: str = Field(default="", max_length=40)
    run_number: int = 0
    display_name: str = ""
    description: str = ""
    labels: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    annotations: dict[str, str] = Field(default_factory=dict, sa_column=json_map())
    spec: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    status: int = 0
    total_items: int = 0
    total_evaluations: int = Field(default=0, sa_column=big())
    completed: int = Field(default=0, sa_column=big())
    passed: int = Field(default=0, sa_column=big())
    failed: int = Field(default=0, sa_column=big())
    errored: int = Field(default=0, sa_column=big())
    skipped: int = Field(default=0, sa_column=big())
    aggregate: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    overall_passed: bool | None = None
    error_code: str = ""
    error_message: str = ""
    create_time: float = 0.0
    start_time: float | None = None
    end_time: float | None = None
    update_time: float = 0.0
    last_seq: int = Field(default=0, sa_column=big())
    cost_usd: float = Field(default=0.0, sa_column_kwargs=ZERO)  # target and judge spend so far, for budgets
    delete_time: float | None = None  # soft-deleted (AIP-164): hidden from ListRuns unless show_deleted
    # Bumped by every change of the row: the run's etag (AIP-154), compared by conditional writes.
    version: int = Field(default=1, sa_column_kwargs={"server_default": "1"})
    # The run a RerunRun took this one's definition and items from; "" for a run CreateRun created. No
    # server default (SQLite reflects '' otherwise than declared); the service always writes it.
    rerun_of: str = Field(default="", max_length=40)
    # What the run stores, in bytes (evalsvc.store.usage): its definition and items from its creation,
    # what each recording adds; its tenant's stored bytes lose it when the run is purged.
    stored_bytes: int = Field(default=0, sa_column=big(added=True))


class RunLabelRow(SQLModel, table=True):
    """A run's labels, one row each, so ListRuns can filter by label in SQL."""

    __tablename__ = "run_labels"
    __table_args__ = (Index("ix_run_labels_lookup", "tenant", "key", "value"),)

    run_id: str = Field(primary_key=True, max_length=40)
    key: str = Field(primary_key=True, max_length=63)
    value: str = Field(max_length=63)
    tenant: str = Field(max_length=64)


class RunCounterRow(SQLModel, table=True):
    """The last run_number given per tenant and dataset ("" for inline runs)."""

    __tablename__ = "run_counters"

    tenant: str = Field(primary_key=True, max_length=64)
    dataset_id: str = Field(primary_key=True, max_length=40)
    last: int = 0


class TenantRunTotalsRow(SQLModel, table=True):
    """What a tenant's runs add up to beyond what their rows still show: how many it stores (deleted ones
    until they are purged), for --max-runs-per-tenant without counting its runs at every CreateRun, what
    its purged runs had spent, so that purging a run does not give its spend back to the tenant's
    --tenant-budget-usd, all it has spent, and the bytes it stores. Kept by the
    transactions that insert runs (evalsvc.store.runs.insert_runs), record results, add and delete dataset
    items, purge runs (evalsvc.store.retention.expire), end runs over a limit and write the spend of
    stopped jobs: evalsvc.store.usage."""

    __tablename__ = "tenant_run_totals"

    tenant: str = Field(primary_key=True, max_length=64)
    runs: int = Field(default=0, sa_column=big())  # stored runs: inserted, less purged
    # The spend (cost_usd) of the runs purged so far: what versions before revision 0022 add to the runs'
    # cost_usd for a tenant's budget (kept for replicas of those during an upgrade; `spent_usd` has it).
    purged_cost_usd: float = 0.0
    # Bytes the tenant stores (evalsvc.store.usage): its runs' stored_bytes and its datasets' items, for
    # --max-stored-bytes-per-tenant without summing them at every write.
    stored_bytes: int = Field(default=0, sa_column=big(added=True))
    # The payload bytes of its response cache entries, for --cache-max-bytes (evalsvc.store.cache).
    cache_bytes: int = Field(default=0, sa_column=big(added=True))
    # Everything its model calls cost, for --tenant-budget-usd: its runs' cost_usd as it grows (purged runs
    # included) and the calls answered in jobs that ended without a recorded result (stopped by a cancel,
    # a delete or a shutdown; fenced out), which no run's cost_usd holds. A running total, so a budget
    # check reads one row, not every run of the tenant.
    spent_usd: float = Field(default=0.0, sa_column_kwargs=ZERO)


class RunPurgeRow(SQLModel, table=True):
    """A purged run whose rows (items, jobs, outputs, results, events, webhook deliveries) are still being
    deleted, in chunks. Its run row went in the transaction that wrote this one, so from then on the run
    is NOT_FOUND everywhere (UndeleteRun included) however long its rows take to go."""

    __tablename__ = "run_purges"

    run_id: str = Field(primary_key=True, max_length=40)
    tenant: str = Field(max_length=64)
    purge_time: float = 0.0


class StagedRunRow(SQLModel, table=True):
    """A large CreateRun whose items and jobs are being written in chunks, each its own short transaction,
    before its run row exists (evalsvc.store.staging): nothing reads a run's rows without its run row, so
    they stay invisible and unclaimed. The transaction that inserts the run row deletes this one; a
    CreateRun refused or failed after staging (and one staged longer than an hour, a crashed server's)
    becomes a `run_purges` row instead, and the purge deletes what it wrote."""

    __tablename__ = "staged_runs"

    run_id: str = Field(primary_key=True, max_length=40)
    tenant: str = Field(max_length=64)
    stage_time: float = Field(index=True)


# The covering index of run items' digests, which store.comparisons names to SQLite (INDEXED BY).
DIGESTS_INDEX = "ix_run_items_digests"


class RunItemRow(SQLModel, table=True):
    """An item copied into a run, so later dataset edits never change a past run.

    With it, its digests as CompareRuns and ListComparisonItems compare items (evalsvc.runs.compare
    `item_digests`), metadata included and left out (metadata is compared only when a run's target is
    sent it): written with the item, so a comparison reads 64 bytes an item instead of reading and
    hashing every item on every call. NULL in rows from before revision 0028; a comparison hashes
    those items as it reads them.

    ix_run_items_digests holds the digests too, so a comparison reads them from the index alone: in the
    table they follow the item, and SQLite reaches them through a large item's overflow pages. Two
    columns rather than one of 64 bytes: the same bytes, each read by name, no layout to keep."""

    __tablename__ = "run_items"
    __table_args__ = (Index(DIGESTS_INDEX, "run_id", "idx", "digest_with_metadata", "digest_without_metadata"),)

    run_id: str = Field(primary_key=True, max_length=40)
    idx: int = Field(primary_key=True)
    tenant: str = Field(max_length=64)
    item: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    digest_with_metadata: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    digest_without_metadata: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))


class JobRow(SQLModel, table=True):
    """One item x repetition to execute, with its lease. `claim_id` fences completions."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_claimable", "state", "id"),
        Index("ix_jobs_run", "run_id", "state", "id"),
        Index("ix_jobs_claim", "claim_id"),
    )

    id: int | None = Field(default=None, sa_column=big(primary_key=True, autoincrement=True))
    tenant: str = Field(max_length=64)
    run_id: str = Field(max_length=40)
    item_idx: int
    repetition: int
    state: int = JOB_QUEUED
    claim_id: str | None = Field(default=None, max_length=40)
    lease_owner: str | None = Field(default=None, max_length=255)  # host:pid:nonce; pod names run long
    lease_expiry: float | None = None
    attempt: int = 0


class OutputRow(SQLModel, table=True):
    """What the target produced for one job; every result of that job refers to it."""

    __tablename__ = "outputs"

    job_id: int = Field(sa_column=big(primary_key=True))
    tenant: str = Field(max_length=64)
    run_id: str = Field(max_length=40)
    output: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    latency_ms: float = Field(default=0.0, sa_column_kwargs=ZERO)
    cost_usd: float = Field(default=0.0, sa_column_kwargs=ZERO)
    item_score: float | None = None  # the graders' weighted mean score, errors excluded
    cached: bool = Field(default=False, sa_column_kwargs=FALSE)  # from the response cache: cost_usd not spent


class ResultRow(SQLModel, table=True):
    """One evaluation's outcome. The unique key makes every evaluation's result exactly-once."""

    __tablename__ = "results"
    __table_args__ = (
        UniqueConstraint("run_id", "item_id", "repetition", "grader", name="uq_results_evaluation"),
        Index("ix_results_run_state", "run_id", "state", "id"),
    )

    id: int = Field(sa_column=big(primary_key=True))  # job id x 1024 + grader index, never generated
    tenant: str = Field(max_length=64)
    run_id: str = Field(max_length=40)
    job_id: int = Field(sa_column=big())
    item_id: str = Field(sa_column=code_point_ordered(128))
    repetition: int
    grader: str = Field(sa_column=code_point_ordered(63))
    state: int
    score: float
    raw_score: float
    explanation: str
    error_reason: str
    attempt: int
    cost_usd: float
    latency_ms: float
    complete_time: float
    scoring_cost_usd: float = Field(default=0.0, sa_column_kwargs=ZERO)
    confidence: float | None = None
    cached: bool = Field(default=False, sa_column_kwargs=FALSE)  # the output came from the response cache
    verdict_cached: bool = Field(default=False, sa_column_kwargs=FALSE)  # the judge's verdict did
    human_verdict: bool | None = None  # a person's verdict on the output for this grader (Item.human_verdicts)


class EventRow(SQLModel, table=True):
    """A run's event log: seq 1, 2, 3... without gaps, written in the transaction of the change.
    Never rewritten, and deleted only with the whole run when it is purged (evalsvc.store.retention), after
    the run row itself. Watchers' page reads rely on the gaps never being there: a page is a closed range
    of seqs (store.events._next_seqs)."""

    __tablename__ = "events"

    run_id: str = Field(primary_key=True, max_length=40)
    seq: int = Field(sa_column=big(primary_key=True))
    tenant: str = Field(max_length=64)
    payload: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class DatasetRow(SQLModel, table=True):
    """A named set of items."""

    __tablename__ = "datasets"
    __table_args__ = (
        UniqueConstraint("tenant", "request_id", name="uq_datasets_tenant_request_id"),
        Index("ix_datasets_tenant_id", "tenant", "id"),
    )

    id: str = Field(primary_key=True, max_length=40)
    tenant: str = Field(max_length=64)
    request_id: str | None = Field(default=None, max_length=128)
    request_hash: str = Field(default="", max_length=64)
    display_name: str = ""
    description: str = ""
    labels: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    annotations: dict[str, str] = Field(default_factory=dict, sa_column=json_map())
    item_count: int = 0
    create_time: float = 0.0
    update_time: float = 0.0


class DatasetItemRow(SQLModel, table=True):
    """An item of a dataset, in the order it was added."""

    __tablename__ = "dataset_items"
    __table_args__ = (UniqueConstraint("dataset_id", "item_id", name="uq_dataset_items_item_id"),)

    dataset_id: str = Field(primary_key=True, max_length=40)
    idx: int = Field(primary_key=True)
    item_id: str = Field(max_length=128)
    tenant: str = Field(max_length=64)
    item: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class DatasetAppendRow(SQLModel, table=True):
    """An AddDatasetItems made with a request_id (AIP-155): the items it added (a range of the dataset's
    indexes), so that a retry adds nothing and answers as it did. Deleted with its dataset."""

    __tablename__ = "dataset_appends"
    __table_args__ = (Index("ix_dataset_appends_dataset", "dataset_id"),)

    tenant: str = Field(primary_key=True, max_length=64)
    request_id: str = Field(primary_key=True, max_length=128)
    dataset_id: str = Field(max_length=40)
    request_hash: str = Field(max_length=64)
    first_idx: int  # the first added item's index in the dataset
    count: int  # how many it added
    create_time: float = 0.0


class DatasetGenerationRow(SQLModel, table=True):
    """Items the generator model is asked to write into a dataset; one per dataset, leased while a
    process works on it so a restart (or another replica) resumes it."""

    __tablename__ = "dataset_generations"
    __table_args__ = (Index("ix_dataset_generations_state", "state", "create_time"),)

    dataset_id: str = Field(primary_key=True, max_length=40)
    tenant: str = Field(max_length=64)
    state: int = 1  # DatasetGeneration.State
    item_count: int = 0
    generated_count: int = 0
    instructions: str = ""
    error: str = ""
    claim_id: str | None = Field(default=None, max_length=40)
    lease_expiry: float | None = None
    create_time: float = 0.0
    update_time: float = 0.0


class ApiKeyRow(SQLModel, table=True):
    """An API key: its id and tenant in clear, only a hash of its secret."""

    __tablename__ = "api_keys"
    __table_args__ = (Index("ix_api_keys_tenant", "tenant"),)

    id: str = Field(primary_key=True, max_length=12)
    tenant: str = Field(max_length=64)
    name: str = ""
    secret_hash: str = Field(max_length=64)
    create_time: float
    expire_time: float | None = None
    revoke_time: float | None = None
    last_used_time: float | None = None


class SavedGraderRow(SQLModel, table=True):
    """A saved grader; its definitions live in saved_grader_versions."""

    __tablename__ = "saved_graders"
    __table_args__ = (
        UniqueConstraint("tenant", "request_id", name="uq_saved_graders_tenant_request_id"),
        Index("ix_saved_graders_tenant_id", "tenant", "id"),
    )

    id: str = Field(primary_key=True, max_length=40)
    tenant: str = Field(max_length=64)
    request_id: str | None = Field(default=None, max_length=128)
    request_hash: str = Field(default="", max_length=64)
    display_name: str = ""
    description: str = ""
    labels: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    latest_version: int = 1
    create_time: float = 0.0


class SavedGraderVersionRow(SQLModel, table=True):
    """One immutable version of a saved grader."""

    __tablename__ = "saved_grader_versions"

    grader_id: str = Field(primary_key=True, max_length=40)
    version: int = Field(primary_key=True)
    tenant: str = Field(max_length=64)
    definition: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    create_time: float = 0.0


class DefinitionPurgeRow(SQLModel, table=True):
    """A deleted dataset or saved grader whose parts (a dataset's items, a grader's versions) are still
    being deleted, in chunks (evalsvc.store.retention.definition_purge_step). Its own row went in the
    transaction that wrote this one, so from then on it is NOT_FOUND everywhere however long its parts
    take to go; their bytes left its tenant's stored bytes with its row."""

    __tablename__ = "definition_purges"

    kind: str = Field(primary_key=True, max_length=16)  # "dataset" or "grader"
    owner_id: str = Field(primary_key=True, max_length=40)
    tenant: str = Field(max_length=64)
    purge_time: float = 0.0


class SavedTargetRow(SQLModel, table=True):
    """A saved target definition."""

    __tablename__ = "saved_targets"
    __table_args__ = (
        UniqueConstraint("tenant", "request_id", name="uq_saved_targets_tenant_request_id"),
        Index("ix_saved_targets_tenant_id", "tenant", "id"),
    )

    id: str = Field(primary_key=True, max_length=40)
    tenant: str = Field(max_length=64)
    request_id: str | None = Field(default=None, max_length=128)
    request_hash: str = Field(default="", max_length=64)
    display_name: str = ""
    description: str = ""
    labels: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    definition: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    create_time: float = 0.0


# Kinds of response cache entries.
CACHE_TARGET_OUTPUT = 1
CACHE_JUDGE_VERDICT = 2


class CacheEntryRow(SQLModel, table=True):
    """A cached target output or LLM-judge verdict, per tenant (evalsvc/execution/cache.py makes the key).

    Written in the recording transaction of the result that produced it; `last_used` orders the
    least-recently-used eviction of --cache-max-entries."""

    __tablename__ = "cache_entries"
    __table_args__ = (Index("ix_cache_entries_lru", "tenant", "last_used"),)

    tenant: str = Field(primary_key=True, max_length=64)
    key: str = Field(primary_key=True, max_length=64)  # sha256, hex
    kind: int
    payload: bytes = Field(sa_column=Column(LargeBinary, nullable=False))  # a Response, or a Result's verdict
    cost_usd: float = 0.0  # what producing it cost: what a hit saves
    create_time: float = 0.0
    last_used: float = 0.0


class TenantSecretRow(SQLModel, table=True):
    """A tenant's own secret: its name in clear, its value sealed (AES-GCM, evalsvc.secrets.sealing)."""

    __tablename__ = "tenant_secrets"

    tenant: str = Field(primary_key=True, max_length=64)
    name: str = Field(primary_key=True, max_length=64)
    sealed: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    create_time: float


class ServerKeyRow(SQLModel, table=True):
    """A secret of the service itself, belonging to no tenant: the key that signs page tokens. It
    lives in the database so that it survives restarts and every replica of a shared database signs
    and checks with the same one."""

    __tablename__ = "server_keys"

    name: str = Field(primary_key=True, max_length=64)
    secret: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    create_time: float = 0.0


class WebhookRow(SQLModel, table=True):
    """A tenant's webhook endpoint. The signing secret is kept in clear: every delivery is signed with it."""

    __tablename__ = "webhooks"
    __table_args__ = (
        UniqueConstraint("tenant", "request_id", name="uq_webhooks_tenant_request_id"),
        Index("ix_webhooks_tenant_id", "tenant", "id"),
    )

    id: str = Field(primary_key=True, max_length=40)
    tenant: str = Field(max_length=64)
    request_id: str | None = Field(default=None, max_length=128)
    request_hash: str = Field(default="", max_length=64)
    url: str
    event_mask: int = 0  # one bit per event type (evalsvc.webhooks.events)
    description: str = ""
    enabled: bool = True
    disabled_reason: str = ""
    secret: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    previous_secret: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    previous_secret_expire_time: float | None = None
    create_time: float = 0.0
    update_time: float = 0.0
    # The circuit breaker (evalsvc.webhooks.sender, revision 0024): failed attempts since the last 2xx;
    # while `circuit_open_until` is set the circuit is open until then (a half-open probe's lease, once
    # its cooldown ended), and `circuit_opens` counts its openings since it last closed (the cooldown's
    # doubling).
    consecutive_failures: int = Field(default=0, sa_column_kwargs=ZERO)
    circuit_open_until: float | None = None
    circuit_opens: int = Field(default=0, sa_column_kwargs=ZERO)
    # Events not queued for this webhook because its tenant's backlog was full (MAX_PENDING_PER_TENANT).
    dropped_events: int = Field(default=0, sa_column=big(added=True))


class WebhookDeliveryRow(SQLModel, table=True):
    """The outbox: one notification of one run event to one webhook, written in the transaction of the
    event, with its lease (`claim_id` fences the outcome of an attempt, as for jobs) and retry state."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "status", "next_attempt_time"),
        Index("ix_webhook_deliveries_webhook", "webhook_id", "id"),
        # A tenant's backlog (MAX_PENDING_PER_TENANT), and its due deliveries in claim order (revision 0023).
        Index("ix_webhook_deliveries_tenant_due", "tenant", "status", "next_attempt_time"),
        Index("ix_webhook_deliveries_run", "run_id"),  # a purged run's deliveries (evalsvc.store.retention)
        Index("ix_webhook_deliveries_finished", "status", "create_time"),  # the prune's chunks (0020)
    )

    id: str = Field(primary_key=True, max_length=40)
    tenant: str = Field(max_length=64)
    webhook_id: str = Field(max_length=40)
    event_type: str = Field(max_length=32)
    run_id: str = Field(max_length=40)
    seq: int = Field(default=0, sa_column=big())
    status: int = 0  # WebhookDeliveryStatus
    attempts: int = 0
    next_attempt_time: float | None = None
    claim_id: str | None = Field(default=None, max_length=40)
    lease_expiry: float | None = None
    last_response_code: int = 0
    last_error: str = ""
    create_time: float = 0.0
    last_attempt_time: float | None = None
