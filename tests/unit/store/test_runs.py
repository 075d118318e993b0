"""The run store (evalsvc.store.runs) over a bare database: no server, no network."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.messages.convert import timestamp
from evalsvc.messages.run_filter import parse_filter
from evalsvc.store import bulk
from evalsvc.store import jobs as job_store
from evalsvc.store import runs as run_store
from evalsvc.store.db import Database
from evalsvc.store.models import JOB_CANCELLED, JOB_DONE, JOB_LEASED, JOB_QUEUED, RunItemRow, RunLabelRow
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import item_pb2, run_pb2
from tests.unit.stored import col, get, insert, jobs_of, logged, new_run, plan_nodes, unanalyzed

ITEMS = RunItemRow.__table__  # type: ignore[attr-defined]
LABELS = RunLabelRow.__table__  # type: ignore[attr-defined]

PENDING, RUNNING = run_pb2.RUN_STATUS_PENDING, run_pb2.RUN_STATUS_RUNNING
SUCCEEDED, FAILED, CANCELLED = run_pb2.RUN_STATUS_SUCCEEDED, run_pb2.RUN_STATUS_FAILED, run_pb2.RUN_STATUS_CANCELLED


async def set_status(db: Database, run: pb.WatchRunResponse, status: int) -> pb.WatchRunResponse | None:
    """Move a run to `status` from any status (to set a test's scene)."""

    async def work(conn: AsyncConnection) -> pb.WatchRunResponse | None:
        everything = list(run_pb2.RunStatus.values())
        return await run_store.set_status(conn, "t1", run.run.id, status, from_statuses=everything)

    return await db.transact(work)


# ------------------------------------------------------------------------------------ creating runs


async def test_insert_runs_stores_several_runs_with_items_jobs_labels_and_first_events(db: Database) -> None:
    async def create(conn: AsyncConnection) -> list[pb.WatchRunResponse]:
        first = await run_store.allocate_run_numbers(conn, "t1", "", 2)
        return await run_store.insert_runs(
            conn,
            [
                new_run("t1", items=2, repetitions=2, labels={"team": "a"}, run_number=first),
                new_run("t1", items=3, graders=("exact", "contains"), run_number=first + 1),
                new_run("t2", items=1, run_number=await run_store.allocate_run_numbers(conn, "t2", "")),
            ],
        )

    events = await db.transact(create)

    assert [e.seq for e in events] == [1, 1, 1]
    assert [e.run.status for e in events] == [PENDING] * 3
    assert [e.run.run_number for e in events] == [1, 2, 1]  # numbered per tenant
    assert [e.counts.total_evaluations for e in events] == [4, 6, 1]
    assert [e.counts.completed_evaluations for e in events] == [0, 0, 0]
    assert dict(events[0].run.labels) == {"team": "a"}
    assert events[1].run.graders[1].name == "contains"  # the definition is the stored spec
    for tenant, event in zip(("t1", "t1", "t2"), events, strict=True):
        assert await logged(db, tenant, event.run.id) == [event]
    assert await logged(db, "t2", events[0].run.id) == []  # another tenant's log reads as empty

    first = await jobs_of(db, events[0].run.id)
    assert [(j["item_idx"], j["repetition"]) for j in first] == [(0, 1), (1, 1), (0, 2), (1, 2)]
    assert {j["state"] for j in first} == {JOB_QUEUED}
    assert len(await jobs_of(db, events[1].run.id)) == 3 and len(await jobs_of(db, events[2].run.id)) == 1
    async with db.read() as conn:
        items = (await conn.execute(select(ITEMS).where(ITEMS.c.run_id == events[1].run.id))).mappings()
        labels = (await conn.execute(select(LABELS.c.run_id, LABELS.c.key, LABELS.c.value))).all()
    assert [(i["idx"], item_pb2.Item.FromString(i["item"]).id) for i in items] == [
        (0, "item0"),
        (1, "item1"),
        (2, "item2"),
    ]
    assert [tuple(label) for label in labels] == [(events[0].run.id, "team", "a")]


async def test_run_numbers_are_consecutive_per_tenant_and_dataset(db: Database) -> None:
    async def allocate(conn: AsyncConnection) -> list[int]:
        return [
            await run_store.allocate_run_numbers(conn, "t1", "ds_a", 3),
            await run_store.allocate_run_numbers(conn, "t1", "ds_a"),
            await run_store.allocate_run_numbers(conn, "t1", "ds_b", 2),
            await run_store.allocate_run_numbers(conn, "t2", "ds_a"),
            await run_store.allocate_run_numbers(conn, "t1", "ds_b"),
        ]

    assert await db.transact(allocate) == [1, 4, 1, 1, 3]


async def test_find_by_request_ids_finds_each_tenants_own_runs_by_key(db: Database) -> None:
    mine, theirs, _ = await insert(
        db, new_run("t1", request_id="r1"), new_run("t2", request_id="r1"), new_run("t1", request_id=None)
    )

    async def find(conn: AsyncConnection) -> dict[tuple[str, str], Any]:
        keys = [("t1", "r1"), ("t2", "r1"), ("t1", "r1"), ("t1", "missing"), ("t3", "r1")]
        return await run_store.find_by_request_ids(conn, keys)

    found = await db.transact(find)
    assert {key: col(row, "id") for key, row in found.items()} == {
        ("t1", "r1"): mine.run.id,
        ("t2", "r1"): theirs.run.id,
    }
    assert await db.transact(lambda conn: run_store.find_by_request_ids(conn, [])) == {}


async def test_tenant_runs_counts_pending_and_running_runs_as_active_and_every_run_as_stored(db: Database) -> None:
    new = [new_run("t1"), new_run("t1", items=5), new_run("t1"), new_run("t2")]
    _pending, running, ended, _ = await insert(db, *new)
    await set_status(db, running, RUNNING)
    await set_status(db, ended, SUCCEEDED)

    counted = await db.transact(lambda conn: run_store.tenant_runs(conn, ["t1", "t3", "t2"]))
    size = [run.stored_bytes for run in new]  # what each run stores (evalsvc.store.usage)
    assert size[1] > size[0]
    assert counted == {
        "t1": run_store.TenantRuns(active=2, stored=3, stored_bytes=size[0] + size[1] + size[2]),
        "t2": run_store.TenantRuns(active=1, stored=1, stored_bytes=size[3]),
        "t3": run_store.TenantRuns(),
    }


# ---------------------------------------------------------------------------------- status changes


async def test_start_runs_moves_only_pending_runs_with_one_event_each(db: Database) -> None:
    first, second, already = await insert(db, new_run(), new_run(), new_run())
    moved = await set_status(db, already, RUNNING)
    assert moved is not None and moved.seq == 2
    ids = [first.run.id, second.run.id, already.run.id, "run_unknown"]
    before = time.time()

    started = await db.transact(lambda conn: run_store.start_runs(conn, ids, before))

    assert [e.run.id for e in started] == sorted([first.run.id, second.run.id])
    assert [(e.seq, e.run.status) for e in started] == [(2, RUNNING), (2, RUNNING)]
    assert all(e.run.start_time.ToSeconds() == int(before) for e in started)
    assert [e.seq for e in await logged(db, "t1", first.run.id)] == [1, 2]
    assert col(await get(db, already.run.id), "last_seq") == 2  # no second event for a running run
    assert await db.transact(lambda conn: run_store.start_runs(conn, ids, time.time())) == []


async def test_add_progress_counts_each_runs_results_and_allocates_their_seqs(db: Database) -> None:
    a, b, untouched = await insert(db, new_run(items=10), new_run(items=10), new_run(items=10))
    progress = {
        a.run.id: run_store.Progress(passed=2, failed=1, cost_usd=0.5),
        b.run.id: run_store.Progress(errored=1, skipped=3),
    }

    rows = await db.transact(lambda conn: run_store.add_progress(conn, progress, time.time()))

    assert set(rows) == {a.run.id, b.run.id}
    counters = ("completed", "passed", "failed", "errored", "skipped", "last_seq")
    assert [col(rows[a.run.id], c) for c in counters] == [3, 2, 1, 0, 0, 1 + 3]
    assert [col(rows[b.run.id], c) for c in counters] == [4, 0, 0, 1, 3, 1 + 4]
    assert col(rows[a.run.id], "cost_usd") == 0.5 and col(rows[b.run.id], "cost_usd") == 0.0

    again = await db.transact(
        lambda conn: run_store.add_progress(conn, {a.run.id: run_store.Progress(passed=1, cost_usd=0.25)}, 0.0)
    )
    assert [col(again[a.run.id], c) for c in counters] == [4, 3, 1, 0, 0, 5]  # seq 5 is the new result's
    assert col(again[a.run.id], "cost_usd") == 0.75
    assert col(await get(db, b.run.id), "last_seq") == 5  # only the runs named changed
    assert col(await get(db, untouched.run.id), "last_seq") == 1
    assert await db.transact(lambda conn: run_store.add_progress(conn, {}, 0.0)) == {}


def ending(run_id: str, status: int, overall: bool | None, code: str = "", aggregate: float = 0.5) -> run_store.Ending:
    summary = run_pb2.RunAggregate(pass_rate=aggregate).SerializeToString()
    return run_store.Ending(run_id, status, overall, code, f"{code} message" if code else "", summary, 1234.0)


async def test_finish_runs_ends_each_active_run_its_own_way_and_leaves_ended_runs_alone(db: Database) -> None:
    won, lost, errored, cancelled = await insert(db, new_run(), new_run(), new_run(), new_run())
    await set_status(db, won, RUNNING)
    await set_status(db, cancelled, CANCELLED)
    endings = [
        ending(cancelled.run.id, SUCCEEDED, True),
        ending(lost.run.id, SUCCEEDED, False, aggregate=0.25),
        ending(won.run.id, SUCCEEDED, True, aggregate=1.0),
        ending(errored.run.id, FAILED, None, "ALL_EVALUATIONS_ERRORED", aggregate=0.0),
    ]

    ended = await db.transact(lambda conn: run_store.finish_runs(conn, endings))

    assert [e.run.id for e in ended] == sorted([won.run.id, lost.run.id, errored.run.id])
    by_id = {e.run.id: e for e in ended}
    assert (by_id[won.run.id].seq, by_id[lost.run.id].seq, by_id[errored.run.id].seq) == (3, 2, 2)
    assert by_id[won.run.id].run.status == SUCCEEDED and by_id[won.run.id].run.overall_passed is True
    assert by_id[won.run.id].run.aggregate.pass_rate == 1.0
    assert by_id[lost.run.id].run.overall_passed is False and by_id[lost.run.id].run.aggregate.pass_rate == 0.25
    failed = by_id[errored.run.id].run
    assert failed.status == FAILED and not failed.HasField("overall_passed")
    assert (failed.error.code, failed.error.message) == ("ALL_EVALUATIONS_ERRORED", "ALL_EVALUATIONS_ERRORED message")
    assert all(e.run.end_time.ToSeconds() == 1234 for e in ended)
    for event in ended:
        assert (await logged(db, "t1", event.run.id))[-1] == event
    kept = await get(db, cancelled.run.id)
    assert (col(kept, "status"), col(kept, "last_seq"), col(kept, "aggregate")) == (CANCELLED, 2, None)
    assert await db.transact(lambda conn: run_store.finish_runs(conn, endings)) == []  # none is active now


async def test_finish_runs_records_a_batch_in_which_no_run_has_a_verdict(db: Database) -> None:
    """Every value of the per-run verdict is NULL: PostgreSQL once read such a CASE as text and refused it."""
    runs = await insert(db, new_run(), new_run())
    endings = [ending(e.run.id, FAILED, None, "ALL_EVALUATIONS_ERRORED") for e in runs]

    ended = await db.transact(lambda conn: run_store.finish_runs(conn, endings))

    assert [(e.run.status, e.run.HasField("overall_passed")) for e in ended] == [(FAILED, False)] * 2
    assert [col(await get(db, e.run.id), "overall_passed") for e in runs] == [None, None]


async def test_set_status_with_a_stale_version_changes_nothing(db: Database) -> None:
    (run,) = await insert(db, new_run())
    version = col(await get(db, run.run.id), "version")

    async def cancel(conn: AsyncConnection, at: int) -> pb.WatchRunResponse | None:
        return await run_store.set_status(
            conn, "t1", run.run.id, CANCELLED, from_statuses=[PENDING, RUNNING], version=at
        )

    assert await db.transact(lambda conn: cancel(conn, version + 1)) is None
    assert (col(await get(db, run.run.id), "status"), col(await get(db, run.run.id), "version")) == (PENDING, version)

    event = await db.transact(lambda conn: cancel(conn, version))
    assert event is not None and (event.seq, event.run.status) == (2, CANCELLED)
    assert col(await get(db, run.run.id), "version") == version + 1
    assert await db.transact(lambda conn: cancel(conn, version + 1)) is None  # no longer in a status it may leave
    assert [e.seq for e in await logged(db, "t1", run.run.id)] == [1, 2]


async def test_set_status_refuses_another_tenants_run(db: Database) -> None:
    (run,) = await insert(db, new_run("t2"))

    async def cancel(conn: AsyncConnection) -> pb.WatchRunResponse | None:
        return await run_store.set_status(conn, "t1", run.run.id, CANCELLED, from_statuses=[PENDING])

    assert await db.transact(cancel) is None
    assert col(await get(db, run.run.id), "status") == PENDING


# ------------------------------------------------------------------------------------------- jobs


async def claim(db: Database, quotas: dict[str, int], claim_id: str) -> list[int]:
    return await claim_at(db, quotas, claim_id, time.time())


async def claim_at(db: Database, quotas: dict[str, int], claim_id: str, now: float) -> list[int]:
    """Claim as at `now`, with leases of 60 s: the ids leased."""

    async def work(conn: AsyncConnection) -> list[int]:
        claimed = await job_store.claim(conn, owner="test", claim_id=claim_id, quotas=quotas, now=now, lease_ttl_s=60)
        return [col(job, "id") for job in claimed]

    return await db.transact(work)


async def store_outputs(
    db: Database, run: pb.WatchRunResponse, outputs: list[tuple[float, float, bool, float]]
) -> None:
    """One output per job of the run, in job order: (latency_ms, cost_usd, cached, memory_mib), item score 0.5."""
    jobs = await jobs_of(db, run.run.id)

    async def work(conn: AsyncConnection) -> None:
        rows = [
            job_store.output_tuple(
                job_id=job["id"],
                tenant="t1",
                run_id=run.run.id,
                output=item_pb2.Response(content="a", memory_mib=memory).SerializeToString(),
                latency_ms=latency,
                cost_usd=cost,
                item_score=0.5,
                cached=cached,
            )
            for job, (latency, cost, cached, memory) in zip(jobs, outputs, strict=False)
        ]
        await job_store.store_outputs(conn, rows)

    await db.transact(work)


async def test_an_aggregate_reads_its_own_runs_outputs_only(db: Database) -> None:
    """A run's aggregate is built in the writer's transaction when it ends: its output figures must
    cost its own outputs, not every output in the database (`outputs` has no run_id index; read by
    run_id, every run's end scanned the whole table)."""
    await unanalyzed(db, "outputs", "jobs")
    big, small = await insert(db, new_run(items=3_000), new_run(items=3))
    await store_outputs(db, big, [(1.0, 0.01, False, 0.0)] * 3_000)
    await store_outputs(db, small, [(10.0, 0.5, False, 64.0), (30.0, 0.25, True, 0.0), (20.0, 1.0, False, 128.0)])

    async with db.read() as conn:
        inputs = (await run_store.aggregate_inputs(conn, [small.run.id]))[small.run.id]
        sql, parameters = bulk.in_driver_style(conn, run_store.OUTPUT_FIGURES_SQL), (small.run.id,)
        if conn.dialect.name == "postgresql":
            plan = (await conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, parameters)).scalar_one()
            # A node's rows read: those it returned and those its filter dropped.
            nodes = plan_nodes(plan)
            visited = max(int(node["Actual Rows"]) + int(node.get("Rows Removed by Filter", 0)) for node in nodes)
            assert visited <= 3, f"the aggregate of a run of 3 outputs read {visited} rows in one step"
        else:
            steps = [row[-1] for row in await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, parameters)]
            assert not [step for step in steps if step.startswith("SCAN")], steps

    assert sorted(inputs.latencies) == [10.0, 20.0, 30.0]
    assert inputs.item_scores == [0.5, 0.5, 0.5]
    assert (inputs.target_cost_usd, inputs.cached_outputs, inputs.target_cost_saved_usd) == (1.5, 1, 0.25)
    assert sorted(inputs.memory_mib) == [64.0, 128.0]  # outputs that reported none are left out


