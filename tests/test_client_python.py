"""The Python client (clients/python, `evalsvc_client`) against real servers: every method, errors, retries,
and a watch that resumes across a kill -9 and restart of the server on the same port. Chat and HTTP targets and
the LLM judge call real HTTP servers standing in for the endpoints (tests/fake_llm.py)."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "clients" / "python"))

from evalsvc_client import (
    AlreadyExistsError,
    AsyncEvalClient,
    EvalClient,
    EvalError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    RetryPolicy,
    UnauthenticatedError,
    UnavailableError,
    builders,
    pb,
)

from evalsvc.server import EvalServer
from tests.conftest import make_settings
from tests.fake_llm import FakeEndpoint, Reply, chat_reply, judge_reply
from tests.procs import ServerProcess, free_port


def _items(n: int, *, wrong_every: int = 0) -> list[pb.Item]:
    return [
        builders.item(
            f"question {i}",
            f"answer {i}",
            id=f"i{i}",
            response="nope" if wrong_every and i % wrong_every == 0 else f"answer {i}",
            cost_usd=0.001,
        )
        for i in range(n)
    ]


@pytest.fixture
async def client(server: EvalServer) -> AsyncIterator[AsyncEvalClient]:
    assert server.bootstrap_key
    async with AsyncEvalClient(f"127.0.0.1:{server.port}", api_key=server.bootstrap_key) as c:
        yield c


async def test_create_watch_get_list_results(client: AsyncEvalClient) -> None:
    run = await client.create_run(
        items=_items(5, wrong_every=2),
        target=builders.provided(),
        graders=[builders.exact_match("exact"), {"name": "has", "contains": {"values": ["answer"]}}],
        display_name="client test",
        labels={"suite": "client"},
        pass_threshold=50,
    )
    assert run.id and run.display_name == "client test"
    uuid.UUID(run.request_id)  # a uuid4 was generated for the idempotency key

    events = [e async for e in client.watch(run.id)]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].HasField("run") and events[-1].run.status == pb.run.RUN_STATUS_SUCCEEDED
    assert sum(e.HasField("result") for e in events) == 10

    # Resuming from a seq gives exactly the rest.
    rest = [e async for e in client.watch(run.id, after_seq=4)]
    assert [e.seq for e in rest] == [e.seq for e in events[4:]]

    got = await client.get_run(run.id)
    assert got.status == pb.run.RUN_STATUS_SUCCEEDED and got.last_seq == events[-1].seq
    assert (await client.wait(run.id)).status == pb.run.RUN_STATUS_SUCCEEDED

    results = [r async for r in client.list_results(run.id, page_size=3)]  # four pages
    assert len(results) == 10 and len({r.id for r in results}) == 10
    failed = [r async for r in client.list_results(run.id, state=pb.run.RESULT_STATE_FAILED, page_size=2)]
    assert {r.item_id for r in failed} == {"i0", "i2", "i4"}

    listed = [r.id async for r in client.list_runs(labels={"suite": "client"}, page_size=1)]
    assert listed == [run.id]
    by_status = [r.id async for r in client.list_runs(statuses=[pb.run.RUN_STATUS_SUCCEEDED])]
    assert run.id in by_status
    assert [r async for r in client.list_runs(statuses=[pb.run.RUN_STATUS_CANCELLED])] == []


async def test_create_run_is_idempotent_by_request_id(client: AsyncEvalClient) -> None:
    kwargs = {"items": _items(2), "target": "provided", "graders": [{"exact_match": {}}], "request_id": "same-key"}
    first = await client.create_run(**kwargs)  # type: ignore[arg-type]
    again = await client.create_run(**kwargs)  # type: ignore[arg-type]
    assert first.id == again.id and first.request_id == "same-key"
    request = pb.runs.CreateRunRequest(target=builders.echo(), graders=[builders.exact_match()], items=_items(1))
    created = await client.create_run_from(request)
    assert created.job_count == 1 and request.request_id  # filled in before the first attempt


async def test_list_runs_limit_and_pages(client: AsyncEvalClient) -> None:
    ids = [
        (await client.create_run(items=_items(1), target="echo", graders=[builders.exact_match()])).id for _ in range(3)
    ]
    listed = [r.id async for r in client.list_runs(page_size=2)]
    assert listed[:3] == ids[::-1]  # newest first, across pages
    assert len([r async for r in client.list_runs(page_size=1, limit=2)]) == 2


async def test_list_runs_filters_orders_and_takes_the_basic_view(client: AsyncEvalClient) -> None:
    names = ["nightly-a", "adhoc", "nightly-b"]
    ids = [
        (await client.create_run(items=_items(1), target="echo", graders=[builders.exact_match()], display_name=n)).id
        for n in names
    ]
    nightly = client.list_runs(
        filter='display_name:"nightly-"', order_by="create_time", view=pb.runs.RUN_VIEW_BASIC, page_size=1
    )
    listed = [r async for r in nightly]
    assert [r.id for r in listed] == [ids[0], ids[2]]  # oldest first, across pages
    assert not any(r.HasField("target") or r.graders for r in listed) and listed[0].display_name == "nightly-a"


async def test_cancel_run(client: AsyncEvalClient) -> None:
    run = await client.create_run(items=_items(2000), target="provided", graders=[builders.exact_match()])
    cancelled = await client.cancel_run(run.id)
    assert cancelled.status == pb.run.RUN_STATUS_CANCELLED
    assert (await client.cancel_run(run.id)).status == pb.run.RUN_STATUS_CANCELLED  # idempotent
    events = [e async for e in client.watch(run.id)]
    assert events[-1].run.status == pb.run.RUN_STATUS_CANCELLED

    done = await client.create_run(items=_items(1), target="provided", graders=[builders.exact_match()])
    await client.wait(done.id)
    with pytest.raises(FailedPreconditionError) as info:
        await client.cancel_run(done.id)
    assert info.value.reason == "RUN_ALREADY_FINISHED"


async def test_create_run_takes_every_setting_of_the_request(client: AsyncEvalClient) -> None:
    """create_run had no max_cost_usd, annotations or cache_mode (the README suggests max_cost_usd)."""
    run = await client.create_run(
        items=_items(1),
        target="provided",
        graders=[builders.exact_match()],
        max_cost_usd=1.5,
        annotations={"ticket": "EV-1"},
        cache_mode="replay",
    )
    assert run.max_cost_usd == 1.5 and dict(run.annotations) == {"ticket": "EV-1"}
    assert run.cache_mode == pb.cache.CACHE_MODE_REPLAY

    def blocking() -> pb.Run:
        with EvalClient(client.options.target, options=client.options) as sync:
            return sync.create_run(
                items=_items(1), target="provided", graders=[builders.exact_match()], cache_mode=pb.cache.CACHE_MODE_OFF
            )

    assert (await asyncio.to_thread(blocking)).cache_mode == pb.cache.CACHE_MODE_OFF
    with pytest.raises(ValueError, match="replay") as refused:
        await client.create_run(items=_items(1), target="provided", graders=[builders.exact_match()], cache_mode="x")
    # The SDK's parameter is named, not evalctl's `--cache` flag (which a library's caller never used).
    assert str(refused.value).startswith("cache_mode: ") and "--cache" not in str(refused.value), refused.value


async def test_update_delete_undelete_run(client: AsyncEvalClient) -> None:
    run = await client.create_run(items=_items(1), target="provided", graders=[builders.exact_match()])
    renamed = await client.update_run(run.id, display_name="renamed", annotations={"note": "kept"})
    assert renamed.display_name == "renamed" and dict(renamed.annotations) == {"note": "kept"}
    assert (await client.delete_run(run.id)).HasField("delete_time")
    assert run.id not in [r.id async for r in client.list_runs()]
    assert run.id in [r.id async for r in client.list_runs(show_deleted=True)]  # it could not ask for them
    assert not (await client.undelete_run(run.id)).HasField("delete_time")
    assert run.id in [r.id async for r in client.list_runs()]


async def test_list_results_of_several_states_and_update_run_by_key(client: AsyncEvalClient) -> None:
    """list_results(states=...) lists what needs triage (failed or errored) in one call; update_run's
    set_labels/remove_labels change those keys alone, where labels= replaces the map whole."""
    items = [*_items(3, wrong_every=2), builders.item("no answer recorded", "x", id="e")]  # i0, i2 fail; e errors
    created = await client.create_run(
        items=items, target="provided", graders=[builders.exact_match()], labels={"team": "a", "old": "x"}
    )
    run = await client.wait(created.id)
    triage = [pb.run.RESULT_STATE_FAILED, pb.run.RESULT_STATE_ERROR]
    listed = [r async for r in client.list_results(run.id, states=triage, page_size=1)]  # three pages
    assert {r.item_id: r.state for r in listed} == {
        "i0": pb.run.RESULT_STATE_FAILED,
        "i2": pb.run.RESULT_STATE_FAILED,
        "e": pb.run.RESULT_STATE_ERROR,
    }
    with pytest.raises(InvalidArgumentError) as both:
        [r async for r in client.list_results(run.id, state=pb.run.RESULT_STATE_FAILED, states=triage)]
    assert {path for path, _ in both.value.field_violations} == {"state", "states"}

    updated = await client.update_run(run.id, set_labels={"stage": "triaged", "team": "b"}, remove_labels=["old"])
    assert dict(updated.labels) == {"team": "b", "stage": "triaged"} and updated.display_name == run.display_name
    odd = await client.update_run(run.id, set_labels={"cost-center": "1"})  # not an identifier: quoted in the mask
    assert dict(odd.labels) == {"team": "b", "stage": "triaged", "cost-center": "1"}
    with pytest.raises(ValueError, match="not both"):
        await client.update_run(run.id, labels={"a": "b"}, set_labels={"c": "d"})
    # One key to remove, as a string, is that key (it was the keys c, o, s, t, ...).
    fewer = await client.update_run(run.id, remove_labels="cost-center")
    assert dict(fewer.labels) == {"team": "b", "stage": "triaged"}


async def test_update_and_delete_run_check_an_etag(client: AsyncEvalClient) -> None:
    """update_run and delete_run could not send an etag (AIP-154): a change made since a read went unnoticed."""
    created = await client.create_run(items=_items(1), target="provided", graders=[builders.exact_match()])
    run = await client.wait(created.id)  # ended: nothing but these calls changes it now
    renamed = await client.update_run(run.id, display_name="first", etag=run.etag)
    assert renamed.display_name == "first" and renamed.etag != run.etag
    for stale in (
        client.update_run(run.id, display_name="second", etag=run.etag),
        client.delete_run(run.id, etag=run.etag),
    ):
        with pytest.raises(EvalError) as refused:
            await stale
        assert (refused.value.code, refused.value.reason) == (grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    assert (await client.get_run(run.id)).display_name == "first"
    assert (await client.delete_run(run.id, etag=renamed.etag)).HasField("delete_time")


async def test_rerun_run(client: AsyncEvalClient) -> None:
    """rerun_run: the errored items by default, "failed_or_errored" and "all" by name or as a RerunScope, one
    run per request_id, and the service's refusals as the SDK's errors."""
    items = _items(4, wrong_every=3)  # i0 and i3 wrong: FAILED
    items[1].ClearField("response")  # i1 without a response: ERROR
    source = await client.wait(
        (
            await client.create_run(items=items, target="provided", graders=[builders.exact_match()], pass_threshold=50)
        ).id
    )
    errored = await client.rerun_run(source.id)
    assert errored.rerun_of == source.id and errored.counts.total_items == 1 and errored.pass_threshold == 50
    assert [r.item_id async for r in client.list_results((await client.wait(errored.id)).id)] == ["i1"]
    both = await client.rerun_run(source.id, scope="failed_or_errored")
    assert both.counts.total_items == 3
    every = await client.rerun_run(source.id, scope=pb.runs.RERUN_SCOPE_ITEMS_ALL, request_id="again")
    assert every.counts.total_items == 4
    assert (await client.rerun_run(source.id, scope="all", request_id="again")).id == every.id
    with pytest.raises(AlreadyExistsError):
        await client.rerun_run(source.id, scope="errored", request_id="again")
    with pytest.raises(ValueError, match="unknown rerun scope"):
        await client.rerun_run(source.id, scope="some")
    with pytest.raises(NotFoundError):
        await client.rerun_run("run_nope")
    clean = await client.wait(
        (await client.create_run(items=_items(2), target="provided", graders=[builders.exact_match()])).id
    )
    with pytest.raises(FailedPreconditionError) as nothing:
        await client.rerun_run(clean.id)
    assert nothing.value.reason == "NOTHING_TO_RERUN"


async def test_datasets(client: AsyncEvalClient) -> None:
    dataset = await client.create_dataset("qa", description="a few questions", labels={"team": "eval"})
    assert dataset.id and dataset.item_count == 0
    added = await client.add_dataset_items(
        dataset.id, [*_items(4), {"id": "j", "input": "hi", "expected_output": "hi"}]
    )
    assert list(added.item_ids) == ["i0", "i1", "i2", "i3", "j"] and added.dataset.item_count == 5
    assert (await client.get_dataset(dataset.id)).item_count == 5
    items = [i.id async for i in client.list_dataset_items(dataset.id, page_size=2)]
    assert items == ["i0", "i1", "i2", "i3", "j"]
    other = await client.create_dataset("other")
    listed = [d.id async for d in client.list_datasets(page_size=1)]
    assert listed[:2] == [other.id, dataset.id]

    run = await client.create_run(
        dataset_id=dataset.id, item_ids=["i1", "j"], target="echo", graders=[{"exact_match": {}}]
    )
    final = await client.wait(run.id)
    assert final.dataset_id == dataset.id and final.counts.total_items == 2
    assert [r.id async for r in client.list_runs(dataset_id=dataset.id)] == [run.id]

    await client.delete_dataset(dataset.id)
    with pytest.raises(NotFoundError) as deleted:
        await client.get_dataset(dataset.id)
    assert deleted.value.reason == "DATASET_NOT_FOUND"
    with pytest.raises(NotFoundError):
        await client.delete_dataset(dataset.id)
    assert [d.id async for d in client.list_datasets()] == [other.id]
    assert (await client.get_run(run.id)).counts.total_items == 2  # the run keeps its copies


async def test_saved_graders_and_targets(client: AsyncEvalClient) -> None:
    details: dict[str, Any] = {"description": "names the capital", "labels": {"team": "eval"}}
    grader = await client.create_grader(
        "capital", builders.contains(["Paris"], "answer"), **details, request_id="grader-key"
    )
    assert grader.id.startswith("grd_") and (grader.version, grader.latest_version) == (1, 1)
    assert grader.display_name == "capital" and dict(grader.labels) == {"team": "eval"}
    again = await client.create_grader(
        "capital", {"name": "answer", "contains": {"values": ["Paris"]}}, **details, request_id="grader-key"
    )
    assert again == grader  # the request_id makes a repeat safe: the same grader, not a second one
    with pytest.raises(AlreadyExistsError) as conflict:
        await client.create_grader("other", builders.exact_match(), request_id="grader-key")
    assert conflict.value.reason == "REQUEST_ID_CONFLICT"

    updated = await client.update_grader(grader.id, {"name": "answer", "contains": {"values": ["Lyon"]}})
    assert (updated.id, updated.version, updated.latest_version) == (grader.id, 2, 2)
    latest = await client.get_grader(grader.id)
    assert latest.version == 2 and list(latest.grader.contains.values) == ["Lyon"]
    first = await client.get_grader(grader.id, version=1)
    assert (first.version, first.latest_version) == (1, 2) and list(first.grader.contains.values) == ["Paris"]
    other = await client.create_grader("exact", builders.exact_match())
    listed = [(g.id, g.version) async for g in client.list_graders(page_size=1)]  # two pages
    assert listed == [(other.id, 1), (grader.id, 2)]  # newest first, at their latest versions

    target = await client.create_target(
        "agent", builders.echo(model_id="echo-1"), description="says it back", labels={"team": "eval"}
    )
    assert target.id.startswith("tgt_") and target.target.WhichOneof("kind") == "echo"
    assert (await client.create_target("agent", "echo", request_id="target-key")).id != target.id
    assert (await client.create_target("agent", "echo", request_id="target-key")).id == (
        await client.create_target("agent", {"echo": {}}, request_id="target-key")
    ).id
    got = await client.get_target(target.id)
    assert got.display_name == "agent" and got.target.model_id == "echo-1" and dict(got.labels) == {"team": "eval"}
    targets = [t.id async for t in client.list_targets(page_size=1)]
    assert len(targets) == 2 and targets[-1] == target.id

    # A run of the saved target with the grader pinned at version 1 and at its latest version.
    run = await client.create_run(
        items=[builders.item("Paris", id="p")],
        target=builders.saved_target(target.id),
        graders=[builders.saved_grader(grader.id, 1, "pinned", weight=2), builders.saved_grader(grader.id)],
    )
    final = await client.wait(run.id)
    assert final.status == pb.run.RUN_STATUS_SUCCEEDED and final.counts.total_evaluations == 2
    assert final.target.WhichOneof("kind") == "echo" and final.target.model_id == "echo-1"  # the snapshot
    assert [(g.name, g.weight, list(g.contains.values)) for g in final.graders] == [
        ("pinned", 2, ["Paris"]),
        ("answer", 0, ["Lyon"]),
    ]
    states = {r.grader: r.state async for r in client.list_results(run.id)}
    assert states == {"pinned": pb.run.RESULT_STATE_PASSED, "answer": pb.run.RESULT_STATE_FAILED}

    with pytest.raises(NotFoundError) as missing_grader:
        await client.get_grader("grd_nope")
    assert missing_grader.value.reason == "GRADER_NOT_FOUND"
    with pytest.raises(NotFoundError):
        await client.get_grader(grader.id, version=3)
    with pytest.raises(NotFoundError):
        await client.update_grader("grd_nope", builders.exact_match())
    with pytest.raises(NotFoundError) as missing_target:
        await client.get_target("tgt_nope")
    assert missing_target.value.reason == "TARGET_NOT_FOUND"
    with pytest.raises(NotFoundError) as missing_ref:
        await client.create_run(items=_items(1), target="echo", graders=[builders.saved_grader("grd_nope")])
    assert missing_ref.value.reason == "GRADER_NOT_FOUND"
    with pytest.raises(InvalidArgumentError) as nested_grader:
        await client.create_grader("nested", builders.saved_grader(grader.id))
    assert "grader.grader.saved" in dict(nested_grader.value.field_violations)
    with pytest.raises(InvalidArgumentError) as nested_target:
        await client.create_target("nested", builders.saved_target(target.id))
    assert "target.target.saved_target_id" in dict(nested_target.value.field_violations)
    with pytest.raises(InvalidArgumentError) as bad_update:
        await client.update_grader(grader.id, builders.regex("("))
    assert "grader.regex.pattern" in dict(bad_update.value.field_violations)

    await client.delete_grader(grader.id)
    await client.delete_target(target.id)
    with pytest.raises(NotFoundError):
        await client.get_grader(grader.id, version=1)
    with pytest.raises(NotFoundError):
        await client.delete_grader(grader.id)
    with pytest.raises(NotFoundError) as deleted_target:
        await client.delete_target(target.id)
    assert deleted_target.value.reason == "TARGET_NOT_FOUND"
    assert len([r async for r in client.list_results(run.id)]) == 2  # the run keeps its copies


SECRET = "sk-test-0123456789abcdef"


async def test_chat_and_http_targets_and_llm_judge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chat_target, http_target and llm_judge builders, saved and inline, against endpoints on 127.0.0.1."""
    monkeypatch.setenv("EVALSVC_SECRET_LLM_KEY", SECRET)
    srv = EvalServer(make_settings(tmp_path, outbound_allow="127.0.0.1"))
    await srv.start()
    try:
        assert srv.bootstrap_key
        async with AsyncEvalClient(f"127.0.0.1:{srv.port}", api_key=srv.bootstrap_key) as client:
            weather = {"type": "object", "properties": {"city": {"type": "string"}}}
            with (
                FakeEndpoint(chat_reply("Paris, kindly.")) as llm,
                FakeEndpoint(judge_reply({"passed": True, "reason": "polite"})) as judge_llm,
            ):
                chat = builders.chat_target(
                    llm.url + "/v1",
                    "gpt-test",
                    api_key_secret="llm_key",
                    timeout_s=5,
                    system_prompt="Be brief.",
                    temperature=0.2,
                    max_tokens=64,
                    parameters={"seed": 7},
                    tools=[builders.tool("lookup", "find", weather), {"name": "book"}],
                    model_id="gpt-test",
                )
                judge = builders.llm_judge(
                    "criteria",
                    "polite",
                    criteria="The answer is polite.",
                    scoring="binary",
                    model="judge-test",
                    base_url=judge_llm.url + "/v1",
                    weight=3,
                )
                saved_chat = await client.create_target("assistant", chat)
                assert saved_chat.target == chat
                saved_judge = await client.create_grader("polite", judge)
                assert saved_judge.grader == judge
                run = await client.create_run(
                    items=[builders.item("Capital of France?", "Paris", id="q")],
                    target=builders.saved_target(saved_chat.id),
                    graders=[builders.saved_grader(saved_judge.id), builders.contains(["Paris"])],
                )
                final = await client.wait(run.id)
                sent, asked = llm.seen[0], judge_llm.seen[0].body
            assert final.status == pb.run.RUN_STATUS_SUCCEEDED and final.overall_passed
            assert final.target.chat.model == "gpt-test" and final.graders[0].llm_judge.criteria
            assert sent.path == "/v1/chat/completions" and sent.headers["authorization"] == f"Bearer {SECRET}"
            assert sent.body["model"] == "gpt-test" and sent.body["temperature"] == 0.2 and sent.body["seed"] == 7
            assert [m["role"] for m in sent.body["messages"]] == ["system", "user"]
            assert [t["function"]["name"] for t in sent.body["tools"]] == ["lookup", "book"]
            assert asked["model"] == "judge-test" and "The answer is polite." in str(asked["messages"])
            results = {r.grader: r async for r in client.list_results(run.id)}
            assert results["polite"].state == pb.run.RESULT_STATE_PASSED and results["polite"].score == 1.0
            assert results["contains"].output.content == "Paris, kindly."

            agent_reply = Reply({"content": "booked", "tool_calls": [{"name": "book", "arguments": {}}]})
            with FakeEndpoint(agent_reply) as agent:
                target = builders.http_target(
                    agent.url + "/agent", headers={"x-team": "a", "x-key": "secret:llm_key"}, timeout_s=5
                )
                saved_http = await client.create_target("webhook", target)
                run = await client.create_run(
                    items=[builders.item("book me", id="b")],
                    target=builders.saved_target(saved_http.id, model_id="agent-v2"),
                    graders=[builders.tool_calls(["book"]), builders.exact_match()],
                    pass_threshold=50,
                )
                final = await client.wait(run.id)
                sent = agent.seen[0]
            assert sent.path == "/agent" and sent.headers["x-key"] == SECRET and sent.body["item"]["id"] == "b"
            assert final.status == pb.run.RUN_STATUS_SUCCEEDED and final.target.model_id == "agent-v2"
            assert {r.grader: r.state async for r in client.list_results(run.id)} == {
                "tool_calls": pb.run.RESULT_STATE_PASSED,
                "exact_match": pb.run.RESULT_STATE_FAILED,
            }
            assert [t.id async for t in client.list_targets()] == [saved_http.id, saved_chat.id]

            with pytest.raises(InvalidArgumentError) as no_model:
                await client.create_target("bad", builders.chat_target(llm.url + "/v1", ""))
            assert "target.target.chat.model" in dict(no_model.value.field_violations)
            with pytest.raises(InvalidArgumentError) as no_secret:
                await client.create_target("bad", builders.http_target(agent.url, api_key_secret="missing"))
            assert "target.target.http.endpoint.api_key_secret" in dict(no_secret.value.field_violations)
    finally:
        await srv.stop(grace=1.0)


