"""One tenant's share of the served calls (--max-calls-per-tenant, evalsvc.limits.TenantLimits.take_call):
its slow calls, however many it opens, leave --max-concurrent-rpcs to the other tenants, on the wire and
through the in-process REST gateway alike; and the health check is served even when tenants together fill
the server. The slow calls are ContinueConversations against a real HTTP generator (tests/fake_llm.py)
that holds every answer until the test lets it go."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from evalsvc.config import Settings, SettingsError
from evalsvc.server import EvalServer
from evalsvc.statuses import TERMINAL
from evalsvc.v1 import (
    dataset_generation_pb2_grpc,
    dataset_service_pb2_grpc,
    grader_service_pb2_grpc,
    item_pb2,
    target_service_pb2_grpc,
)
from evalsvc.v1 import dataset_service_pb2 as ds
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc as stubs
from evalsvc.v1 import grader_service_pb2 as gs
from evalsvc.v1 import target_service_pb2 as ts
from evalsvc.v1.dataset_generation_pb2 import ContinueConversationsRequest, Conversation
from tests.conftest import make_settings
from tests.fake_llm import FakeEndpoint, held_generator
from tests.helpers import (
    create_request,
    error_reason,
    keyed_channel,
    retry_delay,
    rich_error,
    serving_gateway,
    until,
)

TURNS = [item_pb2.Message(role="user", content="Can I take two?"), item_pb2.Message(role="assistant", content="No.")]


class Tenant:
    """One tenant's stubs on its own channel."""

    def __init__(self, channel: grpc.aio.Channel, key: str) -> None:
        self.key = key
        self.runs = stubs.EvalRunServiceStub(channel)
        self.datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        self.generations = dataset_generation_pb2_grpc.DatasetGenerationServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)
        self.graders = grader_service_pb2_grpc.GraderServiceStub(channel)
        self.targets = target_service_pb2_grpc.TargetServiceStub(channel)

    async def slow_call(self, fake: FakeEndpoint) -> grpc.aio.UnaryUnaryCall[Any, Any]:
        """A ContinueConversations call, once the generator has its request (it is being served)."""
        dataset_id = (await self.datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset()))).dataset.id
        seen = len(fake.seen)
        call = self.generations.ContinueConversations(
            ContinueConversationsRequest(
                dataset_id=dataset_id, conversations=[Conversation(item_id="next", turns=TURNS)]
            )
        )
        assert await asyncio.to_thread(fake.wait_seen, seen + 1, 30)
        return call


@contextlib.asynccontextmanager
async def tenants(srv: EvalServer, *names: str) -> AsyncIterator[list[Tenant]]:
    """A Tenant of the bootstrap key (tenant "default"), then one per name, each with its own key."""
    keys = [srv.bootstrap_key or ""] + [(await srv.keys.create(name))[0] for name in names]
    async with contextlib.AsyncExitStack() as stack:
        yield [Tenant(await stack.enter_async_context(keyed_channel(srv.port, key)), key) for key in keys]


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


def generating(tmp_path: Path, fake: FakeEndpoint, **overrides: Any) -> Settings:
    return make_settings(
        tmp_path, outbound_allow="127.0.0.1", judge_base_url=fake.url + "/v1", judge_model="judge", **overrides
    )


