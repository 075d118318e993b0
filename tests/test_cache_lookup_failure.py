"""A response-cache lookup the database cannot answer (a statement_timeout, lock_timeout or DBA cancel
on PostgreSQL, SQLITE_BUSY/IOERR on SQLite): a READ_WRITE run treats it as a miss and calls the target
and the judge; a REPLAY run hands the job back, and it runs again when its lease expires. No
error_reason ever holds the statement, its parameters, or another tenant's name or keys (one SELECT
serves every tenant's lookups of a moment, and the driver's message quotes them all)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import exc as sa_exc

from evalsvc.execution import cache
from evalsvc.server import EvalServer
from evalsvc.store import cache as cache_store
from evalsvc.v1 import cache_pb2, eval_run_service_pb2_grpc, grader_pb2, item_pb2, run_pb2, target_pb2
from evalsvc.v1 import eval_run_service_pb2 as pb
from tests.conftest import make_settings
from tests.dbs import USE_POSTGRES
from tests.fake_llm import FakeEndpoint, chat_reply, judge_reply
from tests.helpers import all_results, keyed_channel, watch_all

Mode = cache_pb2.CacheMode
LEAKS = ("SELECT", "cache_entries", "parameters", "[SQL", "tenant_b", "tenant-b")


def _driver_error(statement: str, params: Sequence[Any]) -> Exception:
    """What SQLAlchemy raises for a cancelled (PostgreSQL) or busy (SQLite) statement, quoting it."""
    if USE_POSTGRES:
        orig: Exception = asyncpg.exceptions.QueryCanceledError("canceling statement due to user request")
        return sa_exc.DBAPIError(statement, params, orig)
    orig = sqlite3.OperationalError("database is locked")
    orig.sqlite_errorname = "SQLITE_BUSY"  # type: ignore[attr-defined]
    return sa_exc.OperationalError(statement, params, orig)


def _failing_fetch(failures: list[int]) -> Any:
    """A `cache_store.fetch` that fails while `failures[0]` > 0, quoting every pair asked (as the driver does)."""
    real = cache_store.fetch

    async def fetch(conn: Any, keys: Sequence[tuple[str, str]]) -> Any:
        if failures[0] > 0:
            failures[0] -= 1
            statement = "SELECT cache_entries.tenant, cache_entries.key FROM cache_entries WHERE (tenant, key) IN ..."
            raise _driver_error(statement, [v for pair in keys for v in pair])
        return await real(conn, keys)

    return fetch


async def _start(tmp_path: Path, **overrides: object) -> EvalServer:
    srv = EvalServer(make_settings(tmp_path, outbound_allow="127.0.0.1", **overrides))
    await srv.start()
    return srv


def _request(llm_url: str, judge_url: str, mode: int, n: int = 3) -> pb.CreateRunRequest:
    endpoint = target_pb2.Endpoint(base_url=llm_url + "/v1", timeout_s=10)
    return pb.CreateRunRequest(
        items=[item_pb2.Item(id=f"i{i}", input=f"question {i}", expected_output="ok") for i in range(n)],
        target=target_pb2.Target(chat=target_pb2.ChatTarget(endpoint=endpoint, model="gpt-test")),
        graders=[
            grader_pb2.Grader(name="exact", exact_match=grader_pb2.ExactMatch()),
            grader_pb2.Grader(
                name="judge",
                llm_judge=grader_pb2.LlmJudge(
                    mode=grader_pb2.LlmJudge.MODE_ACCURACY,
                    model="judge-test",
                    endpoint=target_pb2.Endpoint(base_url=judge_url + "/v1"),
                ),
            ),
        ],
        cache_mode=mode,  # type: ignore[arg-type]
    )


async def _run(stub: eval_run_service_pb2_grpc.EvalRunServiceStub, request: pb.CreateRunRequest) -> Any:
    created = await stub.CreateRun(request)
    events = await watch_all(stub, created.run.id)
    return events[-1].run, await all_results(stub, created.run.id)


def _assert_no_leak(results: list[run_pb2.Result], run: run_pb2.Run) -> None:
    texts = [r.error_reason for r in results] + [r.explanation for r in results] + [run.error.message]
    for text in texts:
        for leak in LEAKS:
            assert leak not in text, (leak, text)


async def test_a_failed_lookup_is_a_miss_the_target_and_judge_are_called(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures = [10**6]  # every lookup fails
    monkeypatch.setattr(cache_store, "fetch", _failing_fetch(failures))
    srv = await _start(tmp_path)
    assert srv.bootstrap_key
    try:
        key_b, _ = await srv.keys.create("tenant_b")
        with FakeEndpoint(chat_reply("ok")) as llm, FakeEndpoint(judge_reply({"score": 9, "reason": "g"})) as judge:
            async with (
                keyed_channel(srv.port, srv.bootstrap_key) as channel_a,
                keyed_channel(srv.port, key_b) as channel_b,
            ):
                stub_a = eval_run_service_pb2_grpc.EvalRunServiceStub(channel_a)
                stub_b = eval_run_service_pb2_grpc.EvalRunServiceStub(channel_b)
                request = _request(llm.url, judge.url, Mode.CACHE_MODE_READ_WRITE)
                (run_a, results_a), (run_b, results_b) = await asyncio.gather(
                    _run(stub_a, request), _run(stub_b, request)
                )
            assert len(llm.seen) == 6 and len(judge.seen) == 6  # every lookup missed: both tenants' calls made
    finally:
        await srv.stop(grace=0.5)
    for run, results in ((run_a, results_a), (run_b, results_b)):
        assert run.status == run_pb2.RUN_STATUS_SUCCEEDED
        assert len(results) == 6
        assert all(r.state == run_pb2.RESULT_STATE_PASSED and not r.error_reason for r in results), results
        assert not any(r.cached or r.verdict_cached for r in results)
        _assert_no_leak(results, run)
    failed = srv.metrics.registry.get_sample_value
    assert failed("evalsvc_cache_lookups_total", {"kind": "output", "outcome": "failed"}) == 6
    assert failed("evalsvc_cache_lookups_total", {"kind": "verdict", "outcome": "failed"}) == 6


async def test_a_replay_whose_lookup_failed_runs_again_and_reads_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures = [0]
    monkeypatch.setattr(cache_store, "fetch", _failing_fetch(failures))
    srv = await _start(tmp_path, lease_ttl_s=1.0)
    assert srv.bootstrap_key
    try:
        with FakeEndpoint(chat_reply("ok")) as llm, FakeEndpoint(judge_reply({"score": 9, "reason": "g"})) as judge:
            async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
                stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
                await _run(stub, _request(llm.url, judge.url, Mode.CACHE_MODE_READ_WRITE))
                calls = (len(llm.seen), len(judge.seen))
                failures[0] = 1  # the replay's first lookup (all its jobs' output lookups) fails
                run, results = await _run(stub, _request(llm.url, judge.url, Mode.CACHE_MODE_REPLAY))
            assert (len(llm.seen), len(judge.seen)) == calls  # a replay makes no call
    finally:
        await srv.stop(grace=0.5)
    assert failures[0] == 0
    assert run.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert all(r.state == run_pb2.RESULT_STATE_PASSED and r.cached for r in results), results
    _assert_no_leak(results, run)


async def test_a_replay_whose_lookup_keeps_failing_errs_without_sql(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures = [0]
    monkeypatch.setattr(cache_store, "fetch", _failing_fetch(failures))
    srv = await _start(tmp_path, lease_ttl_s=0.5)
    assert srv.bootstrap_key
    try:
        with FakeEndpoint(chat_reply("ok")) as llm, FakeEndpoint(judge_reply({"score": 9, "reason": "g"})) as judge:
            async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
                stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
                await _run(stub, _request(llm.url, judge.url, Mode.CACHE_MODE_READ_WRITE, n=1))
                failures[0] = 10**6
                run, results = await _run(stub, _request(llm.url, judge.url, Mode.CACHE_MODE_REPLAY, n=1))
    finally:
        await srv.stop(grace=0.5)
    assert all(r.state == run_pb2.RESULT_STATE_ERROR for r in results)
    assert all(r.error_reason.startswith("CACHE_UNAVAILABLE: ") for r in results), results
    _assert_no_leak(results, run)


async def test_each_waiting_tenant_gets_an_error_naming_nothing_of_the_statement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_store, "fetch", _failing_fetch([1]))
    srv = await _start(tmp_path, workers=0)
    try:
        lookups = cache.ResponseCache(srv.db)
        got = await asyncio.gather(
            lookups.get("acme-corp", "k" * 64), lookups.get("tenant-b", "s" * 64), return_exceptions=True
        )
    finally:
        await srv.stop(grace=0.5)
    assert all(isinstance(e, cache.LookupFailed) and e.transient for e in got), got
    assert got[0] is not got[1]
    for e in got:
        assert "acme" not in str(e) and "tenant-b" not in str(e) and "k" * 64 not in str(e) and "SELECT" not in str(e)
        assert e.__cause__ is None and e.__context__ is None


def test_a_database_error_s_text_never_reaches_a_tenant() -> None:
    from evalsvc.graders import grader_failed_grade
    from evalsvc.store.db import public_text

    exc = _driver_error("SELECT secret FROM t WHERE tenant = $1", ("tenant-b",))
    wrapped = RuntimeError("wrapped")
    wrapped.__cause__ = exc
    for error in (exc, wrapped):
        text = public_text(error)
        assert "SELECT" not in text and "tenant-b" not in text and text
        assert "SELECT" not in grader_failed_grade(error, text).error_reason
    assert public_text(ValueError("a target bug")) == "a target bug"