def test_judge_and_target_builders() -> None:
    levels = builders.llm_judge(
        "LEVELS", levels=[builders.judge_level("good", "right", passing=True), {"key": "bad"}], threshold=0
    )
    assert levels.name == "llm_judge" and levels.llm_judge.mode == pb.grader.LlmJudge.MODE_LEVELS
    assert [(lv.key, lv.passing) for lv in levels.llm_judge.levels] == [("good", True), ("bad", False)]
    assert not levels.llm_judge.HasField("endpoint")  # the server's default judge
    numeric = builders.llm_judge(pb.grader.LlmJudge.MODE_CRITERIA, criteria="c", scoring="numeric", threshold=6)
    assert numeric.llm_judge.scoring == pb.grader.LlmJudge.SCORING_NUMERIC and numeric.llm_judge.threshold == 6
    with pytest.raises(ValueError, match="accuracy"):
        builders.llm_judge("vibes")  # type: ignore[arg-type]
    assert not builders.chat_target("http://h/v1", "m").chat.HasField("temperature")  # the endpoint's default
    assert builders.saved_grader("grd_1") == pb.Grader(saved=pb.grader.SavedGraderRef(grader_id="grd_1"))
    assert builders.saved_target("tgt_1").saved_target_id == "tgt_1"


@dataclass
class _Flaky:
    """A stand-in GraderService/TargetService that answers UNAVAILABLE to the first call of every method."""

    seen: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))

    def handler(self, method: str, request_type: Any, reply: Callable[[Any], Any]) -> grpc.RpcMethodHandler:
        async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            self.seen[method].append(request)
            if len(self.seen[method]) == 1:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "not yet")
            return reply(request)

        return grpc.unary_unary_rpc_method_handler(
            handle, request_deserializer=request_type.FromString, response_serializer=lambda m: m.SerializeToString()
        )


