"""DatasetGenerationService: a real server writes dataset items with a generator model that is a real
HTTP fake (tests/fake_llm.py); generations resume after a restart and record why they failed."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format

from evalsvc.datasets import generation
from evalsvc.messages.validation import MAX_CONVERSATION_TURNS
from evalsvc.server import EvalServer
from evalsvc.v1 import dataset_generation_pb2_grpc, dataset_service_pb2_grpc, item_pb2
from evalsvc.v1 import dataset_service_pb2 as ds
from evalsvc.v1.dataset_generation_pb2 import (
    ContinueConversationsRequest,
    Conversation,
    DatasetGeneration,
    GenerateDatasetItemsRequest,
)
from tests.conftest import make_settings
from tests.fake_llm import FakeEndpoint, Reply, chat_reply, generator_reply, held_generator
from tests.helpers import error_reason, keyed_channel, retry_delay, rich_error, until, violations

INSTRUCTIONS = "Questions a pharmacy chatbot must answer carefully."
TURNS = [item_pb2.Message(role="user", content="Can I take two?"), item_pb2.Message(role="assistant", content="No.")]


def continuing(dataset_id: str, *item_ids: str) -> ContinueConversationsRequest:
    conversations = [Conversation(item_id=i, turns=TURNS, metadata={"turn_number": "2"}) for i in item_ids]
    return ContinueConversationsRequest(dataset_id=dataset_id, instructions=INSTRUCTIONS, conversations=conversations)


class Generator(list[Reply]):
    """A FakeEndpoint script answering every request with the items it asks for."""

    def __init__(self, fake: FakeEndpoint) -> None:
        super().__init__()
        self.fake = fake

    def __len__(self) -> int:
        return 2  # FakeEndpoint pops while more than one reply is left: every request comes here

    def pop(self, index: Any = -1) -> Reply:
        return generator_reply(self.fake.seen[-1].body)


@pytest.fixture
async def generator() -> AsyncIterator[FakeEndpoint]:
    with FakeEndpoint() as fake:
        fake.script = Generator(fake)
        yield fake


def settings_for(tmp_path: Path, **overrides: Any) -> Any:
    return make_settings(tmp_path, outbound_allow="127.0.0.1", **overrides)


@contextlib.asynccontextmanager
async def generating_server(tmp_path: Path, fake: FakeEndpoint) -> AsyncIterator[EvalServer]:
    """A started server whose generator model is `fake`; stopped after."""
    srv = EvalServer(settings_for(tmp_path, judge_base_url=fake.url + "/v1", judge_model="judge"))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(grace=0.5)


class Client:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        self.generations = dataset_generation_pb2_grpc.DatasetGenerationServiceStub(channel)

    async def new_dataset(self) -> str:
        return (await self.datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset()))).dataset.id

    async def settled(self, dataset_id: str) -> ds.Dataset:
        """The dataset once its generation has ended (polled: datasets have no watch), at most 60 s."""
        async with asyncio.timeout(60):
            while True:
                dataset = (await self.datasets.GetDataset(ds.GetDatasetRequest(dataset_id=dataset_id))).dataset
                if dataset.generation.state in (DatasetGeneration.STATE_SUCCEEDED, DatasetGeneration.STATE_FAILED):
                    return dataset
                await asyncio.sleep(0.1)

    async def generated(self, item_count: int = 5) -> ds.Dataset:
        """A new dataset once a generation of `item_count` items into it has ended."""
        dataset_id = await self.new_dataset()
        await self.generations.GenerateDatasetItems(
            GenerateDatasetItemsRequest(dataset_id=dataset_id, item_count=item_count, instructions=INSTRUCTIONS)
        )
        return await self.settled(dataset_id)


async def test_a_pending_generation_resumes_after_a_restart(tmp_path: Path, generator: FakeEndpoint) -> None:
    settings = settings_for(tmp_path, judge_base_url=generator.url + "/v1", judge_model="judge")
    first = EvalServer(settings)
    await first.start()
    await first.generations.stop()  # accepted, but nothing is written before the restart
    try:
        async with keyed_channel(first.port, first.bootstrap_key or "") as channel:
            client = Client(channel)
            dataset_id = await client.new_dataset()
            request = GenerateDatasetItemsRequest(dataset_id=dataset_id, item_count=45, instructions=INSTRUCTIONS)
            accepted = (await client.generations.GenerateDatasetItems(request)).generation
            assert accepted.state == DatasetGeneration.STATE_PENDING and accepted.item_count == 45
            again = (await client.generations.GenerateDatasetItems(request)).generation
            assert again == accepted  # the same request is the same generation
            got = (await client.datasets.GetDataset(ds.GetDatasetRequest(dataset_id=dataset_id))).dataset
            assert got.generation.state == DatasetGeneration.STATE_PENDING and got.item_count == 0
    finally:
        await first.stop(grace=0.5)
    assert generator.seen == []
    second = EvalServer(settings_for(tmp_path, db=settings.db, judge_base_url=settings.judge_base_url, judge_model="j"))
    await second.start()
    try:
        async with keyed_channel(second.port, first.bootstrap_key or "") as channel:
            client = Client(channel)
            done = await client.settled(dataset_id)
            assert done.generation.state == DatasetGeneration.STATE_SUCCEEDED
            assert done.item_count == done.generation.generated_count == 45
            items = (await client.datasets.ListDatasetItems(ds.ListDatasetItemsRequest(dataset_id=dataset_id))).items
            assert len({item.input for item in items}) == 45 and len({item.id for item in items}) == 45
            listed = (await client.datasets.ListDatasets(ds.ListDatasetsRequest())).datasets
            assert [d.generation.state for d in listed if d.id == dataset_id] == [DatasetGeneration.STATE_SUCCEEDED]
    finally:
        await second.stop(grace=0.5)
    asked = [seen.body for seen in generator.seen]
    assert len(asked) == 3 and {body["model"] for body in asked} == {"j"}  # batches of at most 20
    assert all(INSTRUCTIONS in body["messages"][-1]["content"] for body in asked)


async def test_a_failing_generator_is_recorded_with_its_reason(tmp_path: Path) -> None:
    with FakeEndpoint(Reply({"error": "bad model"}, status=400)) as broken:
        settings = settings_for(
            tmp_path, generator_base_url=broken.url + "/v1", generator_model="gen", generator_api_key="gk"
        )
        srv = EvalServer(settings)
        await srv.start()
        try:
            async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
                client = Client(channel)
                failed = await client.generated()
                with pytest.raises(grpc.aio.AioRpcError) as unreachable:
                    await client.generations.ContinueConversations(continuing(failed.id, "next-1"))
                assert unreachable.value.code() == grpc.StatusCode.UNAVAILABLE
                assert error_reason(unreachable.value) == "GENERATOR_UNAVAILABLE"
        finally:
            await srv.stop(grace=0.5)
    assert failed.generation.state == DatasetGeneration.STATE_FAILED and failed.item_count == 0
    assert "HTTP 400" in failed.generation.error
    call, _ = broken.seen  # a 400 is not retried
    assert call.body["model"] == "gen" and call.headers["authorization"] == "Bearer gk"


async def test_bad_requests_are_refused_and_write_nothing(tmp_path: Path, generator: FakeEndpoint) -> None:
    srv = EvalServer(settings_for(tmp_path, judge_base_url=generator.url + "/v1", judge_model="judge"))
    await srv.start()
    try:
        other_key, _ = await srv.keys.create("other-tenant")
        async with (
            keyed_channel(srv.port, srv.bootstrap_key or "") as channel,
            keyed_channel(srv.port, other_key) as other_channel,
        ):
            client, other = Client(channel), Client(other_channel)
            dataset_id = await client.new_dataset()
            for count, instructions, bad in ((0, INSTRUCTIONS, "item_count"), (1001, "", "instructions")):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await client.generations.GenerateDatasetItems(
                        GenerateDatasetItemsRequest(dataset_id=dataset_id, item_count=count, instructions=instructions)
                    )
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and bad in violations(refused.value)
            request = GenerateDatasetItemsRequest(dataset_id=dataset_id, item_count=2, instructions=INSTRUCTIONS)
            with pytest.raises(grpc.aio.AioRpcError) as foreign:
                await other.generations.GenerateDatasetItems(request)
            assert foreign.value.code() == grpc.StatusCode.NOT_FOUND  # another tenant's dataset does not exist
            await client.generations.GenerateDatasetItems(request)
            with pytest.raises(grpc.aio.AioRpcError) as clash:
                await client.generations.GenerateDatasetItems(
                    GenerateDatasetItemsRequest(dataset_id=dataset_id, item_count=3, instructions=INSTRUCTIONS)
                )
            assert clash.value.code() == grpc.StatusCode.ALREADY_EXISTS and error_reason(clash.value) == (
                "GENERATION_EXISTS"
            )
            assert (await client.settled(dataset_id)).item_count == 2
            for bad, field in (
                (continuing(dataset_id), "conversations"),
                (continuing(dataset_id, ""), "conversations[0].item_id"),
                (continuing(dataset_id, "twice", "twice"), "conversations[1].item_id"),  # was `...[1].id`
            ):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await client.generations.ContinueConversations(bad)
                assert field in violations(refused.value), violations(refused.value)
            calls = len(generator.seen)
            [turn] = (await client.generations.ContinueConversations(continuing(dataset_id, "next-a"))).items
            assert turn.id == "next-a" and turn.input and dict(turn.metadata) == {"turn_number": "2"}
            assert "Can I take two?" in generator.seen[-1].body["messages"][-1]["content"]
            again = (await client.generations.ContinueConversations(continuing(dataset_id, "next-a", "next-b"))).items
            assert again[0] == turn and again[1].id == "next-b" and len(generator.seen) == calls + 2
            got = (await client.datasets.GetDataset(ds.GetDatasetRequest(dataset_id=dataset_id))).dataset
            assert got.item_count == 4
    finally:
        await srv.stop(grace=0.5)


async def test_a_conversation_at_the_turn_limit_is_continued_into_an_item_within_it(
    tmp_path: Path, generator: FakeEndpoint
) -> None:
    """A review read that continuing a conversation of MAX_CONVERSATION_TURNS stores an item of one turn
    more. It does not: the item holds the next turn as its `input` and none of the turns sent (docs/spec.md,
    "Conversation turns"), so a conversation at the limit is continued (the model shown every turn), and
    sending the thread again one turn longer is INVALID_ARGUMENT naming its turns, nothing written."""
    srv = EvalServer(settings_for(tmp_path, judge_base_url=generator.url + "/v1", judge_model="judge"))
    await srv.start()
    try:
        async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
            client = Client(channel)
            dataset_id = await client.new_dataset()
            roles = ("user", "assistant")
            turns = [item_pb2.Message(role=roles[i % 2], content=f"turn {i}") for i in range(MAX_CONVERSATION_TURNS)]
            at_limit = Conversation(item_id="next", turns=turns)
            request = ContinueConversationsRequest(dataset_id=dataset_id, conversations=[at_limit])
            [item] = (await client.generations.ContinueConversations(request)).items
            assert item.id == "next" and item.input and not item.conversation
            assert f"turn {MAX_CONVERSATION_TURNS - 1}" in generator.seen[-1].body["messages"][-1]["content"]
            listed = await client.datasets.ListDatasetItems(ds.ListDatasetItemsRequest(dataset_id=dataset_id))
            assert list(listed.items) == [item]
            longer = Conversation(item_id="after", turns=[*turns, item_pb2.Message(role="user", content=item.input)])
            calls = len(generator.seen)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.generations.ContinueConversations(
                    ContinueConversationsRequest(dataset_id=dataset_id, conversations=[longer])
                )
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert violations(refused.value) == {
                "conversations[0].turns": f"at most {MAX_CONVERSATION_TURNS} turns (got {MAX_CONVERSATION_TURNS + 1})"
            }
            assert len(generator.seen) == calls  # refused before any model call
            got = (await client.datasets.GetDataset(ds.GetDatasetRequest(dataset_id=dataset_id))).dataset
            assert got.item_count == 1
    finally:
        await srv.stop(grace=0.5)


async def test_without_a_generator_model_nothing_is_accepted(tmp_path: Path) -> None:
    srv = EvalServer(settings_for(tmp_path))
    await srv.start()
    try:
        async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
            client = Client(channel)
            dataset_id = await client.new_dataset()
            for validate_only in (True, False):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await client.generations.GenerateDatasetItems(
                        GenerateDatasetItemsRequest(
                            dataset_id=dataset_id, item_count=2, instructions=INSTRUCTIONS, validate_only=validate_only
                        )
                    )
                assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert error_reason(refused.value) == "GENERATOR_NOT_CONFIGURED"
            with pytest.raises(grpc.aio.AioRpcError) as unconfigured:
                await client.generations.ContinueConversations(continuing(dataset_id, "next-1"))
            assert error_reason(unconfigured.value) == "GENERATOR_NOT_CONFIGURED"
            got = (await client.datasets.GetDataset(ds.GetDatasetRequest(dataset_id=dataset_id))).dataset
            assert not got.HasField("generation") and got.item_count == 0
    finally:
        await srv.stop(grace=0.5)


class SlowForTenantA(Generator):
    """Answers tenant A's generations (their instructions say so) only after a delay."""

    def pop(self, index: Any = -1) -> Reply:
        body = self.fake.seen[-1].body
        slow = "tenant A" in body["messages"][-1]["content"]
        return Reply(generator_reply(body).body, delay_s=5.0 if slow else 0.0)


