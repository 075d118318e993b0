"""Chat and HTTP targets, the LLM judge, saved definitions and budgets, against real HTTP servers
started by the tests (tests/fake_llm.py) standing in for model endpoints."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from evalsvc.config import Settings
from evalsvc.execution import executor as executor_module
from evalsvc.http import outbound as outbound_module
from evalsvc.http.outbound import AdaptiveLimit, Outbound
from evalsvc.server import EvalServer
from evalsvc.store import usage
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import (
    eval_run_service_pb2_grpc,
    grader_pb2,
    grader_service_pb2_grpc,
    item_pb2,
    run_pb2,
    target_pb2,
    target_service_pb2_grpc,
)
from evalsvc.v1 import grader_service_pb2 as gs
from evalsvc.v1 import target_service_pb2 as ts
from tests.conftest import make_settings
from tests.dbs import USE_POSTGRES, postgres_url, stored_bytes
from tests.fake_llm import FakeEndpoint, Reply, chat_reply, judge_reply
from tests.helpers import error_reason, exact, keyed_channel, until, violations, watch_all

SECRET = "sk-test-0123456789abcdef"
MIN_SHOWN = 4  # no piece of a secret this long may show
PRICES = {"gpt-test": {"input_per_mtok": 1000.0, "output_per_mtok": 2000.0}, "judge-test": {"input_per_mtok": 100.0}}
Judge = grader_pb2.LlmJudge


class Stubs:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
        self.graders = grader_service_pb2_grpc.GraderServiceStub(channel)
        self.targets = target_service_pb2_grpc.TargetServiceStub(channel)


async def start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **overrides: object) -> EvalServer:
    monkeypatch.setenv("EVALSVC_SECRET_LLM_KEY", SECRET)
    tmp_path.mkdir(parents=True, exist_ok=True)
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps(PRICES))
    values: dict[str, object] = {"outbound_allow": "127.0.0.1", "price_table": str(prices)}
    values.update(overrides)
    srv = EvalServer(make_settings(tmp_path, **values))
    srv.outbound.base_backoff_s = 0.01  # keep retry tests quick; the backoff shape is the same
    await srv.start()
    return srv


@asynccontextmanager
async def stubs_of(srv: EvalServer) -> AsyncIterator[tuple[EvalServer, Stubs]]:
    """A started server and stubs keyed with its bootstrap key; the server stopped after."""
    assert srv.bootstrap_key
    try:
        async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
            yield srv, Stubs(channel)
    finally:
        await srv.stop(grace=0.5)


@pytest.fixture
async def svc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[EvalServer, Stubs]]:
    async with stubs_of(await start(tmp_path, monkeypatch)) as served:
        yield served


@pytest.fixture(scope="module")
async def refusing_svc(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[EvalServer, Stubs]]:
    """One server for this module's tests whose every call is refused (nothing stored, nothing called out):
    none changes what another reads, so they share it rather than start and migrate one each."""
    srv = EvalServer(make_settings(tmp_path_factory.mktemp("refusing"), outbound_allow="127.0.0.1"))
    await srv.start()
    async with stubs_of(srv) as served:
        yield served


def chat(url: str, **fields: object) -> target_pb2.Target:
    return target_pb2.Target(
        chat=target_pb2.ChatTarget(
            endpoint=target_pb2.Endpoint(base_url=url + "/v1", api_key_secret="llm_key", timeout_s=5),
            model="gpt-test",
            **fields,  # type: ignore[arg-type]
        )
    )


async def next_run_after_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, url: str
) -> tuple[run_pb2.Run, list[run_pb2.Result]]:
    """A server restarted with a tenant budget of $0.25 runs the tenant's next one-item run to its end:
    whether the spend before the restart still counts against it."""
    srv = await start(tmp_path, monkeypatch, tenant_budget_usd=0.25)
    try:
        async with keyed_channel(srv.port, key) as channel:
            return await run_to_end(
                Stubs(channel),
                pb.CreateRunRequest(items=[item_pb2.Item(input="q")], target=chat(url), graders=[exact()]),
            )
    finally:
        await srv.stop(grace=0.5)


async def run_to_end(stubs: Stubs, request: pb.CreateRunRequest) -> tuple[run_pb2.Run, list[run_pb2.Result]]:
    created = await stubs.runs.CreateRun(request)
    await watch_all(stubs.runs, created.run.id)
    run = (await stubs.runs.GetRun(pb.GetRunRequest(run_id=created.run.id))).run
    results = (await stubs.runs.ListRunResults(pb.ListRunResultsRequest(run_id=run.id, page_size=1000))).results
    return run, list(results)


async def test_chat_target_sends_messages_and_tools_and_records_calls_usage_and_cost(svc) -> None:
    _, stubs = svc
    tool = target_pb2.Tool(name="lookup", description="find", parameters=struct_pb2.Struct())
    with FakeEndpoint(chat_reply("Paris", tool_calls=[{"name": "lookup", "args": {"q": "france"}}])) as llm:
        run, results = await run_to_end(
            stubs,
            pb.CreateRunRequest(
                items=[
                    item_pb2.Item(
                        input="Capital of France?",
                        expected_output="Paris",
                        conversation=[item_pb2.Message(role="user", content="hi")],
                    )
                ],
                target=chat(llm.url, system_prompt="Be brief.", temperature=0.2, tools=[tool]),
                graders=[
                    exact(),
                    grader_pb2.Grader(name="tools", tool_calls=grader_pb2.ToolCalls(expected=["lookup"])),
                ],
            ),
        )
        sent = llm.seen[0]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {SECRET}"
    assert sent.body["model"] == "gpt-test" and sent.body["temperature"] == 0.2
    assert [m["role"] for m in sent.body["messages"]] == ["system", "user", "user"]
    assert sent.body["tools"][0]["function"]["name"] == "lookup"
    assert run.status == run_pb2.RUN_STATUS_SUCCEEDED and run.overall_passed
    output = results[0].output
    assert output.content == "Paris" and output.tool_calls[0].name == "lookup"
    assert output.tool_calls[0].arguments["q"] == "france"
    assert (output.prompt_tokens, output.completion_tokens) == (10, 5)
    assert output.cost_usd == pytest.approx((10 * 1000 + 5 * 2000) / 1e6)
    assert run.aggregate.total_cost_usd == pytest.approx(0.02) and run.cost_usd == pytest.approx(0.02)
    assert output.latency_ms > 0


async def test_retries_5xx_and_timeouts_then_succeeds(svc) -> None:
    _, stubs = svc
    script = [Reply({"error": "x"}, status=500), Reply(status=503, body={}), chat_reply("late", usage=(1, 1))]
    with FakeEndpoint(*script) as llm:
        _, results = await run_to_end(
            stubs,
            pb.CreateRunRequest(
                items=[item_pb2.Item(input="q", expected_output="late")], target=chat(llm.url), graders=[exact()]
            ),
        )
        attempts = len(llm.seen)
    assert attempts == 3 and results[0].state == run_pb2.RESULT_STATE_PASSED


async def test_timeout_is_retried(svc) -> None:
    _, stubs = svc
    target = chat("")
    with FakeEndpoint(Reply(body={}, delay_s=1.5), chat_reply("ok")) as llm:
        target.chat.endpoint.base_url = llm.url + "/v1"
        target.chat.endpoint.timeout_s = 0.5
        _, results = await run_to_end(
            stubs,
            pb.CreateRunRequest(
                items=[item_pb2.Item(input="q", expected_output="ok")], target=target, graders=[exact()]
            ),
        )
        assert len(llm.seen) == 2
    assert results[0].state == run_pb2.RESULT_STATE_PASSED


async def test_429_retry_after_is_honoured(svc) -> None:
    _, stubs = svc
    with FakeEndpoint(Reply({}, status=429, headers={"retry-after": "1"}), chat_reply("ok")) as llm:
        _, results = await run_to_end(
            stubs,
            pb.CreateRunRequest(
                items=[item_pb2.Item(input="q", expected_output="ok")], target=chat(llm.url), graders=[exact()]
            ),
        )
        gap = llm.seen[1].at - llm.seen[0].at
    assert results[0].state == run_pb2.RESULT_STATE_PASSED
    assert gap >= 0.95


async def test_giving_up_is_a_target_error_on_every_grader(svc) -> None:
    _, stubs = svc
    with FakeEndpoint(Reply({"error": "down"}, status=500)) as llm:
        run, results = await run_to_end(
            stubs,
            pb.CreateRunRequest(
                items=[item_pb2.Item(input="q")],
                target=chat(llm.url),
                graders=[exact(), grader_pb2.Grader(name="c", contains=grader_pb2.Contains(values=["x"]))],
            ),
        )
        assert len(llm.seen) == 5  # 1 + --http-retries (4)
    assert run.status == run_pb2.RUN_STATUS_FAILED
    assert all(r.state == run_pb2.RESULT_STATE_ERROR and "HTTP 500" in r.error_reason for r in results)
    # The endpoint's own words come with it: `HTTP 400 from host` alone left nothing to go on.
    assert all("HTTP 500 from 127.0.0.1" in r.error_reason and '{"error": "down"}' in r.error_reason for r in results)


async def test_an_error_reply_shows_its_first_words_on_one_line_and_no_more(svc) -> None:
    """A provider's 400 says why; the reason shows its body's start as one printable line, cut at 300
    characters, and the rest of a large body is never read."""
    _, stubs = svc
    noisy = "model not found\n\t\x00" + "x" * 1_000_000
    with FakeEndpoint(Reply(raw=noisy, status=400)) as llm:
        _, results = await run_to_end(
            stubs, pb.CreateRunRequest(items=[item_pb2.Item(input="q")], target=chat(llm.url), graders=[exact()])
        )
    [result] = results
    assert result.error_reason.startswith("HTTP 400 from 127.0.0.1:") and ": model not found xxx" in result.error_reason
    assert result.error_reason.endswith("...") and len(result.error_reason) < 400, result.error_reason


@pytest.mark.parametrize("echo", ["whole", "cut"])
async def test_an_error_reply_that_echoes_the_calls_headers_shows_no_secret(svc, echo: str) -> None:
    """An endpoint whose error body quotes the request's headers (a debugging endpoint, a proxy's error
    page) put the secret behind `api_key_secret` into error_reason, in clear, for every reader of the
    results and in the database: each value the call sent is blanked out, one cut off by the excerpt's
    end (512 bytes) too."""
    srv, stubs = svc
    quoted = f'{{"error": "bad key", "headers": {{"authorization": "Bearer {SECRET}"}}}}'
    # "cut": the excerpt (512 bytes) ends 18 characters into the secret, the spaces collapsed to one
    body = quoted if echo == "whole" else " " * 490 + "err " + SECRET
    with FakeEndpoint(Reply(raw=body, status=401)) as llm:
        _, results = await run_to_end(
            stubs, pb.CreateRunRequest(items=[item_pb2.Item(input="q")], target=chat(llm.url), graders=[exact()])
        )
    [result] = results
    assert SECRET[:MIN_SHOWN] not in result.error_reason and "[redacted]" in result.error_reason, result.error_reason
    if echo == "whole":
        assert '"error": "bad key"' in result.error_reason  # the endpoint's own words stay
    assert SECRET.encode() not in stored_bytes(srv.settings.db) and SECRET[:10].encode() not in stored_bytes(
        srv.settings.db
    )


async def test_an_error_whose_body_drips_is_still_its_status_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 429 with Retry-After whose body then drips (a byte every 0.3 s): waiting for the body's first
    512 bytes cost each attempt its whole timeout (5 s) and reported a timeout, the 429 and its
    Retry-After lost. The excerpt is waited for half a second; the status stands."""
    srv = await start(tmp_path, monkeypatch, http_retries=2)
    assert srv.bootstrap_key
    throttled = Reply(raw='{"error": "rate limited, slow down"}', status=429, headers={"retry-after": "0"})
    throttled.drip_s = 0.3
    try:
        async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
            with FakeEndpoint(throttled) as llm:
                started = time.monotonic()
                _, results = await run_to_end(
                    Stubs(channel),
                    pb.CreateRunRequest(items=[item_pb2.Item(input="q")], target=chat(llm.url), graders=[exact()]),
                )
                took = time.monotonic() - started
    finally:
        await srv.stop(grace=0.5)
    [result] = results
    assert result.error_reason.startswith("HTTP 429 from 127.0.0.1:"), result.error_reason
    assert result.error_reason.endswith("(gave up after 3 attempts)") and took < 5, (took, result.error_reason)


