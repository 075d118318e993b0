"""Grading never blocks the event loop, end to end: a pathological run grades while another tenant stays
responsive, regex patterns are RE2's at the API, and the loop's lag is a metric (the pool itself:
tests/unit/test_grading_pool.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

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
from tests.unit.test_grading_pool import HEAVY_PATTERN, MODERATE, SIMILARITY, big_json, output

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


async def test_an_expensive_grader_on_moderate_outputs_is_graded_in_a_worker(tmp_path: Path) -> None:
    """What a grading costs counts, not only its text's size: a valid RE2 pattern that is slow to search
    (80-100 ms per 16 KB output) and a `contains` grader with 28k values both run in a worker, so they
    meet the worker's time limit (tiny here: GRADER_TIMEOUT says where they ran) instead of holding the
    event loop; an ordinary grader in the same run is graded inline as before."""
    srv = EvalServer(make_settings(tmp_path, grade_timeout_s=0.001))
    await srv.start()
    try:
        async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
            runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            items = [item_pb2.Item(id=f"i{i}", input="q", response=output(MODERATE)) for i in range(3)]
            graders = [
                grader_pb2.Grader(name="re", regex=grader_pb2.Regex(pattern=HEAVY_PATTERN)),
                grader_pb2.Grader(
                    name="many", contains=grader_pb2.Contains(values=[f"v{i:05d}" for i in range(28_000)])
                ),
                grader_pb2.Grader(name="exact", exact_match=grader_pb2.ExactMatch()),
            ]
            run = (await runs.CreateRun(create_request(items=items, graders=graders))).run
            events = await asyncio.wait_for(watch_all(runs, run.id), 120)
            results = await all_results(runs, run.id)
    finally:
        await srv.stop(grace=0.5)
    assert events[-1].run.status == run_pb2.RUN_STATUS_SUCCEEDED
    by_grader: dict[str, set[str]] = {}
    for result in results:
        by_grader.setdefault(result.grader, set()).add(result.error_reason.split(":")[0])
    assert by_grader == {"re": {"GRADER_TIMEOUT"}, "many": {"GRADER_TIMEOUT"}, "exact": {""}}
