"""Recording finished jobs: one transaction per batch, fenced, with every result's event.

For each batch: mark the jobs done where their claim still holds the lease (the fence), store the
outputs, count the results on their runs while allocating one seq per result, insert results and
events, and finish every run whose last evaluation this was. Either all of it commits or none.

A batch holds many runs of many tenants, so one evaluation the database refuses must not cost the
others theirs: a refused batch is split in halves, each recorded (and split) again, until the job
that cannot be stored is alone; it is then recorded as ERROR `RESULT_NOT_STORABLE`, so its run ends
and its lease is released like any other. A database that cannot serve (unreachable, out of
connections, a lock or statement timeout: `unavailable_cause`) or a lost race is everyone's, not split
for: the batch fails whole, and the executor records it again once the database serves (splitting on an
exhausted PostgreSQL stored correct results as ERROR for good). Anything else is split for, whether the
database named it the data's (a value out of range, a constraint, a row too large) or nobody recognises
it: splitting retries every part, so a passing failure costs nothing, and only the job that fails alone
is left out; not splitting let one job's unrecognised failure stop every tenant's recordings. A job
that fails alone for a reason nobody recognises is left unrecorded (its lease expires and it runs
again) until its UNKNOWN_FAILURE_ATTEMPTS-th attempt: recorded as ERROR at once, a failure that merely
lasted through the split's few milliseconds lost a correct result for good.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.execution.aggregate import aggregate_so_far, build_aggregate, verdict
from evalsvc.graders import Grade
from evalsvc.messages.convert import timestamp
from evalsvc.storable import storable_text
from evalsvc.store import cache as cache_store
from evalsvc.store import events as event_log
from evalsvc.store import jobs as job_store
from evalsvc.store import runs as run_store
from evalsvc.store import usage
from evalsvc.store.cache import CacheEntry
from evalsvc.store.db import Database, is_conflict, is_refused_data, unavailable_cause
from evalsvc.store.jobs import ClaimedJob
from evalsvc.store.records import RunRecord
from evalsvc.turns import YIELD_EVERY_S
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import item_pb2, run_pb2

log = logging.getLogger(__name__)

GRADER_SLOTS = 1024  # result id = job id * GRADER_SLOTS + grader index
# A recording of this many evaluations commits in a transaction of its own rather than in the
# writer's shared group: it takes long enough to build that the claims and CreateRuns queued
# behind it should not wait for it too (measured: a 1,000 x 50 run 4.8 s shared, 4.3 s alone).
# Smaller recordings - most runs' - share their group's commit.
ALONE_FROM_EVALUATIONS = 2000

# An evaluation's error_reason is stored at most this long: exception messages reach it (a grader that
# raised quotes what it raised on), and every page, event and copy of the result carries it whole.
MAX_ERROR_REASON_CHARS = 2000

_STATE_FIELD: dict[int, str] = {
    run_pb2.RESULT_STATE_PASSED: "passed",
    run_pb2.RESULT_STATE_FAILED: "failed",
    run_pb2.RESULT_STATE_ERROR: "errored",
    run_pb2.RESULT_STATE_SKIPPED: "skipped",
}


@dataclass(frozen=True, slots=True)
class FinishedJob:
    """A job whose target ran and whose graders graded, waiting to be recorded."""

    job: ClaimedJob
    item_id: str
    output: item_pb2.Response
    grades: Sequence[tuple[str, Grade]]
    cached: bool = False  # the output came from the response cache: its cost was not spent
    recorded: bool = False  # the output is the item's recorded response: its cost was spent before, not here
    cache_writes: Sequence[CacheEntry] = ()  # outputs and verdicts to store in the response cache
    cache_hits: Sequence[str] = ()  # keys of the entries it used (their last use moves to now)
    human_verdicts: Mapping[str, bool] = field(default_factory=dict)  # people's verdicts on the output, by grader
    # What its calls cost that no result holds - its warmups; the output and verdicts of a result that
    # could not be stored (`_not_storable`): the run's cost counts it, so budgets hold across restarts and
    # replicas (warmups were counted in memory only: a restart forgot them).
    extra_cost_usd: float = 0.0


@dataclass(frozen=True, slots=True)
class RunGraders:
    """What the recorder needs of a run: grader names and weights in order, and its verdict's bars."""

    grader_names: Sequence[str]
    weights: Sequence[float]
    pass_threshold: float | None
    max_error_rate: float | None = None  # percent of evaluations that may error for the run to pass; None: no bar


