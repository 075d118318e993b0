"""The recorder (evalsvc.execution.recorder) over a bare database: runs stored and jobs claimed through
the store, finished jobs built by hand; no server, no targets, no network."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.execution import recorder
from evalsvc.execution.recorder import FinishedJob, RunGraders
from evalsvc.graders import Grade, target_error_grade
from evalsvc.store import jobs as job_store
from evalsvc.store import runs as run_store
from evalsvc.store import usage
from evalsvc.store.db import Database
from evalsvc.store.models import JOB_DONE, JOB_LEASED
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import item_pb2, run_pb2
from tests.unit.stored import col, get, insert, jobs_of, logged, new_run, pg_error

PASS = Grade(run_pb2.RESULT_STATE_PASSED, 1.0, 1.0, "matched")
FAIL = Grade(run_pb2.RESULT_STATE_FAILED, 0.0, 0.0, "did not match")
ERROR = Grade(run_pb2.RESULT_STATE_ERROR, 0.0, 0.0, "", "TARGET_FAILED: boom")

RESULT_JOB = run_store.RESULT_COLUMNS.index("job_id")  # a results row's columns, in insert order
RESULT_ERROR = run_store.RESULT_COLUMNS.index("error_reason")
ONE_GRADER = RunGraders(["exact"], [1.0], None)
TWO_GRADERS = RunGraders(["exact", "judge"], [1.0, 1.0], None)


async def claim(db: Database, quotas: dict[str, int], claim_id: str = "c1") -> list[recorder.ClaimedJob]:
    """Lease jobs and start their runs in one transaction, as the executor does."""

    async def work(conn: AsyncConnection) -> list[Any]:
        rows = await job_store.claim(
            conn, owner="test", claim_id=claim_id, quotas=quotas, now=time.time(), lease_ttl_s=60
        )
        await run_store.start_runs(conn, sorted({col(row, "run_id") for row in rows}), time.time())
        return rows

    fields = ("id", "tenant", "run_id", "item_idx", "repetition", "attempt")
    return [
        recorder.ClaimedJob(claim_id=claim_id, **{name: col(row, name) for name in fields})
        for row in await db.transact(work)
    ]


def done(
    job: recorder.ClaimedJob,
    *grades: Grade,
    graders: Sequence[str] = ("exact",),
    item_id: str = "",
    cost: float = 0.0,
    latency: float = 10.0,
    cached: bool = False,
) -> FinishedJob:
    """The job as its graders left it: one grade per grader, in the run's grader order."""
    return FinishedJob(
        job=job,
        item_id=item_id or f"item{job.item_idx}",
        output=item_pb2.Response(content="answer", cost_usd=cost, latency_ms=latency),
        grades=list(zip(graders, grades, strict=True)),
        cached=cached,
    )


async def record(
    db: Database, finished: Sequence[FinishedJob], graders_of: dict[str, RunGraders]
) -> tuple[dict[str, list[pb.WatchRunResponse]], set[str]]:
    return await recorder.record(db, finished, graders_of, cache_bounds=recorder.CacheBounds(100, 1024**3))


async def results_of(db: Database, tenant: str, run_id: str) -> list[tuple[Any, bytes | None]]:
    async with db.read() as conn:
        page = await run_store.results_page(conn, tenant, run_id, after_id=None, limit=1000, states=[])
        outputs = await run_store.outputs_of(conn, tenant, [row.job_id for row, _ in page])
        explanations = await run_store.explanations_of(conn, tenant, [row.id for row, _ in page])
    return [(dataclasses.replace(row, explanation=explanations[row.id]), outputs.get(row.job_id)) for row, _ in page]


def assert_gap_free(log: Sequence[pb.WatchRunResponse]) -> None:
    assert [e.seq for e in log] == list(range(1, len(log) + 1))


