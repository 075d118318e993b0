"""Bad input gets its own code and no noise (docs/errors.md): request bytes that are not the method's
message are INVALID_ARGUMENT (MALFORMED_REQUEST) logged only at debug, and a write whose caller has
gone finishes without leaving a "Task exception was never retrieved" behind."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import sqlite3
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from sqlalchemy.engine import make_url

from evalsvc.messages.validation import (
    MAX_CONVERSATION_TURNS,
    MAX_GRADERS,
    MAX_METADATA_ENTRIES,
    MAX_REQUEST_TURNS,
    MAX_STRUCT_VALUES,
)
from evalsvc.server import EvalServer
from evalsvc.v1 import (
    dataset_generation_pb2,
    dataset_generation_pb2_grpc,
    dataset_service_pb2_grpc,
    eval_run_service_pb2_grpc,
    item_pb2,
)
from evalsvc.v1 import dataset_service_pb2 as ds
from evalsvc.v1 import eval_run_service_pb2 as pb
from tests.conftest import make_settings
from tests.helpers import create_request, error_reason, keyed_channel, violations

# Not a protobuf message: field 15 with a length that runs past the end.
GARBAGE = b"\x7a\xff\xff\xff\xff\x0f\x01"


@pytest.fixture
async def server(tmp_path: Path) -> Any:
    srv = EvalServer(make_settings(tmp_path, sqlite_synchronous="NORMAL"))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(grace=0.5)


async def test_undecodable_requests_are_invalid_argument_never_read_without_a_key_and_never_logged_as_errors(
    server: EvalServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    codes: dict[tuple[str, bool], set[grpc.StatusCode]] = {}
    reasons = set()
    methods = [
        ("/evalsvc.v1.EvalRunService/CreateRun", False),
        ("/evalsvc.v1.EvalRunService/GetRun", False),
        ("/evalsvc.v1.EvalRunService/WatchRun", True),
    ]
    for keyed in (False, True):
        channel = (
            keyed_channel(server.port, server.bootstrap_key or "")
            if keyed
            else grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        )
        async with channel:
            for method, streaming in methods:
                for _ in range(100 if not keyed and method.endswith("GetRun") else 10):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        if streaming:
                            async for _event in channel.unary_stream(method)(GARBAGE, timeout=10):
                                pass
                        else:
                            await channel.unary_unary(method)(GARBAGE, timeout=10)
                    codes.setdefault((method, keyed), set()).add(err.value.code())
                    reasons.add(error_reason(err.value))
    # Without a key the request is never read, so never parsed: UNAUTHENTICATED.
    for method, _ in methods:
        assert codes[(method, False)] == {grpc.StatusCode.UNAUTHENTICATED}, codes
        assert codes[(method, True)] == {grpc.StatusCode.INVALID_ARGUMENT}, codes
    assert reasons == {"MALFORMED_REQUEST", "API_KEY_MISSING"}
    # The access log names the tenant whose valid key sent the undecodable request (the review: "-").
    malformed = [r for r in caplog.records if r.name == "evalsvc.access" and r.code == "INVALID_ARGUMENT"]  # type: ignore[attr-defined]
    assert len(malformed) == 30 and {r.tenant for r in malformed} == {"default"}  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if r.exc_info]
    assert any("not a valid message" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)


async def test_a_write_whose_caller_left_leaves_no_unretrieved_exception(tmp_path: Path) -> None:
    # Every CreateRun fails inside its write transaction (no active runs allowed), after the test let
    # its callers time out while an outside connection held SQLite's write lock. SQLite on either
    # engine's run: what is tested is the shielding of writes, the same for both.
    srv = EvalServer(make_settings(tmp_path, db=f"sqlite+aiosqlite:///{tmp_path / 'writes.db'}", max_active_runs=0))
    await srv.start()
    unretrieved: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
    try:
        async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
            runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            lock = sqlite3.connect(
                make_url(srv.settings.db).database or "", isolation_level=None, check_same_thread=False
            )
            # In a thread: the server's own claim loop may hold the write lock this waits for, and it
            # needs this event loop to let go (taken on the loop, it failed "database is locked" once).
            await asyncio.to_thread(lock.execute, "BEGIN IMMEDIATE")
            try:
                calls = [runs.CreateRun(create_request(1), timeout=0.5) for _ in range(20)]
                outcomes = await asyncio.gather(*calls, return_exceptions=True)
            finally:
                lock.execute("ROLLBACK")
                lock.close()
            assert {o.code() for o in outcomes if isinstance(o, grpc.aio.AioRpcError)} == {
                grpc.StatusCode.DEADLINE_EXCEEDED
            }
            # The one writer serves in order: once this write is done, the abandoned ones are too.
            datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
            await datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset(display_name="after")))
            gc.collect()
            await asyncio.sleep(0)  # let any pending done-callbacks run (no timing involved)
            gc.collect()
    finally:
        loop.set_exception_handler(previous)
        await srv.stop(grace=0.5)
    assert not unretrieved, [c.get("message") for c in unretrieved]


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
async def test_recorded_tool_call_arguments_must_hold_json_values(server: EvalServer, number: float) -> None:
    """A NaN or an Infinity in a recorded tool call's arguments (a Struct) was stored by CreateRun and
    AddDatasetItems, and every REST read of the item or its results then failed with a plain-text 500.
    It is refused as a target's `parameters` are, naming the field."""
    arguments = struct_pb2.Struct(
        fields={"ok": struct_pb2.Value(number_value=1), "n": struct_pb2.Value(number_value=number)}
    )
    call = item_pb2.ToolCall(name="t", arguments=arguments)
    item = item_pb2.Item(
        id="a", input="q", response=item_pb2.Response(content="x", tool_calls=[item_pb2.ToolCall(name="s"), call])
    )
    field = "items[0].response.tool_calls[1].arguments"
    async with keyed_channel(server.port, server.bootstrap_key or "") as channel:
        runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
        request = create_request(1)
        request.items[0].CopyFrom(item)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await runs.CreateRun(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(err.value) == {field: "must hold JSON values (no NaN or Infinity)"}
        datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        dataset = (await datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset(display_name="d")))).dataset
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=[item]))
        assert violations(err.value) == {field: "must hold JSON values (no NaN or Infinity)"}
        item.response.tool_calls[1].arguments.fields["n"].number_value = 1e300  # finite: kept
        added = await datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=[item]))
        assert list(added.item_ids) == ["a"]