def item_score(grades: Sequence[tuple[str, Grade]], weights: Sequence[float]) -> float | None:
    """The weighted mean score of one output over the graders that could grade it."""
    total = weight_sum = 0.0
    for (_, grade), weight in zip(grades, weights, strict=True):
        if grade.state != run_pb2.RESULT_STATE_ERROR:
            total += grade.score * weight
            weight_sum += weight
    return total / weight_sum if weight_sum else None


Recorded = tuple[dict[str, list[pb.WatchRunResponse]], set[str]]
# Attempts a job gets when it alone fails to be recorded for a reason nobody recognises (not its data's,
# not the database's unavailability): at the last one it is recorded as ERROR RESULT_NOT_STORABLE.
UNKNOWN_FAILURE_ATTEMPTS = 3


async def record(
    db: Database, finished: Sequence[FinishedJob], graders_of: dict[str, RunGraders], *, cache_bounds: CacheBounds
) -> Recorded:
    """Commit a batch. Returns the committed events by run, and the runs that finished.

    Splits a batch the database refuses until only the evaluation it cannot store is left out,
    recorded as ERROR `RESULT_NOT_STORABLE` instead (see the module docstring). Raises, recording
    nothing, when the database cannot serve or the batch lost a race, or when the database refuses even
    that replacement."""
    try:
        return await _record_batch(db, finished, graders_of, cache_bounds)
    except Exception as exc:
        if unavailable_cause(exc) is not None or is_conflict(exc):
            raise
        if len(finished) > 1:
            half = len(finished) // 2
            first = await record(db, finished[:half], graders_of, cache_bounds=cache_bounds)
            second = await record(db, finished[half:], graders_of, cache_bounds=cache_bounds)
            for run_id, events in second[0].items():
                first[0].setdefault(run_id, []).extend(events)
            return first[0], first[1] | second[1]
        [refused] = finished
        if not is_refused_data(exc) and refused.job.attempt < UNKNOWN_FAILURE_ATTEMPTS:
            # Alone and failing for a reason nobody recognises: perhaps a passing one, that lasted through
            # the split's attempts of a few milliseconds; recorded as ERROR now, a correct result was lost
            # for good. Left unrecorded, it runs again when its lease expires (the executor renews no lease
            # of a recorded batch); at its last attempt it is recorded as ERROR.
            log.warning(
                "the result of job %d (run %s) could not be stored (%s: %s); it runs again when its lease "
                "expires (attempt %d of %d)",
                refused.job.id,
                refused.job.run_id,
                type(exc).__name__,
                str(exc)[:500],
                refused.job.attempt,
                UNKNOWN_FAILURE_ATTEMPTS,
            )
            await _spent_without_result(db, refused)
            return {}, set()
        log.warning(
            "the result of job %d (run %s, item %r) cannot be stored (%s: %s); recorded as ERROR RESULT_NOT_STORABLE",
            refused.job.id,
            refused.job.run_id,
            refused.item_id[:128],
            type(exc).__name__,
            str(exc)[:500],
        )
        return await _record_batch(db, [_not_storable(refused, exc)], graders_of, cache_bounds)


async def _spent_without_result(db: Database, refused: FinishedJob) -> None:
    """Add what a job left unrecorded had spent to its tenant's spend (the attempt that runs it again
    counts only its own calls), in a transaction of its own; a database that cannot take even that leaves
    it out, with a warning."""
    if (usd := spent(refused)) <= 0:
        return
    try:
        await db.transact(functools.partial(usage.add_to_totals, spent_usd={refused.job.tenant: usd}))
    except Exception as exc:
        log.warning("what job %d had spent ($%.4f) is in no budget: %s", refused.job.id, usd, type(exc).__name__)


def _not_storable(refused: FinishedJob, exc: Exception) -> FinishedJob:
    """The job with its output dropped and every grade replaced by ERROR `RESULT_NOT_STORABLE`; the
    reason names only the exception's type, since its message may quote the very text refused."""
    grade = Grade(
        run_pb2.RESULT_STATE_ERROR,
        0.0,
        0.0,
        "the result could not be stored, so its output and grade were dropped",
        f"RESULT_NOT_STORABLE: the database refused the result ({type(exc).__name__})",
    )
    return FinishedJob(
        job=refused.job,
        item_id=storable_text(refused.item_id),
        output=item_pb2.Response(),
        grades=[(storable_text(name), grade) for name, _ in refused.grades],
        extra_cost_usd=spent(refused),  # its calls were paid for though their answers are dropped
    )