async def test_create_get_list_are_retried_and_update_grader_is_not() -> None:
    flaky = _Flaky()
    g, t = pb.graders, pb.targets
    saved_grader = pb.SavedGrader(id="grd_1", version=1)
    saved_target = pb.SavedTarget(id="tgt_1")
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "evalsvc.v1.GraderService",
                {
                    "CreateGrader": flaky.handler(
                        "CreateGrader", g.CreateGraderRequest, lambda r: g.CreateGraderResponse(grader=saved_grader)
                    ),
                    "GetGrader": flaky.handler(
                        "GetGrader", g.GetGraderRequest, lambda r: g.GetGraderResponse(grader=saved_grader)
                    ),
                    "ListGraders": flaky.handler(
                        "ListGraders", g.ListGradersRequest, lambda r: g.ListGradersResponse(graders=[saved_grader])
                    ),
                    "UpdateGrader": flaky.handler(
                        "UpdateGrader", g.UpdateGraderRequest, lambda r: g.UpdateGraderResponse(grader=saved_grader)
                    ),
                },
            ),
            grpc.method_handlers_generic_handler(
                "evalsvc.v1.TargetService",
                {
                    "CreateTarget": flaky.handler(
                        "CreateTarget", t.CreateTargetRequest, lambda r: t.CreateTargetResponse(target=saved_target)
                    ),
                    "GetTarget": flaky.handler(
                        "GetTarget", t.GetTargetRequest, lambda r: t.GetTargetResponse(target=saved_target)
                    ),
                    "ListTargets": flaky.handler(
                        "ListTargets", t.ListTargetsRequest, lambda r: t.ListTargetsResponse(targets=[saved_target])
                    ),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        policy = RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.002)
        async with AsyncEvalClient(f"127.0.0.1:{port}", retry=policy) as client:
            assert (await client.create_grader("g", builders.exact_match())).id == "grd_1"
            assert (await client.get_grader("grd_1", 1)).id == "grd_1"
            assert [x.id async for x in client.list_graders()] == ["grd_1"]
            with pytest.raises(UnavailableError):
                await client.update_grader("grd_1", builders.exact_match())
            assert (await client.create_target("t", "echo")).id == "tgt_1"
            assert (await client.get_target("tgt_1")).id == "tgt_1"
            assert [x.id async for x in client.list_targets()] == ["tgt_1"]
        attempts = {method: len(requests) for method, requests in flaky.seen.items()}
        assert attempts == {
            "CreateGrader": 2,
            "GetGrader": 2,
            "ListGraders": 2,
            "UpdateGrader": 1,
            "CreateTarget": 2,
            "GetTarget": 2,
            "ListTargets": 2,
        }
        for method in ("CreateGrader", "CreateTarget"):  # both attempts carried one generated request_id
            first, second = (r.request_id for r in flaky.seen[method])
            assert first and first == second
        assert flaky.seen["GetGrader"][1].version == 1
    finally:
        await server.stop(grace=None)


async def test_every_violation_of_one_field_is_kept(client: AsyncEvalClient) -> None:
    """A label whose key and value are both wrong gets two violations of `labels[Bad Key]`; they were keyed by
    field in a dict, which kept the last one only."""
    with pytest.raises(InvalidArgumentError) as invalid:
        await client.create_run(
            items=_items(1), target="provided", graders=[builders.exact_match()], labels={"Bad Key": "v" * 100}
        )
    about_label = [why for path, why in invalid.value.field_violations if path == "labels[Bad Key]"]
    assert len(about_label) == 2 and about_label[0] != about_label[1], invalid.value.field_violations
    assert all(f"labels[Bad Key]: {why}" in str(invalid.value) for why in about_label)
    # Code written against the dict it was (0.1) still works: by field, the last description of a field.
    violations = invalid.value.field_violations
    assert "labels[Bad Key]" in violations and violations["labels[Bad Key]"] == about_label[-1]
    assert violations.get("labels[Bad Key]") == about_label[-1] and violations.get("nope") is None
    assert dict(violations.items()) == {"labels[Bad Key]": about_label[-1]} and list(violations.keys()) == [
        "labels[Bad Key]"
    ]
    assert violations[0].field == "labels[Bad Key]" and len(violations) == 2


async def test_errors_carry_reason_and_details(client: AsyncEvalClient, server: EvalServer) -> None:
    with pytest.raises(NotFoundError) as missing:
        await client.get_run("run_nope")
    assert missing.value.reason == "RUN_NOT_FOUND" and missing.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(NotFoundError):
        await client.get_dataset("ds_nope")
    with pytest.raises(InvalidArgumentError) as invalid:
        await client.create_run(items=_items(1), target="provided", graders=[builders.regex("(")])
    assert "graders[0].regex.pattern" in dict(invalid.value.field_violations)
    # An uncaught error's text says why, not only which field: it was "...: graders[0].regex.pattern".
    why = dict(invalid.value.field_violations)["graders[0].regex.pattern"]
    assert f"graders[0].regex.pattern: {why}" in str(invalid.value)

    run = await client.create_run(items=_items(1), target="provided", graders=[builders.exact_match()])
    final = await client.wait(run.id)
    with pytest.raises(OutOfRangeError) as out_of_range:
        async for _ in client.watch(run.id, after_seq=final.last_seq + 5):
            pass
    assert out_of_range.value.reason == "SEQ_OUT_OF_RANGE"

    async with AsyncEvalClient(f"127.0.0.1:{server.port}", api_key="evk_bad") as bad:
        with pytest.raises(UnauthenticatedError):
            await bad.get_run(run.id)
    async with AsyncEvalClient(f"127.0.0.1:{server.port}") as anonymous:
        with pytest.raises(UnauthenticatedError) as no_key:
            await anonymous.get_run(run.id)
        assert no_key.value.reason == "API_KEY_MISSING"


async def test_retries_honour_retry_info_and_watch_shows_heartbeats(tmp_path: Path) -> None:
    # One CreateRun token every 0.25 s: the second and third calls get RESOURCE_EXHAUSTED with RetryInfo and the
    # client waits at least retry_delay, then succeeds.
    srv = EvalServer(make_settings(tmp_path, create_run_rate=4.0, create_run_burst=1, heartbeat_s=0.2))
    await srv.start()
    try:
        assert srv.bootstrap_key
        policy = RetryPolicy(max_attempts=10, initial_backoff_s=0.01, max_backoff_s=0.02)
        async with AsyncEvalClient(f"127.0.0.1:{srv.port}", api_key=srv.bootstrap_key, retry=policy) as client:
            loop = asyncio.get_running_loop()
            started = loop.time()
            runs = [
                await client.create_run(items=_items(1), target="echo", graders=[builders.exact_match()])
                for _ in range(3)
            ]
            assert len({r.id for r in runs}) == 3
            assert loop.time() - started >= 0.4  # two waits of ~0.25 s, not ten 0.02 s backoffs

            no_retry = RetryPolicy(max_attempts=1)
            async with AsyncEvalClient(f"127.0.0.1:{srv.port}", api_key=srv.bootstrap_key, retry=no_retry) as once:
                with pytest.raises(Exception) as exhausted:
                    for _ in range(3):
                        await once.create_run(items=_items(1), target="echo", graders=[builders.exact_match()])
                assert getattr(exhausted.value, "retry_delay", None)

            # A watch of a finished run from its last seq ends at once; heartbeats are exposed on request.
            await client.wait(runs[0].id)
            big = await client.create_run(
                items=_items(1), target="echo", graders=[builders.exact_match()], request_id="hb"
            )
            final = await client.wait(big.id)
            assert [e async for e in client.watch(big.id, after_seq=final.last_seq)] == []
    finally:
        await srv.stop(grace=1.0)


async def test_compare_runs_and_list_comparison_items(client: AsyncEvalClient) -> None:
    baseline = await client.create_run(items=_items(12), target="provided", graders=[builders.exact_match()])
    candidate = await client.create_run(
        items=_items(12, wrong_every=2), target="provided", graders=[builders.exact_match()]
    )
    await client.wait(baseline.id)
    await client.wait(candidate.id)
    comparison = await client.compare_runs(baseline.id, candidate.id)
    exact = comparison.graders[0]
    assert (exact.regressed, exact.improved, exact.pairs) == (6, 0, 12)
    assert exact.verdict == pb.comparison.COMPARISON_VERDICT_REGRESSED
    regressed = [
        item.item_id
        async for item in client.list_comparison_items(
            baseline.id, candidate.id, change=pb.comparison.COMPARISON_CHANGE_REGRESSED, page_size=4
        )
    ]
    assert regressed == ["i0", "i10", "i2", "i4", "i6", "i8"]
    with pytest.raises(NotFoundError):
        await client.compare_runs(baseline.id, "run_nope")


async def test_sync_client_every_method(server: EvalServer) -> None:
    """The blocking client, driven from a thread (the in-process server runs on this test's loop)."""
    assert server.bootstrap_key
    target, key = f"127.0.0.1:{server.port}", server.bootstrap_key

    def scenario() -> None:
        with EvalClient(target, api_key=key) as client:
            dataset = client.create_dataset("sync")
            client.add_dataset_items(dataset.id, _items(3))
            assert client.get_dataset(dataset.id).item_count == 3
            assert [i.id for i in client.list_dataset_items(dataset.id, page_size=2)] == ["i0", "i1", "i2"]
            assert dataset.id in [d.id for d in client.list_datasets()]
            run = client.create_run(dataset_id=dataset.id, target="provided", graders=[builders.exact_match()])
            events = list(client.watch(run.id))
            assert [e.seq for e in events] == list(range(1, len(events) + 1))
            assert client.get_run(run.id).status == pb.run.RUN_STATUS_SUCCEEDED
            assert client.wait(run.id).counts.passed == 3
            assert len(list(client.list_results(run.id, page_size=2))) == 3
            assert (
                list(client.list_results(run.id, states=[pb.run.RESULT_STATE_FAILED, pb.run.RESULT_STATE_ERROR])) == []
            )
            labelled = client.update_run(run.id, set_labels={"k": "v"}, remove_labels=["absent"])
            assert dict(labelled.labels) == {"k": "v"}
            assert client.compare_runs(run.id, run.id).overall.both_passed == 3
            assert len(list(client.list_comparison_items(run.id, run.id, page_size=2))) == 3
            assert run.id in [r.id for r in client.list_runs(dataset_id=dataset.id)]
            with pytest.raises(FailedPreconditionError):
                client.cancel_run(run.id)
            again = client.rerun_run(run.id, scope="all", request_id="sync-rerun")
            assert again.rerun_of == run.id and again.dataset_id == dataset.id and again.counts.total_items == 3
            assert client.rerun_run(run.id, scope="all", request_id="sync-rerun").id == again.id
            with pytest.raises(FailedPreconditionError):
                client.rerun_run(run.id)  # nothing errored
            big = client.create_run(items=_items(500), target="provided", graders=[builders.exact_match()])
            assert client.cancel_run(big.id).status == pb.run.RUN_STATUS_CANCELLED
            with pytest.raises(NotFoundError):
                client.get_run("run_nope")
            with pytest.raises(OutOfRangeError):
                list(client.watch(run.id, after_seq=10_000))

    await asyncio.to_thread(scenario)


async def test_sync_client_saved_graders_and_targets(server: EvalServer) -> None:
    """The blocking client's GraderService and TargetService methods, and a run of saved definitions."""
    assert server.bootstrap_key
    target, key = f"127.0.0.1:{server.port}", server.bootstrap_key

    def scenario() -> None:
        with EvalClient(target, api_key=key) as client:
            grader = client.create_grader("capital", builders.contains(["Paris"], "answer"), request_id="g1")
            assert grader.version == 1 and client.create_grader("capital", grader.grader, request_id="g1") == grader
            updated = client.update_grader(grader.id, builders.contains(["Lyon"], "answer"))
            assert (updated.version, updated.latest_version) == (2, 2)
            assert client.get_grader(grader.id).version == 2
            assert list(client.get_grader(grader.id, 1).grader.contains.values) == ["Paris"]
            other = client.create_grader("exact", {"exact_match": {}})
            assert [(g.id, g.version) for g in client.list_graders(page_size=1)] == [(other.id, 1), (grader.id, 2)]

            saved = client.create_target("agent", builders.echo(), labels={"team": "eval"}, request_id="t1")
            assert client.create_target("agent", builders.echo(), labels={"team": "eval"}, request_id="t1") == saved
            assert client.get_target(saved.id) == saved
            provided = client.create_target("recorded", "provided")
            assert [t.id for t in client.list_targets(page_size=1)] == [provided.id, saved.id]

            run = client.create_run(
                items=[builders.item("Paris", id="p")],
                target=builders.saved_target(saved.id),
                graders=[builders.saved_grader(grader.id, version=1, name="pinned"), builders.saved_grader(other.id)],
            )
            final = client.wait(run.id)
            assert final.status == pb.run.RUN_STATUS_SUCCEEDED and final.target.WhichOneof("kind") == "echo"
            assert [g.name for g in final.graders] == ["pinned", other.id]  # saved without a name: its id
            assert {r.grader: r.state for r in client.list_results(run.id)} == {
                "pinned": pb.run.RESULT_STATE_PASSED,
                other.id: pb.run.RESULT_STATE_FAILED,  # the item has no expected output
            }
            with pytest.raises(NotFoundError):
                client.get_grader("grd_nope")
            with pytest.raises(NotFoundError):
                client.update_grader("grd_nope", builders.exact_match())
            with pytest.raises(NotFoundError):
                client.get_target("tgt_nope")
            with pytest.raises(InvalidArgumentError):
                client.create_target("nested", builders.saved_target(saved.id))

            client.delete_grader(grader.id)
            client.delete_target(saved.id)
            with pytest.raises(NotFoundError):
                client.get_grader(grader.id)
            with pytest.raises(NotFoundError):
                client.get_target(saved.id)
            dataset = client.create_dataset("to delete")
            client.delete_dataset(dataset.id)
            with pytest.raises(NotFoundError):
                client.delete_dataset(dataset.id)
            assert client.get_run(run.id).status == pb.run.RUN_STATUS_SUCCEEDED

    await asyncio.to_thread(scenario)


@pytest.mark.slow
async def test_watch_resumes_across_kill_9_and_restart_on_the_same_port(tmp_path: Path) -> None:
    db = f"sqlite+aiosqlite:///{tmp_path / 'resume.db'}"
    port = free_port()
    knobs = ("--grpc-addr", f"127.0.0.1:{port}", "--claim-batch", "25", "--workers", "25")
    first = ServerProcess(db, tmp_path / "first.log", *knobs)
    second: ServerProcess | None = None
    key = first.bootstrap_key()
    assert key and first.port == port
    seqs: list[int] = []
    final: pb.Run | None = None
    try:
        async with AsyncEvalClient(f"127.0.0.1:{port}", api_key=key) as client:
            run = await client.create_run(items=_items(2000), target="provided", graders=[builders.exact_match()])
            async for event in client.watch(run.id):
                seqs.append(event.seq)
                if len(seqs) == 300:
                    first.kill()  # mid-run: the stream drops, reconnects are refused until the restart
                    second = ServerProcess(db, tmp_path / "second.log", *knobs)
                    assert second.port == port
                if event.HasField("run"):
                    final = event.run
            got = await client.get_run(run.id)
    finally:
        if first.proc.poll() is None:
            first.kill()
        if second is not None:
            assert second.terminate() == 0
    assert second is not None, "the run ended before the kill"
    assert seqs == list(range(1, len(seqs) + 1))  # every seq once, in order, across the restart
    assert final is not None and final.status == pb.run.RUN_STATUS_SUCCEEDED
    assert seqs[-1] == got.last_seq and got.counts.completed_evaluations == 2000


async def test_a_watch_that_never_connects_fails_as_fast_as_a_call(tmp_path: Path) -> None:
    """Nothing listening: the watch retried 30 times (35 s, silent) before its first stream had delivered anything;
    it now reads the run first, and gives up in about the time get_run's retries take."""
    target = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    async with AsyncEvalClient(target, api_key="evk_x") as client:
        with pytest.raises(UnavailableError) as refused:
            async for _ in client.watch("run_x"):
                pass
    assert f"Nothing answers at {target}" in refused.value.hint

    def blocking() -> None:
        with EvalClient(target, api_key="evk_x") as client, pytest.raises(UnavailableError):
            for _ in client.watch("run_x"):
                pass

    await asyncio.to_thread(blocking)
    assert time.monotonic() - started < 10  # both; 30 attempts each took 35 s


async def test_watch_exposes_heartbeats_only_on_request(tmp_path: Path) -> None:
    # No workers: the run stays PENDING and its stream idles, so the server sends heartbeats every 0.2 s.
    srv = EvalServer(make_settings(tmp_path, workers=0, heartbeat_s=0.2))
    await srv.start()
    try:
        assert srv.bootstrap_key
        async with AsyncEvalClient(f"127.0.0.1:{srv.port}", api_key=srv.bootstrap_key) as client:
            run = await client.create_run(items=_items(1), target="echo", graders=[builders.exact_match()])
            seen: list[pb.WatchRunResponse] = []
            async for event in client.watch(run.id, heartbeats=True):
                seen.append(event)
                if event.HasField("heartbeat"):
                    break
            assert seen[0].seq == 1 and seen[-1].seq == 0 and seen[-1].heartbeat.last_seq == 1

            async def first_two() -> list[int]:
                got = []
                async for event in client.watch(run.id):
                    got.append(event.seq)
                    if len(got) == 2:
                        break
                return got

            # Without heartbeats=True the idle stream yields nothing past the creation event.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(first_two(), timeout=0.6)
            await client.cancel_run(run.id)
    finally:
        await srv.stop(grace=1.0)


async def test_webhooks(tmp_path: Path) -> None:
    """Every WebhookService method through the async client, and the blocking one from a thread."""
    srv = EvalServer(make_settings(tmp_path, outbound_allow="127.0.0.1"))
    await srv.start()
    try:
        assert srv.bootstrap_key
        target, key = f"127.0.0.1:{srv.port}", srv.bootstrap_key
        with FakeEndpoint(Reply({})) as receiver:
            async with AsyncEvalClient(target, api_key=key) as client:
                webhook = await client.create_webhook(receiver.url, event_types=["run.succeeded"], description="ci")
                assert webhook.signing_secret.startswith("whsec_") and webhook.enabled
                assert (await client.get_webhook(webhook.id)).signing_secret == ""
                assert [w.id async for w in client.list_webhooks(page_size=1)] == [webhook.id]
                run = await client.create_run(items=_items(1), target="provided", graders=[builders.exact_match()])
                await client.wait(run.id)
                assert await asyncio.to_thread(receiver.wait_seen, 1, 60.0)
                [delivery] = [d async for d in client.list_webhook_deliveries(webhook.id)]
                assert (delivery.run_id, delivery.event_type) == (run.id, "run.succeeded")
                updated = await client.update_webhook(webhook.id, enabled=False, event_types=["run.failed"])
                assert not updated.enabled and list(updated.event_types) == ["run.failed"]
                assert updated.description == "ci"
                with pytest.raises(InvalidArgumentError) as caught:
                    await client.update_webhook(webhook.id, url="http://10.0.0.1/")
                assert "webhook.url" in dict(caught.value.field_violations)

            def blocking() -> None:
                with EvalClient(target, api_key=key) as client:
                    rotated = client.rotate_webhook_secret(webhook.id, revoke_previous=True)
                    assert rotated.signing_secret not in ("", webhook.signing_secret)
                    assert [w.id for w in client.list_webhooks()] == [webhook.id]
                    assert len(list(client.list_webhook_deliveries(webhook.id))) == 1
                    client.delete_webhook(webhook.id)
                    with pytest.raises(NotFoundError):
                        client.get_webhook(webhook.id)

            await asyncio.to_thread(blocking)
    finally:
        await srv.stop(grace=0.5)


async def test_secrets(tmp_path: Path) -> None:
    """Every SecretService method through the async client (evalctl's tests use the blocking one): a value set
    is never returned, and a second set of a name replaces it."""
    from evalsvc.secrets.sealing import generate_key

    srv = EvalServer(make_settings(tmp_path, secrets_key=generate_key()))
    await srv.start()
    try:
        assert srv.bootstrap_key
        async with AsyncEvalClient(f"127.0.0.1:{srv.port}", api_key=srv.bootstrap_key) as client:
            created = await client.create_secret("llm_key", SECRET)
            assert created.name == "LLM_KEY" and created.create_time.seconds > 0
            await client.create_secret("b_key", "first")
            await client.create_secret("B_KEY", "second")  # the same secret: replaced
            listed = [s async for s in client.list_secrets(page_size=1)]
            assert [s.name for s in listed] == ["B_KEY", "LLM_KEY"] and SECRET not in str(listed)
            await client.delete_secret("llm_key")
            assert [s.name async for s in client.list_secrets()] == ["B_KEY"]
            with pytest.raises(NotFoundError):
                await client.delete_secret("llm_key")
            with pytest.raises(InvalidArgumentError):
                await client.create_secret("not a name", "v")
    finally:
        await srv.stop(grace=0.5)


def test_an_error_spells_out_at_most_ten_violations() -> None:
    """Every violation's reason is in the text, up to MAX_VIOLATIONS_SHOWN; the rest are counted."""
    from evalsvc_client.errors import MAX_VIOLATIONS_SHOWN

    violations = {f"items[{i}].input": "must not be empty" for i in range(MAX_VIOLATIONS_SHOWN + 3)}
    error = InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, "invalid request", field_violations=violations)
    text = str(error)
    assert text.startswith("INVALID_ARGUMENT: invalid request - items[0].input: must not be empty; items[1].input")
    assert f"items[{MAX_VIOLATIONS_SHOWN - 1}].input: must not be empty; and 3 more" in text
    assert f"items[{MAX_VIOLATIONS_SHOWN}]" not in text


