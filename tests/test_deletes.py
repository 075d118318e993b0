"""DeleteDataset, DeleteGrader and DeleteTarget on a real server: what they remove, what they leave
(runs made from the deleted resources, running or finished), a dataset generation in progress or
pending, and the REST routes."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select

from evalsvc.auth.service import DEFAULT_TENANT
from evalsvc.store.datasets import GENERATIONS
from evalsvc.store.datasets import ITEMS as DATASET_ITEMS
from evalsvc.store.definitions import VERSIONS
from evalsvc.testing import EvalServiceTestServer
from evalsvc.v1 import dataset_service_pb2 as ds
from evalsvc.v1 import (
    dataset_service_pb2_grpc,
    grader_pb2,
    grader_service_pb2_grpc,
    item_pb2,
    run_pb2,
    target_pb2,
    target_service_pb2_grpc,
)
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import grader_service_pb2 as gs
from evalsvc.v1 import target_service_pb2 as ts
from evalsvc.v1.dataset_generation_pb2 import DatasetGeneration, GenerateDatasetItemsRequest
from evalsvc.v1.dataset_generation_pb2_grpc import DatasetGenerationServiceStub
from tests import dbs
from tests.conftest import make_settings
from tests.fake_llm import FakeEndpoint, Reply, chat_reply, generator_reply
from tests.helpers import all_results, error_reason, exact, serving_gateway, watch_all


class Client:
    def __init__(self, server: EvalServiceTestServer) -> None:
        self.server = server
        self.runs = server.runs
        self.datasets = dataset_service_pb2_grpc.DatasetServiceStub(server.channel)
        self.generations = DatasetGenerationServiceStub(server.channel)
        self.graders = grader_service_pb2_grpc.GraderServiceStub(server.channel)
        self.targets = target_service_pb2_grpc.TargetServiceStub(server.channel)

    async def dataset(self, items: int = 0) -> str:
        dataset_id = (await self.datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset()))).dataset.id
        if items:
            added = [item_pb2.Item(id=f"i{n}", input=f"question {n}", expected_output="ok") for n in range(items)]
            await self.datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset_id, items=added))
        return dataset_id

    async def grader(self) -> str:
        return (
            await self.graders.CreateGrader(gs.CreateGraderRequest(grader=gs.SavedGrader(grader=exact())))
        ).grader.id

    async def target(self, target: target_pb2.Target) -> str:
        return (await self.targets.CreateTarget(ts.CreateTargetRequest(target=ts.SavedTarget(target=target)))).target.id

    async def purged(self) -> None:
        """Once a pass of the purge loop that started after this call has ended: the items (versions) of
        the datasets (graders) deleted before it are gone."""
        await asyncio.wait_for(self.server.server.purger.next_pass(), 20)

    async def rows(self, table: Any, **where: str) -> int:
        """Rows of a table left in the database, however the API shows them."""
        async with self.server.server.db.read() as conn:
            query = select(func.count()).select_from(table)
            for column, value in where.items():
                query = query.where(table.c[column] == value)
            return int((await conn.execute(query)).scalar_one())


@pytest.fixture
async def gate() -> threading.Event:
    return threading.Event()


@pytest.fixture
async def model(gate: threading.Event) -> AsyncIterator[FakeEndpoint]:
    """A chat model whose answers ("ok") wait for `gate`: a call held in flight until the test opens it."""
    with FakeEndpoint(Reply(chat_reply("ok").body, gate=gate)) as fake:
        yield fake


@pytest.fixture
async def client(tmp_path: Path, model: FakeEndpoint) -> AsyncIterator[Client]:
    async with EvalServiceTestServer(
        database_url=dbs.db_url(tmp_path), outbound_allow="127.0.0.1", judge_base_url=model.url + "/v1", judge_model="m"
    ) as server:
        yield Client(server)


async def _refused(call: Any, code: grpc.StatusCode = grpc.StatusCode.NOT_FOUND) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value
    return error_reason(caught.value)


async def test_deleted_resources_are_not_found_and_their_parts_are_gone(client: Client) -> None:
    dataset_id, grader_id = await client.dataset(items=3), await client.grader()
    await client.graders.UpdateGrader(gs.UpdateGraderRequest(grader_id=grader_id, grader=exact()))  # version 2
    target_id = await client.target(target_pb2.Target(echo=target_pb2.EchoTarget()))
    kept = await client.dataset(items=2)  # another of each stays as it is
    kept_grader, kept_target = (
        await client.grader(),
        await client.target(target_pb2.Target(echo=target_pb2.EchoTarget())),
    )

    await client.datasets.DeleteDataset(ds.DeleteDatasetRequest(dataset_id=dataset_id))
    await client.graders.DeleteGrader(gs.DeleteGraderRequest(grader_id=grader_id))
    await client.targets.DeleteTarget(ts.DeleteTargetRequest(target_id=target_id))

    assert (
        await _refused(client.datasets.GetDataset(ds.GetDatasetRequest(dataset_id=dataset_id))) == "DATASET_NOT_FOUND"
    )
    await _refused(client.datasets.ListDatasetItems(ds.ListDatasetItemsRequest(dataset_id=dataset_id)))
    await _refused(
        client.datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset_id, items=[item_pb2.Item()]))
    )
    assert await _refused(client.graders.GetGrader(gs.GetGraderRequest(grader_id=grader_id, version=1))) == (
        "GRADER_NOT_FOUND"
    )
    await _refused(client.graders.UpdateGrader(gs.UpdateGraderRequest(grader_id=grader_id, grader=exact())))
    assert await _refused(client.targets.GetTarget(ts.GetTargetRequest(target_id=target_id))) == "TARGET_NOT_FOUND"
    saved_grader = grader_pb2.Grader(saved=grader_pb2.SavedGraderRef(grader_id=grader_id))
    echo = target_pb2.Target(echo=target_pb2.EchoTarget())
    for request in (
        pb.CreateRunRequest(dataset_id=dataset_id, target=echo, graders=[exact()]),
        pb.CreateRunRequest(dataset_id=kept, target=echo, graders=[saved_grader]),
        pb.CreateRunRequest(dataset_id=kept, target=target_pb2.Target(saved_target_id=target_id), graders=[exact()]),
    ):
        await _refused(client.runs.CreateRun(request))
    # Deleting twice: NOT_FOUND the second time.
    await _refused(client.datasets.DeleteDataset(ds.DeleteDatasetRequest(dataset_id=dataset_id)))
    await _refused(client.graders.DeleteGrader(gs.DeleteGraderRequest(grader_id=grader_id)))
    await _refused(client.targets.DeleteTarget(ts.DeleteTargetRequest(target_id=target_id)))

    # Nothing of them is left behind; the others keep everything.
    assert await client.rows(DATASET_ITEMS, dataset_id=dataset_id) == 0
    assert await client.rows(DATASET_ITEMS, dataset_id=kept) == 2
    assert await client.rows(VERSIONS, grader_id=grader_id) == 0
    assert await client.rows(VERSIONS, grader_id=kept_grader) == 1
    listed = await client.datasets.ListDatasets(ds.ListDatasetsRequest())
    assert [d.id for d in listed.datasets] == [kept]
    assert [g.id for g in (await client.graders.ListGraders(gs.ListGradersRequest())).graders] == [kept_grader]
    assert [t.id for t in (await client.targets.ListTargets(ts.ListTargetsRequest())).targets] == [kept_target]


async def test_runs_made_from_deleted_resources_finish_and_read_back(
    client: Client, model: FakeEndpoint, gate: threading.Event
) -> None:
    """A run copies its items, grader and target when it is created: deleting them takes nothing from
    it, whether it has finished or is still RUNNING (a model call in flight) at the delete."""
    dataset_id, grader_id = await client.dataset(items=2), await client.grader()
    chat = target_pb2.ChatTarget(endpoint=target_pb2.Endpoint(base_url=model.url + "/v1"), model="m")
    target_id = await client.target(target_pb2.Target(chat=chat))
    request = pb.CreateRunRequest(
        dataset_id=dataset_id,
        target=target_pb2.Target(saved_target_id=target_id),
        graders=[grader_pb2.Grader(name="exact", saved=grader_pb2.SavedGraderRef(grader_id=grader_id))],
    )
    gate.set()
    finished = (await client.runs.CreateRun(request)).run
    await watch_all(client.runs, finished.id)
    gate.clear()
    running = (await client.runs.CreateRun(request)).run
    assert await asyncio.to_thread(model.wait_seen, 3, 30)  # the second run's first model call is held
    assert (await client.runs.GetRun(pb.GetRunRequest(run_id=running.id))).run.status == run_pb2.RUN_STATUS_RUNNING

    await client.datasets.DeleteDataset(ds.DeleteDatasetRequest(dataset_id=dataset_id))
    await client.graders.DeleteGrader(gs.DeleteGraderRequest(grader_id=grader_id))
    await client.targets.DeleteTarget(ts.DeleteTargetRequest(target_id=target_id))
    gate.set()
    events = await watch_all(client.runs, running.id)
    assert events[-1].run.status == run_pb2.RUN_STATUS_SUCCEEDED

    for run_id in (finished.id, running.id):
        run = (await client.runs.GetRun(pb.GetRunRequest(run_id=run_id))).run
        assert run.status == run_pb2.RUN_STATUS_SUCCEEDED and run.dataset_id == dataset_id
        assert run.target.chat.model == "m" and run.graders[0].HasField("exact_match")  # the copies
        results = await all_results(client.runs, run_id)
        assert sorted(r.item_id for r in results) == ["i0", "i1"]
        assert all(r.state == run_pb2.RESULT_STATE_PASSED for r in results)
    listed = await client.runs.ListRuns(pb.ListRunsRequest(dataset_id=dataset_id))
    assert {r.id for r in listed.runs} == {finished.id, running.id}  # still found by the dataset's id


async def test_a_generation_of_a_deleted_dataset_ends_cleanly_and_the_loop_goes_on(
    client: Client, model: FakeEndpoint, gate: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    """A running generation (its model call in flight at the delete) writes nothing more and stops; a
    pending one is never started; the generation loop goes on with other datasets."""
    generations = client.server.server.generations
    model.script = [generator_reply({"messages": [{"content": "Write 20 items"}]})]
    model.script[0].gate = gate
    caplog.set_level(logging.WARNING)

    running = await client.dataset()
    request = GenerateDatasetItemsRequest(dataset_id=running, item_count=40, instructions="Questions.")
    await client.generations.GenerateDatasetItems(request)
    assert await asyncio.to_thread(model.wait_seen, 1, 30)  # claimed, its first batch asked for and held
    [(_, _, task)] = generations._working.values()
    await client.datasets.DeleteDataset(ds.DeleteDatasetRequest(dataset_id=running))
    gate.set()
    await task  # its batch came back to a deleted dataset: nothing written, and it stopped there
    assert len(model.seen) == 1

    await generations.stop()  # a pending generation, deleted before any process claims it
    pending = await client.dataset()
    await client.generations.GenerateDatasetItems(
        GenerateDatasetItemsRequest(dataset_id=pending, item_count=20, instructions="Questions.")
    )
    await client.datasets.DeleteDataset(ds.DeleteDatasetRequest(dataset_id=pending))
    await generations.start()
    after = await client.dataset()
    await client.generations.GenerateDatasetItems(
        GenerateDatasetItemsRequest(dataset_id=after, item_count=20, instructions="Questions.")
    )
    async with asyncio.timeout(60):
        while (await client.datasets.GetDataset(ds.GetDatasetRequest(dataset_id=after))).dataset.item_count < 20:
            await asyncio.sleep(0.05)  # datasets have no watch: polled, as tests/test_dataset_generation.py does
    assert len(model.seen) == 2  # only the new dataset's generation asked the model again
    for deleted in (running, pending):
        assert await client.rows(DATASET_ITEMS, dataset_id=deleted) == 0
        assert await client.rows(GENERATIONS, dataset_id=deleted) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "evalsvc" in r.name], caplog.text
    done = (await client.datasets.GetDataset(ds.GetDatasetRequest(dataset_id=after))).dataset.generation
    assert done.state == DatasetGeneration.STATE_SUCCEEDED


async def test_rest_deletes_answer_in_the_apis_error_shape(tmp_path: Path) -> None:
    async with serving_gateway(make_settings(tmp_path, http_addr="127.0.0.1:0")) as (_, http):
        dataset = (await http.post("/v1/datasets", json={"dataset": {}})).json()["dataset"]["id"]
        grader = (await http.post("/v1/graders", json={"grader": {"grader": {"exactMatch": {}}}})).json()["grader"][
            "id"
        ]
        target = (await http.post("/v1/targets", json={"target": {"target": {"echo": {}}}})).json()["target"]["id"]
        for path, reason in (
            (f"/v1/datasets/{dataset}", "DATASET_NOT_FOUND"),
            (f"/v1/graders/{grader}", "GRADER_NOT_FOUND"),
            (f"/v1/targets/{target}", "TARGET_NOT_FOUND"),
        ):
            deleted = await http.delete(path)
            assert deleted.status_code == 200 and deleted.json() == {}, deleted.text
            again = await http.delete(path)
            assert again.status_code == 404, again.text
            status = again.json()
            assert status["code"] == 5 and status["details"][0]["reason"] == reason, status
            assert (await http.get(path)).status_code == 404


async def _delete_and_one_chunk(client: Client, dataset_id: str, budget: int) -> None:
    """DeleteDataset's first transaction and the first chunk of its purge, as the call and the purge loop make them."""
    import functools

    from evalsvc.store import datasets as dataset_store
    from evalsvc.store import retention

    db = client.server.server.db
    assert await db.transact(lambda conn: dataset_store.remove(conn, DEFAULT_TENANT, dataset_id))
    # The purge loop's own step: the loop's pass may have been first (then this one finds nothing).
    await db.transact(functools.partial(retention.definition_purge_step, budget=budget), alone=True)