async def test_a_claim_leases_each_runs_quota_of_its_oldest_claimable_jobs(db: Database) -> None:
    """One claim over several runs (one statement on SQLite, one per run on PostgreSQL): each run gives
    at most its quota, oldest jobs first, never a job already leased."""
    a, b, c = await insert(db, new_run(items=3), new_run(items=2), new_run(items=2))
    first = await claim(db, {a.run.id: 2, b.run.id: 5, c.run.id: 1}, "c1")
    second = await claim(db, {a.run.id: 2, b.run.id: 5, c.run.id: 1}, "c2")

    ids = {run.run.id: [j["id"] for j in await jobs_of(db, run.run.id)] for run in (a, b, c)}
    assert first == sorted([*ids[a.run.id][:2], *ids[b.run.id], ids[c.run.id][0]])
    assert second == sorted([ids[a.run.id][2], ids[c.run.id][1]])
    assert await claim(db, {a.run.id: 1, b.run.id: 1, c.run.id: 1}, "c3") == []


async def test_a_claim_over_more_runs_than_one_statement_takes_leases_them_all(db: Database) -> None:
    runs = await insert(db, *(new_run(items=1) for _ in range(job_store.CLAIM_RUNS + 3)))
    leased = await claim(db, {run.run.id: 1 for run in runs}, "c1")
    assert len(leased) == len(runs)