async def test_a_tenants_slow_calls_take_its_share_and_leave_the_others_served(tmp_path: Path) -> None:
    """--max-concurrent-rpcs 2, so a tenant's share is 1: with its one slow call served, the tenant's next
    call is refused (its quota named, RetryInfo), on the wire and through the REST gateway, while the
    other tenant's calls and the health check are served. Before, the tenant's two slow calls took both
    places and every other tenant's GetRun and the health Check got SERVER_CALLS_FULL (the probe: 1,000
    ContinueConversations of one tenant, every other call of the server refused)."""
    with held_generator() as (fake, _):
        settings = generating(tmp_path, fake, max_concurrent_rpcs=2, http_addr="127.0.0.1:0")
        async with serving_gateway(settings) as (srv, http), tenants(srv, "victim") as (attacker, victim):
            slow = await attacker.slow_call(fake)
            over = await refused(attacker.generations.ContinueConversations(ContinueConversationsRequest()))
            assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error_reason(over) == "TENANT_QUOTA_EXCEEDED"
            assert rich_error(over).metadata == {"quota": "max_calls_per_tenant"} and retry_delay(over) == 1.0
            assert "--max-calls-per-tenant" in (over.details() or "")
            rest = await http.get("/v1/runs/run_missing")  # the in-process path counts against the same share
            assert rest.status_code == 429, rest.text
            assert {"quota": "max_calls_per_tenant"} in [d.get("metadata") for d in rest.json()["details"]]

            missing = await refused(victim.runs.GetRun(pb.GetRunRequest(run_id="run_missing")))
            assert missing.code() == grpc.StatusCode.NOT_FOUND  # served
            health = await victim.health.Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING

            slow.cancel()
            await until(lambda: srv.limits.calls_of("default") == 0)  # its task ends on the server's schedule
            assert (await http.get("/v1/runs/run_missing")).status_code == 404  # its place is back


async def test_the_health_check_is_served_when_tenants_fill_the_server(tmp_path: Path) -> None:
    """Two tenants at their share of --max-concurrent-rpcs 2 fill the server: a third tenant's call is
    SERVER_CALLS_FULL, but the health Check (no key) is served, so a load balancer keeps the replica."""
    with held_generator() as (fake, _):
        srv = EvalServer(generating(tmp_path, fake, max_concurrent_rpcs=2, http_addr="127.0.0.1:0"))
        await srv.start()
        try:
            async with tenants(srv, "second", "third") as (first, second, third):
                calls = [await first.slow_call(fake), await second.slow_call(fake)]
                full = await refused(third.runs.GetRun(pb.GetRunRequest(run_id="run_missing")))
                assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error_reason(full) == "SERVER_CALLS_FULL"
                assert srv.gateway is not None  # REST calls take the same places (their own count let in as many)
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.gateway.port}") as http:
                    rest = await http.get("/v1/runs/run_missing", headers={"authorization": f"Bearer {third.key}"})
                assert rest.status_code == 429 and "SERVER_CALLS_FULL" in rest.text, rest.text
                async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as anonymous:
                    health = await health_pb2_grpc.HealthStub(anonymous).Check(health_pb2.HealthCheckRequest())
                assert health.status == health_pb2.HealthCheckResponse.SERVING
                for call in calls:
                    call.cancel()
        finally:
            await srv.stop(grace=0.5)


@pytest.mark.parametrize(
    ("overrides", "share"),
    [({}, 2000), ({"max_concurrent_rpcs": 3}, 1), ({"max_calls_per_tenant": 7}, 7), ({"max_concurrent_rpcs": 1}, 1)],
)
def test_a_tenants_share_is_a_quarter_of_the_server_unless_set(overrides: dict[str, int], share: int) -> None:
    assert Settings(**overrides).calls_per_tenant == share


def test_a_share_over_half_of_the_server_is_refused() -> None:
    """One tenant allowed every place is what the setting is there to prevent."""
    with pytest.raises(SettingsError, match=r"--max-calls-per-tenant .* must be at most half of --max-concurrent-rpcs"):
        Settings(max_concurrent_rpcs=10, max_calls_per_tenant=6)
    assert Settings(max_concurrent_rpcs=10, max_calls_per_tenant=5).calls_per_tenant == 5


