"""The response cache against counting fake endpoints (real HTTP servers on 127.0.0.1): a second
identical run makes no call and gives identical outputs at no cost; REPLAY errs only the new items;
a changed parameter or another tenant misses; REFRESH replaces; judge verdicts are cached; the bound
evicts least recently used entries; `evalsvc cache prune`; kill -9 loses no entry a result used."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import text

from evalsvc import cli
from evalsvc.config import CHOICES, SettingsError
from evalsvc.execution.cache import MODE_NAMES, target_key
from evalsvc.server import EvalServer
from evalsvc.statuses import TERMINAL
from evalsvc.store import cache as cache_store
from evalsvc.store import usage
from evalsvc.store.db import Database
from evalsvc.v1 import cache_pb2, eval_run_service_pb2_grpc, grader_pb2, item_pb2, run_pb2, target_pb2
from evalsvc.v1 import eval_run_service_pb2 as pb
from tests.conftest import make_settings
from tests.dbs import db_url
from tests.fake_llm import FakeEndpoint, chat_reply, judge_reply
from tests.helpers import all_results, error_reason, keyed_channel, violations, watch_all
from tests.procs import start_server

PRICES = {"gpt-test": {"input_per_mtok": 1000.0, "output_per_mtok": 2000.0}, "judge-test": {"input_per_mtok": 100.0}}
Mode = cache_pb2.CacheMode


class Svc:
    def __init__(self, srv: EvalServer, runs: eval_run_service_pb2_grpc.EvalRunServiceStub) -> None:
        self.srv, self.runs = srv, runs

    async def other_tenant(self) -> str:
        key, _ = await self.srv.keys.create("other")
        return key


async def _start(tmp_path: Path, **overrides: object) -> EvalServer:
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps(PRICES))
    values: dict[str, object] = {"outbound_allow": "127.0.0.1", "price_table": str(prices)}
    values.update(overrides)
    srv = EvalServer(make_settings(tmp_path, **values))
    await srv.start()
    return srv


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[Svc]:
    srv = await _start(tmp_path)
    assert srv.bootstrap_key
    try:
        async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
            yield Svc(srv, eval_run_service_pb2_grpc.EvalRunServiceStub(channel))
    finally:
        await srv.stop(grace=0.5)


def _endpoint(n: int) -> FakeEndpoint:
    """Distinct replies in arrival order: an output shows which call produced it."""
    return FakeEndpoint(*[chat_reply(f"reply {i}", usage=(10 + i, 5)) for i in range(n)])


def _items(n: int, start: int = 0) -> list[item_pb2.Item]:
    return [item_pb2.Item(id=f"i{i}", input=f"question {i}", expected_output=f"reply {i}") for i in range(start, n)]


def _chat(url: str, **fields: object) -> target_pb2.Target:
    return target_pb2.Target(
        chat=target_pb2.ChatTarget(
            endpoint=target_pb2.Endpoint(base_url=url + "/v1", timeout_s=10),
            model="gpt-test",
            **fields,  # type: ignore[arg-type]
        )
    )


def _request(target: target_pb2.Target, items: list[item_pb2.Item], mode: int, **fields: object) -> pb.CreateRunRequest:
    return pb.CreateRunRequest(
        items=items,
        target=target,
        graders=[grader_pb2.Grader(name="exact", exact_match=grader_pb2.ExactMatch())],
        cache_mode=mode,  # type: ignore[arg-type]
        **fields,  # type: ignore[arg-type]
    )


async def _run(
    stub: eval_run_service_pb2_grpc.EvalRunServiceStub, request: pb.CreateRunRequest
) -> tuple[run_pb2.Run, dict[tuple[str, int], run_pb2.Result]]:
    created = await stub.CreateRun(request)
    events = await watch_all(stub, created.run.id)
    run = events[-1].run
    assert run.status in TERMINAL
    return run, {(r.item_id, r.repetition): r for r in await all_results(stub, run.id)}


async def test_a_second_identical_run_makes_no_call_and_gives_identical_outputs_at_no_cost(svc: Svc) -> None:
    with _endpoint(30) as llm:
        request = _request(_chat(llm.url), _items(6), Mode.CACHE_MODE_READ_WRITE, repetitions=2, warmup_runs=1)
        first, first_results = await _run(svc.runs, request)
        calls = len(llm.seen)
        assert calls == 6 * 2 + 6  # every repetition, and one warmup per item
        second, second_results = await _run(svc.runs, request)
        assert len(llm.seen) == calls  # no call at all, warmups included

    assert first.cache_mode == second.cache_mode == Mode.CACHE_MODE_READ_WRITE
    assert first_results.keys() == second_results.keys() and len(first_results) == 12
    for key, result in second_results.items():
        recorded = first_results[key]
        assert result.output == recorded.output  # content, tokens, latency and cost as recorded
        assert result.cached and not recorded.cached
        assert result.cost_usd == recorded.cost_usd > 0 and result.latency_ms == recorded.latency_ms
        assert result.state == recorded.state
    # Repetitions keep their own outputs: repetition 2 was another call than repetition 1.
    assert all(
        first_results[(f"i{i}", 1)].output.content != first_results[(f"i{i}", 2)].output.content for i in range(6)
    )

    spent = sum(r.cost_usd for r in first_results.values())
    assert spent > 0 and first.aggregate.total_cost_usd == pytest.approx(spent)
    assert first.cost_usd > spent  # its six warmup calls were paid too
    assert first.aggregate.cache_hits == 0 and first.aggregate.cost_saved_usd == 0
    assert second.cost_usd == 0 and second.aggregate.total_cost_usd == 0
    assert second.aggregate.cache_hits == 12
    assert second.aggregate.cost_saved_usd == pytest.approx(spent)
    lookups = svc.srv.metrics.registry.get_sample_value
    assert lookups("evalsvc_cache_lookups_total", {"kind": "output", "outcome": "miss"}) == 12
    assert lookups("evalsvc_cache_lookups_total", {"kind": "output", "outcome": "hit"}) == 12


async def test_replay_errs_only_the_items_it_has_no_output_for(svc: Svc) -> None:
    with _endpoint(8) as llm:
        target = _chat(llm.url)
        await _run(svc.runs, _request(target, _items(5), Mode.CACHE_MODE_READ_WRITE))
        calls = len(llm.seen)
        replay, results = await _run(svc.runs, _request(target, _items(8), Mode.CACHE_MODE_REPLAY))
        assert len(llm.seen) == calls
    assert replay.status == run_pb2.RUN_STATUS_SUCCEEDED
    errored = sorted(item for (item, _), r in results.items() if r.state == run_pb2.RESULT_STATE_ERROR)
    assert errored == ["i5", "i6", "i7"]
    for item in errored:
        assert results[(item, 1)].error_reason.startswith("CACHE_MISS")
    assert all(results[(f"i{i}", 1)].cached for i in range(5))


async def test_a_changed_parameter_and_another_tenant_miss(svc: Svc) -> None:
    with _endpoint(30) as llm:
        await _run(svc.runs, _request(_chat(llm.url, temperature=0.0), _items(4), Mode.CACHE_MODE_READ_WRITE))
        assert len(llm.seen) == 4
        await _run(svc.runs, _request(_chat(llm.url, temperature=0.7), _items(4), Mode.CACHE_MODE_READ_WRITE))
        assert len(llm.seen) == 8  # another temperature, another output
        await _run(svc.runs, _request(_chat(llm.url, temperature=0.0), _items(4), Mode.CACHE_MODE_READ_WRITE))
        assert len(llm.seen) == 8  # both are cached now
        async with keyed_channel(svc.srv.port, await svc.other_tenant()) as channel:
            theirs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            _, results = await _run(
                theirs, _request(_chat(llm.url, temperature=0.0), _items(4), Mode.CACHE_MODE_READ_WRITE)
            )
        assert len(llm.seen) == 12  # another tenant never reads this tenant's entries
        assert not any(r.cached for r in results.values())


async def test_refresh_calls_and_replaces_and_off_ignores_the_cache(svc: Svc) -> None:
    with _endpoint(12) as llm:
        target = _chat(llm.url)
        _, first = await _run(svc.runs, _request(target, _items(3), Mode.CACHE_MODE_READ_WRITE))
        _, refreshed = await _run(svc.runs, _request(target, _items(3), Mode.CACHE_MODE_REFRESH))
        assert len(llm.seen) == 6
        assert not any(r.cached for r in refreshed.values())
        _, read = await _run(svc.runs, _request(target, _items(3), Mode.CACHE_MODE_READ_WRITE))
        assert len(llm.seen) == 6
        assert {k: r.output.content for k, r in read.items()} == {k: r.output.content for k, r in refreshed.items()}
        assert {r.output.content for r in read.values()}.isdisjoint(r.output.content for r in first.values())
        off, _ = await _run(svc.runs, _request(target, _items(3), Mode.CACHE_MODE_UNSPECIFIED))
        assert off.cache_mode == Mode.CACHE_MODE_OFF  # the server's default
        assert len(llm.seen) == 9


async def test_judge_verdicts_are_cached(svc: Svc) -> None:
    items = [
        item_pb2.Item(id=f"i{i}", input="q", expected_output="a", response=item_pb2.Response(content=f"answer {i}"))
        for i in range(4)
    ]
    with FakeEndpoint(judge_reply({"score": 9, "reason": "good"})) as judge:
        grader = grader_pb2.Grader(
            name="judge",
            llm_judge=grader_pb2.LlmJudge(
                mode=grader_pb2.LlmJudge.MODE_ACCURACY,
                model="judge-test",
                endpoint=target_pb2.Endpoint(base_url=judge.url + "/v1"),
            ),
        )
        request = pb.CreateRunRequest(
            items=items,
            target=target_pb2.Target(provided=target_pb2.ProvidedTarget()),
            graders=[grader],
            cache_mode=Mode.CACHE_MODE_READ_WRITE,
        )
        first, first_results = await _run(svc.runs, request)
        assert len(judge.seen) == 4
        second, second_results = await _run(svc.runs, request)
        assert len(judge.seen) == 4
        request.items[0].response.content = "another answer"  # another output judged: another verdict
        await _run(svc.runs, request)
        assert len(judge.seen) == 5
        # A header can pick another deployment of the judge: its verdicts are not the cached ones (a probe:
        # 0 calls, all 4 from the cache); with the same header again they are.
        request.graders[0].llm_judge.endpoint.headers["x-deployment"] = "judge-v2"
        await _run(svc.runs, request)
        assert len(judge.seen) == 9 and judge.seen[-1].headers["x-deployment"] == "judge-v2"
        await _run(svc.runs, request)
        assert len(judge.seen) == 9
    assert all(r.verdict_cached and not r.cached for r in second_results.values())
    assert [r.explanation for r in second_results.values()] == [r.explanation for r in first_results.values()]
    assert first.aggregate.scoring_cost_usd > 0 and second.aggregate.scoring_cost_usd == 0
    assert second.cost_usd == 0
    assert second.aggregate.cache_hits == 4
    assert second.aggregate.cost_saved_usd == pytest.approx(first.aggregate.scoring_cost_usd)


async def test_the_bound_evicts_the_least_recently_used_and_prune_removes_a_tenants_entries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    srv = await _start(tmp_path, cache_max_entries=3)
    assert srv.bootstrap_key
    try:
        async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
            stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            with _endpoint(20) as llm:
                target = _chat(llm.url)

                async def one_item_run(i: int) -> None:  # one run per entry: each is stored (or used) after the last
                    await _run(stub, _request(target, _items(i + 1, i), Mode.CACHE_MODE_READ_WRITE))

                for i in range(5):
                    await one_item_run(i)
                async with srv.db.read() as conn:
                    assert await cache_store.counts(conn) == {"default": 3}  # i0 and i1, the oldest, went
                await one_item_run(2)  # a hit: i3 is now the least recently used, although i2 is older
                await one_item_run(5)  # a new entry evicts i3 (LRU, not FIFO)
                assert len(llm.seen) == 6
                _, kept = await _run(stub, _request(target, _items(6), Mode.CACHE_MODE_REPLAY))
                assert sorted(item for (item, _), r in kept.items() if r.cached) == ["i2", "i4", "i5"]
                assert len(llm.seen) == 6
    finally:
        await srv.stop(grace=0.5)
    url = srv.settings.db
    # The tenant's cache bytes (--cache-max-bytes) are what its entries hold, and lose what prune removes.
    entries_bytes, counted = await _cache_bytes(url)
    assert entries_bytes > 0 and counted == entries_bytes
    assert await asyncio.to_thread(cli.main, ["cache", "prune", "--db", url, "--max-entries", "1"]) == 0
    assert await _counts(url) == {"default": 1}
    entries_bytes, counted = await _cache_bytes(url)
    assert entries_bytes > 0 and counted == entries_bytes
    assert await asyncio.to_thread(cli.main, ["cache", "prune", "--db", url, "--tenant", "default", "--all"]) == 0
    assert await _counts(url) == {}
    assert await _cache_bytes(url) == (0, 0)
    # A mistyped or empty tenant is said to be one (it read "removed 0 cache entries", as any prune may).
    capsys.readouterr()
    assert await asyncio.to_thread(cli.main, ["cache", "prune", "--db", url, "--tenant", "default"]) == 0
    assert "tenant 'default' has no cache entries" in capsys.readouterr().err
    assert await asyncio.to_thread(cli.main, ["cache", "prune", "--db", url, "--tenant", "Bad Name!"]) == 2
    assert "no tenant can be named 'Bad Name!'" in capsys.readouterr().err


async def _counts(url: str) -> dict[str, int]:
    db = Database(url)
    try:
        async with db.read() as conn:
            return dict(await cache_store.counts(conn))
    finally:
        await db.close()


async def _cache_bytes(url: str) -> tuple[int, int]:
    """The default tenant's cache entries' payload bytes, and its cache bytes as its totals count them."""
    db = Database(url)
    try:
        async with db.read() as conn:
            entries = await conn.execute(text("SELECT COALESCE(SUM(length(payload)), 0) FROM cache_entries"))
            counted = await usage.cache_bytes(conn, ["default"])
            return int(entries.scalar_one()), counted["default"]
    finally:
        await db.close()


async def test_bad_cache_modes(svc: Svc, tmp_path: Path) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await svc.runs.CreateRun(_request(target_pb2.Target(echo=target_pb2.EchoTarget()), _items(1), 42))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(err.value) == "INVALID_ARGUMENT"
    assert set(violations(err.value)) == {"cache_mode"}
    with pytest.raises(
        SettingsError, match=r"--cache-default \(EVALSVC_CACHE_DEFAULT\) must be one of off, read_write"
    ):
        make_settings(tmp_path / "bad", cache_default="sometimes")
    assert CHOICES["cache_default"] == tuple(MODE_NAMES)  # the names the settings take are the modes there are


async def test_the_server_default_applies_to_runs_that_do_not_choose(tmp_path: Path) -> None:
    srv = await _start(tmp_path, cache_default="replay")
    assert srv.bootstrap_key
    try:
        async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
            stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            with _endpoint(2) as llm:
                run, results = await _run(stub, _request(_chat(llm.url), _items(2), Mode.CACHE_MODE_UNSPECIFIED))
                assert llm.seen == []
    finally:
        await srv.stop(grace=0.5)
    assert run.cache_mode == Mode.CACHE_MODE_REPLAY
    assert all(r.error_reason.startswith("CACHE_MISS") for r in results.values())


def test_keys_cover_what_changes_an_output_and_never_a_secret() -> None:
    item = item_pb2.Item(id="a", input="q", context="c", conversation=[item_pb2.Message(role="user", content="hi")])

    def key(tenant: str = "t", rep: int = 1, it: item_pb2.Item = item, **fields: object) -> str | None:
        endpoint = target_pb2.Endpoint(base_url="http://h/v1", api_key_secret="prod", timeout_s=5)
        values: dict[str, object] = {"model": "m", "endpoint": endpoint}
        values.update(fields)
        return target_key(tenant, target_pb2.Target(chat=target_pb2.ChatTarget(**values)), it, rep)  # type: ignore[arg-type]

    base = key()
    assert base is not None
    # What cannot change the answer does not change the key: the secret's name, the timeout, the item id.
    assert key(endpoint=target_pb2.Endpoint(base_url="http://h/v1", api_key_secret="other", timeout_s=60)) == base
    renamed = item_pb2.Item()
    renamed.CopyFrom(item)
    renamed.id = "b"
    assert key(it=renamed) == base
    changed = [
        key(tenant="u"),
        key(rep=2),
        key(model="m2"),
        key(system_prompt="be brief"),
        key(temperature=0.0),
        key(max_tokens=10),
        key(tools=[target_pb2.Tool(name="f")]),
        key(endpoint=target_pb2.Endpoint(base_url="http://other/v1")),
        key(endpoint=target_pb2.Endpoint(base_url="http://h/v1", headers={"x-version": "2"})),
        key(it=item_pb2.Item(input="q2", context="c", conversation=item.conversation)),
        key(it=item_pb2.Item(input="q", context="c2", conversation=item.conversation)),
        key(it=item_pb2.Item(input="q", context="c")),
    ]
    assert base not in changed and len(set(changed)) == len(changed)
    assert target_key("t", target_pb2.Target(provided=target_pb2.ProvidedTarget()), item, 1) is None


async def test_kill_9_mid_run_loses_no_entry_a_recorded_result_used(tmp_path: Path) -> None:
    db = db_url(tmp_path, "crash.db")
    knobs = ("--claim-batch", "5", "--workers", "5", "--lease-ttl-s", "3", "--outbound-allow", "127.0.0.1")
    with _endpoint(1) as llm:
        target = _chat(llm.url)
        items = _items(300)
        first = await start_server(db, tmp_path / "first.log", *knobs)
        key = first.bootstrap_key()
        assert key
        try:
            async with keyed_channel(first.port, key) as channel:
                stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
                run_id = (await stub.CreateRun(_request(target, items, Mode.CACHE_MODE_READ_WRITE))).run.id
                async for event in stub.WatchRun(pb.WatchRunRequest(run_id=run_id)):
                    if event.counts.completed_evaluations >= 40:
                        break
        finally:
            first.kill()
        # Every result that reached the database has its output's entry there too.
        store = Database(db)
        try:
            async with store.read() as conn:
                recorded = await store_results(conn, run_id)
                entries = await cache_store.fetch(
                    conn, [("default", target_key("default", target, items[int(i[1:])], 1) or "") for i in recorded]
                )
        finally:
            await store.close()
        assert 40 <= len(recorded) < 300
        assert len(entries) == len(recorded)

        second = await start_server(db, tmp_path / "second.log", *knobs)
        try:
            async with keyed_channel(second.port, key) as channel:
                stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
                await stub.CancelRun(pb.CancelRunRequest(run_id=run_id))
                replayed = [items[int(i[1:])] for i in recorded]
                _, results = await _run(stub, _request(target, replayed, Mode.CACHE_MODE_REPLAY))
        finally:
            assert second.terminate() == 0
    assert len(results) == len(recorded)
    assert all(r.cached and r.state != run_pb2.RESULT_STATE_ERROR for r in results.values())


async def store_results(conn: object, run_id: str) -> list[str]:
    """The item ids with a recorded result in a run, read straight from the database."""
    from sqlalchemy import select

    from evalsvc.store.models import ResultRow

    results = ResultRow.__table__  # type: ignore[attr-defined]
    rows = await conn.execute(select(results.c.item_id).where(results.c.run_id == run_id))  # type: ignore[attr-defined]
    return sorted({item_id for (item_id,) in rows})
