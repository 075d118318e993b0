"""A webhook's circuit breaker (evalsvc.webhooks.sender): after 5 failed attempts in a row its deliveries
wait, unattempted, for a cooldown; then one probe is sent, whose 2xx closes the circuit and whose failure
opens it for twice as long. Kept in the database: a restarted server (or another replica) honours it.
And a claim never hands out a delivery of a disabled webhook. Real servers on port 0 and real HTTP
receivers on 127.0.0.1; runs on SQLite, and on PostgreSQL with EVALSVC_TEST_DB=postgres (tests/dbs.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from evalsvc.config import Settings
from evalsvc.server import EvalServer
from evalsvc.store import webhooks as store
from evalsvc.v1 import eval_run_service_pb2_grpc, webhook_service_pb2_grpc
from evalsvc.v1 import webhook_service_pb2 as wpb
from evalsvc.webhooks import sender
from tests.conftest import make_settings
from tests.fake_llm import FakeEndpoint, Reply
from tests.helpers import create_request, keyed_channel, watch_all

ALL_TYPES = ["run.created", "run.started", "run.succeeded", "run.failed", "run.cancelled"]
WAIT_S = 60.0
TENANT = "acme"


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Quick retries, and more attempts than it takes to open a circuit: a delivery is never FAILED here."""
    quick = {"outbound_allow": "127.0.0.1", "webhook_retry_base_s": 0.05, "webhook_max_attempts": 30}
    return make_settings(tmp_path, **{**quick, **overrides})


