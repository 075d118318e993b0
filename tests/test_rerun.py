"""RerunRun: a new run from an ended run's stored definition over a subset of its items (errored ones by
default), created by CreateRun's path (limits, request_id idempotency), recording its source in `rerun_of`.
Real server, real database (SQLite, or PostgreSQL with EVALSVC_TEST_DB=postgres)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy
from grpc_status import rpc_status

from evalsvc.secrets.sealing import generate_key
from evalsvc.server import EvalServer
from evalsvc.v1 import cache_pb2, grader_pb2, item_pb2, run_pb2, secret_service_pb2, secret_service_pb2_grpc, target_pb2
from evalsvc.v1 import dataset_service_pb2 as ds
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc as pb_grpc
from tests.conftest import make_settings
from tests.fake_llm import FakeEndpoint, Reply
from tests.helpers import (
    all_results,
    create_request,
    error_reason,
    exact,
    keyed_channel,
    serving_gateway,
    violations,
    watch_all,
)

# Item ids by what the provided target and the exact grader make of them: no recorded response is ERROR.
ERRORED = ["i1", "i4"]
FAILED = ["i2"]
ALL = [f"i{i}" for i in range(6)]


def _items() -> list[item_pb2.Item]:
    items = []
    for i in range(6):
        item = item_pb2.Item(id=f"i{i}", input=f"q{i}", expected_output=f"a{i}")
        if f"i{i}" not in ERRORED:
            item.response.content = "wrong" if f"i{i}" in FAILED else f"a{i}"
        items.append(item)
    return items


def _source_request(**fields: Any) -> pb.CreateRunRequest:
    """A run whose definition sets every field a rerun must carry over."""
    request = pb.CreateRunRequest(
        items=_items(),
        target=target_pb2.Target(provided=target_pb2.ProvidedTarget()),
        graders=[exact(), grader_pb2.Grader(name="has_a", contains=grader_pb2.Contains(values=["a"]), weight=2)],
        display_name="nightly",
        description="the nightly suite",
        labels={"suite": "qa"},
        annotations={"commit": "abc123"},
        pass_threshold=80,
        max_error_rate=5,
        max_cost_usd=3.5,
        repetitions=2,
        warmup_runs=1,
        trigger=run_pb2.TRIGGER_AUTO,
        cache_mode=cache_pb2.CACHE_MODE_READ_WRITE,
    )
    for name, value in fields.items():
        setattr(request, name, value)
    return request


DEFINITION = (
    "target",
    "graders",
    "repetitions",
    "warmup_runs",
    "pass_threshold",
    "max_error_rate",
    "max_cost_usd",
    "cache_mode",
    "labels",
    "annotations",
    "display_name",
    "description",
    "dataset_id",
)


def _definition(run: run_pb2.Run) -> dict[str, Any]:
    return {name: getattr(run, name) for name in DEFINITION}


async def _ended(runs: pb_grpc.EvalRunServiceStub, request: pb.CreateRunRequest) -> run_pb2.Run:
    created = (await runs.CreateRun(request)).run
    await watch_all(runs, created.id)
    return (await runs.GetRun(pb.GetRunRequest(run_id=created.id))).run


async def _item_ids(runs: pb_grpc.EvalRunServiceStub, run_id: str) -> list[str]:
    """The run's item ids in result order (each once)."""
    return list(dict.fromkeys(r.item_id for r in await all_results(runs, run_id)))


async def _all_run_ids(runs: pb_grpc.EvalRunServiceStub) -> list[str]:
    return [r.id for r in (await runs.ListRuns(pb.ListRunsRequest(show_deleted=True, page_size=1000))).runs]


