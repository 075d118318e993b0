"""CreateRun, GetRun, ListRuns, CancelRun and ListRunResults over a real server and channel."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest

from evalsvc.graders import grader_name
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc, grader_pb2, item_pb2, run_pb2, target_pb2
from tests.helpers import create_request, error_reason, exact, provided_items, violations, watch_all


async def test_create_run_returns_pending_run_with_job_count(runs) -> None:
    response = await runs.CreateRun(create_request(4, repetitions=3, display_name="smoke", labels={"team": "a"}))
    run = response.run
    assert response.job_count == 12
    assert run.id.startswith("run_")
    assert run.status == run_pb2.RUN_STATUS_PENDING
    assert run.counts.total_items == 4
    assert run.counts.total_evaluations == 12
    assert run.display_name == "smoke" and dict(run.labels) == {"team": "a"}
    assert run.last_seq == 1 and run.run_number == 1
    assert run.create_time.seconds > 0


async def test_an_unnamed_grader_is_shown_by_the_name_its_results_carry(runs) -> None:
    """A grader given without a name was stored as "" in the run (GetRun, reports, the run page) while
    its results and aggregates called it by its kind: the run now names it that way too."""
    unnamed = grader_pb2.Grader(exact_match=grader_pb2.ExactMatch())
    created = (await runs.CreateRun(create_request(2, graders=[unnamed]))).run
    assert [g.name for g in created.graders] == ["exact_match"]
    await watch_all(runs, created.id)
    run = (await runs.GetRun(pb.GetRunRequest(run_id=created.id))).run
    results = (await runs.ListRunResults(pb.ListRunResultsRequest(run_id=run.id))).results
    assert [g.name for g in run.graders] == ["exact_match"] and {r.grader for r in results} == {"exact_match"}


async def test_run_completes_with_counts_aggregate_and_verdict(runs) -> None:
    request = create_request(pass_threshold=70.0)
    request.items[0].response.content = "wrong"
    created = await runs.CreateRun(request)
    events = await watch_all(runs, created.run.id)
    final = (await runs.GetRun(pb.GetRunRequest(run_id=created.run.id))).run
    assert final.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert final.counts.completed_evaluations == 5
    assert (final.counts.passed, final.counts.failed, final.counts.errored) == (4, 1, 0)
    assert final.aggregate.pass_rate == pytest.approx(0.8)
    assert final.aggregate.graders[0].grader == "exact"
    assert final.overall_passed is True
    assert final.last_seq == events[-1].seq
    assert final.start_time.seconds > 0 and final.end_time.seconds > 0


async def test_run_below_threshold_does_not_pass(runs) -> None:
    request = create_request(2)
    request.items[0].response.content = "wrong"
    created = await runs.CreateRun(request)
    await watch_all(runs, created.run.id)
    final = (await runs.GetRun(pb.GetRunRequest(run_id=created.run.id))).run
    assert final.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert final.overall_passed is False  # unset threshold means every evaluation must pass


async def test_run_whose_every_evaluation_errors_fails(runs) -> None:
    request = create_request(3)
    for item in request.items:
        item.ClearField("response")  # the provided target has nothing to return
    created = await runs.CreateRun(request)
    await watch_all(runs, created.run.id)
    final = (await runs.GetRun(pb.GetRunRequest(run_id=created.run.id))).run
    assert final.status == run_pb2.RUN_STATUS_FAILED
    assert final.error.code == "ALL_EVALUATIONS_ERRORED"
    assert final.counts.errored == 3
    assert not final.HasField("overall_passed")
    results = (await runs.ListRunResults(pb.ListRunResultsRequest(run_id=created.run.id))).results
    assert all(r.state == run_pb2.RESULT_STATE_ERROR and "no recorded response" in r.error_reason for r in results)


@pytest.mark.parametrize(("max_error_rate", "passes"), [(None, False), (24.0, False), (25.0, True), (100.0, True)])
async def test_errors_are_excluded_from_the_pass_rate_and_bounded_by_max_error_rate(
    runs, max_error_rate: float | None, passes: bool
) -> None:
    """1 evaluation of 4 errors: the pass rate is over the 3 graded (100%); the run passes only when its
    max_error_rate allows 25% errored (unset: none may; a run whose evaluations mostly errored passed)."""
    request = create_request(4, pass_threshold=100.0)
    if max_error_rate is not None:
        request.max_error_rate = max_error_rate
    request.items[0].ClearField("response")
    created = await runs.CreateRun(request)
    assert created.run.max_error_rate == (max_error_rate or 0.0) and created.run.HasField("max_error_rate")
    await watch_all(runs, created.run.id)
    final = (await runs.GetRun(pb.GetRunRequest(run_id=created.run.id))).run
    assert (final.counts.passed, final.counts.errored) == (3, 1)
    assert final.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert final.aggregate.pass_rate == 1.0 and final.overall_passed is passes


@pytest.mark.parametrize("bad", [-1.0, 100.5, math.nan, math.inf])
async def test_a_max_error_rate_that_is_no_percentage_is_refused(runs, bad: float) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runs.CreateRun(create_request(2, max_error_rate=bad))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(caught.value) == {"max_error_rate": "must be a percentage between 0 and 100"}


async def test_echo_target_and_repetitions_give_one_result_per_evaluation(runs) -> None:
    request = pb.CreateRunRequest(
        items=[item_pb2.Item(id="a", input="hi", expected_output="hi"), item_pb2.Item(input="x", expected_output="y")],
        target=target_pb2.Target(echo=target_pb2.EchoTarget()),
        graders=[exact(), grader_pb2.Grader(contains=grader_pb2.Contains(values=["h"]))],
        repetitions=3,
    )
    created = await runs.CreateRun(request)
    await watch_all(runs, created.run.id)
    results = (await runs.ListRunResults(pb.ListRunResultsRequest(run_id=created.run.id, page_size=100))).results
    keys = {(r.item_id, r.repetition, r.grader) for r in results}
    assert len(results) == len(keys) == 2 * 3 * 2
    assert {r.item_id for r in results} == {"a", "item-2"}  # an empty id is assigned from the position
    by_key = {(r.item_id, r.repetition, r.grader): r for r in results}
    assert by_key[("a", 1, "exact")].state == run_pb2.RESULT_STATE_PASSED
    assert by_key[("item-2", 2, "exact")].state == run_pb2.RESULT_STATE_FAILED
    assert by_key[("a", 3, "contains")].output.content == "hi"
    assert all(r.attempt == 1 for r in results)


async def test_list_run_results_pages_and_filters_by_state(runs) -> None:
    request = create_request(25)
    for item in request.items[:5]:
        item.response.content = "wrong"
    created = await runs.CreateRun(request)
    await watch_all(runs, created.run.id)
    seen, token = [], ""
    while True:
        page = await runs.ListRunResults(pb.ListRunResultsRequest(run_id=created.run.id, page_size=7, page_token=token))
        assert len(page.results) <= 7
        seen.extend(page.results)
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == 25 and len({r.id for r in seen}) == 25
    failed = await runs.ListRunResults(
        pb.ListRunResultsRequest(run_id=created.run.id, state=run_pb2.RESULT_STATE_FAILED)
    )
    assert sorted(r.item_id for r in failed.results) == sorted(f"i{i}" for i in range(5))
    with pytest.raises(grpc.aio.AioRpcError) as bad_token:
        await runs.ListRunResults(
            pb.ListRunResultsRequest(run_id=created.run.id, state=run_pb2.RESULT_STATE_PASSED, page_token=token or "x")
        )
    assert bad_token.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def triage_request(n: int = 12) -> pb.CreateRunRequest:
    """A run of `n` items: i0-i2 fail, i3-i5 error (nothing recorded to return), the rest pass."""
    request = create_request(n)
    for item in request.items[:3]:
        item.response.content = "wrong"
    for item in request.items[3:6]:
        item.ClearField("response")
    return request


async def test_list_run_results_filters_on_any_of_several_states(runs) -> None:
    """`states` lists the results in any of them in one call, paged in id order, each page's token bound
    to the set of states (the order and repeats of `states` do not change it; `state=X` and `states=[X]`
    are one filter)."""
    created = (await runs.CreateRun(triage_request())).run
    await watch_all(runs, created.id)
    wanted = [run_pb2.RESULT_STATE_FAILED, run_pb2.RESULT_STATE_ERROR]
    seen, token, pages = [], "", 0
    while True:
        page = await runs.ListRunResults(
            pb.ListRunResultsRequest(run_id=created.id, states=wanted, page_size=4, page_token=token)
        )
        seen.extend(page.results)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 2 and [int(r.id) for r in seen] == sorted(int(r.id) for r in seen)
    assert {r.item_id: r.state for r in seen} == {
        **{f"i{i}": run_pb2.RESULT_STATE_FAILED for i in range(3)},
        **{f"i{i}": run_pb2.RESULT_STATE_ERROR for i in range(3, 6)},
    }
    first = await runs.ListRunResults(pb.ListRunResultsRequest(run_id=created.id, states=wanted, page_size=4))
    same_set = [run_pb2.RESULT_STATE_ERROR, run_pb2.RESULT_STATE_FAILED, run_pb2.RESULT_STATE_ERROR]
    rest = await runs.ListRunResults(
        pb.ListRunResultsRequest(run_id=created.id, states=same_set, page_token=first.next_page_token)
    )
    assert [r.id for r in [*first.results, *rest.results]] == [r.id for r in seen]
    for other in (
        pb.ListRunResultsRequest(run_id=created.id, states=[run_pb2.RESULT_STATE_FAILED]),
        pb.ListRunResultsRequest(run_id=created.id, state=run_pb2.RESULT_STATE_ERROR),
        pb.ListRunResultsRequest(run_id=created.id),
    ):
        other.page_token = first.next_page_token
        with pytest.raises(grpc.aio.AioRpcError) as bad_token:
            await runs.ListRunResults(other)
        assert bad_token.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_reason(bad_token.value) == "INVALID_PAGE_TOKEN"
    single = await runs.ListRunResults(
        pb.ListRunResultsRequest(run_id=created.id, state=run_pb2.RESULT_STATE_FAILED, page_size=1)
    )
    following = await runs.ListRunResults(
        pb.ListRunResultsRequest(
            run_id=created.id, states=[run_pb2.RESULT_STATE_FAILED], page_size=1, page_token=single.next_page_token
        )
    )
    assert [r.item_id for r in [*single.results, *following.results]] == ["i0", "i1"]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"state": run_pb2.RESULT_STATE_FAILED, "states": [run_pb2.RESULT_STATE_ERROR]},
            {
                "state": "give state (one value) or states (any of several), not both",
                "states": "give state (one value) or states (any of several), not both",
            },
        ),
        (
            {"states": [run_pb2.RESULT_STATE_FAILED, run_pb2.RESULT_STATE_UNSPECIFIED, 99]},
            {"states[1]": "RESULT_STATE_UNSPECIFIED is no state", "states[2]": "unknown result state"},
        ),
        ({"states": [run_pb2.RESULT_STATE_FAILED] * 5}, {"states": "at most 4 states, one per state filtered on"}),
    ],
)
async def test_a_states_filter_no_result_could_match_as_meant_is_refused(runs, fields, expected) -> None:
    created = (await runs.CreateRun(create_request(1))).run
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runs.ListRunResults(pb.ListRunResultsRequest(run_id=created.id, **fields))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(caught.value) == expected


async def test_list_runs_pages_newest_first_and_filters(runs) -> None:
    ids = []
    for i in range(5):
        created = await runs.CreateRun(create_request(1, labels={"batch": "even" if i % 2 == 0 else "odd"}))
        ids.append(created.run.id)
    for run_id in ids:
        await watch_all(runs, run_id)
    first = await runs.ListRuns(pb.ListRunsRequest(page_size=2))
    second = await runs.ListRuns(pb.ListRunsRequest(page_size=2, page_token=first.next_page_token))
    third = await runs.ListRuns(pb.ListRunsRequest(page_size=2, page_token=second.next_page_token))
    listed = [r.id for page in (first, second, third) for r in page.runs]
    assert listed == list(reversed(ids)) and third.next_page_token == ""
    even = await runs.ListRuns(pb.ListRunsRequest(labels={"batch": "even"}))
    assert [r.id for r in even.runs] == [ids[4], ids[2], ids[0]]
    done = await runs.ListRuns(pb.ListRunsRequest(statuses=[run_pb2.RUN_STATUS_SUCCEEDED]))
    assert len(done.runs) == 5
    pending = await runs.ListRuns(pb.ListRunsRequest(statuses=[run_pb2.RUN_STATUS_PENDING]))
    assert list(pending.runs) == []


async def test_a_page_of_runs_with_large_definitions_fits_in_a_message(server, runs) -> None:  # type: ignore[no-untyped-def]
    """ListRuns was bounded by its count alone: a few runs whose graders held megabytes made every page
    fail with RESOURCE_EXHAUSTED ("larger than max"; REST 429), and the tenant's newest runs could not be
    listed at all. A page now stops at half of --max-message-bytes (a smaller bound here), with a token."""
    server.page_tokens.page_bytes = 450_000
    big = grader_pb2.Grader(name="big", contains=grader_pb2.Contains(values=["x" * 200_000]))
    ids = [(await runs.CreateRun(create_request(1, graders=[exact(), big]))).run.id for _ in range(5)]
    pages, token = [], ""
    while True:
        pages.append(page := await runs.ListRuns(pb.ListRunsRequest(page_token=token)))
        if not (token := page.next_page_token):
            break
    assert [r.id for page in pages for r in page.runs] == list(reversed(ids))
    assert max(page.ByteSize() for page in pages) <= 450_000 + 1024 and len(pages) == 3


async def test_list_runs_takes_each_status_at_most_once_and_a_dataset_id_of_an_ids_length(runs) -> None:
    """Probe: ListRuns with 8,000,000 statuses held every tenant's calls for ~20 s (each was checked
    against a list of the enum's values built for it), and a dataset_id of 1,000,000 characters was
    answered with an empty page. More statuses than there are, or a dataset_id longer than any id, is
    INVALID_ARGUMENT naming the field, before any status is looked at; every status once is taken."""
    run = (await runs.CreateRun(create_request(1))).run
    every = [s for s in run_pb2.RunStatus.values() if s != run_pb2.RUN_STATUS_UNSPECIFIED]
    assert [r.id for r in (await runs.ListRuns(pb.ListRunsRequest(statuses=every))).runs] == [run.id]
    for request, field in [
        (pb.ListRunsRequest(statuses=[*every, run_pb2.RUN_STATUS_PENDING]), "statuses"),
        (pb.ListRunsRequest(statuses=[run_pb2.RUN_STATUS_PENDING] * 1_000_000), "statuses"),
        (pb.ListRunsRequest(statuses=[run_pb2.RUN_STATUS_PENDING, 99]), "statuses[1]"),
        (pb.ListRunsRequest(dataset_id="d" * 129), "dataset_id"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await runs.ListRuns(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert list(violations(err.value)) == [field]
    assert list((await runs.ListRuns(pb.ListRunsRequest(dataset_id="d" * 128))).runs) == []


async def test_list_runs_filters_by_every_label_given(runs) -> None:
    """A run is listed when it has every label of the filter, whatever their number (up to the 64 a run
    may have); more than 64 filters, or a key no label may have, is INVALID_ARGUMENT naming `labels`.
    (Unbounded, 20,000 filters held the server for 8 s and ended INTERNAL; on PostgreSQL 150 took 8 s.)"""
    every = {f"k{i:02d}": f"v{i}" for i in range(64)}
    full = (await runs.CreateRun(create_request(1, labels=every))).run.id
    most = (await runs.CreateRun(create_request(1, labels={**every, "k63": "other"}))).run.id
    few = (await runs.CreateRun(create_request(1, labels={"k00": "v0", "k01": "v1"}))).run.id

    async def listed(labels: dict[str, str]) -> list[str]:
        return [r.id for r in (await runs.ListRuns(pb.ListRunsRequest(labels=labels))).runs]

    assert await listed({"k00": "v0"}) == [few, most, full]
    assert await listed({"k01": "v1", "k00": "v0"}) == [few, most, full]
    assert await listed({"k00": "v0", "k01": "v1", "k02": "v2"}) == [most, full]
    assert await listed(every) == [full]
    assert await listed({"k00": "v0", "k01": "other"}) == []
    for bad, field in [({f"k{i}": "v" for i in range(65)}, "labels"), ({"Team": "a"}, "labels[Team]")]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await runs.ListRuns(pb.ListRunsRequest(labels=bad))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in violations(err.value), violations(err.value)


async def test_get_unknown_run_is_not_found(runs) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await runs.GetRun(pb.GetRunRequest(run_id="run_missing"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(err.value) == "RUN_NOT_FOUND"


def chat_settings(
    temperature: float | None = None,
    max_tokens: int = 0,
    parameters: dict[str, float] | None = None,
    timeout_s: float = 0,
) -> target_pb2.ChatTarget:
    """A chat target with these settings, valid otherwise."""
    endpoint = target_pb2.Endpoint(base_url="https://llm.example.com/v1", timeout_s=timeout_s)
    chat = target_pb2.ChatTarget(endpoint=endpoint, model="m", temperature=temperature, max_tokens=max_tokens)
    chat.parameters.update(parameters or {})
    return chat


def judge_at(timeout_s: float) -> grader_pb2.LlmJudge:
    """An accuracy judge of its own endpoint, with this timeout."""
    endpoint = target_pb2.Endpoint(base_url="https://llm.example.com/v1", timeout_s=timeout_s)
    return grader_pb2.LlmJudge(mode=grader_pb2.LlmJudge.MODE_ACCURACY, model="m", endpoint=endpoint)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.ClearField("items"), "items"),
        (lambda r: r.ClearField("target"), "target"),
        (lambda r: r.target.ClearField("provided"), "target"),  # the oneof `kind` is no field (AIP-193)
        (lambda r: setattr(r.target, "saved_target_id", ""), "target.saved_target_id"),
        (lambda r: r.target.chat.CopyFrom(chat_settings(temperature=math.nan)), "target.chat.temperature"),
        (lambda r: r.target.chat.CopyFrom(chat_settings(temperature=math.inf)), "target.chat.temperature"),
        (lambda r: r.target.chat.CopyFrom(chat_settings(temperature=-0.5)), "target.chat.temperature"),
        (lambda r: r.target.chat.CopyFrom(chat_settings(temperature=2.5)), "target.chat.temperature"),
        (lambda r: r.target.chat.CopyFrom(chat_settings(max_tokens=-1)), "target.chat.max_tokens"),
        (lambda r: r.target.chat.CopyFrom(chat_settings(parameters={"top_p": math.nan})), "target.chat.parameters"),
        (lambda r: r.target.chat.CopyFrom(chat_settings(timeout_s=math.inf)), "target.chat.endpoint.timeout_s"),
        (lambda r: r.ClearField("graders"), "graders"),
        (lambda r: setattr(r, "description", "d" * 1025), "description"),
        (lambda r: setattr(r, "display_name", "n" * 257), "display_name"),
        (lambda r: setattr(r, "repetitions", 101), "repetitions"),
        (lambda r: setattr(r, "repetitions", -1), "repetitions"),
        (lambda r: setattr(r, "warmup_runs", 11), "warmup_runs"),
        (lambda r: setattr(r, "pass_threshold", 101.0), "pass_threshold"),
        (lambda r: setattr(r, "request_id", "r" * 129), "request_id"),
        (lambda r: r.labels.update({"Bad Key": "v"}), "labels[Bad Key]"),
        (lambda r: r.labels.update({"team\n": "v"}), "labels[team\n]"),
        (lambda r: r.labels.update({f"k{i}": "v" for i in range(65)}), "labels"),
        (lambda r: setattr(r.items[1], "id", r.items[0].id), "items[1].id"),
        (lambda r: r.graders.append(exact()), "graders[1].name"),
        (lambda r: r.graders.add(regex=grader_pb2.Regex(pattern="(")), "graders[1].regex.pattern"),
        (lambda r: r.graders.add(name="l", latency=grader_pb2.Latency(max_ms=0)), "graders[1].latency.max_ms"),
        (lambda r: r.graders.add(name="empty"), "graders[1]"),
        (
            lambda r: r.graders.add(saved=grader_pb2.SavedGraderRef(grader_id="grd_x", version=-1)),
            "graders[1].saved.version",
        ),
        (
            lambda r: r.graders.add(name="j", llm_judge=judge_at(timeout_s=math.nan)),
            "graders[1].llm_judge.endpoint.timeout_s",
        ),
        (lambda r: r.item_ids.append("x"), "item_ids"),
        (lambda r: setattr(r, "dataset_id", "ds_x"), "items"),
        (lambda r: setattr(r.items[0].response, "cost_usd", math.nan), "items[0].response.cost_usd"),
        (lambda r: setattr(r.items[1].response, "latency_ms", math.inf), "items[1].response.latency_ms"),
        (lambda r: setattr(r.items[2].response, "memory_mib", -1.0), "items[2].response.memory_mib"),
        (lambda r: setattr(r.items[0].response, "prompt_tokens", -5), "items[0].response.prompt_tokens"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
async def test_invalid_create_run_names_the_field_and_writes_nothing(runs, mutate, field) -> None:
    request = create_request(3)
    mutate(request)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await runs.CreateRun(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violations(err.value), violations(err.value)
    assert error_reason(err.value) == "INVALID_ARGUMENT"
    assert list((await runs.ListRuns(pb.ListRunsRequest())).runs) == []


async def test_same_request_id_concurrently_creates_exactly_one_run(runs) -> None:
    request = create_request(10, request_id="deploy-42")
    responses = await asyncio.gather(*(runs.CreateRun(request) for _ in range(20)))
    assert len({r.run.id for r in responses}) == 1
    assert all(r.job_count == 10 for r in responses)
    listed = await runs.ListRuns(pb.ListRunsRequest())
    assert [r.id for r in listed.runs] == [responses[0].run.id]
    assert listed.runs[0].request_id == "deploy-42"


async def test_same_request_id_with_another_request_is_already_exists(runs) -> None:
    await runs.CreateRun(create_request(2, request_id="k1"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await runs.CreateRun(create_request(3, request_id="k1"))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(err.value) == "REQUEST_ID_CONFLICT"


async def test_cancel_is_idempotent_and_stops_the_run(server, runs) -> None:
    await server.executor.stop()  # nothing executes, so the run is surely still pending
    created = await runs.CreateRun(create_request(50))
    cancelled = await runs.CancelRun(pb.CancelRunRequest(run_id=created.run.id))
    assert cancelled.run.status == run_pb2.RUN_STATUS_CANCELLED
    again = await runs.CancelRun(pb.CancelRunRequest(run_id=created.run.id))
    assert again.run.status == run_pb2.RUN_STATUS_CANCELLED
    assert again.run.last_seq == cancelled.run.last_seq == 2  # created, cancelled: one event, not two
    events = await watch_all(runs, created.run.id)
    assert [e.run.status for e in events] == [run_pb2.RUN_STATUS_PENDING, run_pb2.RUN_STATUS_CANCELLED]


async def test_cancel_mid_run_records_nothing_afterwards(server, runs) -> None:
    created = await runs.CreateRun(create_request(3000))
    async for event in runs.WatchRun(pb.WatchRunRequest(run_id=created.run.id)):
        if event.HasField("result"):
            break
    cancelled = (await runs.CancelRun(pb.CancelRunRequest(run_id=created.run.id))).run
    assert cancelled.status == run_pb2.RUN_STATUS_CANCELLED
    assert cancelled.counts.completed_evaluations < 3000
    # A run created afterwards finishing means the executor has drained whatever it held before.
    follower = await runs.CreateRun(create_request(5))
    await watch_all(runs, follower.run.id)
    later = (await runs.GetRun(pb.GetRunRequest(run_id=created.run.id))).run
    assert later.counts.completed_evaluations == cancelled.counts.completed_evaluations
    assert later.last_seq == cancelled.last_seq
    results = await runs.ListRunResults(pb.ListRunResultsRequest(run_id=created.run.id, page_size=1000))
    assert len(results.results) == min(1000, cancelled.counts.completed_evaluations)
    # Its aggregate summarises what was recorded (it held only the pass rate: no grader, a mean score of 0).
    (grader,) = cancelled.aggregate.graders
    assert grader.grader == grader_name(created.run.graders[0])
    assert grader.passed + grader.failed + grader.errored == cancelled.counts.completed_evaluations
    assert grader.passed > 0 and cancelled.aggregate.mean_score > 0
    assert later.aggregate == cancelled.aggregate


async def test_cancel_finished_run_is_failed_precondition(runs) -> None:
    created = await runs.CreateRun(create_request(1))
    await watch_all(runs, created.run.id)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await runs.CancelRun(pb.CancelRunRequest(run_id=created.run.id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err.value) == "RUN_ALREADY_FINISHED"


async def test_items_are_copied_into_the_run(runs) -> None:
    request = create_request(1)
    created = await runs.CreateRun(request)
    await watch_all(runs, created.run.id)
    results = await runs.ListRunResults(pb.ListRunResultsRequest(run_id=created.run.id))
    assert results.results[0].output.content == provided_items(1)[0].response.content


async def test_a_run_that_cannot_be_loaded_fails_instead_of_hanging(tmp_path) -> None:
    """E.g. a definition written by a newer version: after a few attempts the run FAILS, watchers end."""
    from sqlalchemy import update

    from evalsvc.server import EvalServer
    from evalsvc.store.models import RunRow
    from tests.conftest import make_settings
    from tests.helpers import keyed_channel

    srv = EvalServer(make_settings(tmp_path, lease_ttl_s=0.3, poll_interval_s=0.05))
    await srv.start()
    await srv.executor.stop()
    try:
        async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
            stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            run_id = (await stub.CreateRun(create_request(2))).run.id
            async with srv.db.write() as conn:  # a target kind this version does not know
                spec = run_pb2.Run(graders=[exact()], repetitions=1)
                await conn.execute(
                    update(RunRow.__table__)
                    .where(RunRow.__table__.c.id == run_id)
                    .values(spec=spec.SerializeToString())
                )
            await srv.executor.start()
            events = await watch_all(stub, run_id)
    finally:
        await srv.stop(grace=0.5)
    assert events[-1].run.status == run_pb2.RUN_STATUS_FAILED
    assert events[-1].run.error.code == "RUN_NOT_EXECUTABLE"


async def test_an_unknown_very_long_id_is_a_clear_not_found(runs) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await runs.GetRun(pb.GetRunRequest(run_id="r" * 20_000))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND and error_reason(missing.value) == "RUN_NOT_FOUND"
