"""Grading never blocks the event loop: big outputs are graded in worker processes under a time limit,
regex patterns are RE2's, and the loop's lag is a metric."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from evalsvc.graders import compile_grader
from evalsvc.graders.pool import INLINE_LIMIT_CHARS, FairSlots, GradingPool, offloads
from evalsvc.metrics import Metrics
from evalsvc.server import EvalServer
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import (
    eval_run_service_pb2_grpc,
    grader_pb2,
    grader_service_pb2,
    grader_service_pb2_grpc,
    item_pb2,
    run_pb2,
    target_pb2,
)
from tests.conftest import make_settings
from tests.helpers import all_results, create_request, error_reason, keyed_channel, violations, watch_all
from tests.test_observability import scrape

SIMILARITY = grader_pb2.Grader(name="similar", similarity=grader_pb2.Similarity(threshold=0.5))


def big_json(n: int, shift: int = 0) -> str:
    """A JSON array of n numbers: similarity over two of these is quadratic in their length."""
    return json.dumps(list(range(shift, n + shift)))


def output(content: str) -> item_pb2.Response:
    return item_pb2.Response(content=content)


# ------------------------------------------------------------------------------------- the pool


async def test_a_big_grading_goes_to_a_worker_and_grades_as_inline_would() -> None:
    grader = compile_grader(SIMILARITY)
    item = item_pb2.Item(expected_output=big_json(3000))
    out = output(big_json(3000, shift=1))
    assert offloads(grader, item, out)
    assert not offloads(grader, item_pb2.Item(expected_output="x"), output("y" * (INLINE_LIMIT_CHARS - 1)))
    assert not offloads(compile_grader(grader_pb2.Grader(latency=grader_pb2.Latency(max_ms=1))), item, out)
    pool = GradingPool(1, timeout_s=60.0, metrics=Metrics())
    try:
        assert await pool.grade("t", grader, item, out) == grader.grade(item, out)
    finally:
        await pool.close()


async def test_a_grading_over_the_time_limit_is_grader_timeout_and_its_worker_is_killed() -> None:
    """The runaway computation is bounded by the limit: its process is killed, not left running."""
    metrics = Metrics()
    pool = GradingPool(1, timeout_s=0.3, metrics=metrics)
    grader = compile_grader(SIMILARITY)
    runaway = item_pb2.Item(expected_output=big_json(60_000))  # ~7 s of similarity on an idle core
    try:
        quick = await pool.grade("t", grader, item_pb2.Item(expected_output=big_json(3000)), output(big_json(3000)))
        [worker] = pool._idle
        started = time.perf_counter()
        grade = await pool.grade("t", grader, runaway, output(big_json(60_000, shift=1)))
        assert time.perf_counter() - started < 3.0
        assert grade.state == run_pb2.RESULT_STATE_ERROR
        assert grade.error_reason.startswith("GRADER_TIMEOUT")
        assert worker.process.returncode is not None  # killed and reaped
        assert metrics.grader_timeouts.labels("similarity")._value.get() == 1
        # The next grading gets a fresh worker and the same answer as before.
        again = await pool.grade("t", grader, item_pb2.Item(expected_output=big_json(3000)), output(big_json(3000)))
        assert again == quick and pool._idle[0] is not worker
    finally:
        await pool.close()


async def test_a_cancelled_grading_kills_its_worker() -> None:
    pool = GradingPool(1, timeout_s=60.0, metrics=Metrics())
    grader = compile_grader(SIMILARITY)
    try:
        await pool.grade("t", grader, item_pb2.Item(expected_output=big_json(3000)), output(big_json(3000)))
        [worker] = pool._idle
        grading = asyncio.create_task(
            pool.grade("t", grader, item_pb2.Item(expected_output=big_json(60_000)), output(big_json(60_000, 1)))
        )
        while pool._idle:  # until the grading has taken the worker
            await asyncio.sleep(0.01)
        grading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await grading
        await asyncio.wait_for(worker.process.wait(), 10.0)
        assert worker.process.returncode is not None
    finally:
        await pool.close()


async def test_free_slots_go_to_waiting_tenants_in_turn() -> None:
    """Tenant A queues four gradings, then tenant B one: B's goes second, not fifth."""
    slots = FairSlots(1)
    await slots.acquire("a")  # busy, so everything below waits
    order: list[str] = []

    async def grading(tenant: str, label: str) -> None:
        await slots.acquire(tenant)
        order.append(label)
        slots.release()

    waiting = [asyncio.create_task(grading("a", f"a{i}")) for i in range(4)]
    await asyncio.sleep(0)  # A's four are queued before B arrives
    waiting.append(asyncio.create_task(grading("b", "b0")))
    await asyncio.sleep(0)
    slots.release()
    await asyncio.gather(*waiting)
    assert order == ["a0", "b0", "a1", "a2", "a3"]


async def test_a_cancelled_waiter_gives_up_its_place_without_losing_a_slot() -> None:
    slots = FairSlots(1)
    await slots.acquire("a")
    gone = asyncio.create_task(slots.acquire("b"))
    await asyncio.sleep(0)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    slots.release()
    await asyncio.wait_for(slots.acquire("c"), 5)  # the slot came back, not to the cancelled waiter