def test_the_clients_readme_names_every_method() -> None:
    """clients/README.md's method list left out update_run, delete_run, undelete_run, compare_runs and
    list_comparison_items, which both clients have."""
    import inspect
    import re

    readme = (Path(__file__).resolve().parent.parent / "clients" / "README.md").read_text()
    named = set(re.findall(r"`(\w+)[`(]", readme))
    for client in (EvalClient, AsyncEvalClient):
        methods = {name for name, _ in inspect.getmembers(client, inspect.isfunction) if not name.startswith("_")}
        assert methods - named == set(), client.__name__


def test_a_quiet_runs_watch_rides_out_a_server_restart(tmp_path: Path) -> None:
    """A watch from a quiet run's last seq (nothing to deliver until the run moves: `evalctl watch RUN
    --after-seq N` after Ctrl-C) counted as never connected and gave up about 1.5 s into a server restart
    (a review). It reads the run first now, so the restart is ridden out and every later event arrives."""
    port, db = free_port(), f"sqlite+aiosqlite:///{tmp_path / 'quiet.db'}"
    quiet = ("--workers", "0", "--heartbeat-s", "600")  # nothing to deliver, not even a heartbeat
    first = ServerProcess(db, tmp_path / "a.log", "--grpc-addr", f"127.0.0.1:{port}", *quiet)
    key = first.bootstrap_key()
    assert key
    second: ServerProcess | None = None
    try:
        with EvalClient(f"127.0.0.1:{port}", api_key=key) as client:
            run = client.create_run(items=_items(2), target="echo", graders=[builders.exact_match()])
            last = client.get_run(run.id).last_seq  # PENDING, and so it stays: no workers
            seen: list[int] = []
            watcher = threading.Thread(target=lambda: seen.extend(e.seq for e in client.watch(run.id, last)))
            watcher.start()
            deadline = time.monotonic() + 30
            while first.log_path.read_text().count("GetRun OK") < 2 and time.monotonic() < deadline:
                time.sleep(0.05)  # polling a log file: the watch has read the run and opens its stream
            first.kill()  # no goodbye on the stream: the watch has still delivered nothing
            second = ServerProcess(db, tmp_path / "b.log", "--grpc-addr", f"127.0.0.1:{port}")  # with workers
            watcher.join(60)
            assert not watcher.is_alive(), "the watch never ended"
        assert seen and seen[0] == last + 1 and seen == list(range(last + 1, seen[-1] + 1))
    finally:
        if second is not None:
            second.terminate()


