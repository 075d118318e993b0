"""Pages of large messages (ListDatasetItems, ListRunResults, ListComparisonItems) read about their byte
bound, never their `page_size` rows whole, and every item can be listed, however large its outputs.

A page read its `page_size` items (or results with their outputs) whole and parsed them all before its
byte bound dropped what did not fit: 6 ListDatasetItems of 4 MiB items at once took ~9 s each to answer
with one item each, the server's RSS went from 683 MiB to 3.2 GiB and another tenant's GetRun p99 to
3.15 s. These tests count the bytes of items and outputs the store functions hand the services (not
wall time). And a comparison item carries two outputs: two of 9 MB never fitted in a response however
small the page (INTERNAL, "some bound is missing"), nor did a result with an output near
--max-message-bytes; listed outputs are now cut to fit and say so (Result.output_truncated)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.ids import PageTokens
from evalsvc.server import EvalServer
from evalsvc.store import comparisons as comparison_store
from evalsvc.store import datasets as dataset_store
from evalsvc.store import definitions as definition_store
from evalsvc.store import runs as run_store
from evalsvc.store.records import ResultRecord
from evalsvc.testing import EvalServiceTestServer
from evalsvc.v1 import comparison_pb2 as cpb
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
from tests import dbs
from tests.helpers import exact, keyed_channel, watch_all

PAGE_BYTES = 300_000
BLOB = 100_000  # each item's recorded response, so each output too
ITEMS = 12
MAX_PAGES = 50  # bounds every paging loop here


def _blob_bytes(value: Any) -> int:
    """The bytes of the serialized items or outputs, and of the results' explanations, in what a store
    function returned."""
    if isinstance(value, bytes | bytearray | memoryview):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, ResultRecord):
        return len(value.explanation.encode())
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


async def _result_pages(
    runs: eval_run_service_pb2_grpc.EvalRunServiceStub, run_id: str, fetched: Fetched
) -> list[tuple[Any, int]]:
    """Every page of a run's results at page_size 1000 (`_pages`)."""
    return await _pages(
        lambda token: runs.ListRunResults(pb.ListRunResultsRequest(run_id=run_id, page_size=1000, page_token=token)),
        fetched,
    )


async def _comparison_pages(
    runs: eval_run_service_pb2_grpc.EvalRunServiceStub, made: list[str], fetched: Fetched
) -> list[tuple[Any, int]]:
    """Every page of the comparison of runs `made` (baseline, candidate) at page_size 1000 (`_pages`)."""
    return await _pages(
        lambda token: runs.ListComparisonItems(
            cpb.ListComparisonItemsRequest(
                baseline_run_id=made[0], candidate_run_id=made[1], page_size=1000, page_token=token
            )
        ),
        fetched,
    )