async def test_one_tenants_generations_do_not_hold_back_anothers(tmp_path: Path) -> None:
    with FakeEndpoint() as fake:
        fake.script = SlowForTenantA(fake)
        async with generating_server(tmp_path, fake) as srv:
            key_b, _ = await srv.keys.create("tenant-b")
            async with (
                keyed_channel(srv.port, srv.bootstrap_key or "") as channel_a,
                keyed_channel(srv.port, key_b) as channel_b,
            ):
                a, b = Client(channel_a), Client(channel_b)
                datasets_a = [await a.new_dataset() for _ in range(3)]
                for dataset_id in datasets_a:  # more than a tenant's share of generations at once
                    await a.generations.GenerateDatasetItems(
                        GenerateDatasetItemsRequest(dataset_id=dataset_id, item_count=5, instructions="tenant A")
                    )
                dataset_b = await b.new_dataset()
                await b.generations.GenerateDatasetItems(
                    GenerateDatasetItemsRequest(dataset_id=dataset_b, item_count=5, instructions="tenant B")
                )
                done_b = await b.settled(dataset_b)
                states_a = [
                    (await a.datasets.GetDataset(ds.GetDatasetRequest(dataset_id=d))).dataset.generation.state
                    for d in datasets_a
                ]
                assert done_b.generation.state == DatasetGeneration.STATE_SUCCEEDED
                # B finished while A still waits: A runs at most its share (2) at once, the third is PENDING
                assert states_a.count(DatasetGeneration.STATE_SUCCEEDED) == 0
                assert states_a.count(DatasetGeneration.STATE_PENDING) == 1
                for dataset_id in datasets_a:
                    assert (await a.settled(dataset_id)).generation.state == DatasetGeneration.STATE_SUCCEEDED