class Client:
    """A tenant's stubs on one server."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.webhooks = webhook_service_pb2_grpc.WebhookServiceStub(channel)
        self.runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)

    async def webhook(self, webhook_id: str) -> wpb.Webhook:
        return (await self.webhooks.GetWebhook(wpb.GetWebhookRequest(webhook_id=webhook_id))).webhook

    async def run(self, count: int) -> None:
        """Create `count` runs and wait for each to end: 3 deliveries each (created, started, succeeded)."""
        for _ in range(count):
            await watch_all(self.runs, (await self.runs.CreateRun(create_request(1))).run.id)

    async def deliveries(self, webhook_id: str) -> list[wpb.WebhookDelivery]:
        request = wpb.ListWebhookDeliveriesRequest(webhook_id=webhook_id)
        return list((await self.webhooks.ListWebhookDeliveries(request)).deliveries)

    async def until(self, webhook_id: str, holds: Callable[[wpb.Webhook], bool]) -> wpb.Webhook:
        """The webhook once `holds` does (bounded wait on a database state no event announces)."""
        deadline = time.monotonic() + WAIT_S
        while not holds(webhook := await self.webhook(webhook_id)):
            assert time.monotonic() < deadline, f"never: {webhook}"
            await asyncio.sleep(0.05)
        return webhook


@asynccontextmanager
async def client_of(server: EvalServer, key: str) -> AsyncIterator[Client]:
    async with keyed_channel(server.port, key) as channel:
        yield Client(channel)


@pytest.fixture
async def key_and_server(tmp_path: Path) -> AsyncIterator[tuple[str, EvalServer]]:
    srv = EvalServer(settings(tmp_path))
    await srv.start()
    try:
        key, _ = await srv.keys.create(TENANT)
        yield key, srv
    finally:
        await srv.stop(grace=0.5)


def opened(server: EvalServer) -> float | None:
    return server.metrics.registry.get_sample_value("evalsvc_webhook_circuit_opened_total")


def is_open(webhook: wpb.Webhook) -> bool:
    return webhook.HasField("circuit_open_until")


async def no_attempt_for(receiver: FakeEndpoint, seconds: float) -> None:
    """That nothing arrives for a while: a bounded wait, there being no event for "nothing happened"."""
    before = len(receiver.seen)
    assert not await asyncio.to_thread(receiver.wait_seen, before + 1, seconds), "an attempt was sent"


async def test_five_failures_in_a_row_open_the_circuit_and_its_deliveries_wait_without_spending_attempts(
    key_and_server: tuple[str, EvalServer],
) -> None:
    key, server = key_and_server
    with FakeEndpoint(Reply({}, status=500)) as receiver:
        async with client_of(server, key) as client:
            created = (
                await client.webhooks.CreateWebhook(
                    wpb.CreateWebhookRequest(webhook=wpb.Webhook(url=receiver.url, event_types=ALL_TYPES))
                )
            ).webhook
            await client.run(3)  # 9 deliveries
            webhook = await client.until(created.id, is_open)
            # Up to a tenant's share (4) were in flight when the 5th failure opened it; they fail too.
            await client.until(created.id, lambda w: w.consecutive_failures == len(receiver.seen))
            tried = len(receiver.seen)
            assert 5 <= tried <= 8, tried
            await no_attempt_for(receiver, 2.0)
            listed = await client.deliveries(created.id)
            webhook = await client.webhook(created.id)
    assert webhook.consecutive_failures == tried and is_open(webhook)
    open_until = webhook.circuit_open_until.ToNanoseconds() / 1e9
    assert 20.0 < open_until - time.time() <= 30.0, "the first cooldown is 30 s, less up to a quarter"
    assert len(listed) == 9 and all(d.status == wpb.WEBHOOK_DELIVERY_STATUS_PENDING for d in listed)
    assert sum(d.attempts for d in listed) == tried, "a delivery spent an attempt while the circuit was open"
    # Each waits for the end of the cooldown (or its own later retry), not a retry of its own inside it.
    waits = [d.next_attempt_time.ToNanoseconds() / 1e9 - open_until for d in listed]
    assert all(wait >= -1e-3 for wait in waits), (waits, [d.attempts for d in listed])
    assert opened(server) == 1.0


async def test_a_half_open_circuit_sends_one_probe_reopens_twice_as_long_then_closes_on_a_2xx(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver that hangs: each attempt holds a slot for --webhook-timeout-s. Once its circuit is open
    it holds none, and at most one (the probe) when the cooldown ends; the probe's timeout opens the
    circuit again for twice as long; a probe answered 2xx closes it and the deliveries that waited go."""
    monkeypatch.setattr(sender, "CIRCUIT_COOLDOWN_S", 1.0)
    hang = threading.Event()
    srv = EvalServer(settings(tmp_path, webhook_timeout_s=1.0))
    await srv.start()
    held: list[int] = []  # this tenant's attempts in flight, sampled

    async def sample() -> None:
        while True:
            held.append(sum(1 for tenant, _ in srv.webhook_sender._in_flight.values() if tenant == TENANT))
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    try:
        key, _ = await srv.keys.create(TENANT)
        with FakeEndpoint(Reply({}, gate=hang)) as receiver:
            async with client_of(srv, key) as client:
                hook = wpb.Webhook(url=receiver.url, event_types=ALL_TYPES)
                webhook_id = (await client.webhooks.CreateWebhook(wpb.CreateWebhookRequest(webhook=hook))).webhook.id
                await client.run(3)
                await client.until(webhook_id, is_open)
                assert max(held) == 4, "a tenant alone holds a quarter of the 16 slots"
                # The attempts under way when it opened end at their timeout; then only probes go.
                while held[-1] > 0:
                    await asyncio.sleep(0.02)
                held.clear()
                before = len(receiver.seen)
                reopened = await client.until(webhook_id, lambda w: w.consecutive_failures >= 5 and opened(srv) == 2.0)
                assert len(receiver.seen) == before + 1, "more than one probe was sent"
                assert max(held) == 1, f"the open circuit's webhook held {max(held)} slots"
                [probe] = [
                    d for d in await client.deliveries(webhook_id) if d.id == receiver.seen[-1].headers["webhook-id"]
                ]
                cooldown = (
                    reopened.circuit_open_until.ToNanoseconds() / 1e9 - probe.last_attempt_time.ToNanoseconds() / 1e9
                )
                assert 1.5 - 1e-3 <= cooldown <= 2.0 + 1e-3, (
                    f"the re-open's cooldown was {cooldown:.2f} s, not 1 s doubled"
                )
                with receiver._lock:
                    receiver.script[:] = [Reply({})]
                closed = await client.until(webhook_id, lambda w: not is_open(w))
                assert closed.consecutive_failures == 0
                deadline = time.monotonic() + WAIT_S
                while any(d.status == wpb.WEBHOOK_DELIVERY_STATUS_PENDING for d in await client.deliveries(webhook_id)):
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
                listed = await client.deliveries(webhook_id)
        assert all(d.status == wpb.WEBHOOK_DELIVERY_STATUS_SUCCEEDED for d in listed), listed
        assert opened(srv) == 2.0
    finally:
        hang.set()
        sampler.cancel()
        await srv.stop(grace=0.5)


