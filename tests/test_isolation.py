"""Tenant isolation: another tenant's resource is indistinguishable from a missing one, for every RPC."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status

from evalsvc.server import EvalServer
from evalsvc.v1 import dataset_service_pb2 as ds
from evalsvc.v1 import dataset_service_pb2_grpc, eval_run_service_pb2_grpc, item_pb2, target_pb2
from evalsvc.v1 import eval_run_service_pb2 as pb
from tests.helpers import create_request, exact, keyed_channel, provided_items, watch_all


class Tenant:
    """Stubs of one tenant."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
        self.datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)


@pytest.fixture
async def tenants(server: EvalServer) -> AsyncIterator[tuple[Tenant, Tenant]]:
    assert server.bootstrap_key
    other_key, _ = await server.keys.create("other")
    async with (
        keyed_channel(server.port, server.bootstrap_key) as mine,
        keyed_channel(server.port, other_key) as theirs,
    ):
        yield Tenant(mine), Tenant(theirs)


async def _first(stream: Any) -> Any:
    async for message in stream:
        return message
    return None


def _calls(t: Tenant, run_id: str, dataset_id: str) -> dict[str, Callable[[], Awaitable[Any]]]:
    target = target_pb2.Target(provided=target_pb2.ProvidedTarget())
    return {
        "GetRun": lambda: t.runs.GetRun(pb.GetRunRequest(run_id=run_id)),
        "CancelRun": lambda: t.runs.CancelRun(pb.CancelRunRequest(run_id=run_id)),
        "ListRunResults": lambda: t.runs.ListRunResults(pb.ListRunResultsRequest(run_id=run_id)),
        "WatchRun": lambda: _first(t.runs.WatchRun(pb.WatchRunRequest(run_id=run_id))),
        "GetDataset": lambda: t.datasets.GetDataset(ds.GetDatasetRequest(dataset_id=dataset_id)),
        "ListDatasetItems": lambda: t.datasets.ListDatasetItems(ds.ListDatasetItemsRequest(dataset_id=dataset_id)),
        "AddDatasetItems": lambda: t.datasets.AddDatasetItems(
            ds.AddDatasetItemsRequest(dataset_id=dataset_id, items=[item_pb2.Item(id="new")])
        ),
        "CreateRun(dataset)": lambda: t.runs.CreateRun(
            pb.CreateRunRequest(dataset_id=dataset_id, target=target, graders=[exact()])
        ),
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
    # A missing id of the same length, so the statuses can be compared byte for byte.
    missing_run = run.id[:-1] + ("0" if run.id[-1] != "0" else "1")
    missing_dataset = dataset.id[:-1] + ("0" if dataset.id[-1] != "0" else "1")

    own_calls = _calls(mine, run.id, dataset.id)
    foreign_calls = _calls(theirs, run.id, dataset.id)
    missing_calls = _calls(theirs, missing_run, missing_dataset)
    for name in own_calls:
        resource = dataset.id if "Dataset" in name or "dataset" in name else run.id
        missing = missing_dataset if resource == dataset.id else missing_run
        foreign = await _status_bytes(foreign_calls[name], resource)
        absent = await _status_bytes(missing_calls[name], missing)
        assert foreign == absent, name
    for name, call in own_calls.items():
        if name == "CancelRun":
            continue  # the run finished: FAILED_PRECONDITION, which is the owner's answer
        await call()  # the owner is served

    # Listings never show another tenant's data, and request_id idempotency is per tenant.
    assert list((await theirs.runs.ListRuns(pb.ListRunsRequest())).runs) == []
    assert list((await theirs.datasets.ListDatasets(ds.ListDatasetsRequest())).datasets) == []
    theirs_run = (await theirs.runs.CreateRun(create_request(1, request_id="same-key"))).run
    mine_run = (await mine.runs.CreateRun(create_request(1, request_id="same-key"))).run
    assert theirs_run.id != mine_run.id
    assert [r.id for r in (await theirs.runs.ListRuns(pb.ListRunsRequest())).runs] == [theirs_run.id]
