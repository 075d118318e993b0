"""Bad data stays with its evaluation: text is checked at the edge the same on SQLite and PostgreSQL
(run these with EVALSVC_TEST_DB=postgres too), and what targets return is always recorded."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from sqlalchemy import exc as sa_exc

from evalsvc.graders import builtin
from evalsvc.server import EvalServer
from evalsvc.statuses import TERMINAL
from evalsvc.store import runs as run_store
from evalsvc.v1 import dataset_service_pb2 as ds
from evalsvc.v1 import (
    dataset_service_pb2_grpc,
    eval_run_service_pb2_grpc,
    grader_pb2,
    grader_service_pb2,
    grader_service_pb2_grpc,
    item_pb2,
    run_pb2,
    target_pb2,
    target_service_pb2,
    target_service_pb2_grpc,
)
from evalsvc.v1 import eval_run_service_pb2 as pb
from tests.conftest import make_settings
from tests.fake_llm import FakeEndpoint, Reply
from tests.helpers import (
    all_results,
    create_request,
    error_reason,
    exact,
    keyed_channel,
    provided_items,
    violations,
    watch_all,
)

NUL_VIOLATION = "must not contain NUL (U+0000) characters"


def assert_nul_refused(error: pytest.ExceptionInfo[grpc.aio.AioRpcError], *fields: str) -> None:
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error.value) == "INVALID_ARGUMENT"
    named = violations(error.value)
    assert set(named) == set(fields), named
    assert all(NUL_VIOLATION in description for description in named.values())


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"display_name": "before\x00after"}, ["display_name"]),
        ({"request_id": "r\x00"}, ["request_id"]),
        ({"labels": {"team": "a\x00"}}, ["labels[team]"]),
        ({"annotations": {"k\x00": "v"}}, ["annotations[k\\u0000]"]),
        ({"graders": [grader_pb2.Grader(name="exact\x00", exact_match=grader_pb2.ExactMatch())]}, ["graders[0].name"]),
        (
            {"items": [item_pb2.Item(id="a\x00", input="q"), item_pb2.Item(id="b", metadata={"m": "\x00"})]},
            ["items[0].id", "items[1].metadata[m]"],
        ),
    ],
)
async def test_a_nul_in_any_string_of_create_run_is_invalid_argument_naming_the_field(runs, fields, named) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await runs.CreateRun(create_request(2, **fields))
    assert_nul_refused(refused, *named)
    assert not (await runs.ListRuns(pb.ListRunsRequest())).runs  # nothing half-written


async def test_a_request_with_thousands_of_bad_fields_is_still_invalid_argument(runs) -> None:
    """The error's details travel in a trailer and clients take 16 KiB of metadata: ~275 violations made
    the client see RESOURCE_EXHAUSTED instead. The message counts them (up to the first 1,000 NULs,
    where the walk stops); the details list the first 100."""
    request = create_request(1)
    request.item_ids.extend(["\x00"] * 5000)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await runs.CreateRun(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "item_ids[0]" in (refused.value.details() or "") and "and 995 more" in (refused.value.details() or "")
    listed = violations(refused.value)
    assert len(listed) == 100 and "item_ids[99]" in listed
    long_key = "\x00" + "k" * 20_000  # the path of its violation quotes it
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await runs.CreateRun(create_request(1, labels={long_key: "v"}))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert all(len(field) <= 260 for field in violations(refused.value))


async def test_a_nul_in_an_id_is_invalid_argument_not_a_lookup(runs) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await runs.GetRun(pb.GetRunRequest(run_id="run_\x00"))
    assert_nul_refused(refused, "run_id")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await watch_all(runs, "run_\x00")
    assert_nul_refused(refused, "run_id")


async def test_an_empty_required_id_is_invalid_argument_naming_it_not_a_lookup(runs, channel) -> None:
    """An empty run id was NOT_FOUND "run '' not found", as if a run could be named so."""
    for call in (
        runs.GetRun(pb.GetRunRequest()),
        runs.CancelRun(pb.CancelRunRequest()),
        runs.ListRunResults(pb.ListRunResultsRequest()),
        dataset_service_pb2_grpc.DatasetServiceStub(channel).GetDataset(ds.GetDatasetRequest()),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert list(violations(refused.value).values()) == ["is required"], violations(refused.value)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await watch_all(runs, "")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(refused.value) == {"run_id": "is required"}


async def test_update_run_refuses_a_nul_and_keeps_the_run_as_it_was(runs) -> None:
    run = (await runs.CreateRun(create_request(1, display_name="kept"))).run
    update = pb.UpdateRunRequest(
        run_id=run.id,
        run=run_pb2.Run(display_name="x\x00", labels={"team": "ok"}),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name", "labels"]),
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await runs.UpdateRun(update)
    assert_nul_refused(refused, "run.display_name")
    current = (await runs.GetRun(pb.GetRunRequest(run_id=run.id))).run
    assert current.display_name == "kept" and not current.labels


async def test_datasets_graders_and_targets_refuse_a_nul_too(channel) -> None:
    datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
    dataset = (await datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset(display_name="d")))).dataset
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await datasets.AddDatasetItems(
            ds.AddDatasetItemsRequest(
                dataset_id=dataset.id, items=[item_pb2.Item(id="ok"), item_pb2.Item(input="\x00")]
            )
        )
    assert_nul_refused(refused, "items[1].input")
    assert not (await datasets.ListDatasetItems(ds.ListDatasetItemsRequest(dataset_id=dataset.id))).items

    graders = grader_service_pb2_grpc.GraderServiceStub(channel)
    saved = grader_service_pb2.SavedGrader(
        display_name="g", grader=grader_pb2.Grader(contains=grader_pb2.Contains(values=["fine", "no\x00"]))
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await graders.CreateGrader(grader_service_pb2.CreateGraderRequest(grader=saved))
    assert_nul_refused(refused, "grader.grader.contains.values[1]")

    targets = target_service_pb2_grpc.TargetServiceStub(channel)
    chat = target_pb2.ChatTarget(endpoint=target_pb2.Endpoint(base_url="https://example.com/v1"), model="m\x00")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await targets.CreateTarget(
            target_service_pb2.CreateTargetRequest(
                target=target_service_pb2.SavedTarget(target=target_pb2.Target(chat=chat))
            )
        )
    assert_nul_refused(refused, "target.target.chat.model")


async def test_text_without_nul_is_stored_exactly_on_either_engine(runs) -> None:
    """The check refuses NUL only: other control characters and astral-plane text go through as sent."""
    text = "tab\tbell\x07 \U0001f600 \U0010ffff"
    run = (await runs.CreateRun(create_request(1, display_name=text, graders=[exact()]))).run
    assert (await runs.GetRun(pb.GetRunRequest(run_id=run.id))).run.display_name == text


# ------------------------------------------------------------------- what targets and judges return


async def test_nul_and_lone_surrogates_from_a_webhook_and_a_judge_are_recorded_as_replacement_characters(
    tmp_path: Path,
) -> None:
    """The one rule for outputs (docs/targets.md): every string an endpoint returns is made storable,
    so the evaluation is graded and recorded, the same on both engines, never lost or stuck."""
    webhook_reply = Reply(raw='{"content": "a\\u0000b\\ud800c", "tool_calls": [{"name": "t\\u0000"}]}')
    verdict = '{"passed": false, "reason": "bad\\u0000reason\\udfff"}'
    judge_reply = Reply({"choices": [{"message": {"content": verdict}}], "usage": {}})
    srv = EvalServer(make_settings(tmp_path, outbound_allow="127.0.0.1"))
    await srv.start()
    try:
        with FakeEndpoint(webhook_reply) as agent, FakeEndpoint(judge_reply) as judge:
            async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
                runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
                target = target_pb2.Target(http=target_pb2.HttpTarget(endpoint=target_pb2.Endpoint(base_url=agent.url)))
                judge_spec = grader_pb2.LlmJudge(
                    mode=grader_pb2.LlmJudge.MODE_CRITERIA,
                    criteria="c",
                    model="judge",
                    endpoint=target_pb2.Endpoint(base_url=judge.url + "/v1"),
                )
                request = pb.CreateRunRequest(
                    items=[item_pb2.Item(id="one", input="q")],
                    target=target,
                    graders=[
                        grader_pb2.Grader(name="tools", tool_calls=grader_pb2.ToolCalls(expected=["x"])),
                        grader_pb2.Grader(name="judge", llm_judge=judge_spec),
                    ],
                )
                run = (await runs.CreateRun(request)).run
                events = await watch_all(runs, run.id)
                results = {r.grader: r for r in await all_results(runs, run.id)}
    finally:
        await srv.stop(grace=0.5)
    assert events[-1].run.status == run_pb2.RUN_STATUS_SUCCEEDED  # it ran and was graded: no evaluation errored
    assert results["tools"].output.content == "a\ufffdb\ufffdc"
    assert results["tools"].output.tool_calls[0].name == "t\ufffd"
    assert results["tools"].state == run_pb2.RESULT_STATE_FAILED and "'t\ufffd'" in results["tools"].explanation
    assert results["judge"].state == run_pb2.RESULT_STATE_FAILED
    assert results["judge"].explanation.endswith("bad\ufffdreason\ufffd")


# ------------------------------------------------------------------------------ recording failures


async def test_a_result_the_database_refuses_costs_only_its_own_evaluation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two tenants' runs are recorded in one batch; the database refuses one item's results. The
    batch is split until that job is alone: it is recorded as ERROR RESULT_NOT_STORABLE, every other
    result is recorded as it was, both runs end, and no lease is left to be renewed."""
    refused_batches = 0
    insert_results = run_store.insert_results

    async def refusing(conn: Any, rows: list[tuple[Any, ...]]) -> None:
        nonlocal refused_batches
        if any(row[4] == "poison" and not row[11].startswith("RESULT_NOT_STORABLE") for row in rows):
            refused_batches += 1
            raise sa_exc.DataError("INSERT INTO results ...", {}, Exception("invalid byte sequence"))
        await insert_results(conn, rows)

    monkeypatch.setattr(run_store, "insert_results", refusing)
    srv = EvalServer(make_settings(tmp_path))
    await srv.start()
    try:
        assert srv.bootstrap_key
        other_key, _ = await srv.keys.create("other")
        async with keyed_channel(srv.port, srv.bootstrap_key) as mine, keyed_channel(srv.port, other_key) as theirs:
            a_runs = eval_run_service_pb2_grpc.EvalRunServiceStub(mine)
            b_runs = eval_run_service_pb2_grpc.EvalRunServiceStub(theirs)
            await srv.executor.stop()  # both runs are created first, so one claim and one batch hold both
            a_items = provided_items(20)
            a_items[7].id = "poison"
            a_run = (await a_runs.CreateRun(create_request(20, items=a_items))).run
            b_run = (await b_runs.CreateRun(create_request(20))).run
            await srv.executor.start()
            a_events = await asyncio.wait_for(watch_all(a_runs, a_run.id), 60)
            b_events = await asyncio.wait_for(watch_all(b_runs, b_run.id), 60)
            a_results = await all_results(a_runs, a_run.id)
            b_results = await all_results(b_runs, b_run.id)
        assert refused_batches > 1  # the whole batch first, then the halves holding the poison
        assert b_events[-1].run.status == run_pb2.RUN_STATUS_SUCCEEDED
        assert len(b_results) == 20 and all(r.state == run_pb2.RESULT_STATE_PASSED for r in b_results)
        assert a_events[-1].run.status in TERMINAL and a_events[-1].run.counts.completed_evaluations == 20
        [poisoned] = [r for r in a_results if r.item_id == "poison"]
        assert poisoned.state == run_pb2.RESULT_STATE_ERROR
        assert poisoned.error_reason.startswith("RESULT_NOT_STORABLE") and "DataError" in poisoned.error_reason
        assert all(r.state == run_pb2.RESULT_STATE_PASSED for r in a_results if r.item_id != "poison")
        assert not srv.executor._open_claims  # nothing left leased for the keeper to renew
    finally:
        await srv.stop(grace=0.5)


