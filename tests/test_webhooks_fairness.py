"""Webhook delivery slots are divided fairly among tenants (evalsvc.webhooks.sender.divide_slots,
evalsvc.store.webhooks.claim_due): tenants whose receivers hang hold their own share and no more, and
another tenant's deliveries are sent at once. Runs on SQLite, and on PostgreSQL with
EVALSVC_TEST_DB=postgres (tests/dbs.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select

from evalsvc.server import EvalServer
from evalsvc.store import webhooks as store
from evalsvc.v1 import eval_run_service_pb2_grpc, webhook_service_pb2_grpc
from evalsvc.v1 import webhook_service_pb2 as wpb
from evalsvc.webhooks import sender
from evalsvc.webhooks.sender import divide_slots
from tests.conftest import make_settings
from tests.fake_llm import FakeEndpoint, Reply
from tests.helpers import create_request, keyed_channel, watch_all

ALL_TYPES = ["run.created", "run.started", "run.succeeded", "run.failed", "run.cancelled"]
WAIT_S = 60.0
HUNG_TENANTS = 4


class Arrivals:
    """Requests that arrived at a set of receivers, counted under one condition."""

    def __init__(self) -> None:
        self.count = 0
        self.changed = threading.Condition()

    def add(self) -> None:
        with self.changed:
            self.count += 1
            self.changed.notify_all()

    def wait_for(self, count: int, timeout: float) -> int:
        with self.changed:
            self.changed.wait_for(lambda: self.count >= count, timeout)
            return self.count


class HangingReceiver:
    """A receiver that reads each request, counts it, and answers none until closed."""

    def __init__(self, arrivals: Arrivals) -> None:
        self.closing = threading.Event()
        closing = self.closing

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                arrivals.add()
                closing.wait(WAIT_S)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.closing.set()
        self._server.shutdown()
        self._server.server_close()


def test_free_slots_go_round_robin_within_each_tenants_share() -> None:
    # Alone, a tenant gets a quarter of the slots.
    assert divide_slots(16, 16, {}, ["a"]) == {"a": 4}
    # Five tenants due at once: a slot each in turn, 16 / 5 = 3 at most each, 2 left for newcomers.
    assert divide_slots(16, 16, {}, ["a", "b", "c", "d", "e"]) == {"a": 3, "b": 3, "c": 3, "d": 3, "e": 2}
    # Four tenants hold 14 slots (hung receivers): a freed slot goes to the tenant with nothing in
    # flight, not back to the oldest backlog, and neither of the 2 reserved slots goes to a busy tenant.
    held = {"a": 4, "b": 4, "c": 3, "d": 3}
    assert divide_slots(2, 16, held, ["a", "b", "c", "d", "new"]) == {"new": 1}
    assert divide_slots(2, 16, held, ["a", "b", "c", "d"]) == {}
    # More tenants than slots: the ones after the last served go first, so each gets its turn.
    assert divide_slots(2, 16, {"x": 14}, ["a", "b", "c", "d"], after="b") == {"c": 1, "d": 1}
    assert divide_slots(2, 16, {"x": 14}, ["a", "b", "c", "d"], after="d") == {"a": 1, "b": 1}
    # Never more than the free slots, nor past --webhook-concurrency.
    assert sum(divide_slots(3, 16, {"a": 1}, list("bcdefgh")).values()) == 3
    assert divide_slots(5, 4, {"a": 4}, ["b"]) == {}
    assert divide_slots(1, 1, {}, ["a", "b"]) == {"a": 1}


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[EvalServer]:
    """A server whose attempts may hang 60 s (longer than the test waits for another tenant)."""
    srv = EvalServer(
        make_settings(tmp_path, outbound_allow="127.0.0.1", webhook_concurrency=16, webhook_timeout_s=WAIT_S)
    )
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(grace=0.5)


async def tenant_channel(server: EvalServer, tenant: str) -> grpc.aio.Channel:
    key, _ = await server.keys.create(tenant)
    return keyed_channel(server.port, key)


async def deliveries_to(server: EvalServer, tenant: str, url: str, *, runs: int) -> None:
    """The tenant's webhook to `url` for every event type, then `runs` runs to their ends: 3 deliveries each
    (created, started, succeeded)."""
    async with await tenant_channel(server, tenant) as channel:
        hooks = webhook_service_pb2_grpc.WebhookServiceStub(channel)
        stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
        await hooks.CreateWebhook(wpb.CreateWebhookRequest(webhook=wpb.Webhook(url=url, event_types=ALL_TYPES)))
        for _ in range(runs):
            await watch_all(stub, (await stub.CreateRun(create_request(1))).run.id)


async def a_good_tenants_deliveries_s(server: EvalServer) -> float:
    """Seconds from a new tenant's webhook and run until its healthy receiver has had the run's 3
    deliveries, beside whatever other tenants' receivers are doing."""
    with FakeEndpoint(Reply({}), Reply({}), Reply({})) as good:
        started = time.monotonic()
        await deliveries_to(server, "good", good.url, runs=1)
        assert await asyncio.to_thread(good.wait_seen, 3, 15.0), f"got {len(good.seen)} of 3"
        return time.monotonic() - started