async def test_a_claim_of_9000_jobs_is_completed_in_full(db: Database) -> None:
    """`--claim-batch` is the jobs a recording completes at once. On PostgreSQL one statement for all
    of them exceeded the stack depth limit from ~8,000: the recording failed, and its jobs ran again
    when their leases expired, for ever."""
    (run,) = await insert(db, new_run(items=9_000))
    leased = await claim(db, {run.run.id: 9_000}, "c1")
    completed = await db.transact(lambda conn: job_store.complete(conn, [(job_id, "c1") for job_id in leased]))
    assert completed == set(leased) and len(leased) == 9_000
    assert {j["state"] for j in await jobs_of(db, run.run.id)} == {JOB_DONE}


async def test_a_claim_locks_only_the_jobs_it_takes_so_another_replica_takes_the_rest(db: Database) -> None:
    """Replicas claim the same runs at once on PostgreSQL, each skipping jobs the others hold. A claim
    that locked more jobs than it took (both ranges of a run's share up to the share, when some leases
    had expired) left another replica's claim empty while claimable jobs waited, until its commit."""
    if db.writer.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only: SQLite has one writer at a time, so no claim runs beside another")
    (run,) = await insert(db, new_run(items=10))
    rid = run.run.id
    expired = await claim_at(db, {rid: 5}, "crashed", time.time() - 100)  # a replica that died
    async with db.writer.connect() as first, db.writer.connect() as second:
        mine = await job_store.claim(first, owner="a", claim_id="a", quotas={rid: 5}, now=time.time(), lease_ttl_s=60)
        theirs = await job_store.claim(
            second, owner="b", claim_id="b", quotas={rid: 5}, now=time.time(), lease_ttl_s=60
        )
        await first.commit()
        await second.commit()
    assert sorted(job.id for job in mine) == expired  # the expired leases first
    assert len(theirs) == 5 and not {job.id for job in theirs} & set(expired)


