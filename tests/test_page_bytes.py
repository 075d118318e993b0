"""Pages of large messages (ListDatasetItems) read about their byte bound, never their `page_size` rows
whole.

A page read its `page_size` items (or results with their outputs) whole and parsed them all before its
byte bound dropped what did not fit: 6 ListDatasetItems of 4 MiB items at once took ~9 s each to answer
with one item each, the server's RSS went from 683 MiB to 3.2 GiB and another tenant's GetRun p99 to
3.15 s. These tests count the bytes of items the store functions hand the services (not wall time)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from evalsvc.server import EvalServer
from evalsvc.store import comparisons as comparison_store
from evalsvc.store import datasets as dataset_store
from evalsvc.store import runs as run_store
from evalsvc.v1 import dataset_service_pb2 as ds
from evalsvc.v1 import dataset_service_pb2_grpc, item_pb2

PAGE_BYTES = 300_000
BLOB = 100_000  # each item's recorded response, so each output too
ITEMS = 12
MAX_PAGES = 50  # bounds every paging loop here


def _blob_bytes(value: Any) -> int:
    """The bytes of the serialized items or outputs in what a store function returned."""
    if isinstance(value, bytes | bytearray | memoryview):
        return len(value)
    if isinstance(value, dict):
        return sum(_blob_bytes(each) for each in value.values())
    if isinstance(value, list | tuple):
        return sum(_blob_bytes(each) for each in value)
    return 0


class Fetched:
    """Counts the bytes of items and outputs that store functions return, per call of the service."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *functions: tuple[Any, str]) -> None:
        self.bytes = 0
        for module, name in functions:
            original = getattr(module, name, None)
            if original is not None:  # what the store offers (a function of the fix may be missing)
                monkeypatch.setattr(module, name, self._counting(original))

    def _counting(self, original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def counting(*args: Any, **kwargs: Any) -> Any:
            found = await original(*args, **kwargs)
            self.bytes += _blob_bytes(found)
            return found

        return counting

    def take(self) -> int:
        taken, self.bytes = self.bytes, 0
        return taken


def _items() -> list[item_pb2.Item]:
    return [
        item_pb2.Item(id=f"b{i:02d}", input="q", response=item_pb2.Response(content=f"{i:02d}" + "r" * BLOB))
        for i in range(ITEMS)
    ]


async def _pages(read: Callable[[str], Awaitable[Any]], fetched: Fetched) -> list[tuple[Any, int]]:
    """Every page of a list, each with the bytes of items and outputs its call read."""
    pages: list[tuple[Any, int]] = []
    token = ""
    for _ in range(MAX_PAGES):
        fetched.take()
        page = await read(token)
        pages.append((page, fetched.take()))
        if not (token := page.next_page_token):
            return pages
    raise AssertionError(f"more than {MAX_PAGES} pages")


@pytest.fixture
def fetched(server: EvalServer, monkeypatch: pytest.MonkeyPatch) -> Fetched:
    """The bytes of items and outputs the lists read, on the `server` fixture with a page bound of 300 KB."""
    server.page_tokens.page_bytes = PAGE_BYTES
    return Fetched(
        monkeypatch,
        (dataset_store, "items_page"),
        (run_store, "results_page"),
        (run_store, "outputs_of"),
        (comparison_store, "results_of_keys"),
    )


async def _dataset(datasets: dataset_service_pb2_grpc.DatasetServiceStub) -> str:
    dataset = (await datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset()))).dataset
    await datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=_items()))
    return dataset.id


WANT = [f"b{i:02d}" for i in range(ITEMS)]


async def test_a_page_of_dataset_items_reads_about_its_byte_bound_not_its_page_size(
    datasets: dataset_service_pb2_grpc.DatasetServiceStub, fetched: Fetched
) -> None:
    """12 items of 100 KB, a page bound of 300 KB, page_size 1000: each page read every item after its
    position (1.2 MB for the first) to keep two. Each now reads at most its bound, and paging still lists
    every item once, in order, whole."""
    dataset_id = await _dataset(datasets)
    pages = await _pages(
        lambda token: datasets.ListDatasetItems(
            ds.ListDatasetItemsRequest(dataset_id=dataset_id, page_size=1000, page_token=token)
        ),
        fetched,
    )
    assert [item.id for page, _ in pages for item in page.items] == WANT
    assert all(item.response.content.endswith("r" * BLOB) for page, _ in pages for item in page.items)
    assert max(read for _, read in pages) <= PAGE_BYTES, [read for _, read in pages]