async def test_rerun_of_the_errored_items_copies_the_definition_and_names_its_source(runs) -> None:
    source = await _ended(runs, _source_request())
    assert source.status == run_pb2.RUN_STATUS_SUCCEEDED and source.counts.errored > 0 and source.rerun_of == ""

    rerun = await runs.RerunRun(pb.RerunRunRequest(run_id=source.id))
    new = rerun.run
    assert new.id != source.id and new.rerun_of == source.id
    assert new.status == run_pb2.RUN_STATUS_PENDING and new.request_id == ""
    assert _definition(new) == _definition(source)
    assert new.trigger == run_pb2.TRIGGER_AUTO  # the source's, none being given
    assert rerun.job_count == len(ERRORED) * 2  # items x repetitions
    assert (new.counts.total_items, new.counts.total_evaluations) == (len(ERRORED), len(ERRORED) * 2 * 2)

    # Stored with the run: GetRun and ListRuns show it, and the run executes its items, ids kept.
    await watch_all(runs, new.id)
    got = (await runs.GetRun(pb.GetRunRequest(run_id=new.id))).run
    assert got.rerun_of == source.id
    # Recorded responses do not change: every evaluation errors again, and the run says so.
    assert got.status == run_pb2.RUN_STATUS_FAILED and got.error.code == "ALL_EVALUATIONS_ERRORED"
    listed = {r.id: r for r in (await runs.ListRuns(pb.ListRunsRequest())).runs}
    assert listed[new.id].rerun_of == source.id and listed[source.id].rerun_of == ""
    assert await _item_ids(runs, new.id) == ERRORED
    assert (await runs.GetRun(pb.GetRunRequest(run_id=source.id))).run.counts == source.counts  # untouched

    # A rerun of a rerun names its own source.
    again = (await runs.RerunRun(pb.RerunRunRequest(run_id=new.id))).run
    assert again.rerun_of == new.id


async def test_the_scopes_select_failed_or_errored_items_or_all_and_trigger_may_be_given(runs) -> None:
    source = await _ended(runs, _source_request())
    both = await runs.RerunRun(pb.RerunRunRequest(run_id=source.id, scope=pb.RERUN_SCOPE_ITEMS_FAILED_OR_ERRORED))
    await watch_all(runs, both.run.id)
    assert await _item_ids(runs, both.run.id) == sorted(ERRORED + FAILED)

    every = await runs.RerunRun(
        pb.RerunRunRequest(run_id=source.id, scope=pb.RERUN_SCOPE_ITEMS_ALL, trigger=run_pb2.TRIGGER_BACKFILL)
    )
    assert every.job_count == len(ALL) * 2 and every.run.trigger == run_pb2.TRIGGER_BACKFILL
    await watch_all(runs, every.run.id)
    assert await _item_ids(runs, every.run.id) == ALL
    # The definition, except that a whole rerun of a READ_WRITE run refreshes (see the cache test below).
    assert every.run.cache_mode == cache_pb2.CACHE_MODE_REFRESH and source.cache_mode == cache_pb2.CACHE_MODE_READ_WRITE
    assert {**_definition(every.run), "cache_mode": 0} == {**_definition(source), "cache_mode": 0}


async def test_a_dataset_runs_rerun_keeps_the_dataset_and_the_runs_own_copies(runs, datasets) -> None:
    dataset = (await datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset(display_name="d")))).dataset
    await datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=_items()))
    source = await _ended(
        runs,
        pb.CreateRunRequest(
            dataset_id=dataset.id, target=target_pb2.Target(provided=target_pb2.ProvidedTarget()), graders=[exact()]
        ),
    )
    await datasets.DeleteDataset(ds.DeleteDatasetRequest(dataset_id=dataset.id))
    new = (await runs.RerunRun(pb.RerunRunRequest(run_id=source.id))).run
    assert new.dataset_id == dataset.id and new.run_number == source.run_number + 1
    await watch_all(runs, new.id)
    assert await _item_ids(runs, new.id) == ERRORED
    by_dataset = await runs.ListRuns(pb.ListRunsRequest(dataset_id=dataset.id))
    assert [r.id for r in by_dataset.runs] == [new.id, source.id]