async def test_cancel_jobs_stops_the_runs_unfinished_jobs_and_fences_out_their_claims(db: Database) -> None:
    run, other = await insert(db, new_run(items=4), new_run(items=2))
    leased = await claim(db, {run.run.id: 2, other.run.id: 1}, "c1")
    done_id = leased[0]
    assert await db.transact(lambda conn: job_store.complete(conn, [(done_id, "c1")])) == {done_id}

    await db.transact(lambda conn: run_store.cancel_jobs(conn, "t2", run.run.id))  # another tenant: nothing
    assert [j["state"] for j in await jobs_of(db, run.run.id)] == [JOB_DONE, JOB_LEASED, JOB_QUEUED, JOB_QUEUED]

    await db.transact(lambda conn: run_store.cancel_jobs(conn, "t1", run.run.id))

    jobs = await jobs_of(db, run.run.id)
    assert [j["state"] for j in jobs] == [JOB_DONE, JOB_CANCELLED, JOB_CANCELLED, JOB_CANCELLED]
    assert all(j["claim_id"] is None for j in jobs)
    assert await db.transact(lambda conn: job_store.complete(conn, [(leased[1], "c1")])) == set()
    assert [j["state"] for j in await jobs_of(db, other.run.id)] == [JOB_LEASED, JOB_QUEUED]
    async with db.read() as conn:
        claimable = await run_store.claimable_runs(conn, time.time())
    assert claimable == [("t1", other.run.id)]