async def test_a_batch_commits_each_result_with_its_event_seqs_gap_free_and_counts_replayed(db: Database) -> None:
    big, small = await insert(db, new_run("t1", items=3, graders=("exact", "judge")), new_run("t2", items=2))
    jobs = await claim(db, {big.run.id: 3, small.run.id: 2})
    by_run = {run: [j for j in jobs if j.run_id == run] for run in (big.run.id, small.run.id)}
    batch = [
        done(by_run[big.run.id][0], PASS, FAIL, graders=("exact", "judge"), cost=0.5),
        done(by_run[small.run.id][0], ERROR),
        done(by_run[big.run.id][1], FAIL, PASS, graders=("exact", "judge"), cost=0.25, cached=True),
    ]

    events, finished = await record(db, batch, {big.run.id: TWO_GRADERS, small.run.id: ONE_GRADER})

    assert finished == set()
    mine = events[big.run.id]
    assert [e.seq for e in mine] == [3, 4, 5, 6]  # after the run's creation (1) and start (2)
    assert [(e.result.item_id, e.result.grader, e.result.state) for e in mine] == [
        ("item0", "exact", run_pb2.RESULT_STATE_PASSED),
        ("item0", "judge", run_pb2.RESULT_STATE_FAILED),
        ("item1", "exact", run_pb2.RESULT_STATE_FAILED),
        ("item1", "judge", run_pb2.RESULT_STATE_PASSED),
    ]
    replayed = [(e.counts.completed_evaluations, e.counts.passed, e.counts.failed) for e in mine]
    assert replayed == [(1, 1, 0), (2, 1, 1), (3, 1, 2), (4, 2, 2)]
    assert {e.counts.total_evaluations for e in mine} == {6}
    theirs = events[small.run.id]
    assert [(e.seq, e.counts.completed_evaluations, e.counts.errored) for e in theirs] == [(3, 1, 1)]
    assert theirs[0].result.error_reason == "TARGET_FAILED: boom"

    for tenant, run_id in (("t1", big.run.id), ("t2", small.run.id)):
        log = await logged(db, tenant, run_id)
        assert_gap_free(log)
        assert log[2:] == events[run_id]
        assert col(await get(db, run_id), "status") == run_pb2.RUN_STATUS_RUNNING
    stored = await results_of(db, "t1", big.run.id)
    assert [str(col(row, "id")) for row, _ in stored] == [e.result.id for e in mine]
    assert item_pb2.Response.FromString(stored[0][1] or b"").content == "answer"
    run = await get(db, big.run.id)
    assert (col(run, "completed"), col(run, "passed"), col(run, "failed"), col(run, "last_seq")) == (4, 2, 2, 6)
    assert col(run, "cost_usd") == 0.5  # the cached output's cost was not spent
    states = {j["id"]: j["state"] for j in await jobs_of(db, big.run.id)}
    assert [states[j.id] for j in by_run[big.run.id]] == [JOB_DONE, JOB_DONE, JOB_LEASED]

    # The next batch continues each run's seqs and counts where this one left them.
    more, _ = await record(
        db, [done(by_run[small.run.id][1], PASS)], {small.run.id: ONE_GRADER, big.run.id: TWO_GRADERS}
    )
    assert [(e.seq, e.counts.completed_evaluations, e.counts.passed) for e in more[small.run.id][:1]] == [(4, 2, 1)]
    assert_gap_free(await logged(db, "t2", small.run.id))


async def test_runs_whose_last_evaluation_is_in_the_batch_end_with_their_verdict_and_aggregate(
    db: Database,
) -> None:
    mixed, errored, unfinished = await insert(db, new_run(items=2), new_run(items=1), new_run(items=2))
    jobs = await claim(db, {mixed.run.id: 2, errored.run.id: 1, unfinished.run.id: 2})
    of = {run: [j for j in jobs if j.run_id == run] for run in (mixed.run.id, errored.run.id, unfinished.run.id)}
    batch = [
        done(of[mixed.run.id][0], PASS, latency=10.0, cost=0.5),
        done(of[errored.run.id][0], ERROR),
        done(of[unfinished.run.id][0], PASS),
        done(of[mixed.run.id][1], FAIL, latency=30.0, cost=0.25),
    ]
    graders_of = {run: ONE_GRADER for run in of}

    events, finished = await record(db, batch, graders_of)

    assert finished == {mixed.run.id, errored.run.id}
    ended = events[mixed.run.id][-1]
    assert ended.seq == 5 and ended.run.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert ended.run.overall_passed is False  # half passed; the default threshold is 100%
    assert (ended.counts.completed_evaluations, ended.counts.passed, ended.counts.failed) == (2, 1, 1)
    aggregate = ended.run.aggregate
    assert (aggregate.pass_rate, aggregate.total_cost_usd, aggregate.latency.mean_ms) == (0.5, 0.75, 20.0)
    assert [(g.grader, g.passed, g.failed) for g in aggregate.graders] == [("exact", 1, 1)]
    failed = events[errored.run.id][-1].run
    assert failed.status == run_pb2.RUN_STATUS_FAILED and not failed.HasField("overall_passed")
    assert failed.error.code == "ALL_EVALUATIONS_ERRORED"
    assert [e.HasField("run") for e in events[unfinished.run.id]] == [False]
    assert col(await get(db, unfinished.run.id), "status") == run_pb2.RUN_STATUS_RUNNING
    for run_id in of:
        log = await logged(db, "t1", run_id)
        assert_gap_free(log)
        assert log[2:] == events[run_id]


