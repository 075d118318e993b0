"""Per-tenant caps on stored resources (evalsvc.limits.StoredCaps): datasets, items per dataset, saved
graders, saved targets, secrets and webhooks. Small caps set through the settings of a real server;
each is refused at its boundary with the same error shape, frees a place when one is deleted, holds
under concurrent creates (on PostgreSQL, creates spread over two replicas of one database), and
bounds one tenant without touching another."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from evalsvc.secrets.sealing import generate_key
from evalsvc.testing import EvalServiceTestServer
from evalsvc.v1 import dataset_service_pb2 as ds
from evalsvc.v1 import (
    dataset_service_pb2_grpc,
    grader_service_pb2_grpc,
    item_pb2,
    secret_service_pb2_grpc,
    target_pb2,
    target_service_pb2_grpc,
    webhook_service_pb2_grpc,
)
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import grader_service_pb2 as gs
from evalsvc.v1 import secret_service_pb2 as ss
from evalsvc.v1 import target_service_pb2 as ts
from evalsvc.v1 import webhook_service_pb2 as wpb
from evalsvc.v1.dataset_generation_pb2 import (
    ContinueConversationsRequest,
    Conversation,
    DatasetGeneration,
    GenerateDatasetItemsRequest,
)
from evalsvc.v1.dataset_generation_pb2_grpc import DatasetGenerationServiceStub
from tests import dbs
from tests.fake_llm import FakeEndpoint
from tests.helpers import exact, keyed_channel, rich_error

CAP = 3
ITEM_CAP = 5
CAPS = {
    "max_datasets_per_tenant": CAP,
    "max_items_per_dataset": ITEM_CAP,
    "max_graders_per_tenant": CAP,
    "max_versions_per_grader": CAP,
    "max_targets_per_tenant": CAP,
    "max_secrets_per_tenant": CAP,
    "max_webhooks_per_tenant": CAP,
}


class Tenant:
    """One tenant's stubs, and how to create and delete the n-th of each capped kind."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        self.generations = DatasetGenerationServiceStub(channel)
        self.graders = grader_service_pb2_grpc.GraderServiceStub(channel)
        self.targets = target_service_pb2_grpc.TargetServiceStub(channel)
        self.secrets = secret_service_pb2_grpc.SecretServiceStub(channel)
        self.webhooks = webhook_service_pb2_grpc.WebhookServiceStub(channel)

    async def create(self, kind: str, n: int) -> str:
        """Create one of `kind`; its id (a secret's name)."""
        if kind == "max_datasets_per_tenant":
            return (await self.datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset()))).dataset.id
        if kind == "max_graders_per_tenant":
            return (
                await self.graders.CreateGrader(gs.CreateGraderRequest(grader=gs.SavedGrader(grader=exact())))
            ).grader.id
        if kind == "max_targets_per_tenant":
            target = ts.SavedTarget(target=target_pb2.Target(echo=target_pb2.EchoTarget()))
            return (await self.targets.CreateTarget(ts.CreateTargetRequest(target=target))).target.id
        if kind == "max_secrets_per_tenant":
            return (await self.secrets.CreateSecret(ss.CreateSecretRequest(name=f"KEY_{n}", value="v"))).secret.name
        assert kind == "max_webhooks_per_tenant"
        webhook = wpb.Webhook(url=f"http://127.0.0.1:9/{n}")
        return (await self.webhooks.CreateWebhook(wpb.CreateWebhookRequest(webhook=webhook))).webhook.id

    async def delete(self, kind: str, resource_id: str) -> None:
        if kind == "max_datasets_per_tenant":
            await self.datasets.DeleteDataset(ds.DeleteDatasetRequest(dataset_id=resource_id))
        elif kind == "max_graders_per_tenant":
            await self.graders.DeleteGrader(gs.DeleteGraderRequest(grader_id=resource_id))
        elif kind == "max_targets_per_tenant":
            await self.targets.DeleteTarget(ts.DeleteTargetRequest(target_id=resource_id))
        elif kind == "max_secrets_per_tenant":
            await self.secrets.DeleteSecret(ss.DeleteSecretRequest(name=resource_id))
        else:
            await self.webhooks.DeleteWebhook(wpb.DeleteWebhookRequest(webhook_id=resource_id))

    async def items(self, dataset_id: str) -> int:
        return (await self.datasets.GetDataset(ds.GetDatasetRequest(dataset_id=dataset_id))).dataset.item_count


