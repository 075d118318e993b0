"""DatasetService, and runs over datasets (whole, subset, and isolation from later edits)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from evalsvc.store import datasets as dataset_store
from evalsvc.v1 import dataset_service_pb2 as ds
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import item_pb2, run_pb2, target_pb2
from tests.helpers import error_reason, exact, provided_items, rich_error, violations, watch_all


async def _dataset_with_items(datasets, n: int) -> ds.Dataset:  # type: ignore[no-untyped-def]
    created = await datasets.CreateDataset(
        ds.CreateDatasetRequest(dataset=ds.Dataset(display_name="qa", labels={"suite": "smoke"}))
    )
    added = await datasets.AddDatasetItems(
        ds.AddDatasetItemsRequest(dataset_id=created.dataset.id, items=provided_items(n))
    )
    assert list(added.item_ids) == [f"i{i}" for i in range(n)]
    return added.dataset


async def test_create_get_list_datasets(datasets) -> None:
    first = await _dataset_with_items(datasets, 3)
    second = (await datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset(display_name="b")))).dataset
    got = (await datasets.GetDataset(ds.GetDatasetRequest(dataset_id=first.id))).dataset
    assert got.item_count == 3 and got.display_name == "qa" and dict(got.labels) == {"suite": "smoke"}
    page1 = await datasets.ListDatasets(ds.ListDatasetsRequest(page_size=1))
    page2 = await datasets.ListDatasets(ds.ListDatasetsRequest(page_size=1, page_token=page1.next_page_token))
    assert [d.id for d in [*page1.datasets, *page2.datasets]] == [second.id, first.id]
    assert page2.next_page_token == ""


async def test_dataset_items_page_in_order_and_ids_are_assigned(datasets) -> None:
    dataset = await _dataset_with_items(datasets, 5)
    more = await datasets.AddDatasetItems(
        ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=[item_pb2.Item(input="no id")])
    )
    assert list(more.item_ids) == ["item-6"] and more.dataset.item_count == 6
    ids, token = [], ""
    while True:
        page = await datasets.ListDatasetItems(
            ds.ListDatasetItemsRequest(dataset_id=dataset.id, page_size=4, page_token=token)
        )
        ids.extend(i.id for i in page.items)
        token = page.next_page_token
        if not token:
            break
    assert ids == ["i0", "i1", "i2", "i3", "i4", "item-6"]


async def test_an_assigned_id_never_clashes_with_one_a_caller_chose(datasets) -> None:
    """Ids were numbered from the item count alone: once a caller added an `item-2` of its own, every later
    item without an id was refused ("the dataset already has an item 'item-2'", an id the caller never
    sent), for good. Now a number that is taken - in the dataset or in the same request - gives way to
    a random id."""
    created = (await datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset(display_name="d")))).dataset
    mine = await datasets.AddDatasetItems(
        ds.AddDatasetItemsRequest(dataset_id=created.id, items=[item_pb2.Item(id="item-2", input="x")])
    )
    assert list(mine.item_ids) == ["item-2"]
    for _ in range(2):  # it stays possible
        added = await datasets.AddDatasetItems(
            ds.AddDatasetItemsRequest(dataset_id=created.id, items=[item_pb2.Item(input="y")])
        )
        [assigned] = added.item_ids
        assert assigned.startswith("item-") and assigned != "item-2"
    # The same request: the caller's item-5 and an id-less item that would have been numbered item-5.
    both = await datasets.AddDatasetItems(
        ds.AddDatasetItemsRequest(
            dataset_id=created.id, items=[item_pb2.Item(input="z"), item_pb2.Item(id="item-4", input="w")]
        )
    )
    assert both.item_ids[1] == "item-4" and both.item_ids[0] not in ("item-4", "item-2")
    assert both.dataset.item_count == 5


async def test_duplicate_item_ids_are_rejected_and_nothing_is_added(datasets) -> None:
    dataset = await _dataset_with_items(datasets, 2)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await datasets.AddDatasetItems(
            ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=[item_pb2.Item(id="new"), item_pb2.Item(id="i1")])
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items[1].id" in violations(err.value)
    assert (await datasets.GetDataset(ds.GetDatasetRequest(dataset_id=dataset.id))).dataset.item_count == 2


async def test_a_recorded_response_with_a_nan_cost_is_rejected_and_nothing_is_added(datasets) -> None:
    dataset = await _dataset_with_items(datasets, 2)
    bad = item_pb2.Item(id="new", response=item_pb2.Response(content="x", cost_usd=float("nan")))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=[bad]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items[0].response.cost_usd" in violations(err.value)
    assert (await datasets.GetDataset(ds.GetDatasetRequest(dataset_id=dataset.id))).dataset.item_count == 2


async def test_unknown_dataset_is_not_found_everywhere(datasets, runs) -> None:
    calls = [
        datasets.GetDataset(ds.GetDatasetRequest(dataset_id="ds_nope")),
        datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id="ds_nope", items=[item_pb2.Item()])),
        datasets.ListDatasetItems(ds.ListDatasetItemsRequest(dataset_id="ds_nope")),
        runs.CreateRun(
            pb.CreateRunRequest(
                dataset_id="ds_nope", target=target_pb2.Target(echo=target_pb2.EchoTarget()), graders=[exact()]
            )
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_reason(err.value) == "DATASET_NOT_FOUND"


async def test_runs_of_a_dataset_number_and_copy_their_items(datasets, runs) -> None:
    dataset = await _dataset_with_items(datasets, 4)
    target = target_pb2.Target(provided=target_pb2.ProvidedTarget())
    whole = await runs.CreateRun(pb.CreateRunRequest(dataset_id=dataset.id, target=target, graders=[exact()]))
    subset = await runs.CreateRun(
        pb.CreateRunRequest(dataset_id=dataset.id, item_ids=["i3", "i1"], target=target, graders=[exact()])
    )
    assert (whole.run.run_number, subset.run.run_number) == (1, 2)
    assert (whole.job_count, subset.job_count) == (4, 2)
    await datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=provided_items(6)[4:]))
    await watch_all(runs, whole.run.id)
    done = await watch_all(runs, subset.run.id)
    assert done[-1].run.status == run_pb2.RUN_STATUS_SUCCEEDED
    whole_results = (await runs.ListRunResults(pb.ListRunResultsRequest(run_id=whole.run.id))).results
    assert sorted(r.item_id for r in whole_results) == ["i0", "i1", "i2", "i3"]  # later items are not in it
    subset_results = (await runs.ListRunResults(pb.ListRunResultsRequest(run_id=subset.run.id))).results
    assert sorted(r.item_id for r in subset_results) == ["i1", "i3"]
    by_dataset = await runs.ListRuns(pb.ListRunsRequest(dataset_id=dataset.id))
    assert {r.id for r in by_dataset.runs} == {whole.run.id, subset.run.id}


async def test_unknown_item_ids_name_the_field(datasets, runs) -> None:
    dataset = await _dataset_with_items(datasets, 2)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await runs.CreateRun(
            pb.CreateRunRequest(
                dataset_id=dataset.id,
                item_ids=["i0", "zz"],
                target=target_pb2.Target(provided=target_pb2.ProvidedTarget()),
                graders=[exact()],
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "item_ids[1]" in violations(err.value)


async def test_concurrent_runs_and_appends_on_one_dataset_neither_fail_nor_collide(datasets, runs) -> None:
    """On PostgreSQL these race for real: the first run_number of a dataset, and appends that read
    item_count and the existing ids before writing."""
    import asyncio

    dataset = await _dataset_with_items(datasets, 2)
    request = pb.CreateRunRequest(
        dataset_id=dataset.id, target=target_pb2.Target(provided=target_pb2.ProvidedTarget()), graders=[exact()]
    )
    created = await asyncio.gather(*(runs.CreateRun(request) for _ in range(8)))
    assert sorted(r.run.run_number for r in created) == list(range(1, 9))
    added = await asyncio.gather(
        *(
            datasets.AddDatasetItems(
                ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=[item_pb2.Item(input=f"q{i}")])
            )
            for i in range(8)
        )
    )
    assert sorted(a.item_ids[0] for a in added) == sorted({a.item_ids[0] for a in added})
    got = (await datasets.GetDataset(ds.GetDatasetRequest(dataset_id=dataset.id))).dataset
    assert got.item_count == 10


async def test_create_dataset_requires_the_dataset(datasets) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await datasets.CreateDataset(ds.CreateDatasetRequest(request_id="r"))
    assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "dataset" in violations(missing.value)
    assert not (await datasets.ListDatasets(ds.ListDatasetsRequest())).datasets


async def every_page(read: Callable[[str], Awaitable[Any]]) -> list[Any]:
    """Every page of a list, `read` given each page's token ("" first), until one names none."""
    pages, token = [], ""
    while True:
        pages.append(page := await read(token))
        if not (token := page.next_page_token):
            return pages