@pytest.mark.parametrize("subset", [False, True])
@pytest.mark.parametrize("chunked", [False, True])
async def test_a_run_of_a_dataset_deleted_while_it_is_read_is_not_found(
    client: Client, monkeypatch: pytest.MonkeyPatch, subset: bool, chunked: bool
) -> None:
    """CreateRun reads the dataset's row, then its items. A DeleteDataset that committed between the two
    (on PostgreSQL, another replica's) left it looking empty: INVALID_ARGUMENT "the dataset has no
    items" or "no item 'i1' in dataset", as if the caller had named items wrongly. It is NOT_FOUND. And
    with a chunk of its purge done too, the items left were a subset of the deleted dataset's, and a run
    was created of them: NOT_FOUND too."""
    from evalsvc.store import datasets as dataset_store

    dataset_id = await client.dataset(items=5)
    real = dataset_store.all_items

    async def deleted_meanwhile(conn: Any, wanted: str) -> Any:
        if chunked:
            await _delete_and_one_chunk(client, wanted, budget=2)
        else:
            await client.datasets.DeleteDataset(ds.DeleteDatasetRequest(dataset_id=wanted))
        return await real(conn, wanted)

    monkeypatch.setattr(dataset_store, "all_items", deleted_meanwhile)
    request = pb.CreateRunRequest(dataset_id=dataset_id, target=target_pb2.Target(echo={}), graders=[exact()])
    if subset:
        request.item_ids.append("i3")
    assert await _refused(client.runs.CreateRun(request)) == "DATASET_NOT_FOUND"
    assert (await client.runs.ListRuns(pb.ListRunsRequest())).runs == []