# -------------------------------------------------------------------------------------- aggregates


def output_row(job_id: int, run_id: str, *, latency: float, cost: float, score: float | None, **more: Any) -> tuple:
    cached = more.pop("cached", False)
    values = {
        "job_id": job_id,
        "tenant": "t1",
        "run_id": run_id,
        "output": item_pb2.Response(content="out", **more).SerializeToString(),
        "latency_ms": latency,
        "cost_usd": cost,
        "item_score": score,
        "cached": cached,
    }
    return tuple(values[c] for c in job_store.OUTPUT_COLUMNS)


def result_row(job_id: int, run_id: str, grader: str, state: int, score: float, **more: Any) -> tuple:
    values = {
        "id": job_id * 1024 + (0 if grader == "exact" else 1),
        "tenant": "t1",
        "run_id": run_id,
        "job_id": job_id,
        "item_id": f"item{job_id}",
        "repetition": 1,
        "grader": grader,
        "state": state,
        "score": score,
        "raw_score": score,
        "explanation": "",
        "error_reason": "",
        "attempt": 1,
        "cost_usd": 0.0,
        "latency_ms": 0.0,
        "complete_time": 0.0,
        "scoring_cost_usd": more.get("scoring_cost_usd", 0.0),
        "confidence": None,
        "cached": False,
        "verdict_cached": more.get("verdict_cached", False),
        "human_verdict": more.get("human_verdict"),
    }
    return tuple(values[c] for c in run_store.RESULT_COLUMNS)