async def test_an_endpoint_that_answers_too_much_or_too_slowly_fails_only_its_evaluation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply was read whole, however large, then parsed on the event loop (a tenant's endpoint
    answering a gigabyte stopped every tenant's calls, then the memory), and httpx's timeout is per
    read, so a body dripped a byte at a time held a worker and its endpoint slot for as long as it
    dripped. A reply past --max-reply-bytes fails its evaluation as it arrives; an attempt, its body
    included, ends within the endpoint's timeout. The bound is a quarter of --max-message-bytes (64 KiB
    here), so that the result can be read back (`run_to_end` lists it)."""
    srv = await start(tmp_path, monkeypatch, http_retries=0, max_message_bytes=256 * 1024)
    assert srv.bootstrap_key
    huge = json.dumps(chat_reply("x" * (1 << 20)).body)
    dripped = chat_reply("slow")  # about 150 bytes, 0.3 s each: 45 s in all, each read well within 1 s
    dripped.drip_s = 0.3
    try:
        async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
            stubs = Stubs(channel)
            with FakeEndpoint(Reply(raw=huge)) as large:
                _, results = await run_to_end(
                    stubs,
                    pb.CreateRunRequest(items=[item_pb2.Item(input="q")], target=chat(large.url), graders=[exact()]),
                )
            assert [r.state for r in results] == [run_pb2.RESULT_STATE_ERROR]
            assert "answered with more than 65536 bytes" in results[0].error_reason
            with FakeEndpoint(dripped) as slow:
                target = chat(slow.url)
                target.chat.endpoint.timeout_s = 1
                started = time.monotonic()
                _, results = await run_to_end(
                    stubs, pb.CreateRunRequest(items=[item_pb2.Item(input="q")], target=target, graders=[exact()])
                )
                took = time.monotonic() - started
            assert [r.state for r in results] == [run_pb2.RESULT_STATE_ERROR]
            assert "TimeoutError calling 127.0.0.1" in results[0].error_reason and took < 10, (results, took)
    finally:
        await srv.stop(grace=0.5)


async def test_adaptive_limit_halves_on_429_and_grows_on_success() -> None:
    limit = AdaptiveLimit(limit=8)
    await limit.acquire()
    limit.release(throttled=True)
    assert limit.limit == 4
    for _ in range(8):
        await limit.acquire()
        limit.release(throttled=False)
    assert 5 <= limit.limit < 8
    for _ in range(5):
        await limit.acquire()
        limit.release(throttled=True)
    assert limit.limit == 1


async def test_a_throttled_key_halves_only_its_own_limit_at_an_endpoint() -> None:
    """A provider's rate limit is its key's: keyed by the endpoint alone, one tenant whose own key got
    429s halved the limit of every tenant calling that provider with keys of their own (16 one-second
    calls: 2.3 s alone, 10.8 s beside the throttled tenant). Calls with the same credentials (the
    server's judge key, an operator secret, none) still share one limit, and its fair turns, whatever
    other headers a tenant adds (a harmless header of its own gave it a fresh limit: a review)."""
    outbound = Outbound(Settings(outbound_allow="127.0.0.1", http_retries=0))
    try:
        with FakeEndpoint(Reply(raw='{"error": "quota"}', status=429)) as llm:
            headers = {"content-type": "application/json", "authorization": "Bearer sk-a", "x-pad": "1"}
            with pytest.raises(outbound_module.OutboundError):
                await outbound.post_json(llm.url + "/v1/chat/completions", {}, headers, secrets=["sk-a"])
        assert outbound.limit_of(llm.url, ["sk-a"]).limit == 4  # halved, for every call with that key
        assert outbound.limit_of(llm.url, ["sk-b"]).limit == 8  # another key: untouched
        assert outbound.limit_of(llm.url, ()) is outbound.limit_of(llm.url)  # no key: one shared limit
    finally:
        await outbound.close()


async def test_every_spelling_of_an_endpoint_shares_its_limit_and_idle_limits_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Limits were keyed by the URL's netloc: user-info or another spelling gave a tenant a fresh limit
    of 8 around an endpoint's shared (maybe halved) one, and every variant stayed for good (3,000 runs,
    3,000 limits). One limit per (scheme, host, port) now; past ENDPOINT_LIMITS, idle ones are forgotten."""
    outbound = Outbound(Settings())
    try:
        shared = outbound.limit_of("http://api.example.com/v1")
        for variant in (
            "http://user:secret@api.example.com/v1",
            "HTTP://API.example.com:80/x",
            "http://a@api.example.com",
            "http://api.example.com./",
        ):
            assert outbound.limit_of(variant) is shared
        assert outbound.limit_of("http://[2001:db8:0::1]/") is outbound.limit_of("http://[2001:DB8::1]:80/")
        assert outbound.limit_of("https://api.example.com/v1") is not shared  # another port, another endpoint
        monkeypatch.setattr(outbound_module, "ENDPOINT_LIMITS", 3)
        await shared.acquire()  # a call in flight: its limit is kept however many endpoints come after
        for port in range(1, 20):
            outbound.limit_of(f"http://host-{port}.example.com:{port}/")
        assert len(outbound._limits) == 3 and outbound.limit_of("http://api.example.com/") is shared
        newest = outbound.limit_of("http://newest.example.com/")  # room is made before it is kept, never by it
        assert outbound.limit_of("http://newest.example.com/") is newest
    finally:
        await outbound.close()


async def test_http_target_posts_the_item_and_reads_the_reply(svc) -> None:
    _, stubs = svc
    reply = Reply(
        {
            "content": "done",
            "tool_calls": [{"name": "book", "arguments": {"day": "mon"}}],
            "cost_usd": 0.25,
            "memory_mib": 12.5,
        }
    )
    with FakeEndpoint(reply) as agent:
        target = target_pb2.Target(
            http=target_pb2.HttpTarget(
                endpoint=target_pb2.Endpoint(
                    base_url=agent.url + "/agent", headers={"x-team": "a", "x-key": "secret:llm_key"}
                )
            )
        )
        run, results = await run_to_end(
            stubs,
            pb.CreateRunRequest(
                items=[item_pb2.Item(id="c1", input="book me", metadata={"k": "v"})],
                target=target,
                graders=[grader_pb2.Grader(tool_calls=grader_pb2.ToolCalls(expected=["book"]))],
            ),
        )
        sent = agent.seen[0]
    assert sent.path == "/agent" and sent.headers["x-team"] == "a" and sent.headers["x-key"] == SECRET
    assert sent.body["item"] == {
        "id": "c1",
        "input": "book me",
        "context": "",
        "conversation": [],
        "metadata": {"k": "v"},
    }
    assert results[0].state == run_pb2.RESULT_STATE_PASSED and results[0].output.cost_usd == 0.25
    assert run.aggregate.total_cost_usd == 0.25
    assert results[0].output.memory_mib == 12.5  # agents that measure themselves (Agno performance)
    assert (run.aggregate.memory.samples, run.aggregate.memory.max_mib, run.aggregate.memory.p50_mib) == (1, 12.5, 12.5)


def judge(url: str, **fields: object) -> grader_pb2.Grader:
    spec = Judge(model="judge-test", endpoint=target_pb2.Endpoint(base_url=url + "/v1"), **fields)  # type: ignore[arg-type]
    return grader_pb2.Grader(name="judge", llm_judge=spec)


@pytest.mark.parametrize(
    ("fields", "verdict", "state", "score", "confidence"),
    [
        ({"mode": Judge.MODE_ACCURACY}, {"score": 8, "reason": "close"}, run_pb2.RESULT_STATE_PASSED, 7 / 9, None),
        (
            {"mode": Judge.MODE_ACCURACY, "threshold": 9},
            {"score": 8, "reason": "r"},
            run_pb2.RESULT_STATE_FAILED,
            7 / 9,
            None,
        ),
        (
            {"mode": Judge.MODE_CRITERIA, "criteria": "polite"},
            {"passed": True, "reason": "r"},
            run_pb2.RESULT_STATE_PASSED,
            1.0,
            None,
        ),
        (
            {"mode": Judge.MODE_CRITERIA, "criteria": "polite", "scoring": Judge.SCORING_NUMERIC, "threshold": 6},
            {"score": 5, "reason": "meh"},
            run_pb2.RESULT_STATE_FAILED,
            4 / 9,
            None,
        ),
        (
            {
                "mode": Judge.MODE_LEVELS,
                "levels": [grader_pb2.JudgeLevel(key="good", passing=True), grader_pb2.JudgeLevel(key="bad")],
            },
            {"level": "good", "reason": "r", "confidence": 0.9},
            run_pb2.RESULT_STATE_PASSED,
            1.0,
            0.9,
        ),
        (
            {"mode": Judge.MODE_POLICY, "criteria": "refuse weapons questions"},
            {"passed": False, "reason": "complied", "confidence": 0.7},
            run_pb2.RESULT_STATE_FAILED,
            0.0,
            0.7,
        ),
    ],
    ids=["accuracy-pass", "accuracy-threshold", "criteria-binary", "criteria-numeric", "levels", "policy"],
)
async def test_judge_modes(svc, fields, verdict, state, score, confidence) -> None:
    _, stubs = svc
    with FakeEndpoint(judge_reply(verdict)) as llm:
        run, results = await run_to_end(
            stubs,
            pb.CreateRunRequest(
                items=[
                    item_pb2.Item(input="q", expected_output="a", response=item_pb2.Response(content="a", cost_usd=0.5))
                ],
                target=target_pb2.Target(provided=target_pb2.ProvidedTarget()),
                graders=[judge(llm.url, **fields)],
            ),
        )
        asked = llm.seen[0].body
    assert asked["response_format"] == {"type": "json_object"} and asked["model"] == "judge-test"
    result = results[0]
    assert result.state == state and result.score == pytest.approx(score)
    assert (result.confidence if result.HasField("confidence") else None) == confidence
    assert result.scoring_cost_usd == pytest.approx(100 * 100 / 1e6)  # judge tokens, priced apart
    assert run.aggregate.scoring_cost_usd == pytest.approx(0.01) and run.aggregate.total_cost_usd == 0.5


async def test_recorded_responses_costs_are_reported_and_spend_no_budget(svc) -> None:
    """A recorded response's cost_usd is what the call that produced it cost, elsewhere and before: it
    counted as the run's spend, so three $1 recorded responses stopped a run with a $0.50 budget before
    its first judge call (BUDGET_EXCEEDED), and replaying production logs used up the tenant's budget. It
    is reported (each result's cost_usd, the aggregate's total) and spends nothing: the run's cost_usd,
    its budget and its tenant's spend hold the judge calls alone."""
    srv, stubs = svc
    items = [
        item_pb2.Item(input=f"q{i}", expected_output="a", response=item_pb2.Response(content="a", cost_usd=1.0))
        for i in range(3)
    ]
    with FakeEndpoint(judge_reply({"passed": True, "reason": "r"})) as llm:
        run, results = await run_to_end(
            stubs,
            pb.CreateRunRequest(
                items=items,
                target=target_pb2.Target(provided=target_pb2.ProvidedTarget()),
                graders=[judge(llm.url, mode=Judge.MODE_CRITERIA, criteria="c")],
                max_cost_usd=0.5,
                warmup_runs=2,
            ),
        )
        judged = len(llm.seen)
    assert run.status == run_pb2.RUN_STATUS_SUCCEEDED and judged == 3, run
    assert [r.cost_usd for r in results] == [1.0] * 3 and run.aggregate.total_cost_usd == 3.0
    assert run.cost_usd == pytest.approx(3 * 0.01) and run.aggregate.scoring_cost_usd == pytest.approx(0.03)
    assert await committed_spend(srv) == pytest.approx(0.03)


async def test_malformed_judgment_is_retried_then_an_error_never_a_fail(svc) -> None:
    _, stubs = svc
    item = item_pb2.Item(input="q", response=item_pb2.Response(content="a"))
    provided = target_pb2.Target(provided=target_pb2.ProvidedTarget())
    with FakeEndpoint(judge_reply("not json"), judge_reply({"passed": True, "reason": "ok"})) as llm:
        _, results = await run_to_end(
            stubs,
            pb.CreateRunRequest(
                items=[item], target=provided, graders=[judge(llm.url, mode=Judge.MODE_CRITERIA, criteria="c")]
            ),
        )
        assert len(llm.seen) == 2
    assert results[0].state == run_pb2.RESULT_STATE_PASSED
    with FakeEndpoint(judge_reply({"score": 42})) as llm:
        run, results = await run_to_end(
            stubs,
            pb.CreateRunRequest(items=[item], target=provided, graders=[judge(llm.url, mode=Judge.MODE_ACCURACY)]),
        )
        assert len(llm.seen) == 3
    assert results[0].state == run_pb2.RESULT_STATE_ERROR and "unusable judgment" in results[0].error_reason
    assert run.status == run_pb2.RUN_STATUS_FAILED  # every evaluation errored; no FAIL was invented


@pytest.mark.parametrize(
    ("reply", "explanation", "reason"),
    [
        pytest.param(
            judge_reply({"score": 10, "reason": "a score where a verdict was asked"}),
            "the judge gave no usable verdict",
            'unusable judgment: the judge\'s reply has no "passed" field',
            id="missing-field",
        ),
        pytest.param(
            judge_reply("I think it's fine, 8/10"),
            "the judge gave no usable verdict",
            "unusable judgment: the judge's reply is not JSON (Expecting value: line 1 column 1 (char 0))",
            id="not-json",
        ),
        pytest.param(
            Reply({"choices": []}),
            "the judge gave no usable verdict",
            "unusable judgment: the judge's reply has no choices[0].message.content",
            id="no-choices",
        ),
        pytest.param(
            Reply(status=204, raw=""),
            "the judge's reply is not JSON",
            "answered HTTP 204 with an empty body, not JSON",
            id="empty-204",
        ),
    ],
)
async def test_an_unusable_judge_reply_says_what_is_wrong_in_words(
    svc, reply: Reply, explanation: str, reason: str
) -> None:
    """A reply without its mode's field was `unusable judgment: 'passed'` (a KeyError's text), one that is
    not JSON the parser's `Expecting value: ...` alone, and an empty 204 "the judge could not be reached"
    though it answered. The codes and prefixes stay (docs/targets.md)."""
    _, stubs = svc
    item = item_pb2.Item(input="q", response=item_pb2.Response(content="a"))
    provided = target_pb2.Target(provided=target_pb2.ProvidedTarget())
    with FakeEndpoint(reply) as llm:
        _, results = await run_to_end(
            stubs,
            pb.CreateRunRequest(
                items=[item], target=provided, graders=[judge(llm.url, mode=Judge.MODE_CRITERIA, criteria="c")]
            ),
        )
    [result] = results
    assert result.state == run_pb2.RESULT_STATE_ERROR and result.explanation == explanation, result
    assert reason in result.error_reason, result


@pytest.mark.parametrize(
    "reply",
    [
        judge_reply('{"score": Infinity, "reason": "r"}'),
        judge_reply('{"score": 1e999, "reason": "r"}'),
        judge_reply({"score": True, "reason": "a boolean is no score"}),
        judge_reply('{"score": 9, "reason": "r", "confidence": NaN}'),  # was recorded as confidence 1.0
        Reply({**judge_reply({"score": 9}).body, "usage": {"prompt_tokens": math.inf, "completion_tokens": 1}}),
        Reply({**judge_reply({"score": 9}).body, "usage": {"prompt_tokens": -5000, "completion_tokens": 1}}),
    ],
    ids=["infinity", "overflow", "boolean", "nan-confidence", "infinite-usage", "negative-usage"],
)
async def test_a_judge_reply_with_unusable_numbers_errors_only_the_judges_evaluation(svc, reply: Reply) -> None:
    """Infinity or 1e999 as a score or a token count raised OverflowError, which failed every grader of the
    item as a target failure and dropped the output with its cost and latency; `true` was a definite FAIL
    (score 1). Each is an unusable judgment now: retried, then the judge's own ERROR."""
    _, stubs = svc
    response = item_pb2.Response(content="a", cost_usd=0.5, latency_ms=100)
    item = item_pb2.Item(input="q", expected_output="a", response=response)
    provided = target_pb2.Target(provided=target_pb2.ProvidedTarget())
    with FakeEndpoint(reply) as llm:
        run, results = await run_to_end(
            stubs,
            pb.CreateRunRequest(
                items=[item], target=provided, graders=[exact(), judge(llm.url, mode=Judge.MODE_ACCURACY)]
            ),
        )
        assert len(llm.seen) == 3  # retried as any unusable judgment is
    by_grader = {r.grader: r for r in results}
    assert by_grader["exact"].state == run_pb2.RESULT_STATE_PASSED, by_grader
    judged = by_grader["judge"]
    assert judged.state == run_pb2.RESULT_STATE_ERROR and "unusable judgment" in judged.error_reason, judged
    assert "Overflow" not in judged.error_reason and "target failed" not in judged.explanation
    assert run.aggregate.total_cost_usd == 0.5 and run.aggregate.latency.mean_ms == 100  # the output was kept


@pytest.mark.parametrize("cost", ["NaN", "-1000", "Infinity", '"lots"', "true", "1" + "0" * 400])
async def test_a_webhook_cost_that_is_no_amount_fails_its_item_and_leaves_the_budget_on(
    tmp_path, monkeypatch, cost: str
) -> None:
    """A reply's `cost_usd` of NaN or -1000 was added to the tenant's spend and switched
    --tenant-budget-usd off (NaN >= budget is never true; a stored -1000 stayed spent after a restart);
    Infinity ended every later run. Now the item's evaluation is a target ERROR naming the field, nothing
    is spent, and the budget stops the next runs as before."""
    srv = await start(tmp_path, monkeypatch, tenant_budget_usd=1.0)
    try:
        async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
            stubs = Stubs(channel)

            def agent(url: str) -> target_pb2.Target:
                return target_pb2.Target(http=target_pb2.HttpTarget(endpoint=target_pb2.Endpoint(base_url=url)))

            with FakeEndpoint(Reply(raw=f'{{"content": "a", "cost_usd": {cost}}}')) as bad:
                first, failed = await run_to_end(
                    stubs,
                    pb.CreateRunRequest(items=[item_pb2.Item(input="q")], target=agent(bad.url), graders=[exact()]),
                )
            [result] = failed
            assert result.state == run_pb2.RESULT_STATE_ERROR and "cost_usd" in result.error_reason, result
            assert first.cost_usd == 0
            with FakeEndpoint(Reply({"content": "a", "cost_usd": 0.4})) as fair:
                spent, _ = await run_to_end(
                    stubs,
                    pb.CreateRunRequest(
                        items=[item_pb2.Item(input=f"q{i}") for i in range(3)],
                        target=agent(fair.url),
                        graders=[exact()],
                    ),
                )
                stopped, results = await run_to_end(
                    stubs,
                    pb.CreateRunRequest(items=[item_pb2.Item(input="q")], target=agent(fair.url), graders=[exact()]),
                )
    finally:
        await srv.stop(grace=0.5)
    assert spent.cost_usd == pytest.approx(1.2)
    assert stopped.status == run_pb2.RUN_STATUS_FAILED and stopped.error.code == "BUDGET_EXCEEDED", stopped
    assert results == []


@pytest.mark.parametrize(
    ("reply", "field"),
    [
        ('{"content": "a", "refused": "false"}', "refused"),
        ('{"content": [1, 2]}', "content"),
        ('{"content": "a", "tool_calls": "ab"}', "tool_calls"),  # was two calls with no names
    ],
)
async def test_a_webhook_reply_field_of_another_type_fails_its_item_naming_the_field(
    svc, reply: str, field: str
) -> None:
    """`"refused": "false"` was read as a refusal (bool of a non-empty string: judges were told the model
    refused), a list as content became its Python text, and a string as tool_calls a call per character. A
    field of another JSON type than documented is a target ERROR naming it, as a bad cost_usd is."""
    _, stubs = svc
    with FakeEndpoint(Reply(raw=reply)) as agent:
        _, results = await run_to_end(
            stubs,
            pb.CreateRunRequest(
                items=[item_pb2.Item(input="q")],
                target=target_pb2.Target(http=target_pb2.HttpTarget(endpoint=target_pb2.Endpoint(base_url=agent.url))),
                graders=[exact()],
            ),
        )
    [result] = results
    assert result.state == run_pb2.RESULT_STATE_ERROR and f"{field} must be" in result.error_reason, result


async def test_a_judgment_of_millions_of_values_is_refused_off_the_event_loop(svc) -> None:
    """A tenant's judge answering two million JSON values (a few MB) was parsed on the event loop: every
    tenant's calls waited 1-6 s. Such a verdict is parsed, and refused, in a worker process."""
    _, stubs = svc
    item = item_pb2.Item(input="q", response=item_pb2.Response(content="a"))
    provided = target_pb2.Target(provided=target_pb2.ProvidedTarget())
    flood = "[" + ",".join(["0"] * 2_000_000) + "]"
    with FakeEndpoint(judge_reply(flood)) as llm:
        _, results = await run_to_end(
            stubs,
            pb.CreateRunRequest(
                items=[item], target=provided, graders=[judge(llm.url, mode=Judge.MODE_CRITERIA, criteria="c")]
            ),
        )
    assert results[0].state == run_pb2.RESULT_STATE_ERROR
    assert "unusable judgment: the JSON holds more than 20,000 values" in results[0].error_reason
    flooded = json.dumps({**chat_reply("a").body, "junk": [0] * 1_000_000})  # a target's reply, likewise
    with FakeEndpoint(Reply(raw=flooded)) as target:
        _, results = await run_to_end(
            stubs, pb.CreateRunRequest(items=[item_pb2.Item(input="q")], target=chat(target.url), graders=[exact()])
        )
    assert "answered with a body that is not usable JSON (the JSON holds more than 20,000 values)" in (
        results[0].error_reason
    )


async def test_default_judge_from_config_and_missing_judge_is_failed_precondition(tmp_path, monkeypatch) -> None:
    bare = grader_pb2.Grader(name="j", llm_judge=Judge(mode=Judge.MODE_CRITERIA, criteria="c"))
    item = item_pb2.Item(input="q", response=item_pb2.Response(content="a"))
    provided = target_pb2.Target(provided=target_pb2.ProvidedTarget())
    srv = await start(tmp_path, monkeypatch)
    try:
        async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await Stubs(channel).runs.CreateRun(pb.CreateRunRequest(items=[item], target=provided, graders=[bare]))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error_reason(err.value) == "JUDGE_NOT_CONFIGURED"
            assert (err.value.details() or "").startswith(  # which grader: it named none
                "graders[0] (j): an llm_judge grader needs a judge model: give its model and endpoint"
            ), err.value.details()
    finally:
        await srv.stop(grace=0.5)
    with FakeEndpoint(judge_reply({"passed": True, "reason": "ok"})) as llm:
        srv = await start(
            tmp_path / "b", monkeypatch, judge_base_url=llm.url + "/v1", judge_model="m", judge_api_key="jk"
        )
        try:
            async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
                _, results = await run_to_end(
                    Stubs(channel), pb.CreateRunRequest(items=[item], target=provided, graders=[bare])
                )
        finally:
            await srv.stop(grace=0.5)
        assert llm.seen[0].headers["authorization"] == "Bearer jk" and llm.seen[0].body["model"] == "m"
    assert results[0].state == run_pb2.RESULT_STATE_PASSED


async def test_budget_stops_model_calls_and_fails_the_run_keeping_results(svc) -> None:
    _, stubs = svc
    reply = chat_reply("a", usage=(100, 0))  # $0.10 per call
    reply.delay_s = 0.02
    with FakeEndpoint(reply) as llm:
        created = await stubs.runs.CreateRun(
            pb.CreateRunRequest(
                items=[item_pb2.Item(input=f"q{i}", expected_output="a") for i in range(40)],
                target=chat(llm.url),
                graders=[exact()],
                max_cost_usd=0.45,
            )
        )
        events = await watch_all(stubs.runs, created.run.id)
        calls = len(llm.seen)
    run = (await stubs.runs.GetRun(pb.GetRunRequest(run_id=created.run.id))).run
    assert run.status == run_pb2.RUN_STATUS_FAILED and run.error.code == "BUDGET_EXCEEDED"
    assert events[-1].run.error.code == "BUDGET_EXCEEDED"
    # Calls in flight when the budget ran out may finish (at most the endpoint's 8 concurrent slots).
    assert calls <= 5 + 8 and 5 <= run.counts.completed_evaluations < 40
    results = (await stubs.runs.ListRunResults(pb.ListRunResultsRequest(run_id=run.id, page_size=100))).results
    assert len(results) == run.counts.completed_evaluations
    assert run.cost_usd >= 0.45


# Cloud metadata (AWS, Alibaba), private, loopback, shared, protocol-assignment and benchmarking
# space, and loopback or metadata wrapped in 6to4, NAT64, IPv4-mapped and IPv4-compatible IPv6.
NOT_GLOBAL_URLS = [
    "http://169.254.169.254/latest",
    "http://100.100.100.200/v1",
    "http://10.1.2.3/v1",
    "http://192.0.0.8/v1",
    "http://198.18.0.1/v1",
    "http://[::1]:9/v1",
    "http://localhost:9/v1",
    "http://[2002:7f00:1::]/v1",
    "http://[64:ff9b::a9fe:a9fe]/v1",
    "http://[::ffff:127.0.0.1]/v1",
    "http://[::127.0.0.1]/v1",
]


async def test_destinations_that_are_not_globally_routable_are_refused_before_anything_is_stored(
    tmp_path, monkeypatch
) -> None:
    srv = await start(tmp_path, monkeypatch, outbound_allow="")
    refused: dict[str, set[str]] = {}
    try:
        async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
            stubs = Stubs(channel)
            for url in NOT_GLOBAL_URLS:
                target = chat(url)
                target.chat.endpoint.base_url = url
                judge = grader_pb2.Grader(
                    name="judge",
                    llm_judge=Judge(
                        mode=Judge.MODE_ACCURACY, model="judge-test", endpoint=target_pb2.Endpoint(base_url=url)
                    ),
                )
                calls = {
                    "CreateRun": stubs.runs.CreateRun(
                        pb.CreateRunRequest(items=[item_pb2.Item(input="q")], target=target, graders=[exact()])
                    ),
                    "CreateRun judge": stubs.runs.CreateRun(
                        pb.CreateRunRequest(
                            items=[item_pb2.Item(input="q")], target=target_pb2.Target(echo={}), graders=[judge]
                        )
                    ),
                    "CreateTarget": stubs.targets.CreateTarget(
                        ts.CreateTargetRequest(target=ts.SavedTarget(target=target))
                    ),
                    "CreateGrader": stubs.graders.CreateGrader(
                        gs.CreateGraderRequest(grader=gs.SavedGrader(grader=judge))
                    ),
                }
                for name, call in calls.items():
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, url)
                    refused.setdefault(name, set()).update(violations(err.value))
            assert not (await stubs.runs.ListRuns(pb.ListRunsRequest())).runs
            assert not (await stubs.targets.ListTargets(ts.ListTargetsRequest())).targets
            assert not (await stubs.graders.ListGraders(gs.ListGradersRequest())).graders
    finally:
        await srv.stop(grace=0.5)
    assert refused == {
        "CreateRun": {"target.chat.endpoint.base_url"},
        "CreateRun judge": {"graders[0].llm_judge.endpoint.base_url"},
        "CreateTarget": {"target.target.chat.endpoint.base_url"},
        "CreateGrader": {"grader.grader.llm_judge.endpoint.base_url"},
    }