def test_an_etag_checked_change_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """A retry after a lost answer would carry the etag the first attempt made stale: ABORTED ETAG_MISMATCH
    although the change was made (a review). update_run and delete_run with an etag are tried once;
    without one they are retried as before."""

    attempts: list[str] = []

    def lost(request: Any, **_: Any) -> Any:
        attempts.append(type(request).__name__)
        raise _LostAnswer()

    quick = RetryPolicy(max_attempts=5, initial_backoff_s=0.001)
    with EvalClient("127.0.0.1:1", api_key="evk_x", retry=quick) as client:
        monkeypatch.setattr(
            client, "_runs", type("Runs", (), {"UpdateRun": staticmethod(lost), "DeleteRun": staticmethod(lost)})()
        )
        for change in (
            lambda: client.update_run("run_x", display_name="a", etag="3"),
            lambda: client.delete_run("run_x", etag="3"),
        ):
            with pytest.raises(UnavailableError):
                change()
        assert attempts == ["UpdateRunRequest", "DeleteRunRequest"]  # once each
        with pytest.raises(UnavailableError):
            client.delete_run("run_x")
        assert len(attempts) > 3  # without an etag: retried


async def test_add_dataset_items_retried_after_a_lost_answer_adds_nothing_twice(
    server: EvalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server stores the items, the answer is lost (UNAVAILABLE), the client retries: with the request_id it
    reuses, the retry adds nothing and gets the first call's ids. Without one, the retry added the items without
    an id again (so add_dataset_items was not retried at all)."""
    assert server.bootstrap_key
    target, key = f"127.0.0.1:{server.port}", server.bootstrap_key

    def scenario() -> None:
        with EvalClient(target, api_key=key, retry=RetryPolicy(initial_backoff_s=0.001)) as client:
            dataset = client.create_dataset("lost answers")
            real = client._datasets
            calls: list[str] = []

            class LosesFirstAnswer:
                def __getattr__(self, name: str) -> Any:
                    return getattr(real, name)

                def AddDatasetItems(self, request: Any, **kwargs: Any) -> Any:
                    answer = real.AddDatasetItems(request, **kwargs)
                    calls.append(request.request_id)
                    if len(calls) == 1:
                        raise _LostAnswer()
                    return answer

            monkeypatch.setattr(client, "_datasets", LosesFirstAnswer())
            added = client.add_dataset_items(dataset.id, [pb.Item(input="no id"), pb.Item(input="none either")])
            assert len(calls) == 2 and calls[0] == calls[1] != ""  # retried, with one request_id
            assert list(added.item_ids) == ["item-1", "item-2"] and added.dataset.item_count == 2
            assert [i.input for i in client.list_dataset_items(dataset.id)] == ["no id", "none either"]

    await asyncio.to_thread(scenario)


class _LostAnswer(grpc.RpcError):
    """What a client sees when the server did the work but its answer never arrived."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "the answer was lost"

    def trailing_metadata(self) -> tuple[()]:
        return ()