async def test_aggregate_inputs_gathers_each_runs_own_results_and_outputs(db: Database) -> None:
    a, b, empty = await insert(db, new_run(), new_run(), new_run())
    passed, failed = run_pb2.RESULT_STATE_PASSED, run_pb2.RESULT_STATE_FAILED

    async def record(conn: AsyncConnection) -> None:
        await job_store.store_outputs(
            conn,
            [
                output_row(1, a.run.id, latency=10.0, cost=0.5, score=1.0, memory_mib=64.0),
                output_row(2, a.run.id, latency=30.0, cost=0.25, score=None, cached=True),
                output_row(3, b.run.id, latency=5.0, cost=1.0, score=0.5),
            ],
        )
        await run_store.insert_results(
            conn,
            [
                result_row(1, a.run.id, "exact", passed, 1.0),
                result_row(1, a.run.id, "judge", passed, 0.75, scoring_cost_usd=0.1),
                result_row(2, a.run.id, "exact", passed, 0.5),
                result_row(2, a.run.id, "judge", failed, 0.0, scoring_cost_usd=0.2, verdict_cached=True),
                result_row(3, b.run.id, "exact", failed, 0.0),
            ],
        )

    await db.transact(record)
    async with db.read() as conn:
        inputs = await run_store.aggregate_inputs(conn, [a.run.id, b.run.id, empty.run.id])

    assert set(inputs) == {a.run.id, b.run.id, empty.run.id}
    per_grader = {
        (col(r, "grader"), col(r, "state")): (
            col(r, "n"),
            col(r, "score_sum"),
            col(r, "scoring_cost"),
            col(r, "scoring_saved"),
            col(r, "verdict_hits"),
        )
        for r in inputs[a.run.id].grader_tallies
    }
    assert per_grader == {
        ("exact", passed): (2, 1.5, 0.0, 0.0, 0),
        ("judge", passed): (1, 0.75, 0.1, 0.0, 0),
        ("judge", failed): (1, 0.0, 0.0, 0.2, 1),
    }
    first = inputs[a.run.id]
    assert sorted(first.latencies) == [10.0, 30.0] and first.item_scores == [1.0] and first.memory_mib == [64.0]
    assert (first.target_cost_usd, first.cached_outputs, first.target_cost_saved_usd) == (0.5, 1, 0.25)
    second = inputs[b.run.id]
    assert [(col(r, "grader"), col(r, "state"), col(r, "n")) for r in second.grader_tallies] == [("exact", failed, 1)]
    assert (second.latencies, second.target_cost_usd, second.item_scores) == ([5.0], 1.0, [0.5])
    assert inputs[empty.run.id] == run_store.AggregateInputs([], [], 0.0, [], [])


async def test_a_results_page_reads_only_its_own_rows_however_large_the_run(db: Database) -> None:
    """Paging through a large run's results must cost each page its own rows. The page was the run's
    results after the position, sorted by id: every page read and sorted every later result of the
    run, on both engines (52 ms a page of 100 at the start of a 200,000-result run on SQLite, 83 ms on
    PostgreSQL; now 6 and 12), so reading a run page by page was quadratic in its size. And it must not
    join every later result with its output (PostgreSQL, with statistics taken before the run's
    inserts, did). Results of every state, so the page merges the states' index ranges."""
    (run,) = await insert(db, new_run(items=3000))
    job_ids = [col(job, "id") for job in await jobs_of(db, run.run.id)]
    states = [run_pb2.RESULT_STATE_PASSED, run_pb2.RESULT_STATE_FAILED, run_pb2.RESULT_STATE_ERROR]

    async def record(conn: AsyncConnection) -> None:
        await job_store.store_outputs(
            conn, [output_row(j, run.run.id, latency=1.0, cost=0.0, score=1.0) for j in job_ids]
        )
        rows = [result_row(j, run.run.id, "exact", states[n % 3 if n % 7 else 0], 1.0) for n, j in enumerate(job_ids)]
        await run_store.insert_results(conn, rows)

    await unanalyzed(db, "results", "outputs")
    await db.transact(record)

    after = job_ids[999] * 1024
    failed = [j for n, j in enumerate(job_ids) if n > 999 and n % 7 and n % 3 == 1]
    async with db.read() as conn:
        page = await run_store.results_page(conn, "t1", run.run.id, after_id=after, limit=50, states=[])
        assert [col(result, "job_id") for result, _ in page] == job_ids[1000:1050]
        assert all(
            size.output is not None and size.output > 0 for _, size in page
        )  # their outputs' sizes, not the outputs
        only = await run_store.results_page(conn, "t1", run.run.id, after_id=after, limit=50, states=[states[1]])
        assert [col(result, "job_id") for result, _ in only] == failed[:50]
        triage = [j for n, j in enumerate(job_ids) if n > 999 and n % 7 and n % 3 in (1, 2)]
        two = await run_store.results_page(conn, "t1", run.run.id, after_id=after, limit=50, states=states[:0:-1])
        assert [col(result, "job_id") for result, _ in two] == triage[:50]  # any of the states, in id order
        for wanted in ([], [states[1]], states[1:]):
            query = run_store.results_page_query("t1", run.run.id, after_id=after, limit=50, states=wanted)
            sql = str(query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
            if conn.dialect.name == "postgresql":
                plan = (await conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + sql)).scalar_one()
                visited = [node["Actual Rows"] for node in plan_nodes(plan) if node.get("Relation Name") == "results"]
                assert visited and max(visited) <= 50, visited  # it read 2,000 of them, and sorted them
            else:
                steps = [row[-1] for row in await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)]
                searches = [step for step in steps if "SEARCH results" in step]
                assert searches and all("state=? AND id>?" in step for step in searches), steps