async def _record_batch(
    db: Database, finished: Sequence[FinishedJob], graders_of: dict[str, RunGraders], cache_bounds: CacheBounds
) -> Recorded:
    """Commit a batch in one transaction (see `record`). The batch's response cache entries are stored
    in the same transaction (a committed result's entry is committed with it, and caching adds no
    commit), then each writing tenant is trimmed to its cache bounds, least recently used first.

    Each run's changes are stamped when the recorder reaches that run, not when the batch starts:
    a batch that holds the last jobs of a large run before a small one would otherwise date the
    small run's events by the large run's share of the transaction."""

    async def apply(conn: AsyncConnection) -> Recorded:
        return await _record_in(conn, finished, graders_of, cache_bounds)

    evaluations = sum(len(f.grades) for f in finished)
    return await db.transact(apply, alone=evaluations >= ALONE_FROM_EVALUATIONS)


async def _record_in(
    conn: AsyncConnection, finished: Sequence[FinishedJob], graders_of: dict[str, RunGraders], cache_bounds: CacheBounds
) -> Recorded:
    """`_record_batch`'s transaction: a handful of statements for the whole batch, however many runs
    it holds (one UPDATE counts the results and stored bytes of every run, one upsert adds the bytes to
    their tenants', one insert each for outputs, results and events, and one aggregate read and one
    UPDATE for all the runs it finishes)."""
    accepted = await job_store.complete(conn, [(f.job.id, f.job.claim_id) for f in finished])
    kept = [f for f in finished if f.job.id in accepted]
    # A job fenced out still paid for its calls: no run's cost holds them, its tenant's spend does. One
    # refused because this very attempt was recorded already (a batch split, part committed, then retried
    # whole after the database failed) is in its tenant's spend: counted again, it was spent twice.
    # (Two attempts of one job can be in one batch: its lease expired while the database was down, and it
    # was claimed again.)
    refused = [f for f in finished if f.job.id not in accepted]
    recorded_before = await job_store.done_in(conn, [(f.job.id, f.job.attempt) for f in refused])
    fenced = [f for f in refused if (f.job.id, f.job.attempt) not in recorded_before]
    spent_by_tenant: defaultdict[str, float] = defaultdict(float)
    for f in fenced:
        if (usd := spent(f)) > 0:
            spent_by_tenant[f.job.tenant] += usd
    if fenced:
        log.info("fenced out %d finished jobs whose lease was lost or whose run was cancelled", len(fenced))
    if recorded_before:
        log.info("%d finished jobs of a batch tried again had been recorded already", len(recorded_before))
    if not kept:
        await usage.add_to_totals(conn, spent_usd=spent_by_tenant)
        return {}, set()
    await job_store.store_outputs(
        conn,
        [
            job_store.output_tuple(
                job_id=f.job.id,
                tenant=f.job.tenant,
                run_id=f.job.run_id,
                output=f.output.SerializeToString(),
                latency_ms=f.output.latency_ms,
                cost_usd=f.output.cost_usd,
                item_score=item_score(f.grades, graders_of[f.job.run_id].weights),
                cached=f.cached,
            )
            for f in kept
        ],
    )
    cached = await _store_cache_entries(conn, kept, cache_bounds)
    jobs_by_run: dict[str, list[FinishedJob]] = defaultdict(list)
    for f in kept:
        jobs_by_run[f.job.run_id].append(f)
    progress = {run_id: _progress(jobs) for run_id, jobs in jobs_by_run.items()}
    rows = await run_store.add_progress(conn, progress, time.time())
    by_tenant: Counter[str] = Counter()
    for run_id, p in progress.items():
        by_tenant[jobs_by_run[run_id][0].job.tenant] += p.stored_bytes
        spent_by_tenant[jobs_by_run[run_id][0].job.tenant] += p.cost_usd
    by_run: dict[str, list[pb.WatchRunResponse]] = {}
    result_rows: list[tuple[Any, ...]] = []
    for run_id, run_jobs in sorted(jobs_by_run.items()):
        # Each run's changes are stamped when the recorder reaches it (see `_record_batch`).
        by_run[run_id] = await _result_events(rows[run_id], run_jobs, time.time(), result_rows)
    await event_log.append_many(conn, [(jobs_by_run[r][0].job.tenant, r, events) for r, events in by_run.items()])
    await run_store.insert_results(conn, result_rows)
    done = [
        (run_id, events[-1].counts)
        for run_id, events in by_run.items()
        if events[-1].counts.completed_evaluations >= events[-1].counts.total_evaluations
    ]
    if done:
        aggregates = await run_store.aggregate_inputs(conn, [run_id for run_id, _ in done])
        endings = [
            _ending(run_id, counts, graders_of[run_id], aggregates[run_id], time.time()) for run_id, counts in done
        ]
        for event in await run_store.finish_runs(conn, endings):
            by_run[event.run.id].append(event)
        assert all(by_run[run_id][-1].HasField("run") for run_id, _ in done), "a run with leased jobs ended early"
    # Last: after the runs' rows (the lock order), and holding the tenants' rows no longer than it must (on
    # PostgreSQL a tenant's other recordings, CreateRuns and appends wait for them).
    await usage.add_to_totals(conn, stored_bytes=by_tenant, cache_bytes=cached, spent_usd=spent_by_tenant)
    return by_run, {run_id for run_id, _ in done}


