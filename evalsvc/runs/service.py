"""The run service: create, read, list and cancel runs and read their results.

The API layer translates protobuf requests into calls here and errors back into statuses; this
module owns the rules (validation, idempotency, status transitions) and calls the store for SQL.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.config import flag_name
from evalsvc.definitions.service import DefinitionService
from evalsvc.errors import (
    MAX_ECHOED_ID,
    FieldViolation,
    Reason,
    ServiceError,
    database_unavailable,
    invalid_argument,
    not_found,
)
from evalsvc.events.bus import EventBus
from evalsvc.execution.aggregate import aggregate_so_far
from evalsvc.execution.executor import CreatedRunInputs
from evalsvc.graders import grader_name
from evalsvc.graders.judge import JudgeDefaults, names_no_model, needs_default_judge
from evalsvc.graders.validation import validate_grader
from evalsvc.http.outbound import Outbound, destination_violations, named_endpoints
from evalsvc.idempotency import conflict, fingerprint
from evalsvc.ids import PageTokens, new_id, page_size
from evalsvc.limits import StoredCap, TenantLimits, in_page_line, quota_exceeded
from evalsvc.messages.convert import etag, version_of
from evalsvc.messages.run_filter import FilterError, Term, parse_filter, parse_order_by
from evalsvc.messages.validation import (
    MAX_DESCRIPTION,
    MAX_DISPLAY_NAME,
    MAX_MASK_KEYS,
    MAX_REQUEST_ID,
    MAX_RESOURCE_ID,
    assign_item_ids,
    check_annotations,
    check_labels,
    check_length,
    mask_paths,
)
from evalsvc.runs.compare import digests_of
from evalsvc.runs.outputs import attach_output, listed_size
from evalsvc.runs.retention import retention_words
from evalsvc.runs.validation import MAX_REPETITIONS, validate_create_run
from evalsvc.secrets.refs import run_secret_refs
from evalsvc.secrets.service import SecretService
from evalsvc.slots import KeyedLocks
from evalsvc.statuses import ACTIVE
from evalsvc.store import datasets as dataset_store
from evalsvc.store import jobs as job_store
from evalsvc.store import runs as run_store
from evalsvc.store import staging, usage
from evalsvc.store.db import Database
from evalsvc.store.records import RunListing, RunRecord, listed_run_from, run_from
from evalsvc.store.writer import Batch
from evalsvc.targets import validate_target
from evalsvc.turns import mapped
from evalsvc.v1 import cache_pb2, item_pb2, run_pb2
from evalsvc.v1 import eval_run_service_pb2 as pb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CreatedRun:
    """A run as CreateRun returns it."""

    run: run_pb2.Run
    job_count: int


def request_fingerprint(request: pb.CreateRunRequest) -> str:
    """A digest of the request without its request_id: equal requests, equal digests."""
    copy = pb.CreateRunRequest()
    copy.CopyFrom(request)
    copy.ClearField("request_id")
    return fingerprint(copy)


def replay(existing: RunRecord, fingerprint: str) -> CreatedRun:
    """What CreateRun answers for a request_id used before: the run it created, or ALREADY_EXISTS
    REQUEST_ID_CONFLICT naming that run when the request differs."""
    if existing.request_hash != fingerprint:
        raise conflict("run", existing.request_id or "", existing.id)
    run = run_from(existing)
    return CreatedRun(run=run, job_count=run.counts.total_items * run.repetitions)


def rerun_fingerprint(request: pb.RerunRunRequest, scope: int) -> str:
    """A digest of a RerunRun without its request_id, its scope made explicit: never equal to a CreateRun's."""
    copy = pb.RerunRunRequest()
    copy.CopyFrom(request)
    copy.ClearField("request_id")
    copy.scope = scope  # type: ignore[assignment]
    return hashlib.sha256(b"RerunRun\n" + copy.SerializeToString(deterministic=True)).hexdigest()


def rerun_cache_mode(source_mode: cache_pb2.CacheMode, scope: int) -> cache_pb2.CacheMode:
    """A rerun's cache mode when its request names none: the source's, except that a READ_WRITE source's
    failed-or-errored or whole rerun REFRESHes. Reading the cache, it made no call: its failed items came
    back with the same cached outputs and verdicts (errors are never cached, so an errored-only rerun
    calls again for them, and reads the cache for the item's other repetitions)."""
    if source_mode == cache_pb2.CACHE_MODE_READ_WRITE and scope in (
        pb.RERUN_SCOPE_ITEMS_FAILED_OR_ERRORED,
        pb.RERUN_SCOPE_ITEMS_ALL,
    ):
        return cache_pb2.CACHE_MODE_REFRESH
    return source_mode


# A run with more rows than this (items and jobs) or more bytes of items is staged (evalsvc.store.staging)
# in chunks: at ~10 us a row, a CreateRun's transaction of 20,000 rows holds SQLite's one writer ~0.2 s.
STAGE_ABOVE_ROWS = 20_000
STAGE_ABOVE_BYTES = 16 << 20
# A tenant's large CreateRuns in progress in one process, the one staging and those waiting their turn.
MAX_LARGE_CREATES_PER_TENANT = 4
LARGE_CREATES_RETRY_AFTER_S = 5.0
# The rows (and bytes of items) of one staging intent: ~20 ms of the writer. Measured (two creators of
# 100,000 x 2 runs, another tenant's 10-item CreateRuns, /tmp/probe_f2/big_creates.py): 5,000 rows a chunk
# gave the other tenant p50 104 ms, p90 164 ms; 2,000, p50 51-65 ms, p90 81-110 ms (one transaction: p90
# 2.6 s, max 5.4 s), for a first large CreateRun of 4.6-5.4 s instead of 3.6 s.
STAGE_CHUNK_ROWS = 2_000
STAGE_CHUNK_BYTES = 4 << 20


def is_staged(items: Sequence[bytes], repetitions: int) -> bool:
    """Whether a run's items and jobs are written before its run row, in chunks (STAGE_ABOVE_ROWS)."""
    if len(items) * (1 + repetitions) > STAGE_ABOVE_ROWS:
        return True
    return sum(len(item) for item in items) > STAGE_ABOVE_BYTES