async def test_an_error_reason_is_stored_cut_to_its_bound_with_its_code_first(db: Database) -> None:
    """Exception messages reach error_reason (a grader that raised quotes what it raised on): one of
    100,000 characters was stored whole and carried by every page, event and copy of the result."""
    (run,) = await insert(db, new_run(items=2))
    jobs = await claim(db, {run.run.id: 2})
    long = Grade(run_pb2.RESULT_STATE_ERROR, 0.0, 0.0, "", "GRADER_FAILED: ValueError: " + "x" * 100_000)
    short = Grade(run_pb2.RESULT_STATE_ERROR, 0.0, 0.0, "", "x" * recorder.MAX_ERROR_REASON_CHARS)

    events, _ = await record(db, [done(jobs[0], long), done(jobs[1], short)], {run.run.id: ONE_GRADER})

    stored = {row.job_id: row.error_reason for row, _ in await results_of(db, "t1", run.run.id)}
    cut = stored[jobs[0].id]
    assert len(cut) == recorder.MAX_ERROR_REASON_CHARS and cut.startswith("GRADER_FAILED: ValueError: x")
    assert cut.endswith("x...")
    assert stored[jobs[1].id] == short.error_reason  # at the bound: whole
    assert [e.result.error_reason for e in events[run.run.id] if e.HasField("result")] == [cut, short.error_reason]


async def test_a_failed_target_call_has_no_latency_in_the_aggregate(db: Database) -> None:
    """An item whose target call failed is recorded with an empty output (0 ms): counted, it took the
    run's latency mean and percentiles low (a probe: 10% low with a tenth of the items failing)."""
    (run,) = await insert(db, new_run(items=3))
    first, second, third = await claim(db, {run.run.id: 3})
    no_output = FinishedJob(
        job=third, item_id="item2", output=item_pb2.Response(), grades=[("exact", target_error_grade("boom"))]
    )
    events, finished = await record(
        db, [done(first, PASS, latency=10.0), done(second, FAIL, latency=30.0), no_output], {run.run.id: ONE_GRADER}
    )
    assert finished == {run.run.id}
    latency = events[run.run.id][-1].run.aggregate.latency
    assert (latency.mean_ms, latency.p50_ms, latency.p99_ms) == (20.0, 10.0, 30.0), latency  # nearest rank