async def test_a_claim_and_the_look_for_claimable_runs_read_only_what_they_take_however_large_the_run(
    db: Database,
) -> None:
    """Near the end of a large run most of its jobs are done. A claim, and the look for runs with
    claimable jobs before it, must cost the jobs they take, not the jobs the run has: both read every
    job of the run (and the claim sorted them), ~70 ms of the one SQLite writer per claim of a
    200,000-job run, while every other tenant's writes waited. On PostgreSQL with the statistics of
    a fresh table, as during a large run until autovacuum's first ANALYZE."""
    await unanalyzed(db, "jobs")
    (run,) = await insert(db, new_run(items=20_000))
    leased = await claim(db, {run.run.id: 10_100}, "c1")
    await db.transact(lambda conn: job_store.complete(conn, [(job_id, "c1") for job_id in leased[:10_000]]))
    # Left: 100 jobs under a lease that has not expired, 9,900 queued.
    now = time.time()
    async with db.read() as conn:
        postgres = conn.dialect.name == "postgresql"
        claim_sql, parameters = job_store.claim_statement(
            [(run.run.id, 96)], postgres=postgres, owner="test", claim_id="c2", now=now, lease_ttl_s=60
        )
        look, look_parameters = run_store.CLAIMABLE_RUNS_SQL, run_store.claimable_runs_parameters(now)
        if postgres:
            visited = await _rows_visited(conn, bulk.in_driver_style(conn, claim_sql), parameters)
            assert visited <= 96 + 100, f"a claim of 96 jobs visited {visited} rows"
            assert await _rows_visited(conn, bulk.in_driver_style(conn, look), look_parameters) <= 100
        else:
            for sql, sql_parameters in ((claim_sql, parameters), (look, look_parameters)):
                searches = await _job_searches(conn, sql, sql_parameters)
                assert searches and all("(run_id=? AND state=?)" in step for step in searches), searches
    assert len(await claim(db, {run.run.id: 96}, "c2")) == 96


async def _rows_visited(conn: AsyncConnection, sql: str, parameters: tuple[Any, ...]) -> int:
    """The most rows any node of the statement's PostgreSQL plan produced or filtered out."""
    plan = (await conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, parameters)).scalar_one()
    return max(int(node["Actual Rows"]) + int(node.get("Rows Removed by Filter", 0)) for node in plan_nodes(plan))


async def _job_searches(conn: AsyncConnection, sql: str, parameters: tuple[Any, ...]) -> list[str]:
    """The steps of the statement's SQLite query plan that read more than one row of the jobs table by
    its id (the UPDATE's own lookup of each row it changes is one)."""
    steps = [row[-1] for row in await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, parameters)]
    reads = [step for step in steps if " jobs " in f"{step} " and ("SEARCH" in step or "SCAN" in step)]
    return [step for step in reads if "PRIMARY KEY (rowid=?)" not in step]