async def test_an_allow_list_entry_with_a_port_opens_that_port_of_loopback_and_no_other(tmp_path, monkeypatch) -> None:
    """The README's recipe allowed `127.0.0.1`, and so every port of loopback: a tenant's target, judge or
    webhook could call the server's own gateway and metrics, or a database beside the model server. With
    `127.0.0.1:<the model's port>` a target on that port is called; endpoints on another loopback port are
    refused before anything is stored, naming the field and the port; and the default judge (the
    operator's URL, not checked at create) on another port fails its evaluation at call time, unreached."""
    bare = grader_pb2.Grader(name="j", llm_judge=Judge(mode=Judge.MODE_CRITERIA, criteria="c"))
    with FakeEndpoint(chat_reply("Paris")) as model, FakeEndpoint(judge_reply({"passed": True})) as other:
        model_port, other_port = (int(url.rpartition(":")[2]) for url in (model.url, other.url))
        refused = f"127.0.0.1:{other_port} is not allowed (not globally routable; allow it with --outbound-allow)"
        srv = await start(
            tmp_path,
            monkeypatch,
            outbound_allow=f"127.0.0.1:{model_port}",
            judge_base_url=other.url + "/v1",
            judge_model="m",
        )
        async with stubs_of(srv) as (_, stubs):
            run, results = await run_to_end(
                stubs,
                pb.CreateRunRequest(
                    items=[item_pb2.Item(input="Capital of France?", expected_output="Paris")],
                    target=chat(model.url),
                    graders=[exact(), bare],
                ),
            )
            saved = await stubs.graders.CreateGrader(gs.CreateGraderRequest(grader=gs.SavedGrader(grader=exact())))
            other_judge = judge(other.url, mode=Judge.MODE_ACCURACY)
            calls = {
                "target.chat.endpoint.base_url": stubs.runs.CreateRun(
                    pb.CreateRunRequest(items=[item_pb2.Item(input="q")], target=chat(other.url), graders=[exact()])
                ),
                "graders[0].llm_judge.endpoint.base_url": stubs.runs.CreateRun(
                    pb.CreateRunRequest(
                        items=[item_pb2.Item(input="q")],
                        target=target_pb2.Target(echo={}),
                        graders=[other_judge],
                    )
                ),
                "target.target.chat.endpoint.base_url": stubs.targets.CreateTarget(
                    ts.CreateTargetRequest(target=ts.SavedTarget(target=chat(other.url)))
                ),
                "grader.grader.llm_judge.endpoint.base_url": stubs.graders.CreateGrader(
                    gs.CreateGraderRequest(grader=gs.SavedGrader(grader=other_judge))
                ),
                "grader.llm_judge.endpoint.base_url": stubs.graders.UpdateGrader(
                    gs.UpdateGraderRequest(grader_id=saved.grader.id, grader=other_judge)
                ),
            }
            for field, call in calls.items():
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
                assert refused in violations(err.value).get(field, ""), (field, violations(err.value))
        assert len(model.seen) == 1 and not other.seen
    assert run.status == run_pb2.RUN_STATUS_SUCCEEDED
    by_grader = {r.grader: r for r in results}
    assert by_grader["exact"].state == run_pb2.RESULT_STATE_PASSED
    assert by_grader["j"].state == run_pb2.RESULT_STATE_ERROR and refused in by_grader["j"].error_reason