RERUN_ITEMS_PER_TURN = 2000  # items copied into a rerun's request between two turns of the event loop


@dataclass(frozen=True)
class RunOrigin:
    """Where a run made by RerunRun comes from: the source run, and the dataset the source's items came from."""

    rerun_of: str
    dataset_id: str


# The result states that select an item, per rerun scope (an item missing a result is selected too).
_RERUN_STATES = {
    pb.RERUN_SCOPE_ITEMS_ERRORED: (run_pb2.RESULT_STATE_ERROR,),
    pb.RERUN_SCOPE_ITEMS_FAILED_OR_ERRORED: (run_pb2.RESULT_STATE_ERROR, run_pb2.RESULT_STATE_FAILED),
}


def _selected(outcome: Mapping[int, int] | None, evaluations: int, states: Sequence[int]) -> bool:
    """Whether an item is rerun: one of its evaluations ended in one of `states`, or has no result (the
    run ended before it). `outcome` is its results by state; None when it has none."""
    if outcome is None:
        return True
    return sum(outcome.values()) < evaluations or any(outcome.get(state, 0) for state in states)


@dataclass(frozen=True)
class RunDraft:
    """A validated CreateRun waiting for the writer: the row to store (all but its run_number) and
    what the group must check against the database (idempotency, the tenant's active and stored runs, the
    bytes it stores)."""

    tenant: str
    request_id: str
    fingerprint: str
    row: Mapping[str, Any]
    items: Sequence[bytes]
    repetitions: int
    stored_bytes: int  # what the new run stores (usage.new_run_bytes)
    check_active_runs: Callable[[int], None]
    check_stored_runs: Callable[[int], None]
    check_stored_bytes: Callable[[int, int], None]  # (held, adding)
    staged: bool = False  # its items and jobs were written before (evalsvc.store.staging)
    digests: Sequence[staging.ItemDigests] = ()  # of `items`, stored with them: `hashed`

    async def hashed(self) -> RunDraft:
        """This draft with its items' digests (compare.digests_of, ~6 ms a MB), taken just before it is
        stored or staged: a request refused (its definitions' size, a quota, a limit) or replayed before
        costs no hashing. The group refuses on its own reads too; only those refusals come after it."""
        return replace(self, digests=await digests_of(self.items))

    def check_limits(self, *, stored: int, stored_bytes: int, active: int) -> None:
        """The tenant's limits against what it holds before this run: stored runs first (waiting frees no
        place under them), then stored bytes, then active runs."""
        self.check_stored_runs(stored)
        self.check_stored_bytes(stored_bytes, self.stored_bytes)
        self.check_active_runs(active)


Created = tuple[CreatedRun, "pb.WatchRunResponse | None"]  # the answer, and the first event of a new run


async def _create_runs(conn: AsyncConnection, drafts: list[RunDraft]) -> list[Created | BaseException]:
    """Store the CreateRuns of one writer group with a handful of statements for all of them.

    In queue order: a request_id used before replays (or conflicts with) its run, also when the first
    use is earlier in the same group; a tenant at its stored-run cap, past its stored bytes or at its
    active-run limit is refused (counted across the group); the rest get consecutive run numbers per
    dataset and are inserted together. Refusals are decided before anything is written, so they cost
    the others nothing."""
    existing = await run_store.find_by_request_ids(conn, [(d.tenant, d.request_id) for d in drafts if d.request_id])
    counts = await run_store.tenant_runs(conn, [d.tenant for d in drafts])
    active = {tenant: held.active for tenant, held in counts.items()}
    stored = {tenant: held.stored for tenant, held in counts.items()}
    stored_bytes = {tenant: held.stored_bytes for tenant, held in counts.items()}
    answers: list[Created | BaseException | None] = [None] * len(drafts)
    first_use: dict[tuple[str, str], int] = {}
    creating: list[int] = []
    for i, draft in enumerate(drafts):
        key = (draft.tenant, draft.request_id)
        if draft.request_id and key in existing:
            try:
                answers[i] = (replay(existing[key], draft.fingerprint), None)
            except ServiceError as refused:
                answers[i] = refused
            continue
        if draft.request_id and key in first_use:
            continue  # answered below, from the run its first use creates
        try:
            draft.check_limits(
                stored=stored[draft.tenant], stored_bytes=stored_bytes[draft.tenant], active=active[draft.tenant]
            )
        except ServiceError as refused:
            answers[i] = refused
            continue
        active[draft.tenant] += 1
        stored[draft.tenant] += 1
        stored_bytes[draft.tenant] += draft.stored_bytes
        if draft.request_id:
            first_use[key] = i
        creating.append(i)
    staged = await staging.take(conn, [drafts[i].row["id"] for i in creating if drafts[i].staged])
    for i in [i for i in creating if drafts[i].staged and drafts[i].row["id"] not in staged]:
        creating.remove(i)  # abandoned while it was staged: the purge has its rows (a retry stages anew)
        answers[i] = database_unavailable()
    by_dataset: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i in creating:
        by_dataset[(drafts[i].tenant, drafts[i].row["dataset_id"])].append(i)
    numbers: dict[int, int] = {}
    for (tenant, dataset_id), members in sorted(by_dataset.items()):
        first_number = await run_store.allocate_run_numbers(conn, tenant, dataset_id, len(members))
        numbers.update({i: first_number + n for n, i in enumerate(members)})
    new_runs = [
        run_store.NewRun(
            {**drafts[i].row, "run_number": numbers[i]},
            drafts[i].items,
            drafts[i].digests,
            drafts[i].repetitions,
            drafts[i].stored_bytes,
            staged=drafts[i].staged,
        )
        for i in creating
    ]
    for i, event in zip(creating, await run_store.insert_runs(conn, new_runs), strict=True):
        answers[i] = (CreatedRun(run=event.run, job_count=len(drafts[i].items) * drafts[i].repetitions), event)
    for i, draft in enumerate(drafts):
        if answers[i] is None:  # a repeated request_id within the group
            first = answers[first_use[(draft.tenant, draft.request_id)]]
            if isinstance(first, BaseException):  # its first use was abandoned while staged
                answers[i] = first
                continue
            assert isinstance(first, tuple)
            run = first[0].run
            if draft.fingerprint != drafts[first_use[(draft.tenant, draft.request_id)]].fingerprint:
                answers[i] = conflict("run", draft.request_id, run.id)
            else:
                answers[i] = (first[0], None)
    return [answer for answer in answers if answer is not None]