# ----------------------------------------------------------------------------- RE2 at the edge


async def test_a_pattern_re2_cannot_run_is_invalid_argument_at_create_run_and_create_grader(channel) -> None:
    runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
    lookahead = grader_pb2.Grader(name="re", regex=grader_pb2.Regex(pattern=r"^(?=.*\d)\w+$"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await runs.CreateRun(create_request(1, graders=[lookahead]))
    assert (
        refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(refused.value) == "INVALID_ARGUMENT"
    )
    assert "lookahead (?=...) is not supported" in violations(refused.value)["graders[0].regex.pattern"]

    graders = grader_service_pb2_grpc.GraderServiceStub(channel)
    backreference = grader_pb2.Grader(regex=grader_pb2.Regex(pattern=r"(\w)\1"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await graders.CreateGrader(
            grader_service_pb2.CreateGraderRequest(grader=grader_service_pb2.SavedGrader(grader=backreference))
        )
    assert "backreference \\1 is not supported" in violations(refused.value)["grader.grader.regex.pattern"]


# --------------------------------------------------------------- one tenant's load, another's calls


async def test_a_pathological_run_grades_while_another_tenant_stays_responsive(tmp_path: Path) -> None:
    """Tenant A's outputs take seconds each to grade by similarity (they would stall every RPC for
    that long if graded on the loop); tenant B's GetRun and health checks answer quickly meanwhile."""
    srv = EvalServer(make_settings(tmp_path, metrics_addr="127.0.0.1:0", grade_timeout_s=120.0))
    await srv.start()
    try:
        assert srv.bootstrap_key
        b_key, _ = await srv.keys.create("tenant-b")
        async with keyed_channel(srv.port, srv.bootstrap_key) as a_channel, keyed_channel(srv.port, b_key) as b_channel:
            a_runs = eval_run_service_pb2_grpc.EvalRunServiceStub(a_channel)
            b_runs = eval_run_service_pb2_grpc.EvalRunServiceStub(b_channel)
            health = health_pb2_grpc.HealthStub(b_channel)
            b_run = (await b_runs.CreateRun(create_request(1))).run
            items = [
                item_pb2.Item(
                    id=f"big-{i}",
                    expected_output=big_json(40_000),
                    response=item_pb2.Response(content=big_json(40_000, shift=i + 1)),
                )
                for i in range(4)
            ]
            a_run = (
                await a_runs.CreateRun(
                    pb.CreateRunRequest(
                        items=items,
                        target=target_pb2.Target(provided=target_pb2.ProvidedTarget()),
                        graders=[SIMILARITY, grader_pb2.Grader(name="json", json_match=grader_pb2.JsonMatch())],
                    )
                )
            ).run
            a_done = asyncio.create_task(watch_all(a_runs, a_run.id))
            slowest = 0.0
            calls = 0
            deadline = time.monotonic() + 300
            while not a_done.done() and time.monotonic() < deadline:
                started = time.perf_counter()
                got = await b_runs.GetRun(pb.GetRunRequest(run_id=b_run.id))
                checked = await health.Check(health_pb2.HealthCheckRequest())
                slowest = max(slowest, time.perf_counter() - started)
                calls += 1
                assert got.run.id == b_run.id
                assert checked.status == health_pb2.HealthCheckResponse.SERVING
            events = await a_done
            assert events[-1].run.status == run_pb2.RUN_STATUS_SUCCEEDED
            assert calls >= 10, "tenant A's run ended before tenant B's calls could overlap with it"
            assert slowest < 1.5, f"tenant B waited {slowest:.2f} s for a GetRun + health check"
            results = await all_results(a_runs, a_run.id)
            assert len(results) == 8 and all(r.state != run_pb2.RESULT_STATE_ERROR for r in results)
            samples = await scrape(srv.metrics_port)
            assert samples[("evalsvc_event_loop_lag_seconds_count", frozenset())] > 0
    finally:
        await srv.stop(grace=0.5)


async def test_an_output_over_the_grading_time_limit_is_grader_timeout_and_the_run_ends(tmp_path: Path) -> None:
    srv = EvalServer(make_settings(tmp_path, grade_timeout_s=0.3))
    await srv.start()
    try:
        async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
            runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            items = [
                item_pb2.Item(id="runaway", expected_output=big_json(60_000), response=output(big_json(60_000, 1))),
                item_pb2.Item(id="small", expected_output="same", response=output("same")),
            ]
            request = create_request(items=items, graders=[SIMILARITY])
            run = (await runs.CreateRun(request)).run
            events = await asyncio.wait_for(watch_all(runs, run.id), 120)
            results = {r.item_id: r for r in await all_results(runs, run.id)}
    finally:
        await srv.stop(grace=0.5)
    assert events[-1].run.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert results["runaway"].state == run_pb2.RESULT_STATE_ERROR
    assert results["runaway"].error_reason.startswith("GRADER_TIMEOUT")
    assert results["small"].state == run_pb2.RESULT_STATE_PASSED