async def test_a_saved_judge_cannot_be_updated_to_an_internal_endpoint(svc) -> None:
    _, stubs = svc
    public = grader_pb2.Grader(name="answer", contains=grader_pb2.Contains(values=["Paris"]))
    saved = (await stubs.graders.CreateGrader(gs.CreateGraderRequest(grader=gs.SavedGrader(grader=public)))).grader
    metadata = grader_pb2.Grader(
        name="answer",
        llm_judge=Judge(
            mode=Judge.MODE_ACCURACY,
            model="judge-test",
            endpoint=target_pb2.Endpoint(base_url="http://169.254.169.254/latest"),
        ),
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.graders.UpdateGrader(gs.UpdateGraderRequest(grader_id=saved.id, grader=metadata))
    assert violations(err.value).keys() == {"grader.llm_judge.endpoint.base_url"}
    assert (await stubs.graders.GetGrader(gs.GetGraderRequest(grader_id=saved.id))).grader.latest_version == 1


async def test_secrets_stay_server_side(svc, caplog: pytest.LogCaptureFixture) -> None:
    srv, stubs = svc
    caplog.set_level(logging.DEBUG)
    missing = chat("http://127.0.0.1:9")
    missing.chat.endpoint.api_key_secret = "nope"
    missing.chat.endpoint.headers["X-Org"] = "secret:nope_either"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.runs.CreateRun(
            pb.CreateRunRequest(items=[item_pb2.Item(input="q")], target=missing, graders=[exact()])
        )
    # Each reference named by its own field (both were `target.chat.endpoint`).
    assert violations(err.value).keys() == {
        "target.chat.endpoint.api_key_secret",
        "target.chat.endpoint.headers[X-Org]",
    }
    with FakeEndpoint(chat_reply("x")) as llm:
        run, results = await run_to_end(
            stubs, pb.CreateRunRequest(items=[item_pb2.Item(input="q")], target=chat(llm.url), graders=[exact()])
        )
    assert SECRET.encode() not in run.SerializeToString() + b"".join(r.SerializeToString() for r in results)
    assert all(SECRET not in record.getMessage() for record in caplog.records)
    stored = stored_bytes(srv.settings.db)  # the SQLite files, or every row on PostgreSQL
    assert SECRET.encode() not in stored


async def test_chat_settings_no_call_can_send_are_refused_when_a_target_is_saved(svc) -> None:
    """A NaN temperature was saved, and every run of the target then ERRORed each evaluation with
    "ValueError: Out of range float values are not JSON compliant"; a negative one or a negative
    max_tokens made every call an endpoint's 400."""
    _, stubs = svc
    with FakeEndpoint(chat_reply("x")) as llm:
        for fields, field in [
            ({"temperature": math.nan}, "target.target.chat.temperature"),
            ({"temperature": -math.inf}, "target.target.chat.temperature"),
            ({"temperature": 2.01}, "target.target.chat.temperature"),
            ({"max_tokens": -1}, "target.target.chat.max_tokens"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stubs.targets.CreateTarget(
                    ts.CreateTargetRequest(target=ts.SavedTarget(target=chat(llm.url, **fields)))
                )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert violations(err.value).keys() == {field}, (fields, violations(err.value))
        assert not (await stubs.targets.ListTargets(ts.ListTargetsRequest())).targets
        valid = chat(llm.url, temperature=0, max_tokens=0)
        await stubs.targets.CreateTarget(ts.CreateTargetRequest(target=ts.SavedTarget(target=valid)))


async def test_saved_graders_are_versioned_and_runs_keep_snapshots(svc) -> None:
    _, stubs = svc
    v1 = grader_pb2.Grader(name="answer", contains=grader_pb2.Contains(values=["Paris"]))
    created = (
        await stubs.graders.CreateGrader(
            gs.CreateGraderRequest(grader=gs.SavedGrader(display_name="capital", grader=v1))
        )
    ).grader
    assert created.version == created.latest_version == 1
    v2 = grader_pb2.Grader(name="answer", contains=grader_pb2.Contains(values=["Lyon"]))
    updated = (await stubs.graders.UpdateGrader(gs.UpdateGraderRequest(grader_id=created.id, grader=v2))).grader
    assert updated.version == updated.latest_version == 2
    first = (await stubs.graders.GetGrader(gs.GetGraderRequest(grader_id=created.id, version=1))).grader
    assert list(first.grader.contains.values) == ["Paris"]
    listed = (await stubs.graders.ListGraders(gs.ListGradersRequest())).graders
    assert [(g.id, g.version) for g in listed] == [(created.id, 2)]

    saved_target = (
        await stubs.targets.CreateTarget(
            ts.CreateTargetRequest(
                target=ts.SavedTarget(display_name="agent", target=target_pb2.Target(echo=target_pb2.EchoTarget()))
            )
        )
    ).target
    assert [t.id for t in (await stubs.targets.ListTargets(ts.ListTargetsRequest())).targets] == [saved_target.id]
    item = item_pb2.Item(input="Paris")
    latest, latest_results = await run_to_end(
        stubs,
        pb.CreateRunRequest(
            items=[item],
            target=target_pb2.Target(saved_target_id=saved_target.id),
            graders=[grader_pb2.Grader(saved=grader_pb2.SavedGraderRef(grader_id=created.id))],
        ),
    )
    pinned, pinned_results = await run_to_end(
        stubs,
        pb.CreateRunRequest(
            items=[item],
            target=target_pb2.Target(saved_target_id=saved_target.id),
            graders=[grader_pb2.Grader(saved=grader_pb2.SavedGraderRef(grader_id=created.id, version=1))],
        ),
    )
    assert latest.target.WhichOneof("kind") == "echo" and latest.graders[0].WhichOneof("kind") == "contains"
    assert (
        list(latest.graders[0].contains.values) == ["Lyon"] and latest_results[0].state == run_pb2.RESULT_STATE_FAILED
    )
    assert (
        list(pinned.graders[0].contains.values) == ["Paris"] and pinned_results[0].state == run_pb2.RESULT_STATE_PASSED
    )
    await stubs.graders.UpdateGrader(gs.UpdateGraderRequest(grader_id=created.id, grader=v1))
    again = (await stubs.runs.GetRun(pb.GetRunRequest(run_id=latest.id))).run
    assert list(again.graders[0].contains.values) == ["Lyon"]  # the run kept its snapshot
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.runs.CreateRun(
            pb.CreateRunRequest(
                items=[item],
                target=target_pb2.Target(echo=target_pb2.EchoTarget()),
                graders=[grader_pb2.Grader(saved=grader_pb2.SavedGraderRef(grader_id="grd_x"))],
            )
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and error_reason(err.value) == "GRADER_NOT_FOUND"


async def test_tenant_budget_stops_the_tenants_next_run(tmp_path, monkeypatch) -> None:
    srv = await start(tmp_path, monkeypatch, tenant_budget_usd=0.25)
    try:
        async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
            stubs = Stubs(channel)
            with FakeEndpoint(chat_reply("a", usage=(100, 0))) as llm:  # $0.10 per call
                first, _ = await run_to_end(
                    stubs,
                    pb.CreateRunRequest(
                        items=[item_pb2.Item(input=f"q{i}") for i in range(3)], target=chat(llm.url), graders=[exact()]
                    ),
                )
                second, results = await run_to_end(
                    stubs,
                    pb.CreateRunRequest(items=[item_pb2.Item(input="q")], target=chat(llm.url), graders=[exact()]),
                )
                calls = len(llm.seen)
    finally:
        await srv.stop(grace=0.5)
    assert first.cost_usd == pytest.approx(0.3)
    assert second.status == run_pb2.RUN_STATUS_FAILED and second.error.code == "BUDGET_EXCEEDED"
    assert "tenant" in second.error.message and results == [] and calls == 3


async def test_warmup_calls_are_spent_in_the_run_and_the_tenant_budget_across_a_restart(tmp_path, monkeypatch) -> None:
    """Warmup calls are paid calls, but their cost was counted in the executor's memory only: the run's
    cost_usd left them out, and after a restart (or on another replica) the tenant's budget had forgotten
    them (a probe spent $0.88 against a $0.50 budget). The run's cost holds them now, so a restarted
    server stops the tenant's next run."""
    srv = await start(tmp_path, monkeypatch, tenant_budget_usd=0.25)
    key = srv.bootstrap_key or ""
    with FakeEndpoint(chat_reply("a", usage=(100, 0))) as llm:  # $0.10 per call
        try:
            async with keyed_channel(srv.port, key) as channel:
                first, _ = await run_to_end(
                    Stubs(channel),
                    pb.CreateRunRequest(
                        items=[item_pb2.Item(input="q")], target=chat(llm.url), graders=[exact()], warmup_runs=2
                    ),
                )
        finally:
            await srv.stop(grace=0.5)
        second, results = await next_run_after_a_restart(tmp_path, monkeypatch, key, llm.url)
        calls = len(llm.seen)
    assert first.cost_usd == pytest.approx(0.3), "two warmups and the measured call"
    assert second.status == run_pb2.RUN_STATUS_FAILED and second.error.code == "BUDGET_EXCEEDED", second
    assert results == [] and calls == 3


async def test_definitions_are_bounded_so_every_run_and_list_can_be_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Graders and targets had no size bound: a CreateRun just under --max-message-bytes made a run whose
    every Run (the CreateRun answer, GetRun, ListRuns, its events) was larger than any message, so the
    caller was told it failed while it ran, and nobody could ever read it. A grader's or target's
    definition is at most 256 KiB, a run's together at most a quarter of --max-message-bytes (1 MiB
    here), whether given inline or saved; a refused call writes nothing."""
    srv = await start(tmp_path, monkeypatch, max_message_bytes=1 << 20)
    assert srv.bootstrap_key
    big = "x" * (300 << 10)
    try:
        async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
            stubs = Stubs(channel)
            large_grader = grader_pb2.Grader(name="big", contains=grader_pb2.Contains(values=[big]))
            large_target = target_pb2.Target(chat=target_pb2.ChatTarget(model="m", system_prompt=big))
            refused = {
                "graders[1]": stubs.runs.CreateRun(
                    pb.CreateRunRequest(
                        items=[item_pb2.Item(input="q")],
                        target=target_pb2.Target(echo={}),
                        graders=[exact(), large_grader],
                    )
                ),
                "target": stubs.runs.CreateRun(
                    pb.CreateRunRequest(items=[item_pb2.Item(input="q")], target=large_target, graders=[exact()])
                ),
                "grader.grader": stubs.graders.CreateGrader(
                    gs.CreateGraderRequest(grader=gs.SavedGrader(grader=large_grader))
                ),
                "target.target": stubs.targets.CreateTarget(
                    ts.CreateTargetRequest(target=ts.SavedTarget(target=large_target))
                ),
            }
            for field, call in refused.items():
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
                assert "at most 262144" in violations(err.value)[field], field
            # Each under 256 KiB, but 1 MiB together: past a quarter of the largest message.
            fair = [
                grader_pb2.Grader(name=f"g{i}", contains=grader_pb2.Contains(values=["y" * (200 << 10)]))
                for i in range(2)
            ]
            saved = (
                await stubs.graders.CreateGrader(gs.CreateGraderRequest(grader=gs.SavedGrader(grader=fair[0])))
            ).grader
            together = pb.CreateRunRequest(
                items=[item_pb2.Item(input="q")],
                target=target_pb2.Target(echo={}),
                graders=[grader_pb2.Grader(saved=grader_pb2.SavedGraderRef(grader_id=saved.id)), fair[1]],
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stubs.runs.CreateRun(together)  # small on the wire: the saved grader counts once resolved
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "a quarter of the largest message" in violations(err.value)["graders"]
            assert not (await stubs.runs.ListRuns(pb.ListRunsRequest())).runs
            assert not (await stubs.targets.ListTargets(ts.ListTargetsRequest())).targets
            # One of them is fine, and reads back.
            del together.graders[1]
            created = (await stubs.runs.CreateRun(together)).run
            await watch_all(stubs.runs, created.id)
            assert (
                await stubs.runs.GetRun(pb.GetRunRequest(run_id=created.id))
            ).run.status == run_pb2.RUN_STATUS_SUCCEEDED
            # Lists of saved definitions stop at the page's bytes (half of --max-message-bytes; less here).
            srv.page_tokens.page_bytes = 450_000
            await stubs.graders.CreateGrader(gs.CreateGraderRequest(grader=gs.SavedGrader(grader=fair[1])))
            fair[1].name = "g2"
            await stubs.graders.CreateGrader(gs.CreateGraderRequest(grader=gs.SavedGrader(grader=fair[1])))
            sizable = chat("http://127.0.0.1:9", system_prompt="z" * (200 << 10))
            for _ in range(3):
                await stubs.targets.CreateTarget(ts.CreateTargetRequest(target=ts.SavedTarget(target=sizable)))
            graders = await stubs.graders.ListGraders(gs.ListGradersRequest())
            more_graders = await stubs.graders.ListGraders(gs.ListGradersRequest(page_token=graders.next_page_token))
            assert (len(graders.graders), len(more_graders.graders), more_graders.next_page_token) == (2, 1, "")
            targets = await stubs.targets.ListTargets(ts.ListTargetsRequest())
            more_targets = await stubs.targets.ListTargets(ts.ListTargetsRequest(page_token=targets.next_page_token))
            assert (len(targets.targets), len(more_targets.targets), more_targets.next_page_token) == (2, 1, "")
    finally:
        await srv.stop(grace=0.5)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-A", "b\r\nX-Evil: 1"),
        ("X-A", "b\nc"),
        ("X-A", "b\x01"),
        ("X-A", " b"),
        ("X-A", "é"),
        ("X A:", "b"),
        ("", "b"),
    ],
)
async def test_endpoint_headers_http_cannot_send_are_refused(refusing_svc, name: str, value: str) -> None:
    """A header value with CR/LF or a name that is no token was accepted by CreateTarget and an inline
    CreateRun; every evaluation then failed before its call was sent (LocalProtocolError), 5 times each."""
    _, stubs = refusing_svc
    endpoint = target_pb2.Endpoint(base_url="https://api.example.com/v1", headers={name: value, "X-Fine": "a\tb"})
    chat = target_pb2.Target(chat=target_pb2.ChatTarget(model="m", endpoint=endpoint))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.targets.CreateTarget(ts.CreateTargetRequest(target=ts.SavedTarget(target=chat)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(violations(err.value)) == [f"target.target.chat.endpoint.headers[{name}]"], violations(err.value)
    http = target_pb2.Target(http=target_pb2.HttpTarget(endpoint=endpoint))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.runs.CreateRun(
            pb.CreateRunRequest(items=[item_pb2.Item(input="q")], target=http, graders=[exact()])
        )
    assert list(violations(err.value)) == [f"target.http.endpoint.headers[{name}]"], violations(err.value)


async def test_a_request_that_cannot_be_sent_is_not_retried() -> None:
    """A LocalProtocolError is raised before anything is sent, and the same at every attempt: it was
    retried 5 times. It fails the call at once."""
    outbound = Outbound(Settings(outbound_allow="127.0.0.1", http_retries=4))
    try:
        with FakeEndpoint(Reply({})) as endpoint:
            started = time.monotonic()
            with pytest.raises(outbound_module.OutboundError, match="LocalProtocolError") as err:
                await outbound.post_json(endpoint.url, {}, {"x-a": "b\r\nx-evil: 1"})
            assert endpoint.seen == []
        assert "gave up" not in str(err.value) and time.monotonic() - started < 1.0
    finally:
        await outbound.close()


async def end_a_run_by_its_budget_with_jobs_stopped(stubs: Stubs) -> tuple[run_pb2.Run, list[pb.WatchRunResponse]]:
    """Item A's target call answers ($0.10) and its judge call is held; then B's target call answers
    ($0.20 spent, past the run's $0.15), B's judge is refused and the run ends, A's held judge call
    abandoned. The run as GetRun reads it, and every event its watcher saw."""
    held_target = chat_reply("a", usage=(100, 0))  # $0.10 per call
    held_target.gate = threading.Event()
    held_judge = judge_reply({"passed": True, "reason": "r"})
    held_judge.gate = threading.Event()
    with FakeEndpoint(chat_reply("a", usage=(100, 0)), held_target) as llm, FakeEndpoint(held_judge) as judging:
        try:
            created = await stubs.runs.CreateRun(
                pb.CreateRunRequest(
                    items=[item_pb2.Item(input="A"), item_pb2.Item(input="B")],
                    target=chat(llm.url),
                    graders=[judge(judging.url, mode=Judge.MODE_CRITERIA, criteria="c")],
                    max_cost_usd=0.15,
                )
            )
            watching = asyncio.ensure_future(watch_all(stubs.runs, created.run.id))
            assert await asyncio.to_thread(llm.wait_seen, 2, 30), "both target calls started"
            assert await asyncio.to_thread(judging.wait_seen, 1, 30), "A's judge call is held"
            held_target.gate.set()  # B's target call answers: $0.20 spent, B's judge call is refused
            events = await asyncio.wait_for(watching, 30)
        finally:
            held_target.gate.set()
            held_judge.gate.set()
        assert len(judging.seen) == 1
    run = (await stubs.runs.GetRun(pb.GetRunRequest(run_id=created.run.id))).run
    assert run.status == run_pb2.RUN_STATUS_FAILED and run.error.code == "BUDGET_EXCEEDED", run
    assert run.counts.completed_evaluations == 0
    return run, events


async def test_a_run_ended_by_its_budget_records_what_its_stopped_jobs_had_spent(svc) -> None:
    """A job stopped without a result as its run's budget ran out handed nothing to the recorder, so the
    calls it had answered never reached the run's cost_usd (a $5 budget, $1 calls: 8 answered, cost_usd
    0.0). Both answered target calls are written with the run's end, in its terminal event and GetRun
    alike, and in the tenant's spend."""
    srv, stubs = svc
    run, events = await end_a_run_by_its_budget_with_jobs_stopped(stubs)
    assert events[-1].run.cost_usd == pytest.approx(0.2) and run.cost_usd == pytest.approx(0.2)
    assert run.etag == events[-1].run.etag, "one version: nothing changed the run after its terminal event"
    assert await committed_spend(srv) == pytest.approx(0.2)


async def test_a_budget_end_committed_with_its_answer_lost_counts_its_stopped_spend_once(
    svc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL can commit a run's end and lose the connection before the answer: the executor tries
    again, finds the run ended and took it for ended otherwise (cancelled), so it added the stopped jobs'
    $0.20, already in the run's cost_usd and the tenant's spend, to the tenant's spend a second time.
    The retry names the same ending (its end time), so it is told apart. The terminal event, committed
    but never handed to the watcher, still reaches it."""
    srv, stubs = svc
    real_fail_early = executor_module.fail_early
    lost: list[str] = []

    async def answer_lost_once(*args: Any, **kwargs: Any) -> Any:
        end = await real_fail_early(*args, **kwargs)
        if not lost:
            lost.append(args[2])
            raise ConnectionError("connection reset after COMMIT")
        return end

    monkeypatch.setattr(executor_module, "fail_early", answer_lost_once)
    run, events = await end_a_run_by_its_budget_with_jobs_stopped(stubs)
    assert lost == [run.id]
    assert events[-1].run.status == run_pb2.RUN_STATUS_FAILED and events[-1].run.cost_usd == pytest.approx(0.2)
    assert run.cost_usd == pytest.approx(0.2)
    assert await committed_spend(srv) == pytest.approx(0.2)


async def test_a_tenant_budget_counts_a_stopped_runs_answered_calls_after_a_restart(tmp_path, monkeypatch) -> None:
    """The tenant's budget is read back from its runs' cost_usd after a restart: a run ended by the
    budget after its warmups answered recorded cost_usd 0, so the restarted server had forgotten them
    and let the tenant's next run spend again."""
    srv = await start(tmp_path, monkeypatch, tenant_budget_usd=0.25)
    key = srv.bootstrap_key or ""
    with FakeEndpoint(chat_reply("a", usage=(100, 0))) as llm:  # $0.10 per call
        try:
            async with keyed_channel(srv.port, key) as channel:
                stubs = Stubs(channel)
                created = await stubs.runs.CreateRun(
                    pb.CreateRunRequest(
                        items=[item_pb2.Item(input="q")], target=chat(llm.url), graders=[exact()], warmup_runs=5
                    )
                )
                events = await watch_all(stubs.runs, created.run.id)
                first = (await stubs.runs.GetRun(pb.GetRunRequest(run_id=created.run.id))).run
        finally:
            await srv.stop(grace=0.5)
        second, results = await next_run_after_a_restart(tmp_path, monkeypatch, key, llm.url)
        calls = len(llm.seen)
    assert first.status == run_pb2.RUN_STATUS_FAILED and first.error.code == "BUDGET_EXCEEDED", first
    # Three warmups answered ($0.30, past $0.25): the fourth call never started, and the job never got a result.
    assert first.cost_usd == pytest.approx(0.3) and events[-1].run.cost_usd == pytest.approx(0.3)
    assert second.status == run_pb2.RUN_STATUS_FAILED and second.error.code == "BUDGET_EXCEEDED", second
    assert results == [] and calls == 3


async def committed_spend(srv: EvalServer, tenant: str = "default") -> float:
    """The tenant's spend as the database holds it (what a restarted server's budget starts from)."""
    async with srv.db.read() as conn:
        return (await usage.spend(conn, [tenant]))[tenant]


async def spend_then_hold(stubs: Stubs, llm: FakeEndpoint, judging: FakeEndpoint) -> str:
    """A one-item run whose target call answers ($0.30) and whose judge call is held: its job has paid
    for a call and has no result yet. Its id."""
    created = await stubs.runs.CreateRun(
        pb.CreateRunRequest(
            items=[item_pb2.Item(input="q")],
            target=chat(llm.url),
            graders=[judge(judging.url, mode=Judge.MODE_CRITERIA, criteria="c")],
        )
    )
    assert await asyncio.to_thread(judging.wait_seen, 1, 30), "the judge call is held"
    return created.run.id


LOOP_WRITE_FAILS = "shutdown, the record loop's write failing"
add_to_totals_as_shipped = usage.add_to_totals


@pytest.mark.parametrize("ending", ["cancel", "delete", "shutdown", LOOP_WRITE_FAILS])
async def test_a_tenant_budget_counts_the_answered_calls_of_jobs_stopped_without_a_result(
    tmp_path, monkeypatch, ending: str
) -> None:
    """A job stopped without a result - its run cancelled or deleted, or the server shut down - had paid
    for the calls that answered, yet no run's cost_usd holds them: a restarted server's budget, read back
    from the runs' cost_usd, forgot them (a tenant that cancelled runs spent $47-58 against $20). They are
    the tenant's stopped spend now, written as the job stops (not only at shutdown), and counted. At
    shutdown, what the record loop could not write (the database refused it as the loop ended) is written
    by the executor's stop once the loops have ended."""
    srv = await start(tmp_path, monkeypatch)
    key = srv.bootstrap_key or ""
    refused: list[dict[str, float]] = []
    if ending == LOOP_WRITE_FAILS:
        executor, add_to_totals = srv.executor, usage.add_to_totals

        async def refused_while_the_loops_run(conn: Any, **totals: Any) -> None:
            if executor._stopping and executor._loops and totals.get("spent_usd"):
                refused.append(dict(totals["spent_usd"]))
                raise ConnectionError("the database went away")
            await add_to_totals(conn, **totals)

        monkeypatch.setattr(usage, "add_to_totals", refused_while_the_loops_run)
    held_judge = judge_reply({"passed": True, "reason": "r"})
    held_judge.gate = threading.Event()
    with FakeEndpoint(chat_reply("a", usage=(300, 0))) as llm, FakeEndpoint(held_judge) as judging:
        try:
            async with keyed_channel(srv.port, key) as channel:
                stubs = Stubs(channel)
                run_id = await spend_then_hold(stubs, llm, judging)
                if ending == "cancel":
                    await stubs.runs.CancelRun(pb.CancelRunRequest(run_id=run_id))
                elif ending == "delete":
                    await stubs.runs.DeleteRun(pb.DeleteRunRequest(run_id=run_id))
                if ending in ("cancel", "delete"):
                    deadline = time.monotonic() + 15
                    while await committed_spend(srv) < 0.3 and time.monotonic() < deadline:
                        await asyncio.sleep(0.01)
                    assert await committed_spend(srv) == pytest.approx(0.3), "written as the job stopped"
        finally:
            await srv.stop(grace=0.5)
            held_judge.gate.set()
        monkeypatch.setattr(usage, "add_to_totals", add_to_totals_as_shipped)
        second, results = await next_run_after_a_restart(tmp_path, monkeypatch, key, llm.url)
        calls = len(llm.seen)
    assert refused == ([{"default": pytest.approx(0.3)}] if ending == LOOP_WRITE_FAILS else [])
    assert second.status == run_pb2.RUN_STATUS_FAILED and second.error.code == "BUDGET_EXCEEDED", second
    assert results == [] and calls == 1, "the restarted server's budget counted the first run's $0.30"


@pytest.mark.skipif(not USE_POSTGRES, reason="replicas share a PostgreSQL database (EVALSVC_TEST_DB=postgres)")
@pytest.mark.parametrize("seen", ["loading its next run", "during its run"])
async def test_a_replica_counts_what_another_spent_against_the_tenants_budget(tmp_path, monkeypatch, seen: str) -> None:
    """Each replica counted the tenant's spend it read with its first run of the tenant plus what it spent
    itself, so two replicas let a tenant spend twice its budget ($38 of $20). A replica reads the committed
    spend again as it loads a run, and every lease interval while it executes one. Replica B, its one
    worker held by run R0's target call ($0.10), has read the tenant's spend ($0); replica A runs R1 ($0.30,
    past the $0.25 budget); then B's next call is refused: R2's (loaded after R1), or R0's judge (the
    refresh while R0 runs)."""
    during = seen == "during its run"
    db = postgres_url(tmp_path, "replicas")
    budget = {"db": db, "tenant_budget_usd": 0.25, "workers": 1, "lease_ttl_s": 1.5 if during else 60.0}
    b = await start(tmp_path / "b", monkeypatch, **budget)
    held = chat_reply("a", usage=(100, 0))  # $0.10
    held.gate = threading.Event()
    a: EvalServer | None = None
    with (
        FakeEndpoint(held) as holding,
        FakeEndpoint(chat_reply("a", usage=(300, 0))) as paying,
        FakeEndpoint(judge_reply({"passed": True, "reason": "r"})) as judging,
    ):
        try:
            async with keyed_channel(b.port, b.bootstrap_key or "") as channel:
                stubs = Stubs(channel)
                graders = [judge(judging.url, mode=Judge.MODE_CRITERIA, criteria="c")] if during else [exact()]
                r0 = await stubs.runs.CreateRun(
                    pb.CreateRunRequest(items=[item_pb2.Item(input="q")], target=chat(holding.url), graders=graders)
                )
                assert await asyncio.to_thread(holding.wait_seen, 1, 30), "B's one worker is held by R0"
                a = await start(tmp_path / "a", monkeypatch, **budget)
                # Watched on A: replicas in one process do not hear each other's notifications (one process id).
                async with keyed_channel(a.port, b.bootstrap_key or "") as on_a:
                    r1, _ = await run_to_end(
                        Stubs(on_a),
                        pb.CreateRunRequest(
                            items=[item_pb2.Item(input="q")], target=chat(paying.url), graders=[exact()]
                        ),
                    )
                await a.stop(grace=0.5)
                assert r1.status == run_pb2.RUN_STATUS_SUCCEEDED and r1.cost_usd == pytest.approx(0.3), r1
                if during:
                    # No event marks B's refresh (every lease interval, 0.5 s here): wait for its count.
                    await until(lambda: b.executor._tenant_spent.get("default", 0.0) >= 0.3)
                r2 = asyncio.ensure_future(
                    run_to_end(
                        stubs,
                        pb.CreateRunRequest(
                            items=[item_pb2.Item(input="q")], target=chat(paying.url), graders=[exact()]
                        ),
                    )
                )
                held.gate.set()
                await watch_all(stubs.runs, r0.run.id)
                first = (await stubs.runs.GetRun(pb.GetRunRequest(run_id=r0.run.id))).run
                second, results = await r2
        finally:
            held.gate.set()
            if a is not None:
                await a.stop(grace=0.5)
            await b.stop(grace=0.5)
        paid_calls, judge_calls = len(paying.seen), len(judging.seen)
    assert second.status == run_pb2.RUN_STATUS_FAILED and second.error.code == "BUDGET_EXCEEDED", second
    assert results == [] and paid_calls == 1, "B refused R2's call: A's $0.30 counted"
    if during:
        assert first.error.code == "BUDGET_EXCEEDED" and judge_calls == 0, "B refused R0's judge call"
    else:
        assert first.status == run_pb2.RUN_STATUS_SUCCEEDED, first