CREATE_RUNS = Batch("create_runs", _create_runs)


class RunService:
    """Runs of one database, for any tenant the caller names."""

    def __init__(
        self,
        db: Database,
        bus: EventBus,
        *,
        on_created: Callable[[CreatedRunInputs], None] = lambda run: None,
        on_cancelled: Callable[[str], None] = lambda run_id: None,
        limits: TenantLimits,
        runs_cap: StoredCap,
        bytes_cap: StoredCap,
        deleted_run_retention_s: float,
        definitions: DefinitionService,
        outbound: Outbound,
        judge: JudgeDefaults,
        cache_default: int = cache_pb2.CACHE_MODE_OFF,
        secrets: SecretService,
        page_tokens: PageTokens,
        max_definition_bytes: int,
    ) -> None:
        self._db = db
        self._max_definition_bytes = max_definition_bytes
        self._secrets = secrets
        self._page_tokens = page_tokens
        self._bus = bus
        self._on_created = on_created
        self._on_cancelled = on_cancelled
        self._limits = limits
        self._runs_cap = runs_cap
        self._bytes_cap = bytes_cap
        # What a tenant at --max-runs-per-tenant (or its stored bytes) is told to do, and when its deleted
        # runs stop counting.
        purged_after = retention_words(deleted_run_retention_s)
        counted = (
            f"a deleted run counts until it is purged, {purged_after} after its deletion "
            f"({flag_name('deleted_run_retention_s')})"
        )
        self._runs_remedy = f"delete runs to make room; {counted}"
        self._bytes_remedy = f"{usage.ROOM_REMEDY}; {counted}"
        self._definitions = definitions
        self._outbound = outbound
        self._judge = judge
        self._cache_default = cache_default
        # A tenant's large CreateRuns, one at a time in this process (`_create_staged`).
        self._stagings = KeyedLocks()

    @property
    def limits(self) -> TenantLimits:
        """The tenants' limits, whose line its page reads take their turns in (`in_page_line`)."""
        return self._limits

    async def create(self, tenant: str, request: pb.CreateRunRequest) -> CreatedRun:
        """Validate, resolve saved definitions, then store the run, its items, jobs and first event in
        one transaction. The stored run is a snapshot: later edits of datasets or saved definitions
        never change it."""
        self._limits.take_create_run(tenant)
        return await self._create(tenant, request)

    async def rerun(self, tenant: str, request: pb.RerunRunRequest) -> CreatedRun:
        """A new run from an ended run of the tenant (RerunRun): its stored definition over the items of
        `request.scope`, created by the path CreateRun takes (`_create`), so every limit, check and the
        request_id's idempotency apply as they do there. The new run records its source (`rerun_of`)."""
        self._limits.take_create_run(tenant)
        violations: list[FieldViolation] = []
        check_length(request.request_id, MAX_REQUEST_ID, "request_id", violations)
        if request.scope not in pb.RerunScope.values():
            violations.append(FieldViolation("scope", "unknown rerun scope"))
        if request.trigger not in run_pb2.Trigger.values():
            violations.append(FieldViolation("trigger", "unknown trigger"))
        if request.cache_mode not in cache_pb2.CacheMode.values():
            violations.append(FieldViolation("cache_mode", "unknown cache mode"))
        if violations:
            raise invalid_argument(violations)
        scope = request.scope or pb.RERUN_SCOPE_ITEMS_ERRORED
        fingerprint = rerun_fingerprint(request, scope)
        async with self._db.read() as conn:
            if request.request_id:
                # A retry answers with its run before the source is read: it may have been purged since.
                existing = await run_store.find_by_request_id(conn, tenant, request.request_id)
                if existing is not None:
                    return replay(existing, fingerprint)
            source = await run_store.get(conn, tenant, request.run_id)
            if source is None:
                raise not_found("run", request.run_id)
            if source.status in ACTIVE:
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    Reason.RUN_NOT_FINISHED,
                    f"run {source.id!r} is {run_pb2.RunStatus.Name(source.status)}: only a run that has ended "
                    "can be rerun; wait for its end (WatchRun) or cancel it",
                    metadata={"run_id": source.id, "status": run_pb2.RunStatus.Name(source.status)},
                )
            stored_items = await job_store.run_items(conn, source.id)
            if len(stored_items) != source.total_items:
                raise not_found("run", request.run_id)  # purged since its row was read (PostgreSQL)
            outcomes = {} if scope == pb.RERUN_SCOPE_ITEMS_ALL else await run_store.item_outcomes(conn, source.id)
        spec = run_pb2.Run.FromString(source.spec)
        items = await mapped(item_pb2.Item.FromString, stored_items)
        if scope != pb.RERUN_SCOPE_ITEMS_ALL:
            evaluations = spec.repetitions * len(spec.graders)  # per item
            wanted = _RERUN_STATES[scope]
            chosen = await mapped(lambda item: _selected(outcomes.get(item.id), evaluations, wanted), items)
            items = [item for item, keep in zip(items, chosen, strict=True) if keep]
        if not items:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                Reason.NOTHING_TO_RERUN,
                f"nothing to rerun: no item of run {source.id!r} is in scope {pb.RerunScope.Name(scope)} "
                "(every evaluation of every item has a result, and none in the states it selects); "
                "RERUN_SCOPE_ITEMS_ALL reruns every item",
                metadata={"run_id": source.id, "scope": pb.RerunScope.Name(scope)},
            )
        create = pb.CreateRunRequest(
            request_id=request.request_id,
            target=spec.target,
            graders=spec.graders,
            display_name=source.display_name,
            description=source.description,
            labels=source.labels,
            annotations=source.annotations,
            repetitions=spec.repetitions,
            warmup_runs=spec.warmup_runs,
            trigger=request.trigger or spec.trigger,
            cache_mode=request.cache_mode or rerun_cache_mode(spec.cache_mode, scope),
        )
        for optional in ("pass_threshold", "max_error_rate", "max_cost_usd"):  # a source from before
            if spec.HasField(optional):  # max_error_rate has none, and its rerun gets none (`_create`)
                setattr(create, optional, getattr(spec, optional))
        for start in range(0, len(items), RERUN_ITEMS_PER_TURN):  # copied in turns: 100,000 items held the loop
            create.items.extend(items[start : start + RERUN_ITEMS_PER_TURN])
            await asyncio.sleep(0)
        try:
            return await self._create(
                tenant,
                create,
                fingerprint=fingerprint,
                origin=RunOrigin(rerun_of=source.id, dataset_id=source.dataset_id),
            )
        except ServiceError as exc:
            if exc.code != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            # The stored definition, checked as a new run's, no longer holds (a secret it names was deleted,
            # a destination is no longer allowed): INVALID_ARGUMENT named fields the caller never sent.
            shown = "; ".join(f"{v.field}: {v.description}" for v in exc.violations[:5]) or exc.message
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                Reason.RUN_NOT_RERUNNABLE,
                f"run {source.id!r} cannot be rerun as it is stored, its definition checked as a new run's: {shown}",
                metadata={"run_id": source.id},
            ) from None

    async def _create(
        self,
        tenant: str,
        request: pb.CreateRunRequest,
        *,
        fingerprint: str | None = None,
        origin: RunOrigin | None = None,
    ) -> CreatedRun:
        """CreateRun's one path, after its rate token was taken: validate, resolve, store. A RerunRun
        gives its own request's `fingerprint` (the idempotency key is about that request) and the run's
        `origin`: its source and the source's dataset (its items come inline, copied from the source)."""
        # Repetitions out of their range are INVALID_ARGUMENT (validation, below), not a quota.
        repetitions = request.repetitions if 0 < request.repetitions <= MAX_REPETITIONS else 1
        self._limits.check_run_size(len(request.items) or len(request.item_ids), len(request.graders), repetitions)
        await assign_item_ids(request.items)
        fingerprint = fingerprint or request_fingerprint(request)
        violations = await validate_create_run(request)
        saved_target = request.target.WhichOneof("kind") == "saved_target_id"
        if violations:
            raise invalid_argument(violations)
        if request.request_id:
            # A retry answers with the first run before anything is resolved again (AIP-155): its
            # dataset or saved definitions may have changed or gone since. The writer checks again.
            async with self._db.read() as conn:
                existing = await run_store.find_by_request_id(conn, tenant, request.request_id)
            if existing is not None:
                return replay(existing, fingerprint)
        await self._definitions.resolve(tenant, request.target, request.graders)
        await self._check_resolved(tenant, request, check_target=saved_target)
        items = await self._resolve_items(tenant, request)
        if request.dataset_id:  # inline items were counted above
            self._limits.check_run_size(len(items), len(request.graders), repetitions)
        repetitions = request.repetitions or 1
        spec = run_pb2.Run(
            target=request.target,
            graders=request.graders,
            repetitions=repetitions,
            warmup_runs=request.warmup_runs,
            trigger=request.trigger or run_pb2.TRIGGER_MANUAL,
            cache_mode=request.cache_mode or self._cache_default,  # type: ignore[arg-type]
        )
        for grader in spec.graders:  # an unnamed grader showed as "" in the run, as `exact_match` in its results
            grader.name = grader_name(grader)
        if request.HasField("pass_threshold"):
            spec.pass_threshold = request.pass_threshold
        # Always set on the run, 0 when the request left it unset: a run without it was created before the
        # bar existed, and its verdict has none (evalctl reads the run the same way); so has the rerun of
        # such a run, whose request then leaves it unset (a rerun of a run that passed with errors failed).
        if origin is None or request.HasField("max_error_rate"):
            spec.max_error_rate = request.max_error_rate
        if request.HasField("max_cost_usd"):
            spec.max_cost_usd = request.max_cost_usd
        if (size := spec.ByteSize()) > self._max_definition_bytes:  # saved definitions resolved: their size too
            raise invalid_argument(
                [
                    FieldViolation(
                        "graders",
                        f"the run's target and graders are {size} bytes together; at most "
                        f"{self._max_definition_bytes} (a quarter of the largest message: "
                        "every Run returned repeats them)",
                    )
                ]
            )
        if any(names_no_model(grader) for grader in spec.graders):
            # What its judges without a model are graded by (a rerun's: today's), for CompareRuns; after the
            # size check, which is of what the request sent. Not written into the graders: they are graded
            # with the grading server's default endpoint and key, and its model with them (an old model at a
            # new endpoint: "model not found" on every evaluation).
            spec.default_judge_model = self._judge.model
        row: dict[str, Any] = {
            "id": new_id("run"),
            "tenant": tenant,
            "request_id": request.request_id or None,
            "request_hash": fingerprint,
            "dataset_id": origin.dataset_id if origin is not None else request.dataset_id,
            "rerun_of": origin.rerun_of if origin is not None else "",
            "display_name": request.display_name,
            "description": request.description,
            "labels": dict(request.labels),
            "annotations": dict(request.annotations),
            "spec": spec.SerializeToString(),
            "status": run_pb2.RUN_STATUS_PENDING,
            "total_items": len(items),
            "total_evaluations": len(items) * repetitions * len(request.graders),
            "create_time": time.time(),
        }
        draft = RunDraft(
            tenant=tenant,
            request_id=request.request_id,
            fingerprint=fingerprint,
            row=row,
            items=items,
            repetitions=repetitions,
            stored_bytes=usage.new_run_bytes(row, items, len(items) * repetitions),
            check_active_runs=self._limits.check_active_runs,
            check_stored_runs=self._check_stored_runs,
            check_stored_bytes=self._check_stored_bytes,
            staged=is_staged(items, repetitions),
        )
        if not draft.staged:
            created, _ = await self._store(await draft.hashed())
            return created
        return await self._create_staged(draft)

    async def _store(self, draft: RunDraft) -> tuple[CreatedRun, bool]:
        """Submit a draft to the writer's next CreateRun group: its answer, and whether it created the run
        (not a replay of the run an earlier request with its request_id made)."""
        try:
            created, event = await self._db.submit(CREATE_RUNS, draft)
        except IntegrityError:
            # Another server stored the same request_id between our read and our insert (PostgreSQL):
            # its run is the answer.
            if not draft.request_id:
                raise
            async with self._db.read() as conn:
                existing = await run_store.find_by_request_id(conn, draft.tenant, draft.request_id)
            if existing is None:
                raise
            return replay(existing, draft.fingerprint), False
        if event is None:
            return created, False
        self._bus.publish(event.run.id, [event])
        self._on_created(CreatedRunInputs(draft.row["id"], draft.tenant, draft.row["spec"], draft.items))
        return created, True

    async def _create_staged(self, draft: RunDraft) -> CreatedRun:
        """A large run: its items and jobs staged a chunk per intent (evalsvc.store.staging), then its run
        row stored: each chunk holds the one writer about as long as any other group, where the whole run
        in its CreateRun group held every tenant's writes for seconds. A chunk shares its group with the
        writes queued beside it (alone, each would cost a turn of the writer: 300,000 rows, 150 turns).

        A tenant's large CreateRuns go one at a time in this process, from their check of the request_id
        to their run row: one after another, each finds what the one before stored (its run, when they
        share a request_id; the runs and bytes it added, for the limits), so a retry or a request at its
        limit writes nothing. At most MAX_LARGE_CREATES_PER_TENANT of them wait (a caller that goes away
        leaves its write going on, request and all)."""
        tenant = draft.tenant
        if self._stagings.users(tenant) >= MAX_LARGE_CREATES_PER_TENANT:
            raise quota_exceeded(
                "large_creates_in_flight",
                f"the tenant already has {MAX_LARGE_CREATES_PER_TENANT} large CreateRuns (over "
                f"{STAGE_ABOVE_ROWS} items and jobs) in progress; they are written one at a time",
                retry_after_s=LARGE_CREATES_RETRY_AFTER_S,
            )
        async with self._stagings.hold(tenant):
            async with self._db.read() as conn:
                if draft.request_id:
                    existing = await run_store.find_by_request_id(conn, tenant, draft.request_id)
                    if existing is not None:
                        return replay(existing, draft.fingerprint)
                held = (await run_store.tenant_runs(conn, [tenant]))[tenant]
            # Refused now, it writes nothing (its group checks again).
            draft.check_limits(stored=held.stored, stored_bytes=held.stored_bytes, active=held.active)
            draft = await draft.hashed()
            begun = False
            try:
                for chunk in staging.chunks(
                    draft.row["id"],
                    tenant,
                    draft.items,
                    draft.digests,
                    draft.repetitions,
                    rows=STAGE_CHUNK_ROWS,
                    item_bytes=STAGE_CHUNK_BYTES,
                ):
                    begun = True
                    if not await self._db.transact(functools.partial(staging.stage, chunk=chunk)):
                        raise database_unavailable()  # abandoned while staged (over an hour): a retry stages anew
                created, new = await self._store(draft)
            except BaseException:
                if begun:
                    await self._abandon(draft)
                raise
            if not new:  # answered with the run of an earlier request (another replica's): this staging goes
                await self._abandon(draft)
            return created

    async def _abandon(self, draft: RunDraft) -> None:
        """Hand what a CreateRun staged to the purge, when it did not become a run (refused, replayed, failed
        or cancelled). Shielded: a caller that went away still has it abandoned (it costs one small write,
        and the purge deletes the rows in chunks); a failure leaves it for the purge to find an hour on."""
        abandoning = asyncio.ensure_future(
            self._db.transact(functools.partial(staging.abandon, run_ids=[draft.row["id"]]))
        )
        try:
            await asyncio.shield(abandoning)
        except Exception:
            log.warning("a refused CreateRun's staged rows are left for the purge", exc_info=True)

    async def _check_resolved(self, tenant: str, request: pb.CreateRunRequest, *, check_target: bool) -> None:
        """What only the resolved definitions show: valid graders, the target when it was a saved one
        (`check_target`; an inline target was checked with the request), secrets the tenant may use, a
        judge to ask, allowed destinations."""
        violations = [v for i, g in enumerate(request.graders) for v in validate_grader(g, f"graders[{i}]")]
        if check_target:
            violations += validate_target(request.target, "target")
        violations += await self._secrets.refused(tenant, run_secret_refs(request.target, request.graders))
        names = [grader_name(g) for g in request.graders]
        if len(set(names)) != len(names):
            violations.append(FieldViolation("graders", "saved graders resolve to duplicate names; name them"))
        if violations:
            raise invalid_argument(violations)
        # Named by path and name: in a spec of several judges the refusal did not say which one lacked a model.
        needing = [
            f"graders[{i}] ({grader_name(g)})"
            for i, g in enumerate(request.graders)
            if g.WhichOneof("kind") == "llm_judge" and needs_default_judge(g.llm_judge)
        ]
        if needing and not self._judge.configured:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                Reason.JUDGE_NOT_CONFIGURED,
                f"{', '.join(needing)}: an llm_judge grader needs a judge model: give its model and endpoint, or start"
                " the server with --judge-base-url and --judge-model",
            )
        endpoints = named_endpoints(
            request.target, "target", ((f"graders[{i}]", g) for i, g in enumerate(request.graders))
        )
        if refused := await destination_violations(endpoints, self._outbound.allow, tenant):
            raise invalid_argument(refused)

    def _check_stored_runs(self, held: int) -> None:
        """The tenant's stored runs (deleted ones until purged), before it adds one."""
        self._runs_cap.check(held, remedy=self._runs_remedy)

    def _check_stored_bytes(self, held: int, adding: int) -> None:
        """The bytes the tenant stores, before a run adds its definition and items."""
        self._bytes_cap.check(held, adding, remedy=self._bytes_remedy)

    async def _resolve_items(self, tenant: str, request: pb.CreateRunRequest) -> list[bytes]:
        """The serialized items the run copies: inline ones, or the dataset's (or a subset)."""
        if not request.dataset_id:
            return await mapped(item_pb2.Item.SerializeToString, request.items)
        async with self._db.read() as conn:
            dataset = await dataset_store.get(conn, tenant, request.dataset_id)
            if dataset is None:
                raise not_found("dataset", request.dataset_id)
            stored = await dataset_store.all_items(conn, request.dataset_id)
            # Still there after its items were read: no DeleteDataset committed before them (the row goes
            # in the transaction before the first chunk of its purge), so they are all of its items, and
            # none, or a missing item id, is the caller's mistake; gone, they may be what a delete left
            # (nothing, or a chunked purge's remainder): NOT_FOUND.
            if await dataset_store.get(conn, tenant, request.dataset_id) is None:
                raise not_found("dataset", request.dataset_id)
        if not request.item_ids:
            if not stored:
                raise invalid_argument([FieldViolation("dataset_id", "the dataset has no items")])
            return [item for _, item in stored]
        by_id = dict(stored)
        violations = [
            FieldViolation(f"item_ids[{i}]", f"no item {item_id!r} in dataset {request.dataset_id!r}")
            for i, item_id in enumerate(request.item_ids)
            if item_id not in by_id
        ]
        if len(set(request.item_ids)) != len(request.item_ids):
            violations.append(FieldViolation("item_ids", "item ids must not repeat"))
        if violations:
            raise invalid_argument(violations)
        return [by_id[item_id] for item_id in request.item_ids]

    async def get(self, tenant: str, run_id: str) -> run_pb2.Run:
        """A run; NOT_FOUND when it does not exist or is another tenant's. The message may be shared
        with later calls (see run_store.get_current_run): copy it before changing it."""
        run = await run_store.get_current_run(self._db, tenant, run_id)
        if run is None:
            raise not_found("run", run_id)
        return run

    @in_page_line
    async def list(self, tenant: str, request: pb.ListRunsRequest) -> tuple[list[run_pb2.Run], str]:
        """A page of runs in the order asked for (newest first by default) and the next page's token.

        The page token binds the filters and the order (a token of another listing would resume at a
        position that means something else); `filter` and `order_by` join the bound query only when
        given, so a token issued before they existed still reads its next page. A page chooses its runs by
        their stored sizes and then reads only those (as ListDatasets does); a RUN_VIEW_BASIC page never
        reads the runs' definitions (RunListing)."""
        limit = page_size(request.page_size, 50)
        violations: list[FieldViolation] = []
        if len(request.statuses) > len(RUN_STATUSES):  # before any is looked at: millions were each checked
            violations.append(
                FieldViolation("statuses", f"at most {len(RUN_STATUSES)} statuses, one per status filtered on")
            )
        else:
            violations.extend(
                FieldViolation(f"statuses[{i}]", "unknown run status")
                for i, status in enumerate(request.statuses)
                if status not in RUN_STATUSES
            )
        check_length(request.dataset_id, MAX_RESOURCE_ID, "dataset_id", violations)
        check_labels(request.labels, "labels", violations)  # a filter no run's labels could match is a mistake
        terms: tuple[Term, ...] = ()
        newest_first = True
        try:
            terms = parse_filter(request.filter)
        except FilterError as exc:
            violations.append(FieldViolation("filter", str(exc)))
        try:
            newest_first = parse_order_by(request.order_by)
        except FilterError as exc:
            violations.append(FieldViolation("order_by", str(exc)))
        if request.view not in pb.RunView.values():
            violations.append(FieldViolation("view", "unknown view: RUN_VIEW_BASIC or RUN_VIEW_FULL"))
        if violations:
            raise invalid_argument(violations)
        query: dict[str, Any] = {
            "statuses": sorted(request.statuses),
            "labels": dict(sorted(request.labels.items())),
            "dataset_id": request.dataset_id,
            "show_deleted": request.show_deleted,
        }
        if request.filter:
            query["filter"] = request.filter
        if not newest_first:
            query["order"] = "oldest first"
        after = self._page_tokens.decode(tenant, "runs", query, request.page_token)
        wanted = run_store.RunsWanted(
            statuses=sorted(set(request.statuses)),
            labels=request.labels,
            dataset_id=request.dataset_id,
            show_deleted=request.show_deleted,
            terms=terms,
            newest_first=newest_first,
            basic=request.view == pb.RUN_VIEW_BASIC,
        )
        async with self._db.read() as conn:
            position = after if after is None or isinstance(after, str) else (after[0], after[1])
            sizes = await run_store.list_sizes(conn, tenant, wanted, after=position, limit=limit + 1)
            chosen = self._page_tokens.choose(sizes, limit)
            # By id: read again by position, a run created between the reads took the first place and pushed
            # the last chosen one off a last page (no token): a run silently missing.
            rows = await run_store.list_page(conn, tenant, [run_id for _, run_id in chosen.positions], wanted)
        runs = [listed_run_from(row) if isinstance(row, RunListing) else run_from(row) for row in rows]
        return self._page_tokens.chosen_page(
            tenant, "runs", query, runs, lambda i: [rows[i].create_time, rows[i].id], chosen
        )

    async def cancel(self, tenant: str, run_id: str) -> run_pb2.Run:
        """Cancel a run: no job starts after this returns. Idempotent on a cancelled run."""

        async def cancel(conn: AsyncConnection) -> tuple[pb.WatchRunResponse | None, RunRecord | None]:
            event = await _cancel_in(conn, tenant, run_id, time.time())
            return event, (await run_store.get(conn, tenant, run_id) if event is None else None)

        event, row = await self._db.transact(cancel)
        if event is not None:
            self._on_cancelled(run_id)
            self._bus.publish(run_id, [event])
            return event.run
        if row is None:
            raise not_found("run", run_id)
        if row.status == run_pb2.RUN_STATUS_CANCELLED:
            return run_from(row)
        raise ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            Reason.RUN_ALREADY_FINISHED,
            f"run {run_id!r} already finished as {run_pb2.RunStatus.Name(row.status)}",
            metadata={"run_id": run_id},
        )

    async def update(self, tenant: str, request: pb.UpdateRunRequest) -> run_pb2.Run:
        """Change the descriptive fields named by the update mask (all set ones when it is empty, all of them
        when it is `*`, clearing those the request leaves unset): whole
        fields, or single keys of a map (`annotations.KEY`), which are merged into the stored map in the
        write transaction, so concurrent writers of other keys lose nothing. With `run.etag`, only if the
        run is still at that etag."""
        paths = mask_paths(request.update_mask.paths, UPDATABLE, MAX_MASK_KEYS) or [
            n for n in UPDATABLE if getattr(request.run, n)
        ]
        whole, keyed, violations = _parse_mask(paths)
        if not paths:
            violations.append(FieldViolation("update_mask", "nothing to update: set a field of run or name it"))
        expected = _expected_version(request.run.etag, "run.etag", violations)
        check_length(request.run.display_name, MAX_DISPLAY_NAME, "run.display_name", violations)
        check_length(request.run.description, MAX_DESCRIPTION, "run.description", violations)
        check_labels(request.run.labels, "run.labels", violations)
        check_annotations(request.run.annotations, "run.annotations", violations)
        if violations:
            raise invalid_argument(violations)
        values = {path: _column_value(getattr(request.run, path)) for path in whole}

        async def update(conn: AsyncConnection) -> RunRecord | None:
            changed, refused = dict(values), list[FieldViolation]()  # local: the writer may run this twice
            if keyed or expected is not None:
                current = await run_store.get(conn, tenant, request.run_id, lock=True)
                if current is None:
                    raise not_found("run", request.run_id)
                _check_etag(current, expected)
                for field, keys in keyed.items():
                    given = getattr(request.run, field)
                    merged = dict(changed.get(field, getattr(current, field)))
                    for key in keys:
                        if key in given:
                            merged[key] = given[key]
                        else:
                            merged.pop(key, None)
                    (check_labels if field == "labels" else check_annotations)(merged, f"run.{field}", refused)
                    changed[field] = merged
                if refused:
                    raise invalid_argument(refused)
            return await run_store.update_fields(conn, tenant, request.run_id, changed, self._bytes_cap)

        row = await self._db.transact(update)
        if row is None:
            raise not_found("run", request.run_id)
        return run_from(row)

    async def delete(self, tenant: str, run_id: str, etag: str = "") -> run_pb2.Run:
        """Soft-delete a run (AIP-164), cancelling it first if it has not finished; with `etag`, only if
        the run is still at that etag. Idempotent. One transaction: a mismatched etag cancels nothing."""
        violations: list[FieldViolation] = []
        expected = _expected_version(etag, "etag", violations)
        if violations:
            raise invalid_argument(violations)
        now = time.time()

        async def delete(conn: AsyncConnection) -> tuple[pb.WatchRunResponse | None, RunRecord | None]:
            cancelled = await _cancel_in(conn, tenant, run_id, now, version=expected)
            row = await run_store.get(conn, tenant, run_id, lock=True)
            if row is None:
                raise not_found("run", run_id)
            if cancelled is None:
                _check_etag(row, expected)
            if row.delete_time is None:
                row = await run_store.update_fields(conn, tenant, run_id, {"delete_time": now})
            return cancelled, row

        cancelled, row = await self._db.transact(delete)
        if cancelled is not None:
            self._on_cancelled(run_id)
            self._bus.publish(run_id, [cancelled])
        assert row is not None  # the run was read, locked, in this transaction
        return run_from(row)

    async def undelete(self, tenant: str, run_id: str) -> run_pb2.Run:
        """Restore a soft-deleted run. Idempotent: a run that is not deleted is answered as it is, its etag
        unchanged (a second UndeleteRun moved it, and every other client's etag went stale for nothing)."""

        async def undelete(conn: AsyncConnection) -> RunRecord | None:
            row = await run_store.get(conn, tenant, run_id, lock=True)
            if row is None or row.delete_time is None:
                return row
            return await run_store.update_fields(conn, tenant, run_id, {"delete_time": None})

        row = await self._db.transact(undelete)
        if row is None:
            raise not_found("run", run_id)
        return run_from(row)

    @in_page_line
    async def list_results(
        self, tenant: str, request: pb.ListRunResultsRequest
    ) -> tuple[Sequence[run_pb2.Result], str]:
        """A page of a run's results and the next page's token.

        The page is chosen by its results' sizes, each output and explanation cut to what one response
        holds (evalsvc.runs.outputs), and only the kept results' outputs and explanations are read: it read
        the outputs of all its `page_size` results and dropped those past its byte bound (6 pages at once
        of 4 MiB outputs read ~4 GB between them), and a result with an output of 16 MB was INTERNAL for
        every page; it still read every explanation of its `page_size` results (a judge's may be 4 MiB).
        A kept result whose explanation or output is gone by the time it is read was purged with its run
        in between (nothing else deletes them): NOT_FOUND, as the next call would say, never a result
        listed without them."""
        limit = page_size(request.page_size, 100)
        states = result_states(request)
        # One state (from either field) keeps the query `state` bound before `states` existed, so a token
        # issued then, or for `state=X`, still reads the next page of `states=[X]`.
        query: dict[str, Any] = (
            {"run_id": request.run_id, "states": states}
            if len(states) > 1
            else {"run_id": request.run_id, "state": states[0] if states else 0}
        )
        after_id = self._page_tokens.decode(tenant, "results", query, request.page_token)
        share = self._page_tokens.item_bytes
        async with self._db.read() as conn:
            if await run_store.get(conn, tenant, request.run_id) is None:
                raise not_found("run", request.run_id)
            rows = await run_store.results_page(
                conn, tenant, request.run_id, after_id=after_id, limit=limit + 1, states=states
            )
            results = [run_store.result_from(row, None) for row, _ in rows[:limit]]
            kept = rows[
                : self._page_tokens.fitting_sizes(
                    listed_size(result, sizes.output, share, sizes.explanation)
                    for result, (_, sizes) in zip(results, rows, strict=False)
                )
            ]
            outputs = await run_store.outputs_of(conn, tenant, [row.job_id for row, sizes in kept if sizes.output])
            explanations = await run_store.explanations_of(
                conn, tenant, [row.id for row, sizes in kept if sizes.explanation]
            )
        if any(
            (sizes.output and row.job_id not in outputs) or (sizes.explanation and row.id not in explanations)
            for row, sizes in kept
        ):
            raise not_found("run", request.run_id)
        for result, (row, _) in zip(results, kept, strict=False):
            attach_output(result, outputs.get(row.job_id), share, explanations.get(row.id, ""))
        listed = results[: len(kept)]
        return self._page_tokens.page(tenant, "results", query, listed, len(rows), lambda i: int(listed[i].id))