async def test_a_dataset_is_deleted_a_chunk_per_transaction_not_found_from_the_first(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeleteDataset held SQLite's one writer while it deleted every item (~4.6 s a GB: every tenant's
    writes waited). Now the dataset goes in one small transaction and its items a chunk of CHUNK_ROWS per
    transaction: held between two chunks, the dataset is NOT_FOUND (an AddDatasetItems to it too), other
    writes commit, and its items go on going; at the end the tenant's stored bytes are what they were."""
    from evalsvc.store import retention, usage

    db = client.server.server.db

    async def stored() -> int:
        async with db.read() as conn:
            return (await usage.stored_bytes(conn, [DEFAULT_TENANT]))[DEFAULT_TENANT]

    before = await stored()
    dataset_id = await client.dataset(items=100)
    monkeypatch.setattr(retention, "CHUNK_ROWS", 10)
    chunks: list[int] = []
    between, resume = asyncio.Event(), asyncio.Event()
    transact = db.transact

    async def held_after_the_first_chunk(work: Any, *, alone: bool = False) -> Any:
        if getattr(work, "func", None) is retention.definition_purge_step:
            if len(chunks) == 1:  # the first chunk committed: hold the second before it starts
                between.set()
                await asyncio.wait_for(resume.wait(), 20)
            step = await transact(work, alone=alone)
            if step is not None:  # None: the pass found nothing more to purge
                chunks.append(step.rows)
            return step
        return await transact(work, alone=alone)

    monkeypatch.setattr(db, "transact", held_after_the_first_chunk)
    # The call answers once the dataset is gone; its items go in the purge loop's pass it wakes.
    await asyncio.wait_for(client.datasets.DeleteDataset(ds.DeleteDatasetRequest(dataset_id=dataset_id)), 20)
    try:
        await asyncio.wait_for(between.wait(), 20)
        assert await _refused(client.datasets.GetDataset(ds.GetDatasetRequest(dataset_id=dataset_id)))
        assert await _refused(
            client.datasets.AddDatasetItems(
                ds.AddDatasetItemsRequest(dataset_id=dataset_id, items=[item_pb2.Item(id="late", input="q")])
            )
        )
        assert [d.id for d in (await client.datasets.ListDatasets(ds.ListDatasetsRequest())).datasets] == []
        assert await stored() == before  # every byte back with the call's answer, 90 items still to delete
        other = await asyncio.wait_for(client.dataset(items=1), 10)  # another write, between two chunks
        assert await client.rows(DATASET_ITEMS, dataset_id=dataset_id) == 90
    finally:
        resume.set()
    await client.purged()
    assert chunks[:10] == [10] * 10 and sum(chunks) == 100
    assert await client.rows(DATASET_ITEMS, dataset_id=dataset_id) == 0
    assert await client.rows(DATASET_ITEMS, dataset_id=other) == 1
    await client.datasets.DeleteDataset(ds.DeleteDatasetRequest(dataset_id=other))
    await client.purged()
    assert await stored() == before