@pytest.mark.parametrize("patched", ["_grade", "grade"], ids=["built-in-guard", "executor-guard"])
async def test_a_grader_that_raises_costs_only_its_own_evaluation(
    runs, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, patched: str
) -> None:
    """A grader that raises on one output (a bug, a reply no check foresaw) was taken for a target failure:
    every grader of the item ERROR, the output with its cost and latency dropped. Now only that grader's
    evaluation is ERROR GRADER_FAILED; the item's other graders and its output are kept. Built-in graders
    catch it themselves (`_grade` raising); any other grader (a judge) is caught by the executor."""
    original = getattr(builtin._ExactMatch, patched)

    def raising_on_poison(self: Any, item: item_pb2.Item, output: item_pb2.Response) -> builtin.Grade:
        if item.id == "poison":
            raise OverflowError("cannot convert float infinity to integer")
        return original(self, item, output)  # type: ignore[no-any-return]

    monkeypatch.setattr(builtin._ExactMatch, patched, raising_on_poison)
    items = provided_items(5)
    items[2].id = "poison"
    items[2].response.cost_usd, items[2].response.latency_ms = 0.25, 40
    contains = grader_pb2.Grader(name="contains", contains=grader_pb2.Contains(values=["answer"]))
    run = (await runs.CreateRun(create_request(5, items=items, graders=[exact(), contains]))).run
    events = await asyncio.wait_for(watch_all(runs, run.id), 60)
    results = await all_results(runs, run.id)
    assert events[-1].run.status == run_pb2.RUN_STATUS_SUCCEEDED  # some evaluations errored, not all
    [failed] = [r for r in results if r.state == run_pb2.RESULT_STATE_ERROR]
    assert (failed.item_id, failed.grader) == ("poison", "exact"), failed
    assert failed.error_reason == "GRADER_FAILED: OverflowError: cannot convert float infinity to integer"
    [kept] = [r for r in results if r.item_id == "poison" and r.grader == "contains"]
    assert kept.state == run_pb2.RESULT_STATE_PASSED and kept.output.cost_usd == 0.25, kept
    assert events[-1].run.aggregate.total_cost_usd == pytest.approx(0.25)  # a recorded cost: reported, not spent
    if patched == "grade":  # the executor logs what it caught
        assert [r.levelname for r in caplog.records if "poison" in r.getMessage()] == ["WARNING"]