async def test_a_job_whose_claim_was_superseded_or_whose_run_was_cancelled_records_nothing(db: Database) -> None:
    live, cancelled = await insert(db, new_run(items=2), new_run(items=1))
    stale = await claim(db, {live.run.id: 2, cancelled.run.id: 1}, "c1")
    await db.transact(lambda conn: job_store.release(conn, ["c1"]))  # the lease was lost...
    current = await claim(db, {live.run.id: 2}, "c2")  # ...and another claim holds the job now

    async def cancel(conn: AsyncConnection) -> None:
        await run_store.cancel_jobs(conn, "t1", cancelled.run.id)
        await run_store.set_status(
            conn, "t1", cancelled.run.id, run_pb2.RUN_STATUS_CANCELLED, from_statuses=[run_pb2.RUN_STATUS_RUNNING]
        )

    await db.transact(cancel)
    [stale_live] = [j for j in stale if j.run_id == live.run.id and j.item_idx == 0]
    [stale_cancelled] = [j for j in stale if j.run_id == cancelled.run.id]
    graders_of = {live.run.id: ONE_GRADER, cancelled.run.id: ONE_GRADER}

    assert await record(db, [done(stale_live, PASS), done(stale_cancelled, PASS)], graders_of) == ({}, set())
    events, finished = await record(
        db, [done(stale_live, FAIL), done(current[1], PASS), done(stale_cancelled, PASS)], graders_of
    )

    assert finished == set() and list(events) == [live.run.id]
    assert [(e.seq, e.result.item_id, e.result.attempt) for e in events[live.run.id]] == [(3, "item1", 2)]
    assert [col(row, "item_id") for row, _ in await results_of(db, "t1", live.run.id)] == ["item1"]
    assert await results_of(db, "t1", cancelled.run.id) == []
    assert [e.seq for e in await logged(db, "t1", cancelled.run.id)] == [1, 2, 3]  # created, started, cancelled
    jobs = await jobs_of(db, live.run.id)
    assert [(j["state"], j["claim_id"]) for j in jobs] == [(JOB_LEASED, "c2"), (JOB_DONE, None)]


async def test_a_fenced_out_jobs_calls_count_in_its_tenants_spend(db: Database) -> None:
    """A job fenced out (its lease lost, its run cancelled) paid for its calls all the same: no run's cost
    holds them, so its tenant's stopped spend does, which its budget counts (usage.spend)."""
    live, cancelled = await insert(db, new_run(items=1), new_run(items=1))
    stale = await claim(db, {live.run.id: 1, cancelled.run.id: 1}, "c1")
    await db.transact(lambda conn: job_store.release(conn, ["c1"]))
    [current] = await claim(db, {live.run.id: 1}, "c2")
    await db.transact(lambda conn: run_store.cancel_jobs(conn, "t1", cancelled.run.id))
    graders_of = {live.run.id: ONE_GRADER, cancelled.run.id: ONE_GRADER}

    assert await record(db, [done(j, PASS, cost=0.5) for j in stale], graders_of) == ({}, set())  # all fenced
    _, finished = await record(db, [done(stale[0], PASS, cost=0.25), done(current, PASS, cost=2.0)], graders_of)

    assert finished == {live.run.id}
    async with db.read() as conn:
        assert (await usage.spend(conn, ["t1", "t2"])) == {"t1": pytest.approx(3.25), "t2": 0.0}