TENANT_CAPS = [kind for kind in CAPS if kind not in ("max_items_per_dataset", "max_versions_per_grader")]


def assert_over(error: BaseException, quota: str) -> None:
    """The one shape of every cap's refusal: RESOURCE_EXHAUSTED, TENANT_QUOTA_EXCEEDED naming the quota
    (the setting), no RetryInfo (waiting frees nothing), a message naming the flag and what to do."""
    assert isinstance(error, grpc.aio.AioRpcError), error
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    rich = rich_error(error)
    assert rich.reason == "TENANT_QUOTA_EXCEEDED" and rich.metadata == {"quota": quota}
    assert rich.retry_delay is None
    assert "--" + quota.replace("_", "-") in (error.details() or "")


@dataclass
class Served:
    mine: list[Tenant]  # the same tenant on each replica (one on SQLite, two on PostgreSQL)
    theirs: Tenant
    generator: FakeEndpoint


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    """Servers with small caps. On PostgreSQL two replicas of one database, so that concurrent creates
    reach two writers at once (one process has one writer, whose transactions never overlap)."""
    replicas = 2 if dbs.USE_POSTGRES else 1
    url = dbs.db_url(tmp_path)
    async with AsyncExitStack() as stack:
        generator = stack.enter_context(FakeEndpoint())
        settings = {
            **CAPS,
            "secrets_key": generate_key(),
            "outbound_allow": "127.0.0.1",
            "judge_base_url": generator.url + "/v1",
            "judge_model": "gen",
        }
        servers = [
            await stack.enter_async_context(EvalServiceTestServer(database_url=url, **settings))
            for _ in range(replicas)
        ]
        other_key, _ = await servers[0].server.keys.create("other")
        theirs = await stack.enter_async_context(keyed_channel(servers[0].server.port, other_key))
        mine = [Tenant(server.channel) for server in servers]
        yield Served(mine, Tenant(theirs), generator)