async def test_pages_of_datasets_with_large_annotations_fit_in_a_message(server, datasets) -> None:  # type: ignore[no-untyped-def]
    """ListDatasets was bounded by its count alone: datasets of 64 KiB of annotations each, a page of
    them past --max-message-bytes, failed whole (RESOURCE_EXHAUSTED; REST 429)."""
    server.page_tokens.page_bytes = 150_000
    notes = {f"note{i}": "n" * 6000 for i in range(10)}  # ~60 KB
    made = [
        (await datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset(annotations=notes)))).dataset.id
        for _ in range(5)
    ]
    pages = await every_page(lambda token: datasets.ListDatasets(ds.ListDatasetsRequest(page_token=token)))
    assert [d.id for page in pages for d in page.datasets] == list(reversed(made))
    assert max(page.ByteSize() for page in pages) <= 150_000 + 1024 and len(pages) == 3


async def test_pages_of_large_items_and_results_fit_in_a_message(server, datasets, runs) -> None:  # type: ignore[no-untyped-def]
    """A page was bounded by its count alone: 100 dataset items of 1.4 MB, or their results with outputs,
    made ListDatasetItems and ListRunResults fail whole (RESOURCE_EXHAUSTED "larger than max"; over
    REST a 429, a retry that could never succeed). A page now stops at half of --max-message-bytes
    (a smaller bound here), with a token for the rest, and paging still returns every one once."""
    server.page_tokens.page_bytes = 450_000
    big = "x" * 200_000
    created = (await datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset(display_name="big")))).dataset
    items = [
        item_pb2.Item(id=f"b{i}", input="q", expected_output=big, response=item_pb2.Response(content=big))
        for i in range(6)
    ]
    await datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=created.id, items=items))

    pages = await every_page(
        lambda token: datasets.ListDatasetItems(ds.ListDatasetItemsRequest(dataset_id=created.id, page_token=token))
    )
    sizes = [page.ByteSize() for page in pages]
    assert [item.id for page in pages for item in page.items] == [f"b{i}" for i in range(6)]
    assert max(sizes) <= 450_000 + 1024, sizes

    run = (
        await runs.CreateRun(
            pb.CreateRunRequest(
                dataset_id=created.id, target=target_pb2.Target(provided=target_pb2.ProvidedTarget()), graders=[exact()]
            )
        )
    ).run
    await watch_all(runs, run.id)
    pages = await every_page(
        lambda token: runs.ListRunResults(pb.ListRunResultsRequest(run_id=run.id, page_token=token))
    )
    sizes = [page.ByteSize() for page in pages]
    results = [result.item_id for page in pages for result in page.results]
    assert sorted(results) == [f"b{i}" for i in range(6)] and max(sizes) <= 450_000 + 1024, sizes
    assert len(sizes) >= 3  # two results a page