async def test_request_id_makes_a_rerun_idempotent(runs) -> None:
    source = await _ended(runs, _source_request())
    request = pb.RerunRunRequest(run_id=source.id, request_id="rerun-1")
    first = await runs.RerunRun(request)
    before = await _all_run_ids(runs)
    second = await runs.RerunRun(request)
    # The same request, implicitly or explicitly in the default scope, is the same run.
    third = await runs.RerunRun(
        pb.RerunRunRequest(run_id=source.id, request_id="rerun-1", scope=pb.RERUN_SCOPE_ITEMS_ERRORED)
    )
    assert second.run.id == third.run.id == first.run.id and second.job_count == first.job_count
    assert second.run.request_id == "rerun-1" and second.run.rerun_of == source.id
    assert await _all_run_ids(runs) == before  # nothing more was written

    for different in (
        pb.RerunRunRequest(run_id=source.id, request_id="rerun-1", scope=pb.RERUN_SCOPE_ITEMS_ALL),
        pb.RerunRunRequest(run_id=source.id, request_id="rerun-1", trigger=run_pb2.TRIGGER_MANUAL),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as conflict:
            await runs.RerunRun(different)
        assert conflict.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert error_reason(conflict.value) == "REQUEST_ID_CONFLICT"
    # One namespace with CreateRun's keys, both ways.
    await runs.CreateRun(create_request(1, request_id="create-1"))
    with pytest.raises(grpc.aio.AioRpcError) as taken:
        await runs.RerunRun(pb.RerunRunRequest(run_id=source.id, request_id="create-1"))
    assert error_reason(taken.value) == "REQUEST_ID_CONFLICT"
    with pytest.raises(grpc.aio.AioRpcError) as taken_back:
        await runs.CreateRun(create_request(1, request_id="rerun-1"))
    assert error_reason(taken_back.value) == "REQUEST_ID_CONFLICT"
    assert len(await _all_run_ids(runs)) == len(before) + 1


async def _not_found_status(call: Any, run_id: str) -> bytes:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and error_reason(err.value) == "RUN_NOT_FOUND"
    status = rpc_status.from_call(err.value)
    assert status is not None
    return status.SerializeToString().replace(run_id.encode(), b"<ID>")


async def test_another_tenants_run_is_not_found_as_a_missing_one_is(server: EvalServer, runs) -> None:
    source = await _ended(runs, _source_request())
    other_key, _ = await server.keys.create("other")
    missing = source.id[:-1] + ("0" if source.id[-1] != "0" else "1")
    async with keyed_channel(server.port, other_key) as channel:
        theirs = pb_grpc.EvalRunServiceStub(channel)
        foreign = await _not_found_status(theirs.RerunRun(pb.RerunRunRequest(run_id=source.id)), source.id)
        absent = await _not_found_status(theirs.RerunRun(pb.RerunRunRequest(run_id=missing)), missing)
        assert foreign == absent
        assert list((await theirs.ListRuns(pb.ListRunsRequest())).runs) == []
    assert len(await _all_run_ids(runs)) == 1


async def test_nothing_to_rerun_is_refused_and_writes_nothing(runs) -> None:
    source = await _ended(runs, create_request(3))  # every evaluation passes
    before = await _all_run_ids(runs)
    for scope in (pb.RERUN_SCOPE_UNSPECIFIED, pb.RERUN_SCOPE_ITEMS_ERRORED, pb.RERUN_SCOPE_ITEMS_FAILED_OR_ERRORED):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await runs.RerunRun(pb.RerunRunRequest(run_id=source.id, scope=scope, request_id="nothing"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(err.value) == "NOTHING_TO_RERUN"
        assert "nothing to rerun" in (err.value.details() or "")
    assert await _all_run_ids(runs) == before
    # The request_id was not taken: the same key reruns every item.
    every = await runs.RerunRun(
        pb.RerunRunRequest(run_id=source.id, scope=pb.RERUN_SCOPE_ITEMS_ALL, request_id="nothing")
    )
    assert every.job_count == 3


async def test_bad_fields_are_invalid_argument(runs) -> None:
    source = await _ended(runs, create_request(1))
    for request, field in (
        (pb.RerunRunRequest(run_id=""), "run_id"),
        (pb.RerunRunRequest(run_id=source.id, scope=99), "scope"),  # type: ignore[arg-type]
        (pb.RerunRunRequest(run_id=source.id, trigger=99), "trigger"),  # type: ignore[arg-type]
        (pb.RerunRunRequest(run_id=source.id, cache_mode=99), "cache_mode"),  # type: ignore[arg-type]
        (pb.RerunRunRequest(run_id=source.id, request_id="r" * 129), "request_id"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await runs.RerunRun(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in violations(err.value)


async def test_a_deleted_run_can_be_rerun_as_it_can_be_read(runs) -> None:
    """AIP-164: a soft-deleted run is still read by GetRun, so it is a source too (until purged)."""
    source = await _ended(runs, _source_request())
    await runs.DeleteRun(pb.DeleteRunRequest(run_id=source.id))
    new = (await runs.RerunRun(pb.RerunRunRequest(run_id=source.id))).run
    assert new.rerun_of == source.id and not new.HasField("delete_time")


@pytest.fixture
async def hanging(tmp_path: Path) -> AsyncIterator[tuple[pb_grpc.EvalRunServiceStub, str]]:
    """A server and a run of three items that stays RUNNING (its webhook answers after a minute)."""
    srv = EvalServer(make_settings(tmp_path, outbound_allow="127.0.0.1"))
    await srv.start()
    try:
        with FakeEndpoint(Reply(body={"content": "late"}, delay_s=60)) as agent:
            assert srv.bootstrap_key
            async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
                stub = pb_grpc.EvalRunServiceStub(channel)
                created = await stub.CreateRun(
                    pb.CreateRunRequest(
                        items=[item_pb2.Item(id=f"h{i}", input="q", expected_output="a") for i in range(3)],
                        target=target_pb2.Target(
                            http=target_pb2.HttpTarget(endpoint=target_pb2.Endpoint(base_url=agent.url, timeout_s=120))
                        ),
                        graders=[exact()],
                    )
                )
                yield stub, created.run.id
    finally:
        await srv.stop(grace=0.5)


async def test_a_run_that_has_not_ended_is_refused_and_a_cancelled_ones_unevaluated_items_are_rerun(hanging) -> None:
    runs, run_id = hanging
    async with asyncio.timeout(30):
        while (await runs.GetRun(pb.GetRunRequest(run_id=run_id))).run.status != run_pb2.RUN_STATUS_RUNNING:
            await asyncio.sleep(0.05)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await runs.RerunRun(pb.RerunRunRequest(run_id=run_id, scope=pb.RERUN_SCOPE_ITEMS_ALL))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err.value) == "RUN_NOT_FINISHED" and "RUN_STATUS_RUNNING" in (err.value.details() or "")
    assert [r.id for r in (await runs.ListRuns(pb.ListRunsRequest())).runs] == [run_id]

    await runs.CancelRun(pb.CancelRunRequest(run_id=run_id))
    # No item has a result: each was never evaluated, so the errored scope resumes them all.
    new = await runs.RerunRun(pb.RerunRunRequest(run_id=run_id))
    assert new.job_count == 3 and new.run.rerun_of == run_id
    assert new.run.target.http.endpoint.timeout_s == 120


async def test_the_rest_route_reruns(tmp_path: Path) -> None:
    async with serving_gateway(make_settings(tmp_path, http_addr="127.0.0.1:0")) as (_, http):
        created = await http.post(
            "/v1/runs",
            json={
                "items": [
                    {"id": "ok", "input": "q", "expectedOutput": "a", "response": {"content": "a"}},
                    {"id": "bad", "input": "q", "expectedOutput": "a"},
                ],
                "target": {"provided": {}},
                "graders": [{"exactMatch": {}}],
            },
        )
        assert created.status_code == 200, created.text
        source_id = created.json()["run"]["id"]
        async with (
            asyncio.timeout(30),
            http.stream("GET", f"/v1/runs/{source_id}:watch", headers={"accept": "application/x-ndjson"}) as stream,
        ):
            async for _ in stream.aiter_lines():
                pass
        rerun = await http.post(f"/v1/runs/{source_id}:rerun", json={"requestId": "r1"})
        assert rerun.status_code == 200, rerun.text
        body = rerun.json()
        assert body["run"]["rerunOf"] == source_id and body["jobCount"] == 1
        assert body["run"]["counts"]["totalItems"] == 1
        got = (await http.get(f"/v1/runs/{body['run']['id']}")).json()["run"]
        assert got["rerunOf"] == source_id
        every = await http.post(f"/v1/runs/{source_id}:rerun", json={"scope": "RERUN_SCOPE_ITEMS_ALL"})
        assert every.status_code == 200 and every.json()["jobCount"] == 2
        missing = await http.post("/v1/runs/run_nope:rerun", json={})
        assert missing.status_code == 404 and missing.json()["details"][0]["reason"] == "RUN_NOT_FOUND"
        refreshed = await http.post(
            f"/v1/runs/{source_id}:rerun", json={"scope": "RERUN_SCOPE_ITEMS_ALL", "cacheMode": "CACHE_MODE_REFRESH"}
        )
        assert refreshed.status_code == 200, refreshed.text
        assert refreshed.json()["run"]["cacheMode"] == "CACHE_MODE_REFRESH"
        unknown = await http.post(f"/v1/runs/{source_id}:rerun", json={"scope": "RERUN_SCOPE_SOME"})
        assert unknown.status_code == 400
        spec = (await http.get("/openapi.json")).json()
        assert "post" in spec["paths"]["/v1/runs/{run_id}:rerun"]


async def test_the_rerun_of_a_run_from_before_max_error_rate_has_no_error_bar_either(server: EvalServer, runs) -> None:
    """A run created before the field existed has none stored, and its verdict no error bar; its rerun
    got the 0% bar of a new run's unset field, so the same results that passed then failed (a review)."""
    source = await _ended(runs, _source_request(repetitions=1))
    old_spec = run_pb2.Run.FromString(await _stored_spec(server, source.id))
    old_spec.ClearField("max_error_rate")  # as a run from before the field stored it
    async with server.db.write() as conn:
        await conn.execute(
            sqlalchemy.text("UPDATE runs SET spec = :spec WHERE id = :id"),
            {"spec": old_spec.SerializeToString(), "id": source.id},
        )
    rerun = (await runs.RerunRun(pb.RerunRunRequest(run_id=source.id, scope=pb.RERUN_SCOPE_ITEMS_ALL))).run
    assert not rerun.HasField("max_error_rate")
    await watch_all(runs, rerun.id)
    ended = (await runs.GetRun(pb.GetRunRequest(run_id=rerun.id))).run
    assert ended.counts.errored > 0 and ended.HasField("overall_passed")
    assert ended.overall_passed is (ended.aggregate.pass_rate * 100 >= source.pass_threshold)  # no error bar


async def _stored_spec(server: EvalServer, run_id: str) -> bytes:
    async with server.db.read() as conn:
        row = (await conn.execute(sqlalchemy.text("SELECT spec FROM runs WHERE id = :id"), {"id": run_id})).one()
    return bytes(row[0])


async def test_a_run_whose_definition_no_longer_passes_is_refused_naming_what_fails(tmp_path: Path) -> None:
    """The source names a secret deleted since: the rerun is FAILED_PRECONDITION RUN_NOT_RERUNNABLE naming
    the field in the stored definition (it was INVALID_ARGUMENT on fields the caller never sent)."""
    settings = make_settings(tmp_path, outbound_allow="127.0.0.1", secrets_key=generate_key())
    server = EvalServer(settings)
    await server.start()
    try:
        async with keyed_channel(server.port, server.bootstrap_key or "") as channel:
            runs = pb_grpc.EvalRunServiceStub(channel)
            secrets = secret_service_pb2_grpc.SecretServiceStub(channel)
            await secrets.CreateSecret(secret_service_pb2.CreateSecretRequest(name="agent_key", value="sk-1"))
            with FakeEndpoint(Reply({"content": "a"})) as agent:
                endpoint = target_pb2.Endpoint(base_url=agent.url, api_key_secret="agent_key")
                target = target_pb2.Target(http=target_pb2.HttpTarget(endpoint=endpoint))
                source = await _ended(runs, pb.CreateRunRequest(items=_items(), target=target, graders=[exact()]))
            await secrets.DeleteSecret(secret_service_pb2.DeleteSecretRequest(name="agent_key"))
            before = await _all_run_ids(runs)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await runs.RerunRun(pb.RerunRunRequest(run_id=source.id, scope=pb.RERUN_SCOPE_ITEMS_ALL))
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error_reason(refused.value) == "RUN_NOT_RERUNNABLE"
            assert "target.http.endpoint.api_key_secret: no secret named 'agent_key'" in (refused.value.details() or "")
            assert await _all_run_ids(runs) == before  # nothing written
    finally:
        await server.stop(grace=0.5)


async def test_a_rerun_of_failures_calls_again_and_the_cache_mode_may_be_given(tmp_path: Path) -> None:
    """A READ_WRITE run's `--failed` rerun took the source's mode: it made no call, and its failed items came
    back with the same cached outputs and verdicts. Unspecified, a failed-or-errored or whole rerun of a
    READ_WRITE run now REFRESHes (calls, and writes what it gets); `cache_mode` chooses otherwise (a REPLAY
    run's misses rerun live with READ_WRITE)."""
    from tests.fake_llm import chat_reply

    srv = EvalServer(make_settings(tmp_path, outbound_allow="127.0.0.1"))
    await srv.start()
    try:
        with FakeEndpoint(*[chat_reply(f"reply {i}") for i in range(40)]) as llm:
            assert srv.bootstrap_key
            async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
                runs = pb_grpc.EvalRunServiceStub(channel)
                request = pb.CreateRunRequest(
                    items=[item_pb2.Item(id=f"i{i}", input=f"q{i}", expected_output="reply 0") for i in range(3)],
                    target=target_pb2.Target(
                        chat=target_pb2.ChatTarget(
                            endpoint=target_pb2.Endpoint(base_url=llm.url + "/v1", timeout_s=10), model="m"
                        )
                    ),
                    graders=[exact()],
                    cache_mode=cache_pb2.CACHE_MODE_READ_WRITE,
                )
                source = await _ended(runs, request)
                assert len(llm.seen) == 3 and source.counts.failed == 2

                async def rerun(**fields: Any) -> tuple[run_pb2.Run, list[run_pb2.Result]]:
                    created = await runs.RerunRun(pb.RerunRunRequest(run_id=source.id, **fields))
                    await watch_all(runs, created.run.id)
                    run = (await runs.GetRun(pb.GetRunRequest(run_id=created.run.id))).run
                    return run, await all_results(runs, run.id)

                failed = pb.RERUN_SCOPE_ITEMS_FAILED_OR_ERRORED
                fresh, fresh_results = await rerun(scope=failed)
                assert fresh.cache_mode == cache_pb2.CACHE_MODE_REFRESH
                assert len(llm.seen) == 5  # both failed items called again
                assert not any(r.cached for r in fresh_results)
                cached, cached_results = await rerun(scope=failed, cache_mode=cache_pb2.CACHE_MODE_READ_WRITE)
                assert cached.cache_mode == cache_pb2.CACHE_MODE_READ_WRITE
                assert len(llm.seen) == 5 and all(r.cached for r in cached_results)
                # The refresh wrote what it got: the READ_WRITE rerun read those outputs.
                assert {r.output.content for r in cached_results} == {r.output.content for r in fresh_results}
                errored, _ = await rerun(scope=pb.RERUN_SCOPE_ITEMS_ALL, cache_mode=cache_pb2.CACHE_MODE_OFF)
                assert errored.cache_mode == cache_pb2.CACHE_MODE_OFF and len(llm.seen) == 8

                replay_request = pb.CreateRunRequest()
                replay_request.CopyFrom(request)
                replay_request.cache_mode = cache_pb2.CACHE_MODE_REPLAY
                replay_request.items.add(id="new", input="never asked", expected_output="reply 0")
                replayed = await _ended(runs, replay_request)
                assert replayed.counts.errored == 1 and len(llm.seen) == 8  # "new" missed: CACHE_MISS
                again = (await runs.RerunRun(pb.RerunRunRequest(run_id=replayed.id))).run
                assert again.cache_mode == cache_pb2.CACHE_MODE_REPLAY  # the source's: a replay never calls
                await watch_all(runs, again.id)
                live = (
                    await runs.RerunRun(
                        pb.RerunRunRequest(run_id=replayed.id, cache_mode=cache_pb2.CACHE_MODE_READ_WRITE)
                    )
                ).run
                await watch_all(runs, live.id)
                assert len(llm.seen) == 9  # the miss, called live
    finally:
        await srv.stop(grace=0.5)