def result_states(request: pb.ListRunResultsRequest) -> list[int]:
    """The sorted, distinct states ListRunResults filters on (empty: every state), from `state` or `states`;
    INVALID_ARGUMENT when both are given, when `states` is longer than there are states (checked before any
    entry is looked at), or naming each UNSPECIFIED or unknown entry."""
    if request.state and request.states:
        message = "give state (one value) or states (any of several), not both"
        raise invalid_argument([FieldViolation("state", message), FieldViolation("states", message)])
    if request.state not in run_pb2.ResultState.values():
        raise invalid_argument([FieldViolation("state", "unknown result state")])
    if len(request.states) > len(RESULT_STATES):
        raise invalid_argument(
            [FieldViolation("states", f"at most {len(RESULT_STATES)} states, one per state filtered on")]
        )
    violations = [
        FieldViolation(f"states[{i}]", "unknown result state" if state else "RESULT_STATE_UNSPECIFIED is no state")
        for i, state in enumerate(request.states)
        if state not in RESULT_STATES
    ]
    if violations:
        raise invalid_argument(violations)
    return sorted(set(request.states)) if request.states else [request.state] if request.state else []


UPDATABLE = ("display_name", "description", "labels", "annotations")
# The statuses ListRuns filters on: every RunStatus but UNSPECIFIED.
RUN_STATUSES = frozenset(run_pb2.RunStatus.values()) - {run_pb2.RUN_STATUS_UNSPECIFIED}
# The states ListRunResults filters on: every ResultState but UNSPECIFIED.
RESULT_STATES = frozenset(run_pb2.ResultState.values()) - {run_pb2.RESULT_STATE_UNSPECIFIED}
MAPS = ("labels", "annotations")