async def test_a_database_that_drops_the_loops_connection_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The generation loop logged a database that went away (a connection closed in the middle of a
    rollback, as PostgreSQL restarting does) with a traceback, where every supervised loop says it in
    one line; it goes on either way. (Found when CI's PostgreSQL pass caught it in
    test_database_unavailable, by timing.) The loop is supervised as every other loop is
    (evalsvc.liveness.supervise), so this is the real loop in a real server."""
    import logging

    import asyncpg
    from sqlalchemy import exc as sa_exc
    from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_dbapi

    from evalsvc.store import datasets as dataset_store

    def dropped() -> Exception:
        try:
            try:
                raise asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation")
            except Exception as closed:
                raise AsyncAdapt_asyncpg_dbapi(asyncpg).Error("connection was closed") from closed
        except Exception as translated:
            return sa_exc.DBAPIError("ROLLBACK", None, translated)

    failures = [dropped()]
    claimed_again = asyncio.Event()
    claimable = dataset_store.claimable_generations

    async def dropping_once(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        claimed_again.set()
        return await claimable(*args, **kwargs)

    monkeypatch.setattr(dataset_store, "claimable_generations", dropping_once)
    srv = EvalServer(make_settings(tmp_path))
    with caplog.at_level(logging.ERROR):
        await srv.start()
        try:
            await asyncio.wait_for(claimed_again.wait(), 10)  # restarted, and claiming again
        finally:
            await srv.stop(grace=0.5)
    [line] = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert "loop dataset-generations cannot use the database (the connection to the database failed)" in (
        line.getMessage()
    )
    assert line.exc_info is None
    assert srv.metrics.registry.get_sample_value("evalsvc_loop_restarts_total", {"loop": "dataset-generations"}) == 1


async def test_the_generation_loop_survives_a_stray_cancellation_and_the_watchdog_sees_it_stuck(
    tmp_path: Path, generator: FakeEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop had its own supervisor, which caught exceptions but not a CancelledError meant for
    something it awaited: one ended generation in the process until its restart. And no watchdog looked
    at it, so a stuck loop left health SERVING with generations waiting. Now it is supervised and watched
    as the executor's loops are."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    settings = settings_for(
        tmp_path, judge_base_url=generator.url + "/v1", judge_model="judge", stall_s=0.5, poll_interval_s=0.1
    )
    srv = EvalServer(settings)
    await srv.start()
    real_claim = srv.generations._claim
    stray, unstuck = [asyncio.CancelledError()], asyncio.Event()

    async def interrupted_then_stuck() -> None:
        if stray:
            raise stray.pop()
        await unstuck.wait()
        await real_claim()

    monkeypatch.setattr(srv.generations, "_claim", interrupted_then_stuck)
    srv.generations._wake.set()
    try:
        async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
            statuses = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert (await asyncio.wait_for(statuses.read(), 5)).status == health_pb2.HealthCheckResponse.SERVING
            client = Client(channel)
            dataset_id = await client.new_dataset()
            request = GenerateDatasetItemsRequest(dataset_id=dataset_id, item_count=5, instructions=INSTRUCTIONS)
            await client.generations.GenerateDatasetItems(request)  # waits: the loop is stuck
            assert (await asyncio.wait_for(statuses.read(), 10)).status == health_pb2.HealthCheckResponse.NOT_SERVING
            sample = srv.metrics.registry.get_sample_value
            assert sample("evalsvc_loop_restarts_total", {"loop": "dataset-generations"}) == 1  # the stray one
            assert sample("evalsvc_loop_stalled", {"loop": "dataset-generations"}) == 1
            unstuck.set()
            assert (await asyncio.wait_for(statuses.read(), 10)).status == health_pb2.HealthCheckResponse.SERVING
            done = await client.settled(dataset_id)
            assert done.generation.state == DatasetGeneration.STATE_SUCCEEDED and done.item_count == 5
            statuses.cancel()
    finally:
        await srv.stop(grace=0.5)


async def test_an_answer_nested_too_deeply_fails_the_generation_and_the_call_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probe: the generator answered 700 nested `[`s, valid JSON; making its strings storable, a
    recursive walk, raised RecursionError, which nothing caught: the generation stayed RUNNING for good,
    its model called again at every lease's end, and ContinueConversations answered INTERNAL.

    Now it is an unusable answer like any other (asked again, then FAILED with the reason), and an error
    no handler expects still ends the generation FAILED instead of leaving it to be claimed again."""
    deep = "[" * 700 + "]" * 700
    with FakeEndpoint(chat_reply(deep)) as model:
        srv = EvalServer(settings_for(tmp_path, generator_base_url=model.url + "/v1", generator_model="gen"))
        await srv.start()
        try:
            async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
                client = Client(channel)
                failed = await client.generated()
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await client.generations.ContinueConversations(continuing(failed.id, "next-1"))
                calls = len(model.seen)

                def broken(*args: Any) -> list[str]:
                    raise RuntimeError("a bug")

                monkeypatch.setattr(generation, "parse_items", broken)
                model.script = [generator_reply({"messages": [{"content": "Write 5 items"}]})]
                internal = await client.generated()
        finally:
            await srv.stop(grace=0.5)
    assert failed.generation.state == DatasetGeneration.STATE_FAILED and failed.item_count == 0
    assert "nested too deeply" in failed.generation.error, failed.generation.error
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(refused.value) == "GENERATOR_UNAVAILABLE"
    assert "nested too deeply" in (refused.value.details() or "")
    assert calls == 2 * generation.PARSE_ATTEMPTS  # each asked again, then gave up
    assert internal.generation.state == DatasetGeneration.STATE_FAILED and internal.item_count == 0
    assert internal.generation.error.startswith("internal error (RuntimeError)"), internal.generation.error


