"""The grading pool: big gradings run in worker processes under a time limit (tenants take free
processes in turn: tests/unit/test_slots.py). Worker processes, no network and no server."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from evalsvc.graders import builtin, compile_grader
from evalsvc.graders.pool import GradingPool, may_offload, offloads
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
    assert not offloads(grader, item_pb2.Item(expected_output="x"), output("y" * 16_000))
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
    big = item_pb2.Item(expected_output="x" * 16_000, response=output("y" * 16_000))
    small = item_pb2.Item(expected_output="x")
    assert may_offload([latency, text], [small, big])
    assert not may_offload([text], [small])
    assert not may_offload([latency], [big])


# What the probe found stalling every tenant: valid configs that are expensive on moderate (16 KB) text.
HEAVY_PATTERN = "(?s)(.{1000}|x)(.{1000}|y)(.{1000}|z)(.{1000}|w)"  # 80-100 ms per 16 KB output inline
MODERATE = ("ab" * 8000)[:15_900]


def test_an_expensive_grader_is_offloaded_on_moderate_text_and_an_ordinary_one_is_not() -> None:
    """The grader's own cost counts, not only the text's size: a heavy RE2 program or tens of thousands
    of `contains` values go to a worker on a 16 KB output, ordinary configs stay inline."""
    item, out = item_pb2.Item(input="q"), output(MODERATE)
    heavy_regex = compile_grader(grader_pb2.Grader(regex=grader_pb2.Regex(pattern=HEAVY_PATTERN)))
    many_values = compile_grader(
        grader_pb2.Grader(contains=grader_pb2.Contains(values=[f"v{i:05d}" for i in range(28_000)]))
    )
    for heavy in (heavy_regex, many_values):
        assert offloads(heavy, item, out), heavy.kind
        assert may_offload([heavy], [item_pb2.Item(response=out)]), heavy.kind
    # Many values cost on any text: each is one search.
    assert offloads(many_values, item, output("short"))
    # Long values on a short text: a search compares a value's length at each place (350 values of 1,250
    # characters on 2,499 took 93 ms, estimated at 0.9 ms by the values' count alone).
    long_values = compile_grader(
        grader_pb2.Grader(contains=grader_pb2.Contains(values=["a" * 624 + "b" + "a" * 625] * 350))
    )
    assert offloads(long_values, item, output("a" * 2499))
    # An item's own expected tool calls are read too (200,000 names took 73 ms, estimated at nothing).
    by_item = compile_grader(grader_pb2.Grader(tool_calls=grader_pb2.ToolCalls()))
    assert offloads(by_item, item_pb2.Item(expected_tool_calls=[f"t{i}" for i in range(200_000)]), output(""))
    assert not offloads(by_item, item_pb2.Item(expected_tool_calls=["search", "book"]), output(""))
    ordinary = [
        compile_grader(grader_pb2.Grader(regex=grader_pb2.Regex(pattern=r"\d{3}-\d{4}"))),
        compile_grader(grader_pb2.Grader(contains=grader_pb2.Contains(values=["fox", "dog"], case_insensitive=True))),
        compile_grader(grader_pb2.Grader(exact_match=grader_pb2.ExactMatch(case_insensitive=True))),
        compile_grader(grader_pb2.Grader(json_match=grader_pb2.JsonMatch())),
        compile_grader(SIMILARITY),
    ]
    small = output("The quick brown fox 555-1234 jumps over the lazy dog. " * 20)  # ~1 KB
    for grader in ordinary:
        assert not offloads(grader, item_pb2.Item(expected_output="the quick brown fox"), small), grader.kind
        assert not may_offload([grader], [item_pb2.Item(expected_output="x", response=small)]), grader.kind


def test_a_heavy_per_item_pattern_is_offloaded_and_not_compiled_on_the_loop() -> None:
    """Per-item patterns: a plain one is compiled on the loop (and then its program size counts); one
    RE2 may take tens of milliseconds to compile, or to refuse as too large, goes to a worker uncompiled."""
    per_item = compile_grader(grader_pb2.Grader(regex=grader_pb2.Regex()))
    out = output(MODERATE)
    assert offloads(per_item, item_pb2.Item(expected_output=HEAVY_PATTERN), out)
    assert may_offload(
        [per_item],
        [item_pb2.Item(expected_output="ab", response=out), item_pb2.Item(expected_output=HEAVY_PATTERN, response=out)],
    )
    assert not offloads(per_item, item_pb2.Item(expected_output=r"(ab)+"), output("ab" * 200))
    # A run of per-item patterns is told "may offload" without compiling any of them on the loop: asking
    # each item's estimate compiled every pattern (100,000 items of ~0.3 ms patterns held it ~27 s).
    builtin._compile_item_pattern.cache_clear()
    many = [item_pb2.Item(expected_output=rf"(\w\w\w\w){{8}}{i}", response=output("ab")) for i in range(200)]
    assert may_offload([per_item], many)
    assert builtin._compile_item_pattern.cache_info().misses == 0
    assert not may_offload([per_item], [item_pb2.Item(response=output("ab"))])  # no item has a pattern
    too_large = r"\pL{1000}"  # 42 ms for RE2 to refuse, with the default max_mem
    started = time.perf_counter()
    assert offloads(per_item, item_pb2.Item(expected_output=too_large), output("x"))
    assert builtin._compile_item_pattern.cache_info().misses == 0  # never compiled on the loop
    assert time.perf_counter() - started < 0.5  # generous: the assertion above is the point
    # Plain by its text but large once expanded (16.8 ms under RE2's default memory): compiled on the loop
    # only within the small bound, where RE2 refuses it quickly; the worker compiles it in full.
    expands = "(" + "\\W" * 60 + "){64}"
    assert builtin.plain_pattern(expands)
    assert offloads(per_item, item_pb2.Item(expected_output=expands), output("x"))
    assert per_item.grade(item_pb2.Item(expected_output=expands), output("x")).state == run_pb2.RESULT_STATE_FAILED
    # Graded (in a worker, as it would be), it is the item's ERROR, as before.
    grade = per_item.grade(item_pb2.Item(expected_output=too_large), output("x"))
    assert grade.state == run_pb2.RESULT_STATE_ERROR and "too large" in grade.error_reason


async def test_an_expensive_grading_offloaded_runs_in_a_worker_under_the_time_limit() -> None:
    """The heavy pattern is graded by a worker, where the time limit applies (a tiny one here)."""
    pool = GradingPool(1, timeout_s=0.001, metrics=Metrics())
    grader = compile_grader(grader_pb2.Grader(regex=grader_pb2.Regex(pattern=HEAVY_PATTERN)))
    try:
        grade = await pool.grade("t", grader, item_pb2.Item(), output(MODERATE * 4))
    finally:
        await pool.close()
    assert grade.state == run_pb2.RESULT_STATE_ERROR and grade.error_reason.startswith("GRADER_TIMEOUT")


async def test_a_worker_that_died_between_gradings_is_replaced_and_fails_no_grading() -> None:
    """An idle worker killed (as the kernel's OOM killer would) made the next grading ERROR
    GRADER_CRASHED, for nothing of its own (a probe). The dead worker is reaped and replaced before it is
    used: the next grading grades."""
    pool = GradingPool(1, timeout_s=60.0, metrics=Metrics())
    grader = compile_grader(SIMILARITY)
    item, out = item_pb2.Item(expected_output=big_json(3000)), output(big_json(3000))
    try:
        expected = await pool.grade("t", grader, item, out)
        [worker] = pool._idle
        worker.process.kill()
        await worker.process.wait()  # the loop has heard of its exit
        assert await pool.grade("t", grader, item, out) == expected
        [replacement] = pool._idle
        assert replacement is not worker and replacement.alive
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