def stored_bytes(f: FinishedJob) -> int:
    """What recording a finished job stores (evalsvc.store.usage): its output and its results."""
    return f.output.ByteSize() + sum(
        usage.result_bytes(g.explanation, bounded_reason(g.error_reason)) for _, g in f.grades
    )


def spent(f: FinishedJob) -> float:
    """What a finished job's calls cost: outputs and verdicts taken from the response cache, and recorded
    responses, cost nothing (their cost_usd stays on the result and in the aggregate's total)."""
    usd = f.extra_cost_usd + (0.0 if f.cached or f.recorded else f.output.cost_usd)
    return usd + sum(0.0 if grade.cached else grade.cost_usd for _, grade in f.grades)


def _progress(run_jobs: Sequence[FinishedJob]) -> run_store.Progress:
    """What a recording adds to one run's counters."""
    tally = dict.fromkeys(_STATE_FIELD.values(), 0)
    for f in run_jobs:
        for _, grade in f.grades:
            tally[_STATE_FIELD[grade.state]] += 1
    return run_store.Progress(
        cost_usd=sum(map(spent, run_jobs)), stored_bytes=sum(map(stored_bytes, run_jobs)), **tally
    )


@dataclass(frozen=True, slots=True)
class CacheBounds:
    """What one tenant's response cache may hold (--cache-max-entries, --cache-max-bytes)."""

    entries: int
    bytes: int


async def _store_cache_entries(conn: AsyncConnection, kept: Sequence[FinishedJob], bounds: CacheBounds) -> Counter[str]:
    """Store the batch's new cache entries, mark the used ones, and evict beyond the bounds; returns the
    change in the tenants' cache bytes (evalsvc.store.cache)."""
    writes = [entry for f in kept for entry in f.cache_writes]
    hits = [(f.job.tenant, key) for f in kept for key in f.cache_hits]
    if not writes and not hits:
        return Counter()
    now = time.time()
    grown = await cache_store.store(conn, writes, now)
    await cache_store.touch(conn, hits, now)
    writers = sorted({entry.tenant for entry in writes})
    held = await usage.cache_bytes(conn, writers) if writers else {}
    for tenant in writers:
        evicted = await cache_store.evict(conn, tenant, bounds.entries, bounds.bytes, held[tenant] + grown[tenant])
        grown.subtract(evicted.freed)
    return grown


async def _result_events(
    r: RunRecord, run_jobs: Sequence[FinishedJob], now: float, result_rows: list[tuple[Any, ...]]
) -> list[pb.WatchRunResponse]:
    """One event per result, seqs and counts replayed from the run's state before this batch.

    Building them is the recorder's largest share of the event loop (~4 us per result): a batch of
    a large run holds tens of thousands, so it yields every few milliseconds, and other calls are
    served meanwhile (their writes wait for the next group; this one's transaction stays open)."""
    n = sum(len(f.grades) for f in run_jobs)
    counts = run_pb2.RunCounts(
        total_items=r.total_items,
        total_evaluations=r.total_evaluations,
        completed_evaluations=r.completed - n,
        passed=r.passed,
        failed=r.failed,
        errored=r.errored,
        skipped=r.skipped,
    )
    # Roll the per-state counters back to before the batch, then forward event by event.
    for f in run_jobs:
        for _, grade in f.grades:
            field = _STATE_FIELD[grade.state]
            setattr(counts, field, getattr(counts, field) - 1)
    seq = r.last_seq - n
    event_time = timestamp(now)
    events: list[pb.WatchRunResponse] = []
    slice_start = time.perf_counter()
    for f in run_jobs:
        if time.perf_counter() - slice_start > YIELD_EVERY_S:
            await asyncio.sleep(0)
            slice_start = time.perf_counter()
        job = f.job
        for grader_idx, (grader, grade) in enumerate(f.grades):
            seq += 1
            field = _STATE_FIELD[grade.state]
            setattr(counts, field, getattr(counts, field) + 1)
            counts.completed_evaluations += 1
            result_id = job.id * GRADER_SLOTS + grader_idx
            # Exception messages and judges' words reach these texts; a NUL in one must not fail the batch.
            explanation, error_reason = (
                storable_text(grade.explanation),
                storable_text(bounded_reason(grade.error_reason)),
            )
            row = run_store.result_tuple(
                id=result_id,
                tenant=job.tenant,
                run_id=job.run_id,
                job_id=job.id,
                item_id=f.item_id,
                repetition=job.repetition,
                grader=grader,
                state=grade.state,
                score=grade.score,
                raw_score=grade.raw_score,
                explanation=explanation,
                error_reason=error_reason,
                attempt=job.attempt,
                cost_usd=f.output.cost_usd,
                latency_ms=f.output.latency_ms,
                complete_time=now,
                scoring_cost_usd=grade.cost_usd,
                confidence=grade.confidence,
                cached=f.cached,
                verdict_cached=grade.cached,
                human_verdict=f.human_verdicts.get(grader),
            )
            result_rows.append(row)
            event = pb.WatchRunResponse(seq=seq, event_time=event_time, counts=counts)
            run_store.fill_result(event.result, row, event_time)
            events.append(event)
    return events