@pytest.mark.parametrize("role", ["wizard", "USER", " user", "developer", "r" * 5000])
async def test_conversation_roles_are_the_documented_ones(server: EvalServer, role: str) -> None:
    """A conversation turn's role is system, user, assistant or tool (item.proto; empty is the user's):
    any other text was stored by CreateRun, AddDatasetItems and ContinueConversations and sent on to chat
    targets as a message's role."""
    turns = [item_pb2.Message(role="", content="a"), item_pb2.Message(role="assistant", content="b")]
    turns.append(item_pb2.Message(role=role, content="c"))
    item = item_pb2.Item(id="a", input="q", conversation=turns)
    description = "must be one of system, user, assistant, tool (or empty: user)"
    async with keyed_channel(server.port, server.bootstrap_key or "") as channel:
        runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
        request = create_request(1)
        request.items[0].conversation.extend(turns)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await runs.CreateRun(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(err.value) == {"items[0].conversation[2].role": description}
        datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        dataset = (await datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset(display_name="d")))).dataset
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=[item]))
        assert violations(err.value) == {"items[0].conversation[2].role": description}
        conversation = dataset_generation_pb2.Conversation(item_id="n", turns=turns)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await dataset_generation_pb2_grpc.DatasetGenerationServiceStub(channel).ContinueConversations(
                dataset_generation_pb2.ContinueConversationsRequest(dataset_id=dataset.id, conversations=[conversation])
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(err.value) == {"conversations[0].turns[2].role": description}
        item.conversation[2].role = "tool"
        assert list(
            (await datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=[item]))).item_ids
        ) == ["a"]