async def test_an_open_circuit_survives_a_restart_and_enabling_the_webhook_closes_it(tmp_path: Path) -> None:
    with FakeEndpoint(Reply({}, status=503)) as receiver:
        first = EvalServer(settings(tmp_path))
        await first.start()
        try:
            key, _ = await first.keys.create(TENANT)
            async with client_of(first, key) as client:
                hook = wpb.Webhook(url=receiver.url, event_types=ALL_TYPES)
                webhook_id = (await client.webhooks.CreateWebhook(wpb.CreateWebhookRequest(webhook=hook))).webhook.id
                await client.run(2)
                before = await client.until(webhook_id, is_open)
        finally:
            await first.stop(grace=0.5)
        second = EvalServer(settings(tmp_path))
        await second.start()
        try:
            async with client_of(second, key) as client:
                after = await client.webhook(webhook_id)
                assert after.circuit_open_until == before.circuit_open_until
                await no_attempt_for(receiver, 2.0)
                with receiver._lock:
                    receiver.script[:] = [Reply({})]
                started = time.monotonic()
                enable = wpb.UpdateWebhookRequest(webhook_id=webhook_id, webhook=wpb.Webhook(enabled=True))
                enable.update_mask.paths.append("enabled")
                enabled = (await client.webhooks.UpdateWebhook(enable)).webhook
                assert not is_open(enabled) and enabled.consecutive_failures == 0
                succeeded = 0
                while succeeded < 6:
                    assert time.monotonic() - started < 15.0, "the deliveries waited for the cooldown"
                    listed = await client.deliveries(webhook_id)
                    succeeded = sum(d.status == wpb.WEBHOOK_DELIVERY_STATUS_SUCCEEDED for d in listed)
                    await asyncio.sleep(0.05)
        finally:
            await second.stop(grace=0.5)


async def test_a_new_url_closes_the_circuit(key_and_server: tuple[str, EvalServer]) -> None:
    key, server = key_and_server
    with FakeEndpoint(Reply({}, status=502)) as broken, FakeEndpoint(Reply({})) as fixed:
        async with client_of(server, key) as client:
            hook = wpb.Webhook(url=broken.url, event_types=ALL_TYPES)
            webhook_id = (await client.webhooks.CreateWebhook(wpb.CreateWebhookRequest(webhook=hook))).webhook.id
            await client.run(2)
            await client.until(webhook_id, is_open)
            moved = wpb.UpdateWebhookRequest(webhook_id=webhook_id, webhook=wpb.Webhook(url=fixed.url))
            updated = (await client.webhooks.UpdateWebhook(moved)).webhook
            assert not is_open(updated) and updated.consecutive_failures == 0
            assert await asyncio.to_thread(fixed.wait_seen, 6, 15.0), f"{len(fixed.seen)} of 6 within 15 s"


async def test_a_delivery_leased_by_a_dead_sender_is_not_sent_once_its_webhook_was_disabled(tmp_path: Path) -> None:
    """A sender killed mid-attempt leaves its lease; disabling the webhook then fails its deliveries not
    leased only. Reclaimed when that lease expired (or at a SQLite server's next start), the delivery was
    sent once more to a webhook that was disabled. The claim fails it unsent now, as disabling does."""
    with FakeEndpoint(Reply({})) as receiver:
        first = EvalServer(settings(tmp_path))
        await first.start()
        try:
            await first.webhook_sender.stop()  # nothing is sent: the test leases as a dying sender would
            key, _ = await first.keys.create(TENANT)
            async with client_of(first, key) as client:
                hook = wpb.Webhook(url=receiver.url, event_types=["run.created"])
                webhook_id = (await client.webhooks.CreateWebhook(wpb.CreateWebhookRequest(webhook=hook))).webhook.id
                await client.runs.CreateRun(create_request(1))
                now = time.time() + 0.01
                [leased] = await first.db.transact(
                    lambda conn: store.claim_due(conn, claim_id="dead", now=now, lease_s=1.0, quotas={TENANT: 1})
                )
                disable = wpb.UpdateWebhookRequest(webhook_id=webhook_id, webhook=wpb.Webhook(enabled=False))
                disable.update_mask.paths.append("enabled")
                await client.webhooks.UpdateWebhook(disable)
                assert [d.status for d in await client.deliveries(webhook_id)] == [wpb.WEBHOOK_DELIVERY_STATUS_PENDING]
        finally:
            await first.stop(grace=0.5)
        second = EvalServer(settings(tmp_path))  # SQLite: releases the lease at start; PostgreSQL: it expires
        await second.start()
        try:
            async with client_of(second, key) as client:
                deadline = time.monotonic() + WAIT_S
                while (listed := await client.deliveries(webhook_id))[0].status == wpb.WEBHOOK_DELIVERY_STATUS_PENDING:
                    assert time.monotonic() < deadline, listed
                    await asyncio.sleep(0.05)
        finally:
            await second.stop(grace=0.5)
    assert receiver.seen == [], "a disabled webhook's delivery was sent"
    [delivery] = listed
    assert delivery.id == leased.id and delivery.attempts == 0
    assert (delivery.status, delivery.last_error) == (
        wpb.WEBHOOK_DELIVERY_STATUS_FAILED,
        "not sent: the webhook was disabled",
    )