async def test_a_delete_answers_before_its_chunks_a_slow_purge_past_the_clients_deadline(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeleteDataset deleted every chunk before it answered: a large dataset's took past the Python
    client's per-attempt deadline, the client retried, and the retry said NOT_FOUND for a delete that
    was done. It answers once the dataset is gone; the chunks follow in the purge loop."""
    from evalsvc_client.aio import AsyncEvalClient

    from evalsvc.store import retention

    dataset_id = await client.dataset(items=50)
    monkeypatch.setattr(retention, "CHUNK_ROWS", 5)
    real = retention.definition_purge_step

    async def slow(conn: Any, **kw: Any) -> Any:
        await asyncio.sleep(0.1)  # a chunk of a large dataset
        return await real(conn, **kw)

    monkeypatch.setattr(retention, "definition_purge_step", slow)
    srv = client.server
    async with AsyncEvalClient(srv.grpc_target, api_key=srv.api_key, timeout_s=0.5) as c:
        await c.delete_dataset(dataset_id)
    await client.purged()
    assert await client.rows(DATASET_ITEMS, dataset_id=dataset_id) == 0


async def test_a_purge_that_fails_is_logged_not_answered_and_the_others_still_go(
    client: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A chunk that failed had DeleteDataset fail after the dataset was gone; and a deleted definition
    whose purge kept failing held up every one deleted after it. The call answers; the purge loop logs one
    WARNING for it and goes on with the others."""
    from evalsvc.store import retention

    broken, fine = await client.dataset(items=3), await client.dataset(items=3)
    real = retention._delete_parts

    async def failing(conn: Any, kind: str, owner_id: str, *args: Any) -> Any:
        if owner_id == broken:
            raise KeyError(kind)
        return await real(conn, kind, owner_id, *args)

    monkeypatch.setattr(retention, "_delete_parts", failing)
    with caplog.at_level(logging.WARNING, logger="evalsvc.runs.retention"):
        await client.datasets.DeleteDataset(ds.DeleteDatasetRequest(dataset_id=broken))
        await client.datasets.DeleteDataset(ds.DeleteDatasetRequest(dataset_id=fine))
        await client.purged()
        await client.purged()
    assert await client.rows(DATASET_ITEMS, dataset_id=fine) == 0
    assert await client.rows(DATASET_ITEMS, dataset_id=broken) == 3
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and broken in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in caplog.records]
    monkeypatch.setattr(retention, "_delete_parts", real)
    await client.purged()
    assert await client.rows(DATASET_ITEMS, dataset_id=broken) == 0


async def test_the_items_of_a_dataset_deleted_while_they_are_read_are_not_found(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ListDatasetItems reads the dataset's row, then its items' sizes, then the items. A DeleteDataset and a
    chunk of its purge between them answered the items the chunk left as the whole dataset's last page
    (no token): NOT_FOUND, as the next call would say."""
    from evalsvc.store import datasets as dataset_store

    dataset_id = await client.dataset(items=5)
    real = dataset_store.item_sizes

    async def deleted_meanwhile(conn: Any, wanted: str, **kw: Any) -> Any:
        await _delete_and_one_chunk(client, wanted, budget=2)
        return await real(conn, wanted, **kw)

    monkeypatch.setattr(dataset_store, "item_sizes", deleted_meanwhile)
    assert await _refused(client.datasets.ListDatasetItems(ds.ListDatasetItemsRequest(dataset_id=dataset_id)))