async def test_the_aggregate_of_a_large_run_is_read_in_turns(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished or cancelled run's aggregate parses each of its outputs (~35 ms for 100,000) inside
    the write: in turns (`evalsvc.turns.mapped`, tested there), so other calls are served meanwhile."""
    (run,) = await insert(db, new_run(items=3_000))
    leased = await claim(db, {run.run.id: 3_000}, "c1")

    async def record(conn: AsyncConnection) -> None:
        await job_store.complete(conn, [(job_id, "c1") for job_id in leased])
        output = item_pb2.Response(content="a", memory_mib=3.0).SerializeToString()
        await job_store.store_outputs(
            conn,
            [
                job_store.output_tuple(
                    job_id=job_id,
                    tenant="t1",
                    run_id=run.run.id,
                    output=output,
                    latency_ms=1.0,
                    cost_usd=0.0,
                    item_score=1.0,
                    cached=False,
                )
                for job_id in leased
            ],
        )

    await db.transact(record)
    parsed_in_turns = 0
    real_mapped = run_store.mapped

    async def counted(build: Any, parts: Any) -> Any:
        nonlocal parsed_in_turns
        built = await real_mapped(build, parts)
        parsed_in_turns += len(built)
        return built

    monkeypatch.setattr(run_store, "mapped", counted)
    async with db.read() as conn:
        inputs = await run_store.aggregate_inputs(conn, [run.run.id])
    assert parsed_in_turns == 3_000  # every output is parsed by `mapped`: a turn every YIELD_EVERY_S of them
    assert len(inputs[run.run.id].memory_mib) == 3_000


# ------------------------------------------------------------------------------------ listing runs


async def test_a_page_of_runs_reads_its_rows_in_index_order_from_its_time_range_either_way(db: Database) -> None:
    """ListRuns orders by (create_time, id) and filters time ranges: a page must read its LIMIT rows from the
    (tenant, create_time, id) index, oldest or newest first, not read and sort the tenant's runs (on the
    (tenant, id) index only, a page of last week's runs, oldest first, sorted all 3,000). A BASIC page does
    not read the definition (`spec`) or the annotations."""
    await unanalyzed(db, "runs")
    base = 1.7e9
    batch = [new_run(items=1) for _ in range(3_000)]
    for n, run in enumerate(batch):
        run.row["create_time"] = base + n * 60.0 if n % 2 else base + (n - 1) * 60.0  # pairs at one time: ties
    for start in range(0, len(batch), 500):  # one notification per run: PostgreSQL takes 1,664 in one SELECT
        await insert(db, *batch[start : start + 500])
    await insert(db, new_run("t2", items=1))
    by_time = sorted(batch, key=lambda run: (run.row["create_time"], run.row["id"]))
    week = [run.row["id"] for run in by_time if base + 1_000 * 60 <= run.row["create_time"] < base + 2_000 * 60]
    terms = parse_filter(
        f'create_time >= "{_shown(base + 1_000 * 60)}" AND create_time < "{_shown(base + 2_000 * 60)}"'
    )
    async with db.read() as conn:
        for newest_first in (False, True):
            wanted = run_store.RunsWanted(terms=terms, newest_first=newest_first, basic=True)
            expected = week[::-1] if newest_first else week
            listed: list[str] = []
            after: run_store.RunPosition | None = None
            while page := await run_store.list_sizes(conn, "t1", wanted, after=after, limit=400):
                listed += [run_id for (_, run_id), _ in page]
                after = page[-1][0]
            assert listed == expected  # every run of the range once, ties (one create_time) by id
            sql = str(
                run_store.list_sizes_query("t1", wanted, after=(base + 1_500 * 60, ""), limit=50).compile(
                    dialect=conn.dialect, compile_kwargs={"literal_binds": True}
                )
            )
            assert "spec" not in sql and "annotations" not in sql
            await _reads_in_index_order(conn, sql, "ix_runs_tenant_create_time", 51)


async def test_a_page_of_a_datasets_runs_reads_its_rows_in_index_order_either_way(db: Database) -> None:
    """ListRuns of one dataset (its `dataset_id`) pages the dataset's runs by (create_time, id): a page must
    read its LIMIT rows from the (tenant, dataset_id, create_time, id) index, not filter the tenant's other
    runs out of the time index (one run in ten the dataset's: ~10 rows read per row answered) nor sort the
    dataset's runs (on (tenant, dataset_id, id))."""
    await unanalyzed(db, "runs")
    batch = [new_run(items=1, dataset_id="ds_a" if n % 10 == 0 else "ds_b") for n in range(3_000)]
    for n, run in enumerate(batch):
        run.row["create_time"] = 1.7e9 + (n // 2) * 60.0  # pairs at one time: ties
    for start in range(0, len(batch), 500):
        await insert(db, *batch[start : start + 500])
    mine = sorted(
        (run for run in batch if run.row["dataset_id"] == "ds_a"),
        key=lambda run: (run.row["create_time"], run.row["id"]),
    )
    async with db.read() as conn:
        for newest_first in (False, True):
            wanted = run_store.RunsWanted(dataset_id="ds_a", newest_first=newest_first)
            listed: list[str] = []
            after: run_store.RunPosition | None = None
            while page := await run_store.list_sizes(conn, "t1", wanted, after=after, limit=40):
                listed += [run_id for (_, run_id), _ in page]
                after = page[-1][0]
            expected = [run.row["id"] for run in mine]
            assert listed == (expected[::-1] if newest_first else expected)
            middle = mine[150].row
            sql = str(
                run_store.list_sizes_query("t1", wanted, after=(middle["create_time"], middle["id"]), limit=50).compile(
                    dialect=conn.dialect, compile_kwargs={"literal_binds": True}
                )
            )
            await _reads_in_index_order(conn, sql, "ix_runs_tenant_dataset_create_time", 51)


async def _reads_in_index_order(conn: AsyncConnection, sql: str, index: str, most: int) -> None:
    """That the statement reads its rows in order from `index`: on PostgreSQL no step visits more than `most`
    rows and none sorts; on SQLite the plan searches `index` and neither scans nor sorts."""
    if conn.dialect.name == "postgresql":
        plan = (await conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + sql)).scalar_one()
        nodes = plan_nodes(plan)
        visited = max(int(node["Actual Rows"]) + int(node.get("Rows Removed by Filter", 0)) for node in nodes)
        assert visited <= most and not [n for n in nodes if n["Node Type"] == "Sort"], nodes
    else:
        steps = [row[-1] for row in await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)]
        assert any(index in step for step in steps), steps
        assert not [step for step in steps if "TEMP B-TREE" in step or step.startswith("SCAN")], steps


def _shown(seconds: float) -> str:
    """A time as the API shows it (RFC 3339)."""
    shown = timestamp(seconds)
    assert shown is not None
    return shown.ToJsonString()