def continuations() -> list[str]:
    """The ContinueConversations work alive in this process: the call's own coroutine, or one of its
    conversations' (evalsvc.datasets.generation)."""
    return [
        name
        for task in asyncio.all_tasks()
        if "ContinueConversations" in (name := task.get_coro().__qualname__) or "_continue" in name  # type: ignore[union-attr]
    ]


@pytest.mark.parametrize("gives_up", ["deadline", "cancel"])
async def test_a_call_whose_caller_gives_up_stops_calling_the_generator(tmp_path: Path, gives_up: str) -> None:
    """The probe: 200 calls of 100 conversations whose callers' deadlines passed kept the generator busy
    for minutes (16 requests when the callers left, 211 forty seconds later), and 1,300 such calls held
    1.8 GB, because the call was shielded from its cancellation and went on detached. Now its model
    calls end with it: the generator gets no request after the call has ended beyond the ones in flight
    then (CONTINUE_CONCURRENCY), and nothing of the call is left (nor its place of the tenant's)."""
    with held_generator() as (fake, answers):
        async with generating_server(tmp_path, fake) as srv:
            async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
                client = Client(channel)
                request = continuing(await client.new_dataset(), *(f"next-{i}" for i in range(20)))
                call = client.generations.ContinueConversations(
                    request, timeout=1.0 if gives_up == "deadline" else None
                )
                assert await asyncio.to_thread(fake.wait_seen, generation.CONTINUE_CONCURRENCY, 30)
                if gives_up == "cancel":
                    call.cancel()
                with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)):
                    await call
                await until(lambda: not continuations() and srv.generations.continuing.total == 0)
            in_flight = len(fake.seen)
            answers.set()  # the requests in flight were cancelled with the call: no conversation goes on
            assert not await asyncio.to_thread(fake.wait_seen, in_flight + 1, 1.0)
    assert in_flight == generation.CONTINUE_CONCURRENCY