@pytest.mark.parametrize("kind", TENANT_CAPS)
async def test_a_tenant_at_its_cap_is_refused_until_it_deletes_one(served: Served, kind: str) -> None:
    me, them = served.mine[0], served.theirs
    made = [await me.create(kind, n) for n in range(CAP)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await me.create(kind, CAP)
    assert_over(caught.value, kind)
    assert "delete one" in (caught.value.details() or "")
    await them.create(kind, 0)  # another tenant's cap is its own
    await me.delete(kind, made[0])
    await me.create(kind, CAP)  # the place freed is taken again
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await me.create(kind, CAP + 1)
    assert_over(caught.value, kind)


async def test_setting_a_secret_again_needs_no_room(served: Served) -> None:
    me = served.mine[0]
    for n in range(CAP):
        await me.create("max_secrets_per_tenant", n)
    await me.secrets.CreateSecret(ss.CreateSecretRequest(name="key_0", value="another"))  # a new value, same name


async def _concurrently(calls: list[Callable[[], Awaitable[Any]]]) -> tuple[list[Any], list[BaseException]]:
    answers = await asyncio.gather(*(call() for call in calls), return_exceptions=True)
    return [a for a in answers if not isinstance(a, BaseException)], [
        a for a in answers if isinstance(a, BaseException)
    ]


@pytest.mark.parametrize("kind", TENANT_CAPS)
async def test_concurrent_creates_take_the_last_place_once(served: Served, kind: str) -> None:
    """At cap - 1, many creates at once (over both replicas on PostgreSQL): exactly one succeeds. Each
    replica's transaction counts under a lock of the tenant's rows; without it, both replicas counted
    cap - 1 and both inserted."""
    me = served.mine[0]
    for rounds in range(3):  # a few rounds: each is a fresh race at the boundary
        for n in range(CAP - 1):
            await me.create(kind, 100 * rounds + n)
        calls = [
            lambda replica=replica, n=100 * rounds + 10 + n: replica.create(kind, n)  # distinct secret names
            for n, replica in enumerate(served.mine * 8)
        ]
        created, refused = await _concurrently(calls)
        assert len(created) == 1, (created, refused)
        for error in refused:
            assert_over(error, kind)
        await _delete_all(me, kind)


async def _delete_all(me: Tenant, kind: str) -> None:
    """Empty the tenant's holdings of `kind`, for the next round."""
    if kind == "max_datasets_per_tenant":
        ids = [d.id for d in (await me.datasets.ListDatasets(ds.ListDatasetsRequest())).datasets]
    elif kind == "max_graders_per_tenant":
        ids = [g.id for g in (await me.graders.ListGraders(gs.ListGradersRequest())).graders]
    elif kind == "max_targets_per_tenant":
        ids = [t.id for t in (await me.targets.ListTargets(ts.ListTargetsRequest())).targets]
    elif kind == "max_secrets_per_tenant":
        ids = [s.name for s in (await me.secrets.ListSecrets(ss.ListSecretsRequest())).secrets]
    else:
        ids = [w.id for w in (await me.webhooks.ListWebhooks(wpb.ListWebhooksRequest())).webhooks]
    for resource_id in ids:
        await me.delete(kind, resource_id)


def _items(*ids: str) -> list[item_pb2.Item]:
    return [item_pb2.Item(id=i, input=f"question {i}") for i in ids]


async def test_add_dataset_items_past_the_cap_writes_nothing(served: Served) -> None:
    me = served.mine[0]
    dataset_id = await me.create("max_datasets_per_tenant", 0)
    await me.datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset_id, items=_items("a", "b", "c")))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await me.datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset_id, items=_items("d", "e", "f")))
    assert_over(caught.value, "max_items_per_dataset")
    listed = await me.datasets.ListDatasetItems(ds.ListDatasetItemsRequest(dataset_id=dataset_id))
    assert [item.id for item in listed.items] == ["a", "b", "c"] and await me.items(dataset_id) == 3
    await me.datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset_id, items=_items("d", "e")))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await me.datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset_id, items=_items("f")))
    assert_over(caught.value, "max_items_per_dataset")
    assert await me.items(dataset_id) == ITEM_CAP


