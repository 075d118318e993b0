"""--max-stored-bytes-per-tenant on a real server: what a tenant stores (its runs' definitions, items,
outputs and results, its datasets and their items, its saved graders' versions and saved targets) is
bounded, so that one tenant cannot fill the disk every tenant shares. Past it CreateRun, AddDatasetItems
and the saved definitions' writes are refused with nothing written, a running run ends FAILED
(STORAGE_QUOTA_EXCEEDED) keeping its results, another tenant goes on, and deleting a dataset or a saved
definition makes room."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from evalsvc.execution.executor import OverLimit
from evalsvc.testing import EvalServiceTestServer
from evalsvc.v1 import dataset_service_pb2 as ds
from evalsvc.v1 import (
    dataset_service_pb2_grpc,
    eval_run_service_pb2_grpc,
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
from evalsvc.v1.dataset_generation_pb2 import (
    ContinueConversationsRequest,
    Conversation,
    GenerateDatasetItemsRequest,
)
from evalsvc.v1.dataset_generation_pb2_grpc import DatasetGenerationServiceStub
from tests import dbs
from tests.fake_llm import FakeEndpoint, Reply
from tests.helpers import create_request, exact, keyed_channel, watch_all
from tests.test_tenant_caps import assert_over

LIMIT = 200_000
REPLY = "x" * 4000  # what the target answers to each item: 60 of them pass LIMIT


@dataclass
class Tenant:
    runs: eval_run_service_pb2_grpc.EvalRunServiceStub
    datasets: dataset_service_pb2_grpc.DatasetServiceStub
    generations: DatasetGenerationServiceStub
    graders: grader_service_pb2_grpc.GraderServiceStub
    targets: target_service_pb2_grpc.TargetServiceStub

    @classmethod
    def on(cls, channel: grpc.aio.Channel) -> Tenant:
        return cls(
            eval_run_service_pb2_grpc.EvalRunServiceStub(channel),
            dataset_service_pb2_grpc.DatasetServiceStub(channel),
            DatasetGenerationServiceStub(channel),
            grader_service_pb2_grpc.GraderServiceStub(channel),
            target_service_pb2_grpc.TargetServiceStub(channel),
        )

    async def run_to_end(self, request: pb.CreateRunRequest) -> run_pb2.Run:
        created = await self.runs.CreateRun(request)
        await watch_all(self.runs, created.run.id)
        return (await self.runs.GetRun(pb.GetRunRequest(run_id=created.run.id))).run


@dataclass
class Served:
    mine: Tenant
    theirs: Tenant
    agent: FakeEndpoint
    server: EvalServiceTestServer


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async with AsyncExitStack() as stack:
        agent = stack.enter_context(FakeEndpoint(Reply({"content": REPLY}, delay_s=0.01)))
        server = await stack.enter_async_context(
            EvalServiceTestServer(
                database_url=dbs.db_url(tmp_path),
                max_stored_bytes_per_tenant=LIMIT,
                workers=2,
                claim_batch=4,
                outbound_allow="127.0.0.1",
                deleted_run_retention_s=0.0,
                judge_base_url=agent.url + "/v1",  # the generator model too: any call to it is seen
                judge_model="gen",
            )
        )
        other_key, _ = await server.server.keys.create("other")
        theirs = await stack.enter_async_context(keyed_channel(server.server.port, other_key))
        yield Served(Tenant.on(server.channel), Tenant.on(theirs), agent, server)


def agent_run(url: str, items: int) -> pb.CreateRunRequest:
    return pb.CreateRunRequest(
        items=[item_pb2.Item(id=f"i{i}", input=f"q{i}", expected_output="a") for i in range(items)],
        target=target_pb2.Target(http=target_pb2.HttpTarget(endpoint=target_pb2.Endpoint(base_url=url))),
        graders=[exact()],
    )


async def test_a_run_that_fills_its_tenants_storage_ends_failed_keeping_its_results(served: Served) -> None:
    dataset = (await served.mine.datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset()))).dataset
    run = await served.mine.run_to_end(agent_run(served.agent.url, 200))  # 800 KB of replies: four times LIMIT
    assert run.status == run_pb2.RUN_STATUS_FAILED and run.error.code == "STORAGE_QUOTA_EXCEEDED", run.error
    assert "--max-stored-bytes-per-tenant" in run.error.message
    # The run stores its definition, items with their digests and 200 jobs (under 60 KB), then each
    # evaluation its reply and a result: stopped once they reach LIMIT, as jobs start, so those under way
    # then (two workers, a claim of four) still finish.
    done = run.counts.completed_evaluations
    assert (LIMIT - 60_000) // (len(REPLY) + 500) <= done < LIMIT // len(REPLY) + 12
    assert len(served.agent.seen) == run.counts.completed_evaluations  # every call made is recorded
    results = await served.mine.runs.ListRunResults(pb.ListRunResultsRequest(run_id=run.id, page_size=1000))
    assert len(results.results) == run.counts.completed_evaluations  # what it did is kept, and readable

    # Past its bytes, the tenant's writes are refused whole; another tenant's are not.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await served.mine.runs.CreateRun(create_request(1))
    assert_over(refused.value, "max_stored_bytes_per_tenant")
    listed = await served.mine.runs.ListRuns(pb.ListRunsRequest())
    assert [r.id for r in listed.runs] == [run.id]  # nothing written
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await served.mine.datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset()))
    assert_over(refused.value, "max_stored_bytes_per_tenant")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await served.mine.datasets.AddDatasetItems(
            ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=[item_pb2.Item(input="q")])
        )
    assert_over(refused.value, "max_stored_bytes_per_tenant")
    # Generations too, before the model is asked (and paid) for anything.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await served.mine.generations.GenerateDatasetItems(
            GenerateDatasetItemsRequest(dataset_id=dataset.id, item_count=5, instructions="Questions.")
        )
    assert_over(refused.value, "max_stored_bytes_per_tenant")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        conversation = Conversation(item_id="c1", turns=[item_pb2.Message(role="user", content="hi")])
        await served.mine.generations.ContinueConversations(
            ContinueConversationsRequest(dataset_id=dataset.id, conversations=[conversation])
        )
    assert_over(refused.value, "max_stored_bytes_per_tenant")
    assert len(served.agent.seen) == run.counts.completed_evaluations  # no model call was made for them
    theirs = await served.theirs.run_to_end(agent_run(served.agent.url, 10))
    assert theirs.status == run_pb2.RUN_STATUS_SUCCEEDED or theirs.counts.completed_evaluations == 10


@contextmanager
def logged(logger_name: str, text: str) -> Iterator[threading.Event]:
    """An event set when `logger_name` logs a line containing `text` (at INFO or above)."""
    seen = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if text in record.getMessage():
                seen.set()

    logger, handler = logging.getLogger(logger_name), Watch()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_a_call_under_way_as_its_run_passes_the_storage_is_recorded_before_the_run_ends(tmp_path: Path) -> None:
    """docs/errors.md: evaluations under way when the tenant passes its bytes still finish, and are
    recorded. The first item's call is held while the others fill the tenant's storage; the run waits
    for it (it was cancelled as the run ended: its call paid for, its result thrown away), then ends."""
    held = threading.Event()
    first = Reply({"content": REPLY}, gate=held)
    with FakeEndpoint(first, Reply({"content": REPLY}, delay_s=0.01)) as agent:
        try:
            with logged("evalsvc.execution.executor", "ends over its tenant's stored bytes") as marked:
                async with EvalServiceTestServer(
                    database_url=dbs.db_url(tmp_path),
                    max_stored_bytes_per_tenant=LIMIT,
                    workers=2,
                    max_workers_per_tenant=2,
                    claim_batch=4,
                    outbound_allow="127.0.0.1",
                ) as server:
                    mine = Tenant.on(server.channel)
                    created = (await mine.runs.CreateRun(agent_run(agent.url, 200))).run
                    assert await asyncio.to_thread(marked.wait, 60)  # past its bytes, the first call still held
                    waiting = (await mine.runs.GetRun(pb.GetRunRequest(run_id=created.id))).run
                    assert waiting.status == run_pb2.RUN_STATUS_RUNNING
                    held.set()
                    await watch_all(mine.runs, created.id)
                    run = (await mine.runs.GetRun(pb.GetRunRequest(run_id=created.id))).run
                    results = await mine.runs.ListRunResults(pb.ListRunResultsRequest(run_id=run.id, page_size=1000))
        finally:
            held.set()
    assert run.status == run_pb2.RUN_STATUS_FAILED and run.error.code == "STORAGE_QUOTA_EXCEEDED", run.error
    assert len(agent.seen) == run.counts.completed_evaluations == len(results.results)
    [asked] = re.findall(r'"q(\d+)"', json.dumps(agent.seen[0].body))  # the held call's item: its input
    assert f"i{asked}" in {r.item_id for r in results.results}


async def test_dataset_items_count_and_deleting_the_dataset_makes_room(served: Served) -> None:
    dataset = (await served.mine.datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset()))).dataset
    big = [item_pb2.Item(input="y" * 45_000) for _ in range(4)]  # 180 KB of LIMIT's 200 KB
    await served.mine.datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=big))
    with pytest.raises(grpc.aio.AioRpcError) as refused:  # 45 KB more would pass it: none of the two is added
        await served.mine.datasets.AddDatasetItems(
            ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=[item_pb2.Item(input="z"), big[0]])
        )
    assert_over(refused.value, "max_stored_bytes_per_tenant")
    got = (await served.mine.datasets.GetDataset(ds.GetDatasetRequest(dataset_id=dataset.id))).dataset
    assert got.item_count == 4
    # A run of the dataset copies its items: another 180 KB.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await served.mine.runs.CreateRun(
            pb.CreateRunRequest(
                dataset_id=dataset.id, target=target_pb2.Target(echo=target_pb2.EchoTarget()), graders=[exact()]
            )
        )
    assert_over(refused.value, "max_stored_bytes_per_tenant")
    assert "delete runs, datasets, saved graders or saved targets" in (refused.value.details() or "")

    await served.mine.datasets.DeleteDataset(ds.DeleteDatasetRequest(dataset_id=dataset.id))
    run = await served.mine.run_to_end(create_request(3))
    assert run.status == run_pb2.RUN_STATUS_SUCCEEDED


# A grader whose definition is about 45 KB, and a target whose headers are: a quarter of LIMIT's 200 KB each.
BIG_GRADER = grader_pb2.Grader(contains=grader_pb2.Contains(values=[f"{i:03}" + "v" * 1000 for i in range(45)]))
BIG_TARGET = target_pb2.Target(
    http=target_pb2.HttpTarget(
        endpoint=target_pb2.Endpoint(base_url="http://127.0.0.1:9/", headers={f"x-h{i}": "v" * 1000 for i in range(45)})
    )
)


async def test_saved_definitions_count_and_deleting_them_makes_room(served: Served) -> None:
    """Saved grader versions, saved targets and datasets' annotations counted nothing: at a 1 MiB cap a tenant
    stored 400 grader versions of 256 KB (104 MB on disk) while its quota said 0 bytes."""
    mine = served.mine
    new_grader = gs.CreateGraderRequest(grader=gs.SavedGrader(grader=BIG_GRADER))
    grader = (await mine.graders.CreateGrader(new_grader)).grader
    await mine.graders.UpdateGrader(gs.UpdateGraderRequest(grader_id=grader.id, grader=BIG_GRADER))
    new_target = ts.CreateTargetRequest(target=ts.SavedTarget(target=BIG_TARGET))
    target = (await mine.targets.CreateTarget(new_target)).target
    annotated = ds.CreateDatasetRequest(dataset=ds.Dataset(annotations={"notes": "n" * 45_000}))
    dataset = (await mine.datasets.CreateDataset(annotated)).dataset  # 180 KB of LIMIT's 200 KB

    # Each of them once more would pass LIMIT: refused, naming the quota, and nothing is written.
    for write in (
        mine.graders.UpdateGrader(gs.UpdateGraderRequest(grader_id=grader.id, grader=BIG_GRADER)),
        mine.graders.CreateGrader(new_grader),
        mine.targets.CreateTarget(new_target),
        mine.datasets.CreateDataset(annotated),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await write
        assert_over(refused.value, "max_stored_bytes_per_tenant")
    got = (await mine.graders.GetGrader(gs.GetGraderRequest(grader_id=grader.id))).grader
    assert got.latest_version == 2
    assert [g.id for g in (await mine.graders.ListGraders(gs.ListGradersRequest())).graders] == [grader.id]
    assert [t.id for t in (await mine.targets.ListTargets(ts.ListTargetsRequest())).targets] == [target.id]
    assert [d.id for d in (await mine.datasets.ListDatasets(ds.ListDatasetsRequest())).datasets] == [dataset.id]
    # Another tenant's bytes are its own.
    await served.theirs.graders.CreateGrader(new_grader)

    # Deleting gives back all they stored: then 196 KB of items fit in LIMIT's 200 KB.
    await mine.graders.DeleteGrader(gs.DeleteGraderRequest(grader_id=grader.id))
    await mine.targets.DeleteTarget(ts.DeleteTargetRequest(target_id=target.id))
    await mine.datasets.DeleteDataset(ds.DeleteDatasetRequest(dataset_id=dataset.id))
    fresh = (await mine.datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset()))).dataset
    items = [item_pb2.Item(input="y" * 49_000) for _ in range(4)]
    added = await mine.datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=fresh.id, items=items))
    assert added.dataset.item_count == 4


async def test_update_run_growing_past_the_cap_is_refused_and_changes_nothing(served: Served) -> None:
    """UpdateRun's descriptions were counted but never refused: a tenant at its cap went on storing 4 x 60 KB
    of annotations a run (a run's row and its status events each hold them), 200 calls OK. Growth past the
    cap is refused with nothing written; a change that fits, or that gives bytes back, goes."""
    mine = served.mine
    run = await mine.run_to_end(create_request(1))
    dataset = (await mine.datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset()))).dataset
    filler = [item_pb2.Item(input="y" * 45_000) for _ in range(4)]  # 180 KB of LIMIT's 200 KB
    await mine.datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=filler))
    notes = pb.UpdateRunRequest(
        run_id=run.id, run=run_pb2.Run(annotations={"notes": "n" * 10_000}), update_mask=_mask("annotations")
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:  # 4 x 10 KB: past the 20 KB left
        await mine.runs.UpdateRun(notes)
    assert_over(refused.value, "max_stored_bytes_per_tenant")
    unchanged = (await mine.runs.GetRun(pb.GetRunRequest(run_id=run.id))).run
    assert (unchanged.etag, dict(unchanged.annotations)) == (run.etag, {})
    renamed = await mine.runs.UpdateRun(
        pb.UpdateRunRequest(run_id=run.id, run=run_pb2.Run(display_name="nightly"), update_mask=_mask("display_name"))
    )
    assert renamed.run.display_name == "nightly"

    await mine.datasets.DeleteDataset(ds.DeleteDatasetRequest(dataset_id=dataset.id))
    assert dict((await mine.runs.UpdateRun(notes)).run.annotations) == {"notes": "n" * 10_000}


def _mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


async def test_a_tenant_that_made_room_after_a_stopped_run_runs_again_at_once(served: Served) -> None:
    """The executor's count of a tenant's bytes is raised by its recordings and read again only now and then;
    one that says the tenant is over is read again before it stops a run, or the run a tenant creates right
    after deleting a dataset (CreateRun checks the database) would be stopped on the count from before."""
    dataset = (await served.mine.datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset()))).dataset
    filler = [item_pb2.Item(input="y" * 40_000) for _ in range(4)]  # 160 KB of LIMIT's 200 KB
    await served.mine.datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=filler))
    stopped = await served.mine.run_to_end(agent_run(served.agent.url, 30))  # 120 KB of replies
    assert stopped.error.code == "STORAGE_QUOTA_EXCEEDED"

    await served.mine.datasets.DeleteDataset(ds.DeleteDatasetRequest(dataset_id=dataset.id))
    run = await served.mine.run_to_end(create_request(3))
    assert run.status == run_pb2.RUN_STATUS_SUCCEEDED, run.error
    assert run.counts.completed_evaluations == 3


async def test_a_run_marked_to_stop_and_purged_before_it_ended_stops_no_recording(served: Served) -> None:
    """A run over its tenant's bytes is marked, and ended once what it finished is recorded; deleted and
    purged in between (DeleteRun is the documented remedy, and --deleted-run-retention-s may be 0), ending it
    raised and the recording loop failed after every batch, for every tenant (a 200-item run: 1.1 s before,
    102 s after). The mark is set here by hand: the interleaving that reaches it is a matter of milliseconds."""
    executor = served.server.server.executor
    gone = await served.mine.run_to_end(create_request(1))
    await served.mine.runs.DeleteRun(pb.DeleteRunRequest(run_id=gone.id))
    await served.server.server.purger.purge()
    executor._over_limit[gone.id] = OverLimit("STORAGE_QUOTA_EXCEEDED", "marked, then purged")
    executor.wake()
    run = await asyncio.wait_for(served.theirs.run_to_end(create_request(200)), 30)
    assert run.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert gone.id not in executor._over_limit