async def test_a_tenant_has_at_most_its_continuations_in_progress(tmp_path: Path) -> None:
    """CONTINUES_PER_TENANT calls of a tenant in progress: its next one is RESOURCE_EXHAUSTED naming the
    quota, with RetryInfo, before any model call; another tenant's is served."""
    with held_generator() as (fake, _):
        async with generating_server(tmp_path, fake) as srv:
            other_key, _ = await srv.keys.create("other-tenant")
            async with (
                keyed_channel(srv.port, srv.bootstrap_key or "") as channel,
                keyed_channel(srv.port, other_key) as other_channel,
            ):
                client, other = Client(channel), Client(other_channel)
                dataset_id = await client.new_dataset()
                calls = []
                for i in range(generation.CONTINUES_PER_TENANT):
                    calls.append(client.generations.ContinueConversations(continuing(dataset_id, f"next-{i}")))
                    assert await asyncio.to_thread(fake.wait_seen, i + 1, 30)
                with pytest.raises(grpc.aio.AioRpcError) as over:
                    await client.generations.ContinueConversations(continuing(dataset_id, "one-more"))
                assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert error_reason(over.value) == "TENANT_QUOTA_EXCEEDED"
                assert rich_error(over.value).metadata == {"quota": "continue_conversations_in_flight"}
                assert retry_delay(over.value) == generation.CONTINUES_RETRY_AFTER_S
                assert len(fake.seen) == generation.CONTINUES_PER_TENANT  # refused before its model call
                calls.append(other.generations.ContinueConversations(continuing(await other.new_dataset(), "theirs")))
                assert await asyncio.to_thread(fake.wait_seen, generation.CONTINUES_PER_TENANT + 1, 30)
                for call in calls:
                    call.cancel()
                await until(lambda: srv.generations.continuing.total == 0)