async def test_conversations_are_bounded_per_item_and_per_request(server: EvalServer) -> None:
    """Probe: one AddDatasetItems of one item of 3,000,000 empty turns (6 MB) held the event loop for
    seconds (the NUL walk serialized every turn, the role check read each), and eight such calls held
    another tenant's GetRun up to 3 s. A conversation over MAX_CONVERSATION_TURNS, or a request's
    conversations over MAX_REQUEST_TURNS together, is refused naming the field, by every RPC that takes
    them, before the rest of the request is walked (the NUL in it is not reached); at the bounds, taken."""
    over = [item_pb2.Message()] * (MAX_CONVERSATION_TURNS + 1)
    item = item_pb2.Item(id="a", input="q\x00", conversation=over)
    per_item = f"at most {MAX_CONVERSATION_TURNS} turns (got {MAX_CONVERSATION_TURNS + 1})"
    full = [item_pb2.Message(role="user")] * MAX_CONVERSATION_TURNS
    fill = MAX_REQUEST_TURNS // MAX_CONVERSATION_TURNS
    most = [item_pb2.Item(id=f"i{k}", input="q", conversation=full) for k in range(fill)]
    extra = item_pb2.Item(id="last", input="q", conversation=full[:1])
    together = f"at most {MAX_REQUEST_TURNS} conversation turns per request, all together (got {MAX_REQUEST_TURNS + 1})"
    async with keyed_channel(server.port, server.bootstrap_key or "") as channel:
        runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
        datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        dataset = (await datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset(display_name="d")))).dataset
        refusals = [
            (runs.CreateRun(create_request(items=[item])), {"items[0].conversation": per_item}),
            (
                datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=[item])),
                {"items[0].conversation": per_item},
            ),
            (
                dataset_generation_pb2_grpc.DatasetGenerationServiceStub(channel).ContinueConversations(
                    dataset_generation_pb2.ContinueConversationsRequest(
                        dataset_id=dataset.id,
                        conversations=[dataset_generation_pb2.Conversation(item_id="n", turns=over)],
                    )
                ),
                {"conversations[0].turns": per_item},
            ),
            (
                datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=[*most, extra])),
                {"items": together},
            ),
            (runs.CreateRun(create_request(items=[*most, extra])), {"items": together}),
        ]
        for call, expected in refusals:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert violations(err.value) == expected
        added = await datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=most))
        assert len(added.item_ids) == fill
        page = await datasets.ListDatasetItems(ds.ListDatasetItemsRequest(dataset_id=dataset.id, page_size=1))
        assert len(page.items[0].conversation) == MAX_CONVERSATION_TURNS


async def test_items_maps_and_tool_call_arguments_are_bounded(server: EvalServer) -> None:
    """Probe: one item of 700,000 `human_verdicts` (9 MB) was stored by AddDatasetItems, and every read
    that parsed it (ListDatasetItems, a run from the dataset) then held every tenant's calls for seconds;
    metadata the same, a ContinueConversations conversation's metadata too, and a tool call's arguments
    of 400,000 fields held the loop 3.2 s. Past MAX_METADATA_ENTRIES, MAX_GRADERS or MAX_STRUCT_VALUES,
    CreateRun, AddDatasetItems and ContinueConversations are INVALID_ARGUMENT naming the field, and
    nothing is written."""
    crowded = item_pb2.Item(id="a", input="q", metadata={f"k{i}": "" for i in range(MAX_METADATA_ENTRIES + 1)})
    crowded.human_verdicts.update({f"g{i}": True for i in range(MAX_GRADERS + 1)})
    maps = {
        "items[0].metadata": f"at most {MAX_METADATA_ENTRIES} entries (got {MAX_METADATA_ENTRIES + 1})",
        "items[0].human_verdicts": f"at most {MAX_GRADERS} entries (got {MAX_GRADERS + 1})",
    }
    arguments = struct_pb2.Struct()
    arguments.fields["list"].list_value.values.extend([struct_pb2.Value(bool_value=True)] * MAX_STRUCT_VALUES)
    calling = item_pb2.Item(
        id="b", input="q", response=item_pb2.Response(tool_calls=[item_pb2.ToolCall(name="t", arguments=arguments)])
    )
    async with keyed_channel(server.port, server.bootstrap_key or "") as channel:
        runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
        datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        dataset = (await datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset(display_name="d")))).dataset
        conversation = dataset_generation_pb2.Conversation(
            item_id="n", turns=[item_pb2.Message(content="hi")], metadata=crowded.metadata
        )
        refusals = [
            (runs.CreateRun(create_request(items=[crowded])), maps),
            (datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=[crowded])), maps),
            (
                dataset_generation_pb2_grpc.DatasetGenerationServiceStub(channel).ContinueConversations(
                    dataset_generation_pb2.ContinueConversationsRequest(
                        dataset_id=dataset.id, conversations=[conversation]
                    )
                ),
                {"conversations[0].metadata": maps["items[0].metadata"]},
            ),
            (runs.CreateRun(create_request(items=[calling])), {"items[0].response.tool_calls"}),
            (
                datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=[calling])),
                {"items[0].response.tool_calls"},
            ),
        ]
        for call, expected in refusals:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (violations(err.value) if isinstance(expected, dict) else set(violations(err.value))) == expected
        assert list((await runs.ListRuns(pb.ListRunsRequest())).runs) == []
        assert (await datasets.GetDataset(ds.GetDatasetRequest(dataset_id=dataset.id))).dataset.item_count == 0
        del crowded.metadata["k0"], crowded.human_verdicts["g0"]  # at the bounds: taken
        del arguments.fields["list"].list_value.values[-2:]  # the Struct and the list count one each
        calling.response.tool_calls[0].arguments.CopyFrom(arguments)
        added = await datasets.AddDatasetItems(
            ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=[crowded, calling])
        )
        assert list(added.item_ids) == ["a", "b"]