@pytest.fixture
def fetched(server: EvalServer, monkeypatch: pytest.MonkeyPatch) -> Fetched:
    """The bytes of items and outputs the lists read, on the `server` fixture with a page bound of 300 KB."""
    server.page_tokens.page_bytes = PAGE_BYTES
    return Fetched(
        monkeypatch,
        (dataset_store, "items_page"),
        (run_store, "results_page"),
        (run_store, "outputs_of"),
        (run_store, "explanations_of"),
        (comparison_store, "results_by_id"),
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


async def test_a_page_of_results_or_comparison_items_reads_about_its_byte_bound_not_its_page_size(
    datasets: dataset_service_pb2_grpc.DatasetServiceStub,
    runs: eval_run_service_pb2_grpc.EvalRunServiceStub,
    fetched: Fetched,
) -> None:
    """Results of 12 items with outputs of 100 KB, a page bound of 300 KB, page_size 1000: each page of
    ListRunResults or ListComparisonItems read every output after its position (1.2 MB; 2.4 MB for
    comparison items, two outputs each) to keep two results or one item. Each now reads at most its
    bound, and paging still lists every one once, in order, with whole outputs."""
    dataset_id = await _dataset(datasets)
    made = []
    for _ in range(2):
        created = await runs.CreateRun(
            pb.CreateRunRequest(
                dataset_id=dataset_id, target=target_pb2.Target(provided=target_pb2.ProvidedTarget()), graders=[exact()]
            )
        )
        made.append((await watch_all(runs, created.run.id))[-1].run.id)

    pages = await _result_pages(runs, made[0], fetched)
    results = [result for page, _ in pages for result in page.results]
    assert sorted(result.item_id for result in results) == WANT and len(pages) >= ITEMS // 2
    assert all(len(result.output.content) == BLOB + 2 and not result.output_truncated for result in results)
    assert max(read for _, read in pages) <= PAGE_BYTES, [read for _, read in pages]

    pages = await _comparison_pages(runs, made, fetched)
    items = [item for page, _ in pages for item in page.items]
    assert [item.item_id for item in items] == WANT and len(pages) == ITEMS  # two outputs of 100 KB: one a page
    for item in items:
        assert item.baseline.output == item.candidate.output and len(item.baseline.output.content) == BLOB + 2
    assert max(read for _, read in pages) <= PAGE_BYTES, [read for _, read in pages]


MAX_MESSAGE = 256 * 1024  # the smallest --max-message-bytes a server takes


@pytest.fixture
async def small_messages(tmp_path: Path) -> AsyncIterator[eval_run_service_pb2_grpc.EvalRunServiceStub]:
    async with EvalServiceTestServer(database_url=dbs.db_url(tmp_path), max_message_bytes=MAX_MESSAGE) as started:
        assert started.server.bootstrap_key
        async with keyed_channel(started.server.port, started.server.bootstrap_key) as channel:
            yield eval_run_service_pb2_grpc.EvalRunServiceStub(channel)


def _largest_request() -> pb.CreateRunRequest:
    """A CreateRun of one item whose recorded response is as large as the request allows (to 3 bytes), of
    4-byte characters."""
    request = pb.CreateRunRequest(
        items=[item_pb2.Item(id="big", input="q", response=item_pb2.Response(content=""))],
        target=target_pb2.Target(provided=target_pb2.ProvidedTarget()),
        graders=[exact()],
    )
    request.items[0].response.content = "\U0001f600" * ((MAX_MESSAGE - request.ByteSize() - 8) // 4)
    for _ in range(8):
        if request.ByteSize() <= MAX_MESSAGE - 4:
            request.items[0].response.content += "\U0001f600"
    assert MAX_MESSAGE - 4 < request.ByteSize() <= MAX_MESSAGE
    return request


async def test_every_result_and_comparison_item_is_listed_with_its_outputs_cut_to_fit(
    small_messages: eval_run_service_pb2_grpc.EvalRunServiceStub,
) -> None:
    """A result whose output is as large as a request may be, or a comparison item of two outputs of
    more than half of it, was a response over --max-message-bytes: INTERNAL ("some bound is missing") on
    every page that held it, so it could never be listed. Each is listed now, its outputs' content cut
    from the end (at a character boundary: the content here ends in 4-byte characters) so that it fits,
    and `output_truncated` says so; a small output beside it is listed whole."""
    runs = small_messages
    request = _largest_request()
    whole = request.items[0].response.content
    made = []
    for _ in range(2):
        created = await runs.CreateRun(request)
        made.append((await watch_all(runs, created.run.id))[-1].run)
    assert all(run.status == run_pb2.RUN_STATUS_SUCCEEDED for run in made)

    try:
        page = await runs.ListRunResults(pb.ListRunResultsRequest(run_id=made[0].id, page_size=1))
        compared = await runs.ListComparisonItems(
            cpb.ListComparisonItemsRequest(baseline_run_id=made[0].id, candidate_run_id=made[1].id, page_size=1)
        )
    except grpc.aio.AioRpcError as error:
        raise AssertionError(f"{error.code()}: {error.details()}") from None
    (result,) = page.results
    assert page.ByteSize() <= MAX_MESSAGE and result.output_truncated
    assert 0 < len(result.output.content) < len(whole) and whole.startswith(result.output.content)
    (item,) = compared.items
    assert compared.ByteSize() <= MAX_MESSAGE
    for side in (item.baseline, item.candidate):
        assert side.output_truncated and side.explanation  # the rest of the result is whole
        assert len(whole) // 3 < len(side.output.content) < len(whole) // 2 and whole.startswith(side.output.content)

    small = await runs.CreateRun(
        pb.CreateRunRequest(
            items=[item_pb2.Item(id="big", input="q", response=item_pb2.Response(content="short"))],
            target=target_pb2.Target(provided=target_pb2.ProvidedTarget()),
            graders=[exact()],
        )
    )
    await watch_all(runs, small.run.id)
    (item,) = (
        await runs.ListComparisonItems(
            cpb.ListComparisonItemsRequest(baseline_run_id=small.run.id, candidate_run_id=made[1].id)
        )
    ).items
    assert item.baseline.output.content == "short" and not item.baseline.output_truncated
    assert item.candidate.output_truncated and whole.startswith(item.candidate.output.content)


async def test_a_comparison_side_takes_the_room_the_other_side_leaves(
    small_messages: eval_run_service_pb2_grpc.EvalRunServiceStub,
) -> None:
    """Each side of a comparison item was held to half of the item's room even beside an empty or small
    other side: an empty baseline output and a 12 MB candidate output (16 MiB responses) listed the
    candidate's cut. Here at scale (--max-message-bytes 256 KiB, a candidate output of about 70% of it):
    beside an empty or a short baseline the candidate is listed whole; two large outputs still split the
    room, and every response stays within --max-message-bytes."""
    runs = small_messages
    large = "\U0001f600" * (MAX_MESSAGE * 7 // 10 // 4)

    async def run_of(content: str) -> str:
        created = await runs.CreateRun(
            pb.CreateRunRequest(
                items=[item_pb2.Item(id="big", input="q", response=item_pb2.Response(content=content))],
                target=target_pb2.Target(provided=target_pb2.ProvidedTarget()),
                graders=[exact()],
            )
        )
        assert (await watch_all(runs, created.run.id))[-1].run.status == run_pb2.RUN_STATUS_SUCCEEDED
        return created.run.id

    empty, short, big, other_big = [await run_of(content) for content in ("", "short", large, large)]
    for baseline in (empty, short):
        compared = await runs.ListComparisonItems(
            cpb.ListComparisonItemsRequest(baseline_run_id=baseline, candidate_run_id=big)
        )
        (item,) = compared.items
        assert compared.ByteSize() <= MAX_MESSAGE and not compared.next_page_token
        assert not item.baseline.output_truncated and not item.candidate.output_truncated
        assert item.candidate.output.content == large
        (reversed_item,) = (
            await runs.ListComparisonItems(
                cpb.ListComparisonItemsRequest(baseline_run_id=big, candidate_run_id=baseline)
            )
        ).items
        assert reversed_item.baseline.output.content == large and not reversed_item.baseline.output_truncated
    compared = await runs.ListComparisonItems(
        cpb.ListComparisonItemsRequest(baseline_run_id=big, candidate_run_id=other_big)
    )
    (item,) = compared.items
    assert compared.ByteSize() <= MAX_MESSAGE
    for side in (item.baseline, item.candidate):
        assert side.output_truncated and len(side.output.content) < len(large) * 3 // 4


async def _explain(server: EvalServer, run_ids: list[str], explanation: Callable[[str], str]) -> None:
    """Give every result of these runs the explanation `explanation(item_id)`, as a judge may (up to
    --max-reply-bytes, a quarter of --max-message-bytes): the recorded grader here explains in a line."""

    async def work(conn: AsyncConnection) -> None:
        results = await conn.execute(run_store.RESULTS.select().where(run_store.RESULTS.c.run_id.in_(run_ids)))
        for row in results.mappings().all():
            await conn.execute(
                update(run_store.RESULTS)
                .where(run_store.RESULTS.c.id == row["id"])
                .values(explanation=explanation(row["item_id"]))
            )

    await server.db.transact(work)


async def _runs_of(
    runs: eval_run_service_pb2_grpc.EvalRunServiceStub, request: pb.CreateRunRequest, count: int
) -> list[str]:
    made = []
    for _ in range(count):
        created = await runs.CreateRun(request)
        run = (await watch_all(runs, created.run.id))[-1].run
        assert run.status == run_pb2.RUN_STATUS_SUCCEEDED
        made.append(run.id)
    return made


async def test_a_page_of_results_or_comparison_items_reads_about_its_byte_bound_with_long_explanations(
    server: EvalServer,
    datasets: dataset_service_pb2_grpc.DatasetServiceStub,
    runs: eval_run_service_pb2_grpc.EvalRunServiceStub,
    fetched: Fetched,
) -> None:
    """Results of 12 items with short outputs and judges' explanations of 100 KB, a page bound of 300 KB,
    page_size 1000: a page read its `page_size` results whole with their explanations before choosing
    what fitted (1.2 MB for the first page of results, 2.4 MB for comparison items; a page of 1,000
    results with 4 MiB explanations read ~4 GB). Each now reads at most its bound, and paging still lists
    every result once, in order, with its explanation whole."""
    dataset = (await datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset()))).dataset
    short = [item_pb2.Item(id=f"b{i:02d}", input="q", response=item_pb2.Response(content="r")) for i in range(ITEMS)]
    await datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=short))
    request = pb.CreateRunRequest(
        dataset_id=dataset.id, target=target_pb2.Target(provided=target_pb2.ProvidedTarget()), graders=[exact()]
    )
    made = await _runs_of(runs, request, 2)
    await _explain(server, made, lambda item_id: item_id + "\u00e9" * (BLOB // 2))

    pages = await _result_pages(runs, made[0], fetched)
    results = [result for page, _ in pages for result in page.results]
    assert [result.item_id for result in results] == WANT and len(pages) >= ITEMS // 3
    assert all(result.explanation == result.item_id + "\u00e9" * (BLOB // 2) for result in results)
    assert not any(result.explanation_truncated or result.output_truncated for result in results)
    assert max(read for _, read in pages) <= PAGE_BYTES, [read for _, read in pages]

    pages = await _comparison_pages(runs, made, fetched)
    items = [item for page, _ in pages for item in page.items]
    assert [item.item_id for item in items] == WANT and len(pages) == ITEMS  # two explanations of 100 KB
    for item in items:
        assert item.baseline.explanation == item.candidate.explanation == item.item_id + "\u00e9" * (BLOB // 2)
    assert max(read for _, read in pages) <= PAGE_BYTES, [read for _, read in pages]


@pytest.fixture
async def small_server(
    tmp_path: Path,
) -> AsyncIterator[tuple[EvalServer, eval_run_service_pb2_grpc.EvalRunServiceStub]]:
    async with EvalServiceTestServer(database_url=dbs.db_url(tmp_path), max_message_bytes=MAX_MESSAGE) as started:
        assert started.server.bootstrap_key
        async with keyed_channel(started.server.port, started.server.bootstrap_key) as channel:
            yield started.server, eval_run_service_pb2_grpc.EvalRunServiceStub(channel)


async def test_every_result_is_listed_with_its_explanation_cut_to_fit(
    small_server: tuple[EvalServer, eval_run_service_pb2_grpc.EvalRunServiceStub],
) -> None:
    """An explanation as large as a message (a run judged before the server was restarted with a smaller
    --max-message-bytes), beside an output as large as a request may be: the result was a response over
    --max-message-bytes (INTERNAL, "some bound is missing") on every page that held it. It is listed now,
    the explanation cut from the end at a character boundary (4-byte characters here) with
    `explanation_truncated` set, and at least half of the result's room; the output gets the rest. A
    short explanation beside a cut output stays whole."""
    server, runs = small_server
    request = _largest_request()
    whole = "\U0001f600" * (MAX_MESSAGE // 4)
    made = await _runs_of(runs, request, 2)
    await _explain(server, made[:1], lambda _: whole)
    try:
        page = await runs.ListRunResults(pb.ListRunResultsRequest(run_id=made[0], page_size=1))
        compared = await runs.ListComparisonItems(
            cpb.ListComparisonItemsRequest(baseline_run_id=made[0], candidate_run_id=made[1], page_size=1)
        )
    except grpc.aio.AioRpcError as error:
        raise AssertionError(f"{error.code()}: {error.details()}") from None
    (result,) = page.results
    assert page.ByteSize() <= MAX_MESSAGE and result.explanation_truncated and result.output_truncated
    assert whole.startswith(result.explanation), "cut inside a character, or not a prefix"
    assert len(result.explanation.encode()) >= (MAX_MESSAGE - PageTokens.RESPONSE_RESERVE) // 2 - 4096  # half its room
    (item,) = compared.items
    assert compared.ByteSize() <= MAX_MESSAGE
    assert item.baseline.explanation_truncated and whole.startswith(item.baseline.explanation)
    assert item.candidate.explanation and not item.candidate.explanation_truncated  # a short one, whole
    assert item.baseline.output_truncated and item.candidate.output_truncated


def _deleting_first(
    monkeypatch: pytest.MonkeyPatch, module: Any, name: str, delete: Callable[[], Awaitable[None]]
) -> None:
    """Make the store function `name` of `module` delete something first: what another call may do
    between a page's size read and its row read (both engines read each statement at its own snapshot)."""
    original = getattr(module, name)

    async def after_deleting(*args: Any, **kwargs: Any) -> Any:
        await delete()
        return await original(*args, **kwargs)

    monkeypatch.setattr(module, name, after_deleting)


async def test_a_page_whose_rows_go_between_its_size_read_and_its_row_read_is_not_found_not_short(
    server: EvalServer,
    datasets: dataset_service_pb2_grpc.DatasetServiceStub,
    runs: eval_run_service_pb2_grpc.EvalRunServiceStub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A page reads its rows' sizes, then the rows it keeps. A dataset deleted in between answered an empty
    page without a token (a client took it for the end of the dataset), and a run purged in between listed
    its results without their outputs or explanations, as if the target had produced nothing. Both are
    NOT_FOUND now, as the next call says."""
    dataset_id = await _dataset(datasets)
    request = pb.CreateRunRequest(
        dataset_id=dataset_id, target=target_pb2.Target(provided=target_pb2.ProvidedTarget()), graders=[exact()]
    )
    made = await _runs_of(runs, request, 2)
    await _explain(server, made, lambda item_id: "because " + item_id)

    def purging(table: Any, run_id: str) -> Callable[[], Awaitable[None]]:
        async def purge() -> None:  # a step of retention's purge: one table's rows of the run
            await server.db.transact(lambda conn: conn.execute(table.delete().where(table.c.run_id == run_id)))

        return purge

    for table, run_id, read in (
        (run_store.OUTPUTS, made[0], "outputs_of"),
        (run_store.RESULTS, made[1], "explanations_of"),
    ):
        with monkeypatch.context() as patched:
            _deleting_first(patched, run_store, read, purging(table, run_id))
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                page = await runs.ListRunResults(pb.ListRunResultsRequest(run_id=run_id))
                raise AssertionError(f"listed {[(r.explanation, r.output.content[:9]) for r in page.results]}")
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND, raised.value.details()

    compared = await _runs_of(runs, request, 2)
    await _explain(server, compared, lambda item_id: "because " + item_id)
    with monkeypatch.context() as patched:
        _deleting_first(patched, run_store, "explanations_of", purging(run_store.RESULTS, compared[1]))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            items = await runs.ListComparisonItems(
                cpb.ListComparisonItemsRequest(baseline_run_id=compared[0], candidate_run_id=compared[1])
            )
            raise AssertionError(f"listed {[item.candidate.explanation for item in items.items]}")
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND, raised.value.details()

    async def delete_dataset() -> None:
        await datasets.DeleteDataset(ds.DeleteDatasetRequest(dataset_id=dataset_id))

    _deleting_first(monkeypatch, dataset_store, "items_page", delete_dataset)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        page = await datasets.ListDatasetItems(ds.ListDatasetItemsRequest(dataset_id=dataset_id))
        raise AssertionError(f"listed {len(page.items)} items, token {page.next_page_token!r}")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND, raised.value.details()


async def test_a_page_of_runs_datasets_graders_or_targets_reads_only_the_rows_it_returns(
    server: EvalServer,
    channel: grpc.aio.Channel,
    datasets: dataset_service_pb2_grpc.DatasetServiceStub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ListGraders (ListDatasets, ListTargets, ListRuns) read page_size rows whole and parsed them before the
    byte bound kept what fitted: a page of 1,000 graders of 250 KB read ~250 MB to answer with 33, and a
    page of 1,000 runs whose definitions hold 4 MB of graders ~4 GB. Each now chooses its rows by their
    stored sizes, reads only those it answers with, and paging still lists every one once, newest first."""
    runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
    graders = grader_service_pb2_grpc.GraderServiceStub(channel)
    targets = target_service_pb2_grpc.TargetServiceStub(channel)
    annotations = {f"k{n}": "v" * 8000 for n in range(8)}  # ~64 KB, what a dataset's may hold
    contains = grader_pb2.Grader(name="c", contains=grader_pb2.Contains(values=["c" * BLOB]))
    echo = target_pb2.Target(echo=target_pb2.EchoTarget())
    made: dict[str, list[str]] = {"runs": [], "datasets": [], "graders": [], "targets": []}
    for _ in range(ITEMS):
        run = await runs.CreateRun(
            pb.CreateRunRequest(items=[item_pb2.Item(input="q")], target=echo, graders=[contains])
        )
        made["runs"].append(run.run.id)
        created = await datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset(annotations=annotations)))
        made["datasets"].append(created.dataset.id)
        saved = await graders.CreateGrader(gs.CreateGraderRequest(grader=gs.SavedGrader(grader=contains)))
        made["graders"].append(saved.grader.id)
        target = await targets.CreateTarget(
            ts.CreateTargetRequest(target=ts.SavedTarget(description="d" * 1000, target=echo))
        )
        made["targets"].append(target.target.id)
    read: list[int] = []

    def counted(module: Any, name: str) -> None:
        original = getattr(module, name)

        async def counting(*args: Any, **kwargs: Any) -> Any:
            found = await original(*args, **kwargs)
            read.append(len(found))
            return found

        monkeypatch.setattr(module, name, counting)

    for module, name in (
        (run_store, "list_page"),
        (dataset_store, "list_page"),
        (definition_store, "list_graders"),
        (definition_store, "list_targets"),
    ):
        counted(module, name)
    lists: dict[str, tuple[int, Callable[[str], Awaitable[Any]]]] = {  # each kind's page bound, and its list
        "runs": (
            PAGE_BYTES,
            lambda token: runs.ListRuns(pb.ListRunsRequest(page_size=1000, page_token=token)),
        ),
        "datasets": (
            PAGE_BYTES,
            lambda token: datasets.ListDatasets(ds.ListDatasetsRequest(page_size=1000, page_token=token)),
        ),
        "graders": (
            PAGE_BYTES,
            lambda token: graders.ListGraders(gs.ListGradersRequest(page_size=1000, page_token=token)),
        ),
        "targets": (
            3000,
            lambda token: targets.ListTargets(ts.ListTargetsRequest(page_size=1000, page_token=token)),
        ),
    }
    for kind, (page_bytes, page_of) in lists.items():
        server.page_tokens.page_bytes = page_bytes
        listed: list[str] = []
        token = ""
        for _ in range(MAX_PAGES):
            read.clear()
            page = await page_of(token)
            shown = [each.id for each in getattr(page, kind)]
            assert read == [len(shown)], (kind, read, len(shown))  # read whole: only what it answers with
            assert 1 <= len(shown) < ITEMS // 2, (kind, len(shown))
            listed += shown
            if not (token := page.next_page_token):
                break
        assert listed == made[kind][::-1], kind


async def test_a_run_deleted_between_a_pages_size_read_and_its_row_read_is_not_on_it(
    channel: grpc.aio.Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ListRuns reads its runs' sizes, then the chosen runs by id; each read sees the latest commit, so a run
    soft-deleted between them was answered, deleted, on a page that does not show deleted runs."""
    runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
    echo = target_pb2.Target(echo=target_pb2.EchoTarget())
    request = pb.CreateRunRequest(items=[item_pb2.Item(input="q")], target=echo, graders=[exact()])
    made = [(await runs.CreateRun(request)).run.id for _ in range(3)]
    original = run_store.list_sizes

    async def deleting_after(*args: Any, **kwargs: Any) -> Any:
        sizes = await original(*args, **kwargs)
        if made[1] not in deleted:
            deleted.append(made[1])
            await runs.DeleteRun(pb.DeleteRunRequest(run_id=made[1]))
        return sizes

    deleted: list[str] = []
    monkeypatch.setattr(run_store, "list_sizes", deleting_after)
    page = await runs.ListRuns(pb.ListRunsRequest(page_size=10))
    assert [run.id for run in page.runs] == [made[2], made[0]] and not page.next_page_token
    shown = await runs.ListRuns(pb.ListRunsRequest(page_size=10, show_deleted=True))
    assert [run.id for run in shown.runs] == made[::-1] and shown.runs[1].HasField("delete_time")


async def test_a_row_created_between_a_pages_size_read_and_its_row_read_pushes_none_off_it(
    server: EvalServer,
    channel: grpc.aio.Channel,
    datasets: dataset_service_pb2_grpc.DatasetServiceStub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ListDatasets (ListGraders, ListTargets; ListRuns) read the sizes of its rows, then its first `fitting`
    rows again newest first: a row created between the two took the first place and pushed the oldest off a
    last page, with no token (the client never saw it). The rows chosen by size are read by their ids."""
    runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
    graders = grader_service_pb2_grpc.GraderServiceStub(channel)
    targets = target_service_pb2_grpc.TargetServiceStub(channel)

    async def run() -> str:
        echo = target_pb2.Target(echo=target_pb2.EchoTarget())
        created = await runs.CreateRun(
            pb.CreateRunRequest(items=[item_pb2.Item(input="q")], target=echo, graders=[exact()])
        )
        return created.run.id

    async def dataset() -> str:
        return (await datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset()))).dataset.id

    async def grader() -> str:
        return (await graders.CreateGrader(gs.CreateGraderRequest(grader=gs.SavedGrader(grader=exact())))).grader.id

    async def target() -> str:
        saved = ts.SavedTarget(target=target_pb2.Target(echo=target_pb2.EchoTarget()))
        return (await targets.CreateTarget(ts.CreateTargetRequest(target=saved))).target.id

    cases: list[tuple[Any, str, Callable[[], Awaitable[str]], Callable[[], Awaitable[Any]], str]] = [
        (run_store, "list_sizes", run, lambda: runs.ListRuns(pb.ListRunsRequest(page_size=10)), "runs"),
        (
            dataset_store,
            "list_sizes",
            dataset,
            lambda: datasets.ListDatasets(ds.ListDatasetsRequest(page_size=10)),
            "datasets",
        ),
        (
            definition_store,
            "grader_sizes",
            grader,
            lambda: graders.ListGraders(gs.ListGradersRequest(page_size=10)),
            "graders",
        ),
        (
            definition_store,
            "target_sizes",
            target,
            lambda: targets.ListTargets(ts.ListTargetsRequest(page_size=10)),
            "targets",
        ),
    ]
    for module, name, create, list_page, kind in cases:
        made = [await create() for _ in range(3)]
        with monkeypatch.context() as patched:
            created = _creating_after(patched, module, name, create)
            page = await list_page()
        listed = [each.id for each in getattr(page, kind)]
        assert listed == made[::-1] and not page.next_page_token, (kind, made, created, listed)


def _creating_after(
    monkeypatch: pytest.MonkeyPatch, module: Any, name: str, create: Callable[[], Awaitable[str]]
) -> list[str]:
    """Make the store function `name` of `module` create a row after it reads, once: what another call may
    do between a page's size read and its row read. The id created, once it is."""
    original = getattr(module, name)
    created: list[str] = []

    async def created_meanwhile(*args: Any, **kwargs: Any) -> Any:
        sizes = await original(*args, **kwargs)
        if not created:
            created.append(await create())
        return sizes

    monkeypatch.setattr(module, name, created_meanwhile)
    return created


async def test_a_page_whose_chosen_rows_were_all_deleted_before_they_were_read_still_leads_on(
    server: EvalServer, datasets: dataset_service_pb2_grpc.DatasetServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page whose rows chosen by size were all deleted before its row read answered nothing and no token,
    as if the list had ended: the datasets after them were never listed. The token goes after the last
    chosen row."""
    annotations = {f"k{n}": "v" * 8000 for n in range(8)}  # ~64 KB: one a page
    made = [
        (await datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset(annotations=annotations)))).dataset.id
        for _ in range(3)
    ]
    server.page_tokens.page_bytes = 70_000

    async def delete_newest() -> None:
        await datasets.DeleteDataset(ds.DeleteDatasetRequest(dataset_id=made[-1]))

    with monkeypatch.context() as patched:
        _deleting_first(patched, dataset_store, "list_page", delete_newest)
        first = await datasets.ListDatasets(ds.ListDatasetsRequest(page_size=10))
    assert list(first.datasets) == [] and first.next_page_token
    listed: list[str] = []
    token = first.next_page_token
    for _ in range(MAX_PAGES):
        page = await datasets.ListDatasets(ds.ListDatasetsRequest(page_size=10, page_token=token))
        listed += [d.id for d in page.datasets]
        if not (token := page.next_page_token):
            break
    assert listed == made[-2::-1]