async def test_a_conversation_that_fails_ends_the_others_model_calls_with_the_call(tmp_path: Path) -> None:
    """One conversation's model call failed fast (400) and the call ended UNAVAILABLE, giving its places
    back, while the other conversations' calls went on uncounted (a review: 20 requests 4 s after the
    call had ended after 1): failing one on purpose piled up background work. They end with the call."""
    slow = dataclasses.replace(chat_reply(json.dumps({"items": ["next"]})), delay_s=0.5)
    with FakeEndpoint(Reply({"error": {"message": "bad request"}}, status=400), *([slow] * 40)) as fake:
        async with generating_server(tmp_path, fake) as srv:
            async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
                client = Client(channel)
                request = continuing(await client.new_dataset(), *(f"next-{i}" for i in range(20)))
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await client.generations.ContinueConversations(request)
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
                assert not continuations() and srv.generations.continuing.total == 0
            # The call's first CONTINUE_CONCURRENCY requests were on their way when it ended; had the others
            # gone on, each answer (0.5 s) would have let the next conversation call.
            in_flight = generation.CONTINUE_CONCURRENCY
            assert not await asyncio.to_thread(fake.wait_seen, in_flight + 1, 2.0), len(fake.seen)


async def test_a_rest_caller_that_goes_away_ends_its_calls_model_calls_too(tmp_path: Path) -> None:
    """Over REST the call went on after its HTTP client had left (until the model answered or the 60 s
    bound), holding the tenant's places; the gateway now cancels it when the connection closes, as a
    gRPC caller's going away does."""
    with held_generator() as (fake, answers):
        srv = EvalServer(
            settings_for(tmp_path, judge_base_url=fake.url + "/v1", judge_model="judge", http_addr="127.0.0.1:0")
        )
        await srv.start()
        try:
            async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
                request = continuing(await Client(channel).new_dataset(), *(f"next-{i}" for i in range(20)))
            assert srv.gateway is not None
            body = json_format.MessageToDict(request)
            headers = {"authorization": f"Bearer {srv.bootstrap_key}"}
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.gateway.port}", headers=headers) as http:
                posting = asyncio.ensure_future(
                    http.post(f"/v1/datasets/{request.dataset_id}:continueConversations", json=body, timeout=60)
                )
                assert await asyncio.to_thread(fake.wait_seen, generation.CONTINUE_CONCURRENCY, 30)
                posting.cancel()  # the client goes away: its connection is closed
                with contextlib.suppress(asyncio.CancelledError):
                    await posting
            await until(lambda: not continuations() and srv.generations.continuing.total == 0)
            answers.set()  # the requests in flight were cancelled with the call: no conversation goes on
            assert not await asyncio.to_thread(fake.wait_seen, generation.CONTINUE_CONCURRENCY + 1, 1.0)
        finally:
            await srv.stop(grace=0.5)