async def test_a_result_the_database_refuses_is_recorded_as_not_storable_and_costs_the_others_nothing(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One batch holds two tenants' runs; the database refuses one item's results. The batch is split
    until that job is alone: it is recorded as ERROR RESULT_NOT_STORABLE, everything else as it was."""
    refused_batches = 0
    insert_results = run_store.insert_results

    async def refusing(conn: AsyncConnection, rows: list[tuple[Any, ...]]) -> None:
        nonlocal refused_batches
        if any(row[4] == "poison" and not row[11].startswith("RESULT_NOT_STORABLE") for row in rows):
            refused_batches += 1
            raise sa_exc.DataError("INSERT INTO results ...", {}, Exception("invalid byte sequence"))
        await insert_results(conn, rows)

    monkeypatch.setattr(run_store, "insert_results", refusing)
    poisoned, clean = await insert(db, new_run("t1", items=4), new_run("t2", items=3))
    jobs = await claim(db, {poisoned.run.id: 4, clean.run.id: 3})
    batch = [
        done(j, PASS, item_id="poison" if j.run_id == poisoned.run.id and j.item_idx == 2 else "", cost=0.25)
        for j in jobs
    ]

    events, finished = await record(db, batch, {poisoned.run.id: ONE_GRADER, clean.run.id: ONE_GRADER})

    assert refused_batches > 1  # the whole batch first, then the halves that held the poison
    assert finished == {poisoned.run.id, clean.run.id}
    for tenant, run in (("t1", poisoned), ("t2", clean)):
        log = await logged(db, tenant, run.run.id)
        assert_gap_free(log)
        assert log[2:] == events[run.run.id]
        assert {j["state"] for j in await jobs_of(db, run.run.id)} == {JOB_DONE}  # no lease left behind
    assert events[clean.run.id][-1].run.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert events[clean.run.id][-1].run.overall_passed is True
    ended = events[poisoned.run.id][-1]
    assert ended.run.status == run_pb2.RUN_STATUS_SUCCEEDED  # three passed, one errored
    assert ended.run.cost_usd == pytest.approx(1.0), "the dropped output's call was paid for: the run's cost has it"
    assert (ended.counts.passed, ended.counts.errored, ended.counts.completed_evaluations) == (3, 1, 4)
    results = {col(row, "item_id"): (row, output) for row, output in await results_of(db, "t1", poisoned.run.id)}
    row, output = results["poison"]
    assert col(row, "state") == run_pb2.RESULT_STATE_ERROR
    assert col(row, "error_reason").startswith("RESULT_NOT_STORABLE") and "DataError" in col(row, "error_reason")
    assert output == item_pb2.Response().SerializeToString()  # the output was dropped with its grade
    assert all(col(r, "state") == run_pb2.RESULT_STATE_PASSED for item, (r, _) in results.items() if item != "poison")


async def test_an_unavailable_database_fails_the_batch_whole_and_records_nothing(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Splitting would not help: the caller retries the batch, whose claims still hold their leases."""
    calls = 0

    async def unreachable(conn: AsyncConnection, rows: list[tuple[Any, ...]]) -> None:
        nonlocal calls
        calls += 1
        raise sa_exc.OperationalError("INSERT INTO results ...", {}, ConnectionRefusedError("refused"))

    monkeypatch.setattr(run_store, "insert_results", unreachable)
    (run,) = await insert(db, new_run(items=3))
    jobs = await claim(db, {run.run.id: 3})

    with pytest.raises(sa_exc.OperationalError):
        await record(db, [done(j, PASS) for j in jobs], {run.run.id: ONE_GRADER})

    assert calls == 1
    assert [e.seq for e in await logged(db, "t1", run.run.id)] == [1, 2]
    assert {(j["state"], j["claim_id"]) for j in await jobs_of(db, run.run.id)} == {(JOB_LEASED, "c1")}


def fail_inserts(monkeypatch: pytest.MonkeyPatch, faults: dict[int, Exception]) -> Callable[[], int]:
    """Make the inserts of results numbered in `faults` (the first is 1) fail with theirs (the others go
    through); how many were tried."""
    calls = 0
    insert_results = run_store.insert_results

    async def failing(conn: AsyncConnection, rows: list[tuple[Any, ...]]) -> None:
        nonlocal calls
        calls += 1
        if (fault := faults.get(calls)) is not None:
            raise fault
        await insert_results(conn, rows)

    monkeypatch.setattr(run_store, "insert_results", failing)
    return lambda: calls


def fail_first_insert(monkeypatch: pytest.MonkeyPatch, fault: Exception) -> Callable[[], int]:
    """Make the first insert of results fail with `fault` (later ones go through); how many were tried."""
    return fail_inserts(monkeypatch, {1: fault})


@pytest.mark.parametrize(
    "fault",
    [
        pg_error(asyncpg.exceptions.TooManyConnectionsError, 'too many connections for database "evalsvc"'),
        pg_error(asyncpg.exceptions.LockNotAvailableError, "canceling statement due to lock timeout"),
        pg_error(asyncpg.exceptions.QueryCanceledError, "canceling statement due to user request"),
    ],
    ids=["too-many-connections", "lock-timeout", "query-canceled"],
)
async def test_an_unavailable_database_fails_the_batch_whole_and_it_records_exactly_once_it_clears(
    db: Database, monkeypatch: pytest.MonkeyPatch, fault: Exception
) -> None:
    """An unavailable database (out of connections, a lock or statement timeout) is not split for (a
    lost race neither; the writer applies that again itself): splitting stored every job of the batch
    as ERROR RESULT_NOT_STORABLE for good. The batch is recorded as it was once the fault clears."""
    calls = fail_first_insert(monkeypatch, fault)
    (run,) = await insert(db, new_run(items=3))
    jobs = await claim(db, {run.run.id: 3})
    batch = [done(j, PASS) for j in jobs]

    with pytest.raises(type(fault)):
        await record(db, batch, {run.run.id: ONE_GRADER})
    assert calls() == 1  # not split
    assert [e.seq for e in await logged(db, "t1", run.run.id)] == [1, 2]

    events, finished = await record(db, batch, {run.run.id: ONE_GRADER})

    assert finished == {run.run.id}
    assert events[run.run.id][-1].run.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert {col(row, "state") for row, _ in await results_of(db, "t1", run.run.id)} == {run_pb2.RESULT_STATE_PASSED}


async def test_a_passing_failure_nobody_recognises_is_split_for_and_costs_nothing(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unrecognised failure may be one job's: the batch is split, every part tried again, and here
    (the failure passed) every result is recorded as it was; not splitting let one job's failure stop
    every tenant's recordings."""
    calls = fail_first_insert(monkeypatch, RuntimeError("a failure nobody recognises"))
    (run,) = await insert(db, new_run(items=4))
    jobs = await claim(db, {run.run.id: 4})
    _, finished = await record(db, [done(j, PASS) for j in jobs], {run.run.id: ONE_GRADER})
    assert calls() == 3 and finished == {run.run.id}  # the whole batch, then its two halves
    assert {col(row, "state") for row, _ in await results_of(db, "t1", run.run.id)} == {run_pb2.RESULT_STATE_PASSED}


async def test_a_batch_retried_after_part_of_it_committed_counts_each_jobs_spend_once(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: a batch split for an unrecognised failure commits its first half, then the database fails
    under the second and the executor records the whole batch again. The first half's jobs are refused by
    the fence then (they are done), but they are not fenced out: their spend is in the run's cost already,
    and counting it again as a fenced job's made $4 of calls $6 of the tenant's budget."""
    unavailable = sa_exc.OperationalError("INSERT INTO results ...", {}, ConnectionRefusedError("refused"))
    # The whole batch (split for), its first half (committed), its second half (the database fails).
    fail_inserts(monkeypatch, {1: RuntimeError("a failure nobody recognises"), 3: unavailable})
    (run,) = await insert(db, new_run(items=4))
    batch = [done(j, PASS, cost=1.0) for j in await claim(db, {run.run.id: 4})]

    with pytest.raises(sa_exc.OperationalError):
        await record(db, batch, {run.run.id: ONE_GRADER})  # the whole batch; its first half; its second half
    _, finished = await record(db, batch, {run.run.id: ONE_GRADER})  # again, as the executor does

    assert finished == {run.run.id}
    async with db.read() as conn:
        assert await usage.spend(conn, ["t1"]) == {"t1": pytest.approx(4.0)}


async def test_a_job_failing_alone_for_an_unknown_reason_is_tried_again_before_it_is_recorded_as_error(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: a failure that merely lasted through the split's few milliseconds left a correct result
    stored as ERROR for good. A job that fails alone for a reason nobody recognises is left unrecorded (it
    runs again when its lease expires) until its last attempt; the rest of the batch is recorded."""
    insert_results = run_store.insert_results
    (run,) = await insert(db, new_run(items=2))
    first, second = await claim(db, {run.run.id: 2})

    async def failing_for_the_first_job(conn: AsyncConnection, rows: list[tuple[Any, ...]]) -> None:
        if any(row[RESULT_JOB] == first.id and not row[RESULT_ERROR].startswith("RESULT_NOT_STORABLE") for row in rows):
            raise RuntimeError("a failure nobody recognises")
        await insert_results(conn, rows)

    monkeypatch.setattr(run_store, "insert_results", failing_for_the_first_job)
    await record(db, [done(first, PASS, cost=1.0), done(second, PASS, cost=0.5)], {run.run.id: ONE_GRADER})
    assert [col(row, "job_id") for row, _ in await results_of(db, "t1", run.run.id)] == [second.id]
    last = dataclasses.replace(first, attempt=recorder.UNKNOWN_FAILURE_ATTEMPTS)
    await record(db, [done(last, PASS, cost=2.0)], {run.run.id: ONE_GRADER})
    states = {col(row, "job_id"): col(row, "error_reason") for row, _ in await results_of(db, "t1", run.run.id)}
    assert states[first.id].startswith("RESULT_NOT_STORABLE"), states
    async with db.read() as conn:  # every attempt's calls were paid for: the one left unrecorded too
        assert await usage.spend(conn, ["t1"]) == {"t1": pytest.approx(3.5)}
