"""The grading pool: big gradings run in worker processes under a time limit (tenants take free
processes in turn: tests/unit/test_slots.py). Worker processes, no network and no server."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from evalsvc.graders import compile_grader
from evalsvc.graders.pool import INLINE_LIMIT_CHARS, GradingPool, may_offload, offloads
from evalsvc.metrics import Metrics
from evalsvc.v1 import grader_pb2, item_pb2, run_pb2

SIMILARITY = grader_pb2.Grader(name="similar", similarity=grader_pb2.Similarity(threshold=0.5))


def big_json(n: int, shift: int = 0) -> str:
    """A JSON array of n numbers: similarity over two of these is quadratic in their length."""
    return json.dumps(list(range(shift, n + shift)))


def output(content: str) -> item_pb2.Response:
    return item_pb2.Response(content=content)


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


def test_a_run_may_offload_only_with_a_text_grader_and_an_item_over_the_limit() -> None:
    text, latency = compile_grader(SIMILARITY), compile_grader(grader_pb2.Grader(latency=grader_pb2.Latency(max_ms=1)))
    big, small = item_pb2.Item(expected_output="x" * INLINE_LIMIT_CHARS), item_pb2.Item(expected_output="x")
    assert may_offload([latency, text], [small, big])
    assert not may_offload([text], [small])
    assert not may_offload([latency], [big])


async def test_a_worker_that_died_between_gradings_is_grader_crashed_and_replaced() -> None:
    pool = GradingPool(1, timeout_s=60.0, metrics=Metrics())
    grader = compile_grader(SIMILARITY)
    item, out = item_pb2.Item(expected_output=big_json(3000)), output(big_json(3000))
    try:
        expected = await pool.grade("t", grader, item, out)
        [worker] = pool._idle
        await worker.kill()  # as the kernel's OOM killer would
        crashed = await pool.grade("t", grader, item, out)
        assert crashed.state == run_pb2.RESULT_STATE_ERROR and crashed.error_reason.startswith("GRADER_CRASHED")
        assert pool._idle == []  # the dead worker is not kept
        assert await pool.grade("t", grader, item, out) == expected
    finally:
        await pool.close()
    assert pool._idle == []


async def test_close_stops_the_idle_workers() -> None:
    pool = GradingPool(2, timeout_s=60.0, metrics=Metrics())
    grader = compile_grader(SIMILARITY)
    item, out = item_pb2.Item(expected_output=big_json(3000)), output(big_json(3000))
    await asyncio.gather(pool.grade("a", grader, item, out), pool.grade("b", grader, item, out))
    workers = list(pool._idle)
    assert len(workers) == 2
    await pool.close()
    assert all(worker.process.returncode is not None for worker in workers)
