"""Tenant isolation: another tenant's resource is indistinguishable from a missing one, for every RPC."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status

from evalsvc.testing import EvalServiceTestServer
from evalsvc.v1 import comparison_pb2 as cpb
from evalsvc.v1 import dataset_service_pb2 as ds
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import (
    eval_run_service_pb2_grpc,
    grader_pb2,
    item_pb2,
    target_pb2,
)
from evalsvc.v1 import grader_service_pb2 as gs
from evalsvc.v1 import target_service_pb2 as ts
from tests import dbs
from tests.helpers import Tenant, create_request, exact, keyed_channel, provided_items, watch_all


async def _first(stream: Any) -> Any:
    async for message in stream:
        return message
    return None


def _calls(t: Tenant, ids: dict[str, str]) -> dict[str, Callable[[], Awaitable[Any]]]:
    run_id, dataset_id, grader_id, target_id = ids["run"], ids["dataset"], ids["grader"], ids["target"]
    target = target_pb2.Target(provided=target_pb2.ProvidedTarget())
    saved = grader_pb2.Grader(saved=grader_pb2.SavedGraderRef(grader_id=grader_id))
    return {
        "GetGrader": lambda: t.graders.GetGrader(gs.GetGraderRequest(grader_id=grader_id)),
        "UpdateGrader": lambda: t.graders.UpdateGrader(gs.UpdateGraderRequest(grader_id=grader_id, grader=exact())),
        "GetTarget": lambda: t.targets.GetTarget(ts.GetTargetRequest(target_id=target_id)),
        "CreateRun(saved grader)": lambda: t.runs.CreateRun(create_request(1, graders=[saved])),
        "CreateRun(saved target)": lambda: t.runs.CreateRun(
            create_request(1, target=target_pb2.Target(saved_target_id=target_id))
        ),
        "GetRun": lambda: t.runs.GetRun(pb.GetRunRequest(run_id=run_id)),
        "CancelRun": lambda: t.runs.CancelRun(pb.CancelRunRequest(run_id=run_id)),
        "RerunRun": lambda: t.runs.RerunRun(pb.RerunRunRequest(run_id=run_id, scope=pb.RERUN_SCOPE_ITEMS_ALL)),
        "ListRunResults": lambda: t.runs.ListRunResults(pb.ListRunResultsRequest(run_id=run_id)),
        "WatchRun": lambda: _first(t.runs.WatchRun(pb.WatchRunRequest(run_id=run_id))),
        "CompareRuns": lambda: t.runs.CompareRuns(
            cpb.CompareRunsRequest(baseline_run_id=run_id, candidate_run_id=run_id)
        ),
        "ListComparisonItems": lambda: t.runs.ListComparisonItems(
            cpb.ListComparisonItemsRequest(baseline_run_id=run_id, candidate_run_id=run_id)
        ),
        "GetDataset": lambda: t.datasets.GetDataset(ds.GetDatasetRequest(dataset_id=dataset_id)),
        "ListDatasetItems": lambda: t.datasets.ListDatasetItems(ds.ListDatasetItemsRequest(dataset_id=dataset_id)),
        "AddDatasetItems": lambda: t.datasets.AddDatasetItems(
            ds.AddDatasetItemsRequest(dataset_id=dataset_id, items=[item_pb2.Item(id="new")])
        ),
        "CreateRun(dataset)": lambda: t.runs.CreateRun(
            pb.CreateRunRequest(dataset_id=dataset_id, target=target, graders=[exact()])
        ),
        # Last: the owner's own calls are made in this order, and these end the resources.
        "DeleteDataset": lambda: t.datasets.DeleteDataset(ds.DeleteDatasetRequest(dataset_id=dataset_id)),
        "DeleteGrader": lambda: t.graders.DeleteGrader(gs.DeleteGraderRequest(grader_id=grader_id)),
        "DeleteTarget": lambda: t.targets.DeleteTarget(ts.DeleteTargetRequest(target_id=target_id)),
    }


async def _status_bytes(call: Callable[[], Awaitable[Any]], resource_id: str) -> bytes:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call()
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    status = rpc_status.from_call(err.value)
    assert status is not None
    return status.SerializeToString().replace(resource_id.encode(), b"<ID>")


async def test_every_rpc_treats_another_tenants_resource_as_missing(tenants: tuple[Tenant, Tenant]) -> None:
    mine, theirs = tenants
    dataset = (await mine.datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset(display_name="d")))).dataset
    await mine.datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=provided_items(2)))
    run = (await mine.runs.CreateRun(create_request(2))).run
    await watch_all(mine.runs, run.id)
    grader = (await mine.graders.CreateGrader(gs.CreateGraderRequest(grader=gs.SavedGrader(grader=exact())))).grader
    saved_target = (
        await mine.targets.CreateTarget(
            ts.CreateTargetRequest(
                target=ts.SavedTarget(target=target_pb2.Target(provided=target_pb2.ProvidedTarget()))
            )
        )
    ).target
    ids = {"run": run.id, "dataset": dataset.id, "grader": grader.id, "target": saved_target.id}
    # Missing ids of the same length, so the statuses can be compared byte for byte.
    missing = {kind: value[:-1] + ("0" if value[-1] != "0" else "1") for kind, value in ids.items()}
    kind_of = {
        "Dataset": "dataset",
        "dataset": "dataset",
        "Grader": "grader",
        "grader": "grader",
        "Target": "target",
        "target": "target",
    }

    own_calls = _calls(mine, ids)
    foreign_calls = _calls(theirs, ids)
    missing_calls = _calls(theirs, missing)
    for name in own_calls:
        kind = next((k for word, k in kind_of.items() if word in name), "run")
        foreign = await _status_bytes(foreign_calls[name], ids[kind])
        absent = await _status_bytes(missing_calls[name], missing[kind])
        assert foreign == absent, name
    for name, call in own_calls.items():
        if name == "CancelRun":
            continue  # the run finished: FAILED_PRECONDITION, which is the owner's answer
        await call()  # the owner is served

    # Listings never show another tenant's data, and request_id idempotency is per tenant.
    assert list((await theirs.runs.ListRuns(pb.ListRunsRequest())).runs) == []
    assert list((await theirs.datasets.ListDatasets(ds.ListDatasetsRequest())).datasets) == []
    assert list((await theirs.graders.ListGraders(gs.ListGradersRequest())).graders) == []
    assert list((await theirs.targets.ListTargets(ts.ListTargetsRequest())).targets) == []
    theirs_run = (await theirs.runs.CreateRun(create_request(1, request_id="same-key"))).run
    mine_run = (await mine.runs.CreateRun(create_request(1, request_id="same-key"))).run
    assert theirs_run.id != mine_run.id
    assert [r.id for r in (await theirs.runs.ListRuns(pb.ListRunsRequest())).runs] == [theirs_run.id]


async def test_another_tenants_refused_writes_cost_these_create_runs_no_transactions(tmp_path: Path) -> None:
    """A refusal found inside the writer's shared transaction (DeleteRun of a run that does not exist:
    NOT_FOUND) fails that write alone. It used to fail the whole group, whose other writes - this
    tenant's CreateRuns - were then applied again one transaction (and one fsync) each: 40 such
    refusals beside 40 CreateRuns made ~120 transactions and the CreateRuns 3-7x slower."""
    calls = 40
    async with EvalServiceTestServer(
        database_url=dbs.db_url(tmp_path),
        workers=0,  # nothing executes: the writer's groups are these calls' alone
        max_active_runs=1000,
        create_run_burst=1000,
        create_run_rate=1000.0,
    ) as started:
        victim_key, _ = await started.server.keys.create("victim")
        async with keyed_channel(started.server.port, victim_key) as channel:
            victim = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            await victim.CreateRun(create_request(1))  # both channels connected before counting
            with pytest.raises(grpc.aio.AioRpcError):
                await started.runs.DeleteRun(pb.DeleteRunRequest(run_id="run_missing"))
            writer = started.server.db.group_writer
            groups_before = writer.groups
            creates = [victim.CreateRun(create_request(1, display_name=f"victim {i}")) for i in range(calls)]
            refused = [started.runs.DeleteRun(pb.DeleteRunRequest(run_id=f"run_missing{i}")) for i in range(calls)]
            answers = await asyncio.gather(
                *(c for pair in zip(creates, refused, strict=True) for c in pair), return_exceptions=True
            )
        groups = writer.groups - groups_before
    assert all(isinstance(a, pb.CreateRunResponse) for a in answers[0::2]), answers[0::2][:3]
    assert {a.code() for a in answers[1::2] if isinstance(a, grpc.aio.AioRpcError)} == {grpc.StatusCode.NOT_FOUND}
    assert len([a for a in answers[1::2] if isinstance(a, grpc.aio.AioRpcError)]) == calls
    assert groups < calls // 2, f"{groups} transactions for {2 * calls} writes: refusals broke up the groups"