def bounded_reason(reason: str) -> str:
    """The reason cut to MAX_ERROR_REASON_CHARS, ending "..." when cut; its code (the words before the
    colon, what clients branch on) is always at the start."""
    return reason if len(reason) <= MAX_ERROR_REASON_CHARS else reason[: MAX_ERROR_REASON_CHARS - 3] + "..."


def _ending(
    run_id: str, counts: run_pb2.RunCounts, graders: RunGraders, inputs: run_store.AggregateInputs, now: float
) -> run_store.Ending:
    """How a run whose every evaluation has a result ends: its verdict and aggregate."""
    status, overall, code, message = verdict(
        counts.passed, counts.failed, counts.errored, graders.pass_threshold, graders.max_error_rate
    )
    aggregate = build_aggregate(graders.grader_names, inputs).SerializeToString()
    return run_store.Ending(run_id, status, overall, code, message, aggregate, now)


@dataclass(frozen=True, slots=True)
class EarlyEnd:
    """What `fail_early` found. `ours`: the run ended with this ending, so what it carried (`spent_usd`)
    is in its cost_usd and its tenant's spend. `event`: the terminal event, when this call committed it;
    None also when an earlier call with the same ending did (PostgreSQL: its COMMIT succeeded and the
    answer was lost, so the executor tried again), whose event is in the log and was never published."""

    ours: bool
    event: pb.WatchRunResponse | None


async def fail_early(
    db: Database,
    tenant: str,
    run_id: str,
    graders: RunGraders,
    code: str,
    message: str,
    *,
    spent_usd: float = 0.0,
    end_time: float | None = None,
) -> EarlyEnd:
    """End an active run as FAILED before all its evaluations ran (e.g. its budget was spent),
    keeping the results recorded so far; its remaining jobs never run.

    `spent_usd`: what its jobs stopped without a result had spent (a run ended over its budget), added
    to its cost_usd in the UPDATE that ends it, so its terminal event carries it; nothing is added to a
    run that already ended otherwise (cancelled meanwhile: its jobs' calls in flight are in no cost_usd).
    `end_time` names this ending: a caller that tries again after a failure passes the same one, so a
    run its earlier try ended (the commit's answer lost) is told apart from a run ended otherwise; the
    amount must not be counted again then."""
    spent_usd = spent_usd if 0 < spent_usd < math.inf else 0.0
    ends_at = time.time() if end_time is None else end_time

    async def end(conn: AsyncConnection) -> EarlyEnd:
        await run_store.cancel_jobs(conn, tenant, run_id)  # jobs before their run: the lock order
        aggregate = await aggregate_so_far(conn, run_id, graders.grader_names)
        ending = run_store.Ending(run_id, run_pb2.RUN_STATUS_FAILED, None, code, message, aggregate, ends_at, spent_usd)
        ended = await run_store.finish_runs(conn, [ending])
        if not ended:
            run = await run_store.get(conn, tenant, run_id)
            ours = run is not None and (run.status, run.error_code, run.end_time) == (ending.status, code, ends_at)
            return EarlyEnd(ours, None)
        if spent_usd:  # after the run's row (the lock order), as a recording adds it
            await usage.add_to_totals(conn, spent_usd={tenant: spent_usd})
        return EarlyEnd(True, ended[0])

    return await db.transact(end)