async def test_a_write_that_outlives_its_call_keeps_the_tenants_place_until_it_ends(tmp_path: Path) -> None:
    """A write is shielded from its call's cancellation (an acknowledged write is never half-done), so a
    caller whose deadline passed left it going and got its place back: a tenant whose calls kept giving
    up early had more writes going than its share, uncounted (a review: 2 with a share of 1). The write
    now keeps the place until it has ended."""
    srv = EvalServer(make_settings(tmp_path, max_concurrent_rpcs=2))  # a share of 1
    await srv.start()
    held, release = asyncio.Event(), asyncio.Event()
    try:
        async with tenants(srv) as (tenant,):

            async def holding_the_writer(_conn: Any) -> None:
                held.set()
                await release.wait()

            await refused(tenant.runs.GetRun(pb.GetRunRequest(run_id="run_missing")))  # its key is known now
            writer = asyncio.ensure_future(srv.db.transact(holding_the_writer))
            await held.wait()
            late = await refused(
                tenant.datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset()), timeout=0.5)
            )
            assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # its write waits for the writer, detached
            over = await refused(tenant.runs.GetRun(pb.GetRunRequest(run_id="run_missing")))
            assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert rich_error(over).metadata == {"quota": "max_calls_per_tenant"}
            release.set()
            await writer
            await until(lambda: srv.limits.calls_of("default") == 0)  # the write ended: its place is back
            missing = await refused(tenant.runs.GetRun(pb.GetRunRequest(run_id="run_missing")))
            assert missing.code() == grpc.StatusCode.NOT_FOUND
    finally:
        release.set()  # a failed assertion must not leave the writer held: the stop would wait for it
        await srv.stop(grace=0.5)


async def test_a_tenants_page_reads_wait_in_its_own_line(tmp_path: Path) -> None:
    """A page of runs or results is CPU work on the one event loop; one tenant reading 8 large pages at
    once made a quiet tenant's GetRun p50 3 -> 100 ms (p99 1.4 s). A tenant's page reads past
    --max-page-reads-per-tenant now wait their turn (not refused), while another tenant's are read at once."""
    srv = EvalServer(make_settings(tmp_path, max_page_reads_per_tenant=2))
    await srv.start()
    try:
        async with tenants(srv, "quiet") as (loud, quiet):
            loud_run = await finished_run(loud)
            quiet_run = await finished_run(quiet)
            loud_dataset = (await loud.datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset()))).dataset.id
            await loud.datasets.AddDatasetItems(
                ds.AddDatasetItemsRequest(dataset_id=loud_dataset, items=[item_pb2.Item(id="a", input="q")])
            )
            async with contextlib.AsyncExitStack() as turns:  # the loud tenant's two turns, held
                for _ in range(2):
                    await turns.enter_async_context(srv.limits.page_read("default"))
                waiting = asyncio.gather(
                    loud.runs.ListRunResults(pb.ListRunResultsRequest(run_id=loud_run)),
                    loud.runs.ListRuns(pb.ListRunsRequest()),
                    # The other lists read pages too (a page of 1,000 graders of 256 KiB): in the same line.
                    loud.datasets.ListDatasets(ds.ListDatasetsRequest()),
                    loud.datasets.ListDatasetItems(ds.ListDatasetItemsRequest(dataset_id=loud_dataset)),
                    loud.graders.ListGraders(gs.ListGradersRequest()),
                    loud.targets.ListTargets(ts.ListTargetsRequest()),
                )
                await until(lambda: srv.limits.page_reads_of("default") == 8)  # two held, six in line
                assert len((await quiet.runs.ListRunResults(pb.ListRunResultsRequest(run_id=quiet_run))).results) == 3
                assert [run.id for run in (await quiet.runs.ListRuns(pb.ListRunsRequest())).runs] == [quiet_run]
                assert not waiting.done()
            results, runs, sets, items, graders, targets = await asyncio.wait_for(waiting, 30)  # turns freed
            assert len(results.results) == 3 and [run.id for run in runs.runs] == [loud_run]
            assert [d.id for d in sets.datasets] == [loud_dataset] and [i.id for i in items.items] == ["a"]
            assert graders.graders == [] and targets.targets == []
        assert srv.limits.page_reads_of("default") == 0
    finally:
        await srv.stop(grace=0.5)


async def finished_run(tenant: Tenant) -> str:
    """A run of 3 recorded items, once it has ended."""
    run_id = (await tenant.runs.CreateRun(create_request(3))).run.id
    async for event in tenant.runs.WatchRun(pb.WatchRunRequest(run_id=run_id)):
        if event.HasField("run") and event.run.status in TERMINAL:
            return run_id
    raise AssertionError("the watch ended before the run did")