async def test_an_append_with_a_request_id_happens_once_however_often_it_is_retried(datasets) -> None:  # type: ignore[no-untyped-def]
    """A retry after a lost reply added again every item without an id (the service assigns a new one): with
    a request_id (AIP-155) the retries, one after another or all at once, add nothing and get the first
    call's ids; the same request_id for another request is ALREADY_EXISTS naming the dataset."""
    dataset = (await datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset()))).dataset
    request = ds.AddDatasetItemsRequest(
        dataset_id=dataset.id, items=[item_pb2.Item(input="a"), item_pb2.Item(id="b", input="b")], request_id="r1"
    )
    first = await datasets.AddDatasetItems(request)
    assert list(first.item_ids) == ["item-1", "b"]
    again = await asyncio.gather(*(datasets.AddDatasetItems(request) for _ in range(5)))
    assert {tuple(a.item_ids) for a in again} == {("item-1", "b")}
    assert {a.dataset.item_count for a in again} == {2}
    # Concurrent first calls of one request_id: one adds, the others answer as it did.
    racing = ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=[item_pb2.Item(input="c")], request_id="r2")
    raced = await asyncio.gather(*(datasets.AddDatasetItems(racing) for _ in range(5)))
    assert {tuple(a.item_ids) for a in raced} == {("item-3",)}
    listed = await datasets.ListDatasetItems(ds.ListDatasetItemsRequest(dataset_id=dataset.id))
    assert [i.id for i in listed.items] == ["item-1", "b", "item-3"]

    other = ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=[item_pb2.Item(input="z")], request_id="r1")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await datasets.AddDatasetItems(other)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and error_reason(err.value) == "REQUEST_ID_CONFLICT"
    assert rich_error(err.value).metadata == {"dataset_id": dataset.id}
    # It said "already used for a different dataset" of the same dataset: what differs is the items.
    assert err.value.details() == f"request_id 'r1' was already used to add other items to dataset {dataset.id!r}"
    elsewhere = (await datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset()))).dataset
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await datasets.AddDatasetItems(
            ds.AddDatasetItemsRequest(dataset_id=elsewhere.id, items=request.items, request_id="r1")
        )
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert err.value.details() == f"request_id 'r1' was already used to add items to another dataset, {dataset.id!r}"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=[], request_id="x" * 129))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and set(violations(err.value)) == {
        "items",
        "request_id",
    }

    # The request_ids go with their dataset: a retry after DeleteDataset is NOT_FOUND, as any call on it.
    await datasets.DeleteDataset(ds.DeleteDatasetRequest(dataset_id=dataset.id))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await datasets.AddDatasetItems(request)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_retry_that_waited_for_the_first_calls_lock_answers_as_it_did(datasets, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Two replicas given the same append at once (PostgreSQL): the second looked for its request_id before the
    first committed, waited for the dataset's lock, then read the first's items as taken and answered
    INVALID_ARGUMENT (15 rounds of 15, two `evalsvc serve` processes) for a write that had succeeded. Here the
    second's first look is made to miss, as it did then; under the lock it finds the first call's answer."""
    dataset = (await datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset()))).dataset
    items = [item_pb2.Item(id=f"q{n}", input=f"question {n}") for n in range(3)]
    request = ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=items, request_id="once")
    assert list((await datasets.AddDatasetItems(request)).item_ids) == ["q0", "q1", "q2"]

    looked = []
    find = dataset_store.find_append

    async def miss_the_first_look(*args: Any) -> Any:
        looked.append(args)
        return None if len(looked) == 1 else await find(*args)

    monkeypatch.setattr(dataset_store, "find_append", miss_the_first_look)
    again = await datasets.AddDatasetItems(request)
    assert len(looked) == 2  # missed before the lock, found under it
    assert list(again.item_ids) == ["q0", "q1", "q2"] and again.dataset.item_count == 3