async def test_concurrent_appends_never_pass_the_item_cap(served: Served) -> None:
    """Appends lock the dataset's row (on PostgreSQL across replicas too) before they read its count."""
    me = served.mine[0]
    dataset_id = await me.create("max_datasets_per_tenant", 0)
    calls = [
        lambda replica=replica, n=n: replica.datasets.AddDatasetItems(
            ds.AddDatasetItemsRequest(dataset_id=dataset_id, items=_items(f"x{n}", f"y{n}"))
        )
        for n, replica in enumerate(served.mine * 6)
    ]
    created, refused = await _concurrently(calls)
    assert len(created) == ITEM_CAP // 2
    for error in refused:
        assert_over(error, "max_items_per_dataset")
    listed = await me.datasets.ListDatasetItems(ds.ListDatasetItemsRequest(dataset_id=dataset_id))
    assert len(listed.items) == await me.items(dataset_id) == 2 * (ITEM_CAP // 2)


async def test_generations_past_the_item_cap_are_refused_before_any_model_call(served: Served) -> None:
    me = served.mine[0]
    dataset_id = await me.create("max_datasets_per_tenant", 0)
    await me.datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset_id, items=_items("a", "b")))
    generate = GenerateDatasetItemsRequest(dataset_id=dataset_id, item_count=ITEM_CAP - 1, instructions="Questions.")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await me.generations.GenerateDatasetItems(generate)
    assert_over(caught.value, "max_items_per_dataset")
    dataset = (await me.datasets.GetDataset(ds.GetDatasetRequest(dataset_id=dataset_id))).dataset
    assert not dataset.HasField("generation")  # nothing stored
    turns = [item_pb2.Message(role="user", content="Hello?")]
    conversations = [Conversation(item_id=f"next-{n}", turns=turns) for n in range(ITEM_CAP - 1)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await me.generations.ContinueConversations(
            ContinueConversationsRequest(dataset_id=dataset_id, conversations=conversations)
        )
    assert_over(caught.value, "max_items_per_dataset")
    assert served.generator.seen == [] and await me.items(dataset_id) == 2
    generate.item_count = ITEM_CAP - 2  # what fits is accepted
    accepted = (await me.generations.GenerateDatasetItems(generate)).generation
    assert accepted.state == DatasetGeneration.STATE_PENDING


async def test_a_saved_grader_has_at_most_its_cap_of_versions_even_when_updated_at_once(served: Served) -> None:
    """Every UpdateGrader added a version of up to 256 KiB, without bound: one grader could grow for ever.
    Its versions are capped, also when updates race (on PostgreSQL over two replicas), and a refused
    update leaves the grader as it was."""
    me = served.mine[0]
    grader_id = await me.create("max_graders_per_tenant", 0)  # version 1
    update = gs.UpdateGraderRequest(grader_id=grader_id, grader=exact())
    calls = [lambda replica=replica: replica.graders.UpdateGrader(update) for replica in served.mine * 6]
    updated, refused = await _concurrently(calls)
    assert len(updated) == CAP - 1 and len(refused) == len(calls) - (CAP - 1), (updated, refused)
    for error in refused:
        assert_over(error, "max_versions_per_grader")
    got = await me.graders.GetGrader(gs.GetGraderRequest(grader_id=grader_id))
    assert got.grader.version == CAP
    assert "save the definition as a new grader" in (refused[0].details() or "")  # type: ignore[attr-defined]


async def test_retries_of_one_create_at_the_last_place_all_get_what_it_created(served: Served) -> None:
    """At cap - 1, the same CreateDataset (one request_id) sent many times at once, over both replicas on
    PostgreSQL: every retry is the first call's, so each answers with the one dataset it created. A retry
    that had looked for the request_id before the winner committed, then counted under the cap's lock
    after it, was refused RESOURCE_EXHAUSTED."""
    me = served.mine[0]
    for rounds in range(3):
        for n in range(CAP - 1):
            await me.create("max_datasets_per_tenant", n)
        request = ds.CreateDatasetRequest(dataset=ds.Dataset(display_name="once"), request_id=f"once-{rounds}")
        calls = [
            lambda replica=replica, request=request: replica.datasets.CreateDataset(request)
            for replica in served.mine * 8
        ]
        created, refused = await _concurrently(calls)
        assert refused == [] and len({answer.dataset.id for answer in created}) == 1, refused
        await _delete_all(me, "max_datasets_per_tenant")


async def test_the_active_run_limit_holds_across_replicas(tmp_path: Path) -> None:
    """--max-active-runs is counted in the database, and on PostgreSQL under the tenant's lock: with a
    limit of 1, one CreateRun sent to each of two replicas at once left 2 active runs in 9 trials of 10."""
    from evalsvc.v1 import eval_run_service_pb2_grpc
    from tests.helpers import create_request

    replicas = 2 if dbs.USE_POSTGRES else 1
    url = dbs.db_url(tmp_path)
    async with AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(EvalServiceTestServer(database_url=url, max_active_runs=1, workers=0))
            for _ in range(replicas)
        ]
        stubs = [eval_run_service_pb2_grpc.EvalRunServiceStub(server.channel) for server in servers]
        for _ in range(5):
            created, refused = await _concurrently(
                [lambda stub=stub: stub.CreateRun(create_request(1)) for stub in stubs * 2]
            )
            assert len(created) == 1, (created, refused)
            for error in refused:  # waiting helps here (runs end): RetryInfo, unlike the stored caps
                assert isinstance(error, grpc.aio.AioRpcError) and rich_error(error).metadata == {
                    "quota": "max_active_runs"
                }
            await stubs[0].CancelRun(pb.CancelRunRequest(run_id=created[0].run.id))