async def _cancel_in(
    conn: AsyncConnection, tenant: str, run_id: str, now: float, *, version: int | None = None
) -> pb.WatchRunResponse | None:
    """Cancel an active run (at `version`, when given) in the caller's transaction, with the aggregate
    of the results recorded so far (a cancelled run had only its pass rate: no grader, no mean score);
    its event, or None when the run is not active (or not at that version)."""
    # Jobs before the run: the store's lock order (a no-op for runs that are not active).
    await run_store.cancel_jobs(conn, tenant, run_id)
    row = await run_store.get(conn, tenant, run_id, lock=True)
    if row is None or row.status not in ACTIVE or (version is not None and row.version != version):
        return None  # nothing to cancel: the aggregate is not worth reading
    graders = [grader_name(g) for g in run_pb2.Run.FromString(row.spec).graders]
    aggregate = await aggregate_so_far(conn, run_id, graders)
    return await run_store.set_status(
        conn,
        tenant,
        run_id,
        run_pb2.RUN_STATUS_CANCELLED,
        from_statuses=ACTIVE,
        version=version,
        end_time=now,
        aggregate=aggregate,
    )


# AIP-161: a map key in a field mask path is an identifier, or any other key in backticks (a backtick in it
# doubled).
_MASK_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|`(?:[^`]|``)+`")


def _mask_key(written: str) -> str | None:
    """The map key a path names after its dot, unquoted; None when it is neither an identifier nor
    backtick-quoted (AIP-161). Taken literally, `labels.`, `labels.a.b` and an unterminated backtick were
    keys, and a mask that removed them answered OK (changing nothing but the etag) where REST refused it. A
    key that is well formed but no label key is refused when set (`check_labels`), as in a whole map."""
    if not _MASK_KEY.fullmatch(written):
        return None
    return written[1:-1].replace("``", "`") if written.startswith("`") else written


def _parse_mask(paths: Sequence[str]) -> tuple[list[str], dict[str, list[str]], list[FieldViolation]]:
    """An update mask as the fields it replaces whole and the map keys it sets or removes (AIP-161:
    `annotations.KEY`, or `annotations.`KEY`` for a key that is not an identifier)."""
    whole: list[str] = []
    keyed: dict[str, list[str]] = {}
    violations: list[FieldViolation] = []
    for path in paths:
        field, dot, written = path.partition(".")
        if field in MAPS and dot:
            if (key := _mask_key(written)) is not None:
                keyed.setdefault(field, []).append(key)
                continue
            reason = (
                f"{path[:MAX_ECHOED_ID]!r} names no key of {field}: after the dot an identifier, or the key in "
                "backticks (`` for a backtick in it)" + (", that is a label key" if field == "labels" else "")
            )
        elif path in UPDATABLE:
            whole.append(path)
            continue
        else:
            reason = (
                f"{path[:MAX_ECHOED_ID]!r} cannot be updated; updatable: {', '.join(UPDATABLE)} "
                "and single keys of the maps (annotations.KEY, labels.KEY), or * for all"
            )
        violations.append(FieldViolation("update_mask", reason))
    return whole, keyed, violations


def _expected_version(etag: str, field: str, violations: list[FieldViolation]) -> int | None:
    """The run version an etag given with a write names; None when none was given (no check)."""
    if not etag:
        return None
    version = version_of(etag)
    if version is None:
        violations.append(FieldViolation(field, "not an etag this service issued; read the run for its etag"))
    return version


def _check_etag(row: RunRecord, expected: int | None) -> None:
    """ABORTED (AIP-154) when a write's etag is not the run's current one."""
    if expected is not None and row.version != expected:
        raise ServiceError(
            grpc.StatusCode.ABORTED,
            Reason.ETAG_MISMATCH,
            f"run {row.id!r} changed since etag {etag(expected)!r} was read; read it again and retry",
            metadata={"run_id": row.id, "etag": etag(row.version)},
        )


def _column_value(value: Any) -> Any:
    """A message field as its column stores it (maps as plain dicts)."""
    return value if isinstance(value, str) else dict(value)