async def test_claim_due_leases_each_tenants_quota_oldest_first(server: EvalServer) -> None:
    """The store's claim: a tenant's quota is its LIMIT, whatever another tenant's older backlog."""
    await server.webhook_sender.stop()  # the test claims by hand
    webhook_ids = {}
    for tenant, runs_made in [("backlog", 4), ("fresh", 1)]:
        async with await tenant_channel(server, tenant) as channel:
            hooks = webhook_service_pb2_grpc.WebhookServiceStub(channel)
            runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            hook = (
                await hooks.CreateWebhook(
                    wpb.CreateWebhookRequest(webhook=wpb.Webhook(url="http://127.0.0.1:9/hook", event_types=ALL_TYPES))
                )
            ).webhook
            webhook_ids[tenant] = hook.id
            for _ in range(runs_made):
                await watch_all(runs, (await runs.CreateRun(create_request(1))).run.id)
    now = time.time() + 1

    async def claim(conn: Any) -> tuple[list[str], list[Any]]:
        due = await store.due_tenants(conn, now)
        claimed = await store.claim_due(conn, claim_id="c1", now=now, lease_s=60, quotas={"backlog": 2, "fresh": 1})
        return due, claimed

    due, claimed = await server.db.transact(claim)
    assert due == ["backlog", "fresh"]
    by_tenant = sorted((each.tenant, each.webhook_id) for each in claimed)
    assert by_tenant == [("backlog", webhook_ids["backlog"])] * 2 + [("fresh", webhook_ids["fresh"])], by_tenant
    assert all(each.payload for each in claimed)
    # Leased deliveries are not claimed again; a tenant left out of the quotas gets nothing.
    again = await server.db.transact(
        lambda conn: store.claim_due(conn, claim_id="c2", now=now, lease_s=60, quotas={"fresh": 5})
    )
    assert [each.tenant for each in again] == ["fresh"] * 2  # the run's 3 deliveries, one leased before


async def test_four_tenants_with_hung_receivers_do_not_delay_another_tenants_deliveries(server: EvalServer) -> None:
    """Four tenants whose receivers never answer took all 16 slots (a quarter each, and each freed slot
    went back to the oldest backlog), so every other tenant's deliveries waited behind their timeouts.
    Now they hold their share, leaving slots another tenant's deliveries take at once."""
    arrivals = Arrivals()
    hung = [HangingReceiver(arrivals) for _ in range(HUNG_TENANTS)]
    try:
        for index, receiver in enumerate(hung):
            await deliveries_to(server, f"hung{index}", receiver.url, runs=3)  # 9 each, more than any share
        # Every slot the hung tenants may take is taken (14 of 16 now: 2 are kept for tenants with
        # nothing in flight; all 16 before).
        assert await asyncio.to_thread(arrivals.wait_for, 14, WAIT_S) >= 14, arrivals.count
        assert await a_good_tenants_deliveries_s(server) < 15.0
        assert arrivals.count <= 14, "the hung tenants took more than their share"
    finally:
        for receiver in hung:
            receiver.close()


CIRCUIT_TENANTS = 20


async def test_tenants_whose_receivers_hang_hold_no_slot_once_their_circuits_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With more tenants whose receivers hang than --webhook-concurrency, each held a slot (its share)
    for the whole timeout, attempt after attempt: all 16 were held (20 such tenants here), and every other
    tenant's delivery waited for one to free. After 5 failed attempts in a row a webhook's circuit opens
    (evalsvc.webhooks.sender): its deliveries wait, holding no slot, and another tenant's go at once."""
    monkeypatch.setattr(sender, "CIRCUIT_COOLDOWN_S", 600.0)  # no probe within the test: only the opening
    srv = EvalServer(
        make_settings(
            tmp_path,
            outbound_allow="127.0.0.1",
            webhook_concurrency=16,
            # Long enough that all 20 tenants' first attempts overlap before the first circuits open
            # (5 timeouts each): at 1 s, on a slow machine, the first had opened before the last joined (15 of 16).
            webhook_timeout_s=2.0,
            webhook_retry_base_s=0.05,
            webhook_max_attempts=30,
        )
    )
    await srv.start()
    hung_held: list[int] = []  # the hung tenants' attempts in flight, sampled

    async def sample() -> None:
        while True:
            in_flight = srv.webhook_sender._in_flight.values()
            hung_held.append(sum(1 for tenant, _ in in_flight if tenant.startswith("hung")))
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    arrivals = Arrivals()
    hung = [HangingReceiver(arrivals) for _ in range(CIRCUIT_TENANTS)]
    try:
        for index, receiver in enumerate(hung):
            # 6 deliveries each: more than the 5 failures that open a circuit.
            await deliveries_to(srv, f"hung{index:02d}", receiver.url, runs=2)
        assert await asyncio.to_thread(arrivals.wait_for, 5 * CIRCUIT_TENANTS, WAIT_S) >= 5 * CIRCUIT_TENANTS
        assert max(hung_held) == 16, "the hung tenants did not hold every slot before their circuits opened"
        deadline = time.monotonic() + WAIT_S
        while hung_held[-1] > 0:  # the attempts under way when each circuit opened end at their timeout
            assert time.monotonic() < deadline, f"the hung tenants still hold {hung_held[-1]} slots"
            await asyncio.sleep(0.05)
        async with srv.db.read() as conn:
            open_circuits = (
                await conn.execute(select(func.count()).where(store.WEBHOOKS.c.circuit_open_until.is_not(None)))
            ).scalar_one()
        assert open_circuits == CIRCUIT_TENANTS
        tried = arrivals.count
        hung_held.clear()
        took = await a_good_tenants_deliveries_s(srv)
        assert max(hung_held) == 0, f"tenants with open circuits held {max(hung_held)} slots"
        assert arrivals.count == tried, "a delivery of an open circuit was attempted"
        assert took < 5.0, f"another tenant's run and deliveries took {took:.1f} s"
    finally:
        sampler.cancel()
        for receiver in hung:
            receiver.close()
        await srv.stop(grace=0.5)