async def test_enabling_a_webhook_makes_its_waiting_deliveries_due_at_once(tmp_path: Path) -> None:
    """`enabled: true` ("the receiver is back, try now") and a closing 2xx moved only the deliveries due
    before the cooldown's end: a delivery on its own backoff (minutes, up to an hour) waited it out while
    the webhook showed healthy (a probe: 0 of 6 within 20 s, due 107-183 s later)."""
    with FakeEndpoint(Reply({}, status=503)) as receiver:
        srv = EvalServer(settings(tmp_path, webhook_retry_base_s=300.0))  # retries 150-300 s away
        await srv.start()
        try:
            key, _ = await srv.keys.create(TENANT)
            async with client_of(srv, key) as client:
                hook = wpb.Webhook(url=receiver.url, event_types=ALL_TYPES)
                webhook_id = (await client.webhooks.CreateWebhook(wpb.CreateWebhookRequest(webhook=hook))).webhook.id
                await client.run(1)  # 3 deliveries, each failing once: fewer than open the circuit
                await client.until(webhook_id, lambda webhook: webhook.consecutive_failures == 3)
                with receiver._lock:
                    receiver.script[:] = [Reply({})]
                enable = wpb.UpdateWebhookRequest(webhook_id=webhook_id, webhook=wpb.Webhook(enabled=True))
                enable.update_mask.paths.append("enabled")
                await client.webhooks.UpdateWebhook(enable)
                assert await asyncio.to_thread(receiver.wait_seen, 6, 15.0), f"{len(receiver.seen)} of 6 in 15 s"
        finally:
            await srv.stop(grace=0.5)


async def test_a_sender_paused_past_its_lease_does_not_send_what_it_had_claimed(tmp_path: Path) -> None:
    """A replica stopped (SIGSTOP, a VM pause) between its claim and the send woke and sent a delivery
    whose lease had run out, which another replica had leased and sent meanwhile: the receiver got it
    twice, 20-200 ms apart (a probe, in each of three PostgreSQL seeds). The paused sender now sends
    nothing it could not finish within its lease; the delivery waits, unattempted, for a new lease."""
    with FakeEndpoint(Reply({})) as receiver:
        srv = EvalServer(settings(tmp_path, webhook_timeout_s=0.1))  # a lease of 2 x 0.1 + 5 s
        await srv.start()
        try:
            await srv.webhook_sender.stop()  # its loop claims nothing: the test claims, as the loop would
            key, _ = await srv.keys.create(TENANT)
            async with client_of(srv, key) as client:
                hook = wpb.Webhook(url=receiver.url, event_types=["run.created"])
                webhook_id = (await client.webhooks.CreateWebhook(wpb.CreateWebhookRequest(webhook=hook))).webhook.id
                await client.runs.CreateRun(create_request(1))
                sender_ = srv.webhook_sender
                sender_._stopping = False
                assert await sender_._claim(1) == 1
                sending = list(sender_._in_flight)
                time.sleep(5.2)  # the pause itself: the event loop, like the process, stopped
                await asyncio.gather(*sending)
                [delivery] = await client.deliveries(webhook_id)
                assert (delivery.status, delivery.attempts) == (wpb.WEBHOOK_DELIVERY_STATUS_PENDING, 0)
        finally:
            await srv.stop(grace=0.5)
    assert receiver.seen == [], "the paused sender sent a delivery whose lease had run out"
