"""Webhooks: signed Standard Webhooks deliveries of run events, durable through kill -9, retried with
one webhook-id, tenant-scoped, disabled by 410, shared by PostgreSQL replicas without double sends.

Receivers are real HTTP servers on 127.0.0.1 (tests/fake_llm.py), allow-listed like any target."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import re
import socket
import threading
import time
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format
from standardwebhooks.webhooks import Webhook as StandardWebhook

from evalsvc.server import EvalServer
from evalsvc.store import webhooks as webhook_store
from evalsvc.v1 import (
    eval_run_service_pb2,
    eval_run_service_pb2_grpc,
    grader_pb2,
    run_pb2,
    target_pb2,
    webhook_service_pb2_grpc,
)
from evalsvc.v1 import webhook_service_pb2 as wpb
from evalsvc.webhooks.sender import retry_delay
from tests import dbs
from tests.conftest import make_settings
from tests.fake_llm import FakeEndpoint, Reply
from tests.helpers import create_request, error_reason, keyed_channel, violations, watch_all
from tests.procs import start_server

ALL_TYPES = ["run.created", "run.started", "run.succeeded", "run.failed", "run.cancelled"]
WAIT_S = 60.0


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[EvalServer]:
    """A server that may call 127.0.0.1 and retries webhook deliveries quickly."""
    srv = EvalServer(
        make_settings(tmp_path, outbound_allow="127.0.0.1", webhook_retry_base_s=0.05, webhook_max_attempts=4)
    )
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(grace=1.0)


@pytest.fixture
def webhooks(channel: grpc.aio.Channel) -> webhook_service_pb2_grpc.WebhookServiceStub:
    return webhook_service_pb2_grpc.WebhookServiceStub(channel)


async def seen(endpoint: FakeEndpoint, count: int) -> None:
    assert await asyncio.to_thread(endpoint.wait_seen, count, WAIT_S), f"the receiver got {len(endpoint.seen)}"


async def deliveries_when_done(
    webhooks: webhook_service_pb2_grpc.WebhookServiceStub, webhook_id: str, count: int
) -> list[wpb.WebhookDelivery]:
    """The webhook's deliveries once `count` of them are no longer PENDING (bounded wait on a
    database state no event announces)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        listed = await webhooks.ListWebhookDeliveries(wpb.ListWebhookDeliveriesRequest(webhook_id=webhook_id))
        done = [d for d in listed.deliveries if d.status != wpb.WEBHOOK_DELIVERY_STATUS_PENDING]
        if len(done) >= count:
            return list(listed.deliveries)
        assert time.monotonic() < deadline, f"deliveries still pending: {listed.deliveries}"
        await asyncio.sleep(0.05)


def create_webhook(url: str, event_types: list[str] | None = None) -> wpb.CreateWebhookRequest:
    return wpb.CreateWebhookRequest(webhook=wpb.Webhook(url=url, event_types=event_types or []))


async def test_deliveries_verify_with_the_standardwebhooks_package(
    webhooks: webhook_service_pb2_grpc.WebhookServiceStub, runs: eval_run_service_pb2_grpc.EvalRunServiceStub
) -> None:
    with FakeEndpoint(Reply({})) as receiver:
        created = (await webhooks.CreateWebhook(create_webhook(receiver.url + "/hook", ALL_TYPES))).webhook
        secret = created.signing_secret
        assert secret.startswith("whsec_") and len(base64.b64decode(secret[len("whsec_") :])) == 32
        run_id = (await runs.CreateRun(create_request(4))).run.id
        events = await watch_all(runs, run_id)
        await seen(receiver, 3)
    by_type = {}
    for request in receiver.seen:
        body = StandardWebhook(secret).verify(request.raw, request.headers)  # raises unless the signature holds
        assert request.headers["webhook-id"].startswith("msg_") and request.path == "/hook"
        by_type[body["type"]] = body
    assert set(by_type) == {"run.created", "run.started", "run.succeeded"}
    final = by_type["run.succeeded"]
    terminal = events[-1]
    assert final["data"]["lastSeq"] == str(terminal.seq)
    assert final["timestamp"] == terminal.event_time.ToJsonString()
    run = json_format.ParseDict(final["data"]["run"], run_pb2.Run())  # proto3 JSON of the Run
    assert run == terminal.run and run.aggregate.pass_rate == terminal.run.aggregate.pass_rate
    assert "passRate" in final["data"]["run"]["aggregate"]  # proto3 JSON names
    with pytest.raises(Exception, match="signature"):
        StandardWebhook("whsec_" + base64.b64encode(b"x" * 32).decode()).verify(
            receiver.seen[0].raw, receiver.seen[0].headers
        )


async def test_a_webhook_may_call_only_the_loopback_port_its_allow_list_entry_names(tmp_path: Path) -> None:
    """`--outbound-allow 127.0.0.1` let a tenant's webhook post to every port of loopback (the server's
    own gateway and metrics, a database); an entry with the receiver's port allows that receiver only."""
    with FakeEndpoint(Reply({})) as receiver, FakeEndpoint(Reply({})) as other:
        port, other_port = (int(endpoint.url.rpartition(":")[2]) for endpoint in (receiver, other))
        srv = EvalServer(make_settings(tmp_path, outbound_allow=f"127.0.0.1:{port}"))
        await srv.start()
        try:
            async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
                webhooks = webhook_service_pb2_grpc.WebhookServiceStub(channel)
                runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await webhooks.CreateWebhook(create_webhook(other.url + "/hook"))
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                refused = (
                    f"127.0.0.1:{other_port} is not allowed (not globally routable; allow it with --outbound-allow)"
                )
                assert refused in violations(caught.value).get("webhook.url", ""), violations(caught.value)
                await webhooks.CreateWebhook(create_webhook(receiver.url + "/hook", ["run.succeeded"]))
                await watch_all(runs, (await runs.CreateRun(create_request(2))).run.id)
                await seen(receiver, 1)
        finally:
            await srv.stop(grace=1.0)
    assert not other.seen


async def test_a_receiver_failing_twice_gets_three_attempts_with_one_webhook_id(
    server: EvalServer,
    webhooks: webhook_service_pb2_grpc.WebhookServiceStub,
    runs: eval_run_service_pb2_grpc.EvalRunServiceStub,
) -> None:
    script = [Reply({}, status=500), Reply({}, status=503, headers={"retry-after": "1"}), Reply({})]
    with FakeEndpoint(*script) as receiver:
        created = (await webhooks.CreateWebhook(create_webhook(receiver.url))).webhook
        run_id = (await runs.CreateRun(create_request(2))).run.id
        await watch_all(runs, run_id)
        await seen(receiver, 3)
        [delivery] = await deliveries_when_done(webhooks, created.id, 1)
    ids = {request.headers["webhook-id"] for request in receiver.seen}
    assert ids == {delivery.id} and len(receiver.seen) == 3
    for request in receiver.seen:
        StandardWebhook(created.signing_secret).verify(request.raw, request.headers)
    assert receiver.seen[2].at - receiver.seen[1].at >= 0.95, "Retry-After: 1 was not honoured"
    assert delivery.status == wpb.WEBHOOK_DELIVERY_STATUS_SUCCEEDED
    assert (delivery.attempts, delivery.last_response_code, delivery.last_error) == (3, 200, "")
    assert (delivery.event_type, delivery.run_id) == ("run.succeeded", run_id)
    assert not delivery.HasField("next_attempt_time")
    attempts = {
        outcome: server.metrics.registry.get_sample_value("evalsvc_webhook_attempts_total", {"outcome": outcome})
        for outcome in ("retrying", "succeeded")
    }
    assert attempts == {"retrying": 2.0, "succeeded": 1.0}


async def test_the_last_failed_attempt_leaves_the_delivery_failed_and_visible(
    webhooks: webhook_service_pb2_grpc.WebhookServiceStub,
    runs: eval_run_service_pb2_grpc.EvalRunServiceStub,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with FakeEndpoint(Reply({}, status=502)) as receiver, caplog.at_level(logging.INFO):
        # Credentials in the URL are the receiver's: never in last_error or the log (they were, in clear).
        with_password = receiver.url.replace("http://", "http://alice:hunter2pw@", 1)
        created = (await webhooks.CreateWebhook(create_webhook(with_password))).webhook
        await watch_all(runs, (await runs.CreateRun(create_request(1))).run.id)
        [delivery] = await deliveries_when_done(webhooks, created.id, 1)
    ours = " ".join(record.getMessage() for record in caplog.records if record.name.startswith("evalsvc"))
    assert "hunter2pw" not in delivery.last_error and "hunter2pw" not in ours  # httpx's: tests/test_observability.py
    assert len(receiver.seen) == 4  # the fixture's --webhook-max-attempts
    assert delivery.status == wpb.WEBHOOK_DELIVERY_STATUS_FAILED
    assert (delivery.attempts, delivery.last_response_code) == (4, 502)
    assert "HTTP 502" in delivery.last_error and "gave up after 4 attempts" in delivery.last_error
    failed = await webhooks.ListWebhookDeliveries(
        wpb.ListWebhookDeliveriesRequest(webhook_id=created.id, status=wpb.WEBHOOK_DELIVERY_STATUS_FAILED)
    )
    assert [d.id for d in failed.deliveries] == [delivery.id]


async def test_an_attempt_the_http_client_fails_unexpectedly_is_recorded_and_counted(
    server: EvalServer,
    webhooks: webhook_service_pb2_grpc.WebhookServiceStub,
    runs: eval_run_service_pb2_grpc.EvalRunServiceStub,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An attempt whose HTTP client raised something other than an HTTPError (an InvalidURL, an
    OverflowError for a port out of range) was an ERROR traceback and no recorded attempt: the delivery
    was leased again, failed again, for good. It is a failed attempt now, towards the last one."""

    def broken(*args: object, **kwargs: object) -> object:
        raise OverflowError("port must be 0-65535.")

    monkeypatch.setattr(server.webhook_sender._client, "stream", broken)
    created = (await webhooks.CreateWebhook(create_webhook("http://127.0.0.1:9/hook", ["run.created"]))).webhook
    with caplog.at_level(logging.INFO):
        await runs.CreateRun(create_request(1))
        [delivery] = await deliveries_when_done(webhooks, created.id, 1)
    assert delivery.status == wpb.WEBHOOK_DELIVERY_STATUS_FAILED and delivery.attempts == 4
    assert "OverflowError calling 127.0.0.1:9" in delivery.last_error
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_tenants_backlog_of_waiting_deliveries_is_bounded(
    server: EvalServer,
    webhooks: webhook_service_pb2_grpc.WebhookServiceStub,
    runs: eval_run_service_pb2_grpc.EvalRunServiceStub,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Receivers that never keep up let one tenant queue deliveries without end (~3,000 a second with 50
    webhooks), and every claim read through that backlog inside the write transaction. Past
    MAX_PENDING_PER_TENANT waiting, new deliveries are not written; one WARNING says so. The bound is on
    what a transaction adds: checked only before it, one event to 50 webhooks passed it by 49 (here, two
    webhooks: 4 waiting of 3)."""
    monkeypatch.setattr(webhook_store, "MAX_PENDING_PER_TENANT", 3)
    await server.webhook_sender.stop()  # nothing is sent: every delivery stays waiting
    created = [
        (await webhooks.CreateWebhook(create_webhook("http://127.0.0.1:9/hook", ALL_TYPES))).webhook for _ in range(2)
    ]
    with caplog.at_level(logging.WARNING, logger="evalsvc.store.webhooks"):
        for _ in range(3):
            last_run = (await runs.CreateRun(create_request(1))).run.id
            last_seq = (await watch_all(runs, last_run))[-1].seq
    listed = [
        delivery
        for webhook in created
        for delivery in (
            await webhooks.ListWebhookDeliveries(wpb.ListWebhookDeliveriesRequest(webhook_id=webhook.id))
        ).deliveries
    ]
    pending = [d for d in listed if d.status == wpb.WEBHOOK_DELIVERY_STATUS_PENDING]
    assert len(pending) == 3 and all(d.event_type != webhook_store.DROPPED for d in pending), listed
    # The tenant sees what was not queued: a FAILED "events.dropped" delivery per webhook (per streak of
    # drops), counting the events, its run and seq the last one dropped. 3 runs x 3 events x 2 webhooks
    # were 18 deliveries: 15 were not queued.
    markers = [d for d in listed if d.status != wpb.WEBHOOK_DELIVERY_STATUS_PENDING]
    assert sorted(d.webhook_id for d in markers) == sorted(w.id for w in created), listed
    assert all(d.event_type == webhook_store.DROPPED for d in markers), markers
    counts = [int(d.last_error.split(" ")[0]) for d in markers]
    assert sum(counts) == 15, [d.last_error for d in markers]
    assert all("not queued: the tenant had 3 deliveries waiting" in d.last_error for d in markers), markers
    assert {(d.run_id, d.seq) for d in markers} == {(last_run, last_seq)}, markers
    failed = await webhooks.ListWebhookDeliveries(
        wpb.ListWebhookDeliveriesRequest(webhook_id=created[0].id, status=wpb.WEBHOOK_DELIVERY_STATUS_FAILED)
    )
    assert [d.event_type for d in failed.deliveries] == [webhook_store.DROPPED]
    warned = [r.getMessage() for r in caplog.records if r.name == "evalsvc.store.webhooks"]
    assert len(warned) == 1 and "has 3 webhook deliveries waiting: new ones are not queued" in warned[0], warned
    # Each webhook counts what was not queued for it (GetWebhook, ListWebhooks), and so does the metric.
    for webhook in created:
        got = (await webhooks.GetWebhook(wpb.GetWebhookRequest(webhook_id=webhook.id))).webhook
        [marker] = [d for d in markers if d.webhook_id == webhook.id]
        assert got.dropped_event_count == int(marker.last_error.split(" ")[0]), (got, marker)
    listed_hooks = (await webhooks.ListWebhooks(wpb.ListWebhooksRequest())).webhooks
    assert sum(w.dropped_event_count for w in listed_hooks) == 15
    assert server.metrics.registry.get_sample_value("evalsvc_webhook_events_dropped_total") == 15.0


async def test_large_runs_bodies_are_built_once_per_event_off_the_event_loop(
    server: EvalServer,
    webhooks: webhook_service_pb2_grpc.WebhookServiceStub,
    runs: eval_run_service_pb2_grpc.EvalRunServiceStub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A body is the whole run in proto3 JSON (pure-Python json_format, ~0.4 s for 2.7 MB of grader
    definitions). Built on the event loop at every attempt, 50 webhooks on such runs held the loop 16 s
    in 20 s and another tenant's GetRun took 1.4 s. Built once per event in a thread, every webhook gets
    the same documented body, and the loop stays free while they go out (here: 8 webhooks x 3 events
    were 7.6 s of loop stalls, another tenant's GetRun 1.4 s; now ~0.2 s, 0.2 s)."""
    request = create_request(1)
    for g in range(15):
        values = [str(i % 10) for i in range(60_000)]
        request.graders.append(grader_pb2.Grader(name=f"c{g}", contains=grader_pb2.Contains(values=values)))
    other_key, _ = await server.keys.create("other")
    lags: list[float] = []
    # The deliveries wait until the run has ended: what the loop does then is theirs alone (creating and
    # running a run this large costs the loop too, a second or so, and is not this test's subject).
    sender, held = server.webhook_sender, asyncio.Event()
    real_claim = sender._claim

    async def held_claim(room: int) -> int:
        await held.wait()
        return await real_claim(room)

    monkeypatch.setattr(sender, "_claim", held_claim)

    async def sample_lag() -> None:
        while True:
            started = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - started - 0.01)

    with FakeEndpoint(Reply({})) as receiver:
        created = [(await webhooks.CreateWebhook(create_webhook(receiver.url, ALL_TYPES))).webhook for _ in range(8)]
        async with keyed_channel(server.port, other_key) as other:
            theirs = eval_run_service_pb2_grpc.EvalRunServiceStub(other)
            their_run = (await theirs.CreateRun(create_request(1))).run.id
            run_id = (await runs.CreateRun(request, timeout=60)).run.id
            events = await watch_all(runs, run_id)
            await asyncio.sleep(0.2)
            sampler = asyncio.create_task(sample_lag())
            held.set()
            try:
                slowest = 0.0
                deadline = time.monotonic() + WAIT_S
                while len(receiver.seen) < 3 * len(created):
                    assert time.monotonic() < deadline, f"the receiver got {len(receiver.seen)}"
                    started = time.monotonic()
                    await theirs.GetRun(eval_run_service_pb2.GetRunRequest(run_id=their_run))
                    slowest = max(slowest, time.monotonic() - started)
                    await asyncio.sleep(0.02)
            finally:
                sampler.cancel()
    stalled = sum(lag for lag in lags if lag > 0.05)
    assert stalled < 1.5 and slowest < 1.0, (
        f"event loop stalled {stalled:.1f} s; another tenant's GetRun {slowest:.2f} s"
    )
    assert server.webhook_sender._bodies.built == 3, "a body was built again for another webhook or attempt"
    final = [r for r in receiver.seen if b'"type":"run.succeeded"' in r.raw[:40]]
    assert len(final) == len(created) and len({r.raw for r in final}) == 1
    document = {
        "type": "run.succeeded",
        "timestamp": events[-1].event_time.ToJsonString(),
        "data": {"run": json_format.MessageToDict(events[-1].run), "lastSeq": str(events[-1].seq)},
    }
    assert final[0].raw == json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
    verified = 0  # each webhook's copy is signed with its own secret
    for request_seen in final:
        for webhook in created:
            try:
                StandardWebhook(webhook.signing_secret).verify(request_seen.raw, request_seen.headers)
            except Exception:
                continue
            verified += 1
    assert verified == len(created)


async def test_410_fails_the_delivery_and_disables_the_webhook(
    webhooks: webhook_service_pb2_grpc.WebhookServiceStub, runs: eval_run_service_pb2_grpc.EvalRunServiceStub
) -> None:
    with FakeEndpoint(Reply({}, status=410)) as receiver:
        created = (await webhooks.CreateWebhook(create_webhook(receiver.url))).webhook
        await watch_all(runs, (await runs.CreateRun(create_request(1))).run.id)
        [delivery] = await deliveries_when_done(webhooks, created.id, 1)
        assert (delivery.status, delivery.attempts, delivery.last_response_code) == (
            wpb.WEBHOOK_DELIVERY_STATUS_FAILED,
            1,
            410,
        )
        webhook = (await webhooks.GetWebhook(wpb.GetWebhookRequest(webhook_id=created.id))).webhook
        assert not webhook.enabled and "410" in webhook.disabled_reason
        await watch_all(runs, (await runs.CreateRun(create_request(1))).run.id)
        listed = await webhooks.ListWebhookDeliveries(wpb.ListWebhookDeliveriesRequest(webhook_id=created.id))
        assert [d.id for d in listed.deliveries] == [delivery.id], "a disabled webhook got a new delivery"
        # Enabling it again clears the server's reason and delivers the next run.
        enabled = await webhooks.UpdateWebhook(
            wpb.UpdateWebhookRequest(webhook_id=created.id, webhook=wpb.Webhook(enabled=True))
        )
        assert enabled.webhook.enabled and not enabled.webhook.disabled_reason
    assert len(receiver.seen) == 1


async def test_another_tenants_runs_never_reach_this_tenants_webhook(
    server: EvalServer, webhooks: webhook_service_pb2_grpc.WebhookServiceStub
) -> None:
    other_key, _ = await server.keys.create("other")
    with FakeEndpoint(Reply({})) as mine, FakeEndpoint(Reply({})) as theirs:
        my_webhook = (await webhooks.CreateWebhook(create_webhook(mine.url, ALL_TYPES))).webhook
        async with keyed_channel(server.port, other_key) as other:
            their_runs = eval_run_service_pb2_grpc.EvalRunServiceStub(other)
            their_webhooks = webhook_service_pb2_grpc.WebhookServiceStub(other)
            their_webhook = (await their_webhooks.CreateWebhook(create_webhook(theirs.url, ALL_TYPES))).webhook
            their_run = (await their_runs.CreateRun(create_request(2))).run.id
            await watch_all(their_runs, their_run)
            await seen(theirs, 3)
            await deliveries_when_done(their_webhooks, their_webhook.id, 3)
            # "Not yours" is "not found", for every method.
            for call, request in [
                (their_webhooks.GetWebhook, wpb.GetWebhookRequest(webhook_id=my_webhook.id)),
                (their_webhooks.DeleteWebhook, wpb.DeleteWebhookRequest(webhook_id=my_webhook.id)),
                (their_webhooks.RotateWebhookSecret, wpb.RotateWebhookSecretRequest(webhook_id=my_webhook.id)),
                (their_webhooks.ListWebhookDeliveries, wpb.ListWebhookDeliveriesRequest(webhook_id=my_webhook.id)),
                (
                    their_webhooks.UpdateWebhook,
                    wpb.UpdateWebhookRequest(webhook_id=my_webhook.id, webhook=wpb.Webhook(description="x")),
                ),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call(request)
                assert error_reason(caught.value) == "WEBHOOK_NOT_FOUND"
            listed = await their_webhooks.ListWebhooks(wpb.ListWebhooksRequest())
            assert [w.id for w in listed.webhooks] == [their_webhook.id]
    assert mine.seen == []
    assert {r.body["data"]["run"]["id"] for r in theirs.seen} == {their_run}
    mine_listed = await webhooks.ListWebhookDeliveries(wpb.ListWebhookDeliveriesRequest(webhook_id=my_webhook.id))
    assert list(mine_listed.deliveries) == []


async def test_a_receiver_that_never_answers_does_not_slow_runs(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, outbound_allow="127.0.0.1", webhook_concurrency=8, webhook_timeout_s=120.0)
    srv = EvalServer(settings)
    await srv.start()
    try:
        assert srv.bootstrap_key
        async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
            webhooks = webhook_service_pb2_grpc.WebhookServiceStub(channel)
            runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            with FakeEndpoint(Reply({}, delay_s=WAIT_S)) as receiver:
                webhook = (await webhooks.CreateWebhook(create_webhook(receiver.url, ALL_TYPES))).webhook
                run_ids = [(await runs.CreateRun(create_request(20))).run.id for _ in range(6)]
                finals = [(await watch_all(runs, run_id))[-1].run for run_id in run_ids]
                await seen(receiver, 2)
                listed = await webhooks.ListWebhookDeliveries(wpb.ListWebhookDeliveriesRequest(webhook_id=webhook.id))
                # Every run ended while the receiver held the first attempts unanswered: 2 in flight (the
                # tenant's share), the other 16 waiting, none of them in the runs' way.
                assert all(run.status == run_pb2.RUN_STATUS_SUCCEEDED for run in finals)
                assert len(listed.deliveries) == 18
                assert all(d.status == wpb.WEBHOOK_DELIVERY_STATUS_PENDING for d in listed.deliveries)
                assert len(receiver.seen) == 2, "a tenant's share of --webhook-concurrency 8 is 2"
    finally:
        await srv.stop(grace=0.5)


async def test_an_attempt_has_webhook_timeout_s_to_be_answered_as_a_whole(tmp_path: Path) -> None:
    srv = EvalServer(
        make_settings(tmp_path, outbound_allow="127.0.0.1", webhook_timeout_s=7.0, webhook_retry_base_s=0.05)
    )
    await srv.start()
    try:
        assert srv.bootstrap_key
        async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
            webhooks = webhook_service_pb2_grpc.WebhookServiceStub(channel)
            runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            with (
                FakeEndpoint(Reply({}, delay_s=5.5)) as slow,
                FakeEndpoint(Reply({}, delay_s=8.5), Reply({})) as too_slow,
            ):
                slow_id = (await webhooks.CreateWebhook(create_webhook(slow.url))).webhook.id
                too_slow_id = (await webhooks.CreateWebhook(create_webhook(too_slow.url))).webhook.id
                await watch_all(runs, (await runs.CreateRun(create_request(1))).run.id)
                [answered_late] = await deliveries_when_done(webhooks, slow_id, 1)
                [retried] = await deliveries_when_done(webhooks, too_slow_id, 1)
    finally:
        await srv.stop(grace=0.5)
    assert (answered_late.status, answered_late.attempts) == (wpb.WEBHOOK_DELIVERY_STATUS_SUCCEEDED, 1)
    assert (retried.status, retried.attempts) == (wpb.WEBHOOK_DELIVERY_STATUS_SUCCEEDED, 2)
    assert len(too_slow.seen) == 2


async def test_manage_webhooks(webhooks: webhook_service_pb2_grpc.WebhookServiceStub) -> None:
    request = create_webhook("http://127.0.0.1:9/a")
    request.request_id = "hook-1"
    request.webhook.description = "CI"
    created = (await webhooks.CreateWebhook(request)).webhook
    assert created.id.startswith("wh_") and created.enabled
    assert list(created.event_types) == ["run.succeeded", "run.failed", "run.cancelled"]
    replayed = (await webhooks.CreateWebhook(request)).webhook
    assert replayed.id == created.id and replayed.signing_secret == "", "a secret is shown only once"
    got = (await webhooks.GetWebhook(wpb.GetWebhookRequest(webhook_id=created.id))).webhook
    assert got.signing_secret == "" and got.description == "CI"

    update = wpb.UpdateWebhookRequest(
        webhook_id=created.id,
        webhook=wpb.Webhook(url="http://127.0.0.1:9/b", event_types=["run.failed"], enabled=False),
    )
    update.update_mask.paths.extend(["url", "event_types", "enabled"])
    updated = (await webhooks.UpdateWebhook(update)).webhook
    assert (updated.url, list(updated.event_types), updated.enabled) == ("http://127.0.0.1:9/b", ["run.failed"], False)
    assert updated.description == "CI" and updated.disabled_reason == ""

    rotated = (await webhooks.RotateWebhookSecret(wpb.RotateWebhookSecretRequest(webhook_id=created.id))).webhook
    assert rotated.signing_secret.startswith("whsec_") and rotated.signing_secret != created.signing_secret

    listed = await webhooks.ListWebhooks(wpb.ListWebhooksRequest(page_size=1))
    assert [w.id for w in listed.webhooks] == [created.id] and listed.next_page_token == ""
    await webhooks.DeleteWebhook(wpb.DeleteWebhookRequest(webhook_id=created.id))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await webhooks.GetWebhook(wpb.GetWebhookRequest(webhook_id=created.id))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await webhooks.GetWebhook(wpb.GetWebhookRequest(webhook_id="wh_\x00"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_update_webhook_with_the_full_mask_replaces_every_updatable_field(
    webhooks: webhook_service_pb2_grpc.WebhookServiceStub,
) -> None:
    """AIP-134's `*`: every updatable field takes the request's value, one left unset is cleared (an
    unset `enabled` disables; url and event_types cannot be empty). It was "'*' cannot be updated"."""
    request = create_webhook("http://127.0.0.1:9/a")
    request.webhook.description = "CI"
    created = (await webhooks.CreateWebhook(request)).webhook
    update = wpb.UpdateWebhookRequest(
        webhook_id=created.id, webhook=wpb.Webhook(url="http://127.0.0.1:9/b", event_types=["run.failed"])
    )
    update.update_mask.paths.append("*")
    replaced = (await webhooks.UpdateWebhook(update)).webhook
    assert (replaced.url, list(replaced.event_types)) == ("http://127.0.0.1:9/b", ["run.failed"])
    assert (replaced.description, replaced.enabled) == ("", False)
    emptied = wpb.UpdateWebhookRequest(webhook_id=created.id, webhook=wpb.Webhook(enabled=True))
    emptied.update_mask.paths.append("*")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await webhooks.UpdateWebhook(emptied)
    assert {"webhook.url", "webhook.event_types"} <= violations(caught.value).keys()


async def test_bad_webhooks_are_invalid_arguments_naming_the_field(
    webhooks: webhook_service_pb2_grpc.WebhookServiceStub,
) -> None:
    cases = {
        "webhook.url": create_webhook(""),
        "webhook.event_types[1]": create_webhook("http://127.0.0.1:9/", ["run.failed", "run.exploded"]),
    }
    for url in (
        "ftp://127.0.0.1/x",
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest",
        "http://[::1]:80/",
        "http://127.0.0.1:99999/x",  # ports no connection has: every attempt failed, unrecorded, for good
        "http://127.0.0.1:-1/x",
        "http://127.0.0.1:18901:1/x",
    ):
        cases[f"webhook.url {url}"] = create_webhook(url)
    for field, request in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await webhooks.CreateWebhook(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field.split(" ")[0] in violations(caught.value), (field, violations(caught.value))
    assert list((await webhooks.ListWebhooks(wpb.ListWebhooksRequest())).webhooks) == []
    created = (await webhooks.CreateWebhook(create_webhook("http://127.0.0.1:9/"))).webhook
    for update, field in [
        (wpb.UpdateWebhookRequest(webhook_id=created.id, webhook=wpb.Webhook()), "update_mask"),
        (wpb.UpdateWebhookRequest(webhook_id=created.id, webhook=wpb.Webhook(url="http://10.0.0.1/")), "webhook.url"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await webhooks.UpdateWebhook(update)
        assert field in violations(caught.value)
    update = wpb.UpdateWebhookRequest(webhook_id=created.id, webhook=wpb.Webhook())
    update.update_mask.paths.append("event_types")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await webhooks.UpdateWebhook(update)
    assert "webhook.event_types" in violations(caught.value)


MALFORMED_URLS = [
    "http://[::1/",  # urlsplit: "Invalid IPv6 URL"
    "http://a..b.com/",  # the resolver's IDNA codec: "label empty or too long", a UnicodeError
    "http://.example.com/",
    "http://" + "a" * 64 + ".example.com/",
    "http://\x80.com/",
    "http://*.example.com/",
    "http://127.0.0.1:9/a\r\nX-Injected: 1",  # urlsplit drops CR, LF and TAB: stored, never deliverable
    "http://127.0.0.1:9/a\tb",
    "http://127.0.0.1:\n9/x",
    "http://127.0.0.1 :9/sp",
    "http://ci example.com/",
]


async def test_malformed_urls_are_invalid_arguments_naming_the_field_never_internal(
    webhooks: webhook_service_pb2_grpc.WebhookServiceStub, runs: eval_run_service_pb2_grpc.EvalRunServiceStub
) -> None:
    """These were INTERNAL (urlsplit's ValueError, the resolver's UnicodeError, which is no OSError), or
    accepted and stored although no attempt could ever send them, for webhooks and CreateRun endpoints."""
    created = (await webhooks.CreateWebhook(create_webhook("http://127.0.0.1:9/"))).webhook
    for url in MALFORMED_URLS:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await webhooks.CreateWebhook(create_webhook(url))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (url, caught.value.details())
        assert "webhook.url" in violations(caught.value), (url, violations(caught.value))
        update = wpb.UpdateWebhookRequest(webhook_id=created.id, webhook=wpb.Webhook(url=url))
        update.update_mask.paths.append("url")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await webhooks.UpdateWebhook(update)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (url, caught.value.details())
        assert "webhook.url" in violations(caught.value), (url, violations(caught.value))
        target = target_pb2.Target(http=target_pb2.HttpTarget(endpoint=target_pb2.Endpoint(base_url=url)))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await runs.CreateRun(create_request(1, target=target))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (url, caught.value.details())
        assert "target.http.endpoint.base_url" in violations(caught.value), (url, violations(caught.value))
    assert [w.url for w in (await webhooks.ListWebhooks(wpb.ListWebhooksRequest())).webhooks] == [created.url]


async def test_event_types_are_each_named_once_and_no_more_than_there_are(
    webhooks: webhook_service_pb2_grpc.WebhookServiceStub,
) -> None:
    """Probe: UpdateWebhook with event_types ['run.failed'] * 1,300,000 held the event loop a second and
    was accepted, and a repeated type was silently collapsed. More types than exist, or one named twice,
    is INVALID_ARGUMENT naming the field (the element, for a repeat), on create and update, and nothing
    is written."""
    repeated = create_webhook("http://127.0.0.1:9/", ["run.failed", "run.created", "run.failed"])
    too_many = create_webhook("http://127.0.0.1:9/", ["run.failed"] * 100_000)
    for request, expected in [(repeated, "webhook.event_types[2]"), (too_many, "webhook.event_types")]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await webhooks.CreateWebhook(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert list(violations(caught.value)) == [expected]
    assert list((await webhooks.ListWebhooks(wpb.ListWebhooksRequest())).webhooks) == []
    created = (await webhooks.CreateWebhook(create_webhook("http://127.0.0.1:9/", ["run.created"]))).webhook
    for request, expected in [(repeated, "webhook.event_types[2]"), (too_many, "webhook.event_types")]:
        update = wpb.UpdateWebhookRequest(webhook_id=created.id, webhook=request.webhook)
        update.update_mask.paths.append("event_types")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await webhooks.UpdateWebhook(update)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert list(violations(caught.value)) == [expected]
    kept = (await webhooks.GetWebhook(wpb.GetWebhookRequest(webhook_id=created.id))).webhook
    assert list(kept.event_types) == ["run.created"]


async def test_a_receiver_name_that_does_not_resolve_is_accepted_as_a_target_url_is(
    webhooks: webhook_service_pb2_grpc.WebhookServiceStub,
) -> None:
    """docs/webhooks.md's own example was refused ("cannot resolve host 'ci.example.com'") where a
    target on that host was accepted: a name may not be published yet, or DNS be down."""
    for url in ("https://ci.example.com/hooks/evalsvc", "https://hooks.evalsvc.invalid/evalsvc"):
        created = (await webhooks.CreateWebhook(create_webhook(url))).webhook
        assert created.url == url
        await webhooks.DeleteWebhook(wpb.DeleteWebhookRequest(webhook_id=created.id))


async def test_a_receiver_name_is_checked_again_before_and_while_each_attempt_connects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name accepted while it did not resolve is checked before each attempt, and again when the
    attempt connects: one that answers a public address to the check and this machine's to the
    connection (DNS rebinding) reached the receiver on 127.0.0.1 (no --outbound-allow here)."""
    from evalsvc.http import outbound

    answers: list[str] = []  # what the name resolves to, in turn; nothing (a resolver failure) when empty
    real_resolve = outbound._resolve

    async def resolve(host: str, timeout_s: float) -> list[outbound.IPAddress]:
        if host != "localhost":
            return await real_resolve(host, timeout_s)
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [ipaddress.ip_address(answers.pop(0))]

    monkeypatch.setattr(outbound, "_resolve", resolve)
    srv = EvalServer(make_settings(tmp_path, webhook_retry_base_s=0.05, webhook_max_attempts=2))
    await srv.start()
    try:
        assert srv.bootstrap_key
        async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
            webhooks = webhook_service_pb2_grpc.WebhookServiceStub(channel)
            runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            with FakeEndpoint(Reply({})) as receiver:
                url = receiver.url.replace("127.0.0.1", "localhost") + "/hook"
                created = (await webhooks.CreateWebhook(create_webhook(url))).webhook  # not resolving: accepted
                # First attempt: public to the check, 127.0.0.1 to the connection; second: internal to the check.
                answers.extend(["8.8.8.8", "127.0.0.1", "169.254.169.254"])
                await watch_all(runs, (await runs.CreateRun(create_request(1))).run.id)
                [delivery] = await deliveries_when_done(webhooks, created.id, 1)
            assert receiver.seen == []
    finally:
        await srv.stop(grace=0.5)
    assert delivery.status == wpb.WEBHOOK_DELIVERY_STATUS_FAILED and delivery.attempts == 2
    assert "169.254.169.254:" in delivery.last_error and "is not allowed (not globally routable" in delivery.last_error


async def test_a_tenant_has_at_most_50_webhooks(webhooks: webhook_service_pb2_grpc.WebhookServiceStub) -> None:
    for i in range(50):
        await webhooks.CreateWebhook(create_webhook(f"http://127.0.0.1:9/{i}"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await webhooks.CreateWebhook(create_webhook("http://127.0.0.1:9/one-more"))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(caught.value) == "TENANT_QUOTA_EXCEEDED"
    assert len((await webhooks.ListWebhooks(wpb.ListWebhooksRequest(page_size=100))).webhooks) == 50


async def test_a_rotated_secret_keeps_signing_alongside_the_new_one_unless_revoked(
    webhooks: webhook_service_pb2_grpc.WebhookServiceStub, runs: eval_run_service_pb2_grpc.EvalRunServiceStub
) -> None:
    with FakeEndpoint(Reply({})) as receiver:
        created = (await webhooks.CreateWebhook(create_webhook(receiver.url))).webhook
        rotate = wpb.RotateWebhookSecretRequest(webhook_id=created.id)
        rotated = (await webhooks.RotateWebhookSecret(rotate)).webhook
        await watch_all(runs, (await runs.CreateRun(create_request(1))).run.id)
        await seen(receiver, 1)
        rotate.revoke_previous = True
        revoked = (await webhooks.RotateWebhookSecret(rotate)).webhook
        await watch_all(runs, (await runs.CreateRun(create_request(1))).run.id)
        await seen(receiver, 2)
    first, second = receiver.seen
    assert len(first.headers["webhook-signature"].split(" ")) == 2
    StandardWebhook(created.signing_secret).verify(first.raw, first.headers)
    StandardWebhook(rotated.signing_secret).verify(first.raw, first.headers)
    assert len(second.headers["webhook-signature"].split(" ")) == 1
    StandardWebhook(revoked.signing_secret).verify(second.raw, second.headers)


def test_backoff_schedule_starts_within_10_s_grows_4x_and_honours_retry_after() -> None:
    import random

    rng = random.Random(7)
    for _ in range(100):
        first = retry_delay(1, 5.0, None, rng)
        assert 2.5 <= first <= 5.0
        assert 10.0 <= retry_delay(2, 5.0, None, rng) <= 20.0
        assert 1800.0 <= retry_delay(9, 5.0, None, rng) <= 3600.0
    assert retry_delay(3, 5.0, 1.5, rng) == 1.5


async def test_rest_routes_under_v1_webhooks(tmp_path: Path) -> None:
    from tests.helpers import serving_gateway

    settings = make_settings(tmp_path, http_addr="127.0.0.1:0", outbound_allow="127.0.0.1")
    async with serving_gateway(settings) as (_, client):
        created = await client.post("/v1/webhooks", json={"webhook": {"url": "http://127.0.0.1:9/h"}})
        assert created.status_code == 200, created.text
        webhook = created.json()["webhook"]
        assert webhook["signingSecret"].startswith("whsec_") and webhook["eventTypes"][0] == "run.succeeded"
        # proto3 JSON: an int64 is a string; the circuit's end is absent while it is closed.
        assert (webhook["droppedEventCount"], webhook["consecutiveFailures"]) == ("0", 0), webhook
        assert "circuitOpenUntil" not in webhook
        patched = await client.patch(
            f"/v1/webhooks/{webhook['id']}", params={"update_mask": "enabled"}, json={"enabled": False}
        )
        assert patched.status_code == 200 and patched.json()["webhook"]["enabled"] is False, patched.text
        rotated = await client.post(f"/v1/webhooks/{webhook['id']}:rotateSecret", json={})
        assert rotated.json()["webhook"]["signingSecret"] != webhook["signingSecret"]
        deliveries = await client.get(f"/v1/webhooks/{webhook['id']}/deliveries")
        assert deliveries.status_code == 200 and deliveries.json().get("deliveries", []) == []
        assert (await client.delete(f"/v1/webhooks/{webhook['id']}")).status_code == 200
        assert (await client.get(f"/v1/webhooks/{webhook['id']}")).status_code == 404
        bad = await client.post("/v1/webhooks", json={"webhook": {"url": "http://10.0.0.1/"}})
        assert bad.status_code == 400


# --- Durability: real server processes, killed with SIGKILL.


@pytest.mark.slow
async def test_kill_9_between_the_terminal_status_and_the_send_still_delivers_after_restart(tmp_path: Path) -> None:
    db = dbs.db_url(tmp_path, "svc.db")
    env = {"EVALSVC_OUTBOUND_ALLOW": "127.0.0.1"}
    # The sender looks for due deliveries at start and then every --poll-interval-s: with 600 s it cannot
    # send before the kill, so the kill lands after the commit and before any send.
    first = await start_server(db, tmp_path / "a.log", "--poll-interval-s", "600", env=env, forked=True)
    key = first.bootstrap_key()
    assert key
    with FakeEndpoint(Reply({})) as receiver:
        try:
            async with keyed_channel(first.port, key) as channel:
                webhooks = webhook_service_pb2_grpc.WebhookServiceStub(channel)
                runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
                secret = (await webhooks.CreateWebhook(create_webhook(receiver.url))).webhook.signing_secret
                run_id = (await runs.CreateRun(create_request(3))).run.id
                terminal = (await watch_all(runs, run_id))[-1]
        finally:
            first.kill()
        assert terminal.run.status == run_pb2.RUN_STATUS_SUCCEEDED and receiver.seen == []
        restarted = time.monotonic()
        second = await start_server(db, tmp_path / "b.log", env=env, forked=True)
        try:
            assert await asyncio.to_thread(receiver.wait_seen, 1, 30.0), "not delivered within 30 s of restart"
            assert time.monotonic() - restarted < 30.0
        finally:
            second.terminate()
    [request] = receiver.seen
    body = StandardWebhook(secret).verify(request.raw, request.headers)
    assert body["type"] == "run.succeeded" and body["data"]["run"]["id"] == run_id
    assert body["data"]["lastSeq"] == str(terminal.seq)


class HoldingReceiver:
    """A receiver that answers its first request only after `release` is set (it holds the sender
    mid-attempt) and every later one at once with 200."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.arrived = threading.Condition()
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                with receiver.arrived:
                    receiver.ids.append(self.headers["webhook-id"])
                    first = len(receiver.ids) == 1
                    receiver.arrived.notify_all()
                if first:
                    receiver.release.wait(WAIT_S)
                try:
                    self.send_response(200)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the sender was killed while we held it

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float) -> bool:
        with self.arrived:
            return self.arrived.wait_for(lambda: len(self.ids) >= count, timeout)

    def close(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.mark.slow
async def test_disabling_a_webhook_mid_attempt_keeps_what_the_receiver_answered(
    webhooks: webhook_service_pb2_grpc.WebhookServiceStub, runs: eval_run_service_pb2_grpc.EvalRunServiceStub
) -> None:
    """Disabling a webhook failed every PENDING delivery, leased ones too: the one whose attempt was under
    way was listed FAILED "not sent: the webhook was disabled", 0 attempts, though the receiver got it
    and answered 200 (the sender's outcome was then refused). A held delivery is left to its sender."""
    receiver = HoldingReceiver()
    try:
        created = (await webhooks.CreateWebhook(create_webhook(receiver.url + "/hook"))).webhook
        await watch_all(runs, (await runs.CreateRun(create_request(1))).run.id)
        assert await asyncio.to_thread(receiver.wait_for, 1, WAIT_S), "the attempt never arrived"
        disable = wpb.UpdateWebhookRequest(webhook_id=created.id, webhook=wpb.Webhook(enabled=False))
        disable.update_mask.paths.append("enabled")
        await webhooks.UpdateWebhook(disable)
        receiver.release.set()  # the receiver answers 200 now
        [delivery] = await deliveries_when_done(webhooks, created.id, 1)
        assert delivery.id == receiver.ids[0]
        assert (delivery.status, delivery.attempts, delivery.last_response_code) == (
            wpb.WEBHOOK_DELIVERY_STATUS_SUCCEEDED,
            1,
            200,
        ), delivery
    finally:
        receiver.close()


async def test_kill_9_during_a_send_sends_again_with_the_same_webhook_id(tmp_path: Path) -> None:
    db = dbs.db_url(tmp_path, "svc.db")
    env = {"EVALSVC_OUTBOUND_ALLOW": "127.0.0.1"}
    receiver = HoldingReceiver()
    try:
        # The kill comes right after the request arrives, well within the default 10 s attempt timeout.
        first = await start_server(db, tmp_path / "a.log", env=env, forked=True)
        key = first.bootstrap_key()
        assert key
        try:
            async with keyed_channel(first.port, key) as channel:
                webhooks = webhook_service_pb2_grpc.WebhookServiceStub(channel)
                runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
                webhook_id = (await webhooks.CreateWebhook(create_webhook(receiver.url))).webhook.id
                await watch_all(runs, (await runs.CreateRun(create_request(2))).run.id)
                assert await asyncio.to_thread(receiver.wait_for, 1, WAIT_S)
        finally:
            first.kill()  # mid-attempt: the receiver holds the request unanswered
        second = await start_server(db, tmp_path / "b.log", env=env, forked=True)
        try:
            assert await asyncio.to_thread(receiver.wait_for, 2, 30.0), "not resent within 30 s of restart"
            async with keyed_channel(second.port, key) as channel:
                webhooks = webhook_service_pb2_grpc.WebhookServiceStub(channel)
                [delivery] = await deliveries_when_done(webhooks, webhook_id, 1)
        finally:
            second.terminate()
    finally:
        receiver.close()
    assert receiver.ids == [delivery.id, delivery.id]
    assert delivery.status == wpb.WEBHOOK_DELIVERY_STATUS_SUCCEEDED


# --- PostgreSQL replicas share the outbox.


class ConcurrencyReceiver:
    """Answers each request after a short hold and records, per webhook-id, how many attempts of it
    were in flight at once."""

    def __init__(self, hold_s: float) -> None:
        self.lock = threading.Lock()
        self.in_flight: dict[str, int] = {}
        self.most_at_once: dict[str, int] = {}
        self.count = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                message_id = self.headers["webhook-id"]
                with receiver.lock:
                    receiver.count += 1
                    receiver.in_flight[message_id] = receiver.in_flight.get(message_id, 0) + 1
                    receiver.most_at_once[message_id] = max(
                        receiver.most_at_once.get(message_id, 0), receiver.in_flight[message_id]
                    )
                time.sleep(hold_s)  # the request's own thread: holding it is the point
                with receiver.lock:
                    receiver.in_flight[message_id] -= 1
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.mark.slow
@pytest.mark.skipif((reason := dbs.postgres_unavailable()) is not None, reason=reason or "PostgreSQL is not reachable")
async def test_postgres_replicas_share_the_outbox_without_sending_one_delivery_twice_at_once(tmp_path: Path) -> None:
    url = dbs.postgres_url(tmp_path, "replicas")
    env = {"EVALSVC_OUTBOUND_ALLOW": "127.0.0.1"}
    fast = ("--poll-interval-s", "0.1", "--webhook-concurrency", "8", "--metrics-addr", "127.0.0.1:0")
    receiver = ConcurrencyReceiver(hold_s=0.3)
    first = await start_server(url, tmp_path / "a.log", *fast, env=env, forked=True)
    second = None
    try:
        key = first.bootstrap_key()
        assert key
        second = await start_server(url, tmp_path / "b.log", *fast, env=env, forked=True)
        async with keyed_channel(first.port, key) as a, keyed_channel(second.port, key) as b:
            webhooks = webhook_service_pb2_grpc.WebhookServiceStub(a)
            webhook = (await webhooks.CreateWebhook(create_webhook(receiver.url, ALL_TYPES))).webhook
            stubs = [eval_run_service_pb2_grpc.EvalRunServiceStub(c) for c in (a, b)]
            run_ids = [(await stubs[i % 2].CreateRun(create_request(2))).run.id for i in range(12)]
            for i, run_id in enumerate(run_ids):
                await watch_all(stubs[i % 2], run_id)
            deliveries = await deliveries_when_done(webhooks, webhook.id, 36)
            sent_by = [await successful_attempts(process.log_path) for process in (first, second)]
    finally:
        for process in (first, second):
            if process is not None:
                process.terminate()
        receiver.close()
    assert len(deliveries) == 36  # created, started, succeeded x 12
    assert all(d.status == wpb.WEBHOOK_DELIVERY_STATUS_SUCCEEDED for d in deliveries)
    assert set(receiver.most_at_once) == {d.id for d in deliveries}
    assert max(receiver.most_at_once.values()) == 1, "one delivery was in flight twice at the same time"
    logs = [(tmp_path / name).read_text() for name in ("a.log", "b.log")]
    assert all("Traceback" not in log for log in logs)
    assert [d.attempts for d in deliveries] == [1] * 36 and receiver.count == 36
    assert sum(sent_by) == 36 and min(sent_by) > 0, f"the replicas sent {sent_by}: one did not share the outbox"


async def successful_attempts(log_path: Path) -> int:
    """evalsvc_webhook_attempts_total{outcome="succeeded"} of the server process logging to log_path."""
    [port] = re.findall(r"metrics at http://127.0.0.1:(\d+)/metrics", log_path.read_text())
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    found = re.search(r'^evalsvc_webhook_attempts_total\{outcome="succeeded"\} ([0-9.]+)$', text, re.M)
    return int(float(found.group(1))) if found else 0


async def test_finished_deliveries_are_deleted_after_the_retention_period_a_chunk_per_transaction(
    server: EvalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prune was one DELETE of every old row, through no index, in the sender loop and at every
    start: 3,000,000 recent and 1,000,000 old rows held SQLite's one writer 3.8 s (another tenant's
    CreateRun took 4.4 s). It deletes PRUNE_CHUNK rows a transaction now, between the sender's claims,
    and only the deliveries that ended before the retention; the first prune waits 30-60 s after start
    (not 5-10 min: a server restarted more often than that had never pruned)."""
    from sqlalchemy import insert, select

    from evalsvc.store import webhooks as store
    from evalsvc.webhooks.sender import FIRST_PRUNE_AFTER_S, RETENTION_S

    sender = server.webhook_sender
    first_prune_in = sender._next_prune - time.time()
    assert first_prune_in >= FIRST_PRUNE_AFTER_S - 10, "a prune is due at start"
    assert first_prune_in <= 2 * FIRST_PRUNE_AFTER_S, "a server restarted every few minutes would never prune"
    now = time.time()
    old = now - RETENTION_S - 3600

    def row(delivery_id: str, status: int, created: float) -> dict[str, Any]:
        pending = status == store.PENDING
        return {
            **{"id": delivery_id, "tenant": "t", "webhook_id": "wh_x", "event_type": "run.failed", "run_id": "run_x"},
            **{"seq": 1, "status": status, "attempts": 1, "last_response_code": 0, "last_error": ""},
            **{"create_time": created, "next_attempt_time": now + 3600 if pending else None},
        }

    doomed = [row(f"msg_old_{i:05d}", (store.SUCCEEDED, store.FAILED)[i % 2], old - i) for i in range(2500)]
    kept_rows = [row("msg_old_pending", store.PENDING, old), row("msg_recent_ok", store.SUCCEEDED, now)]
    await server.db.transact(lambda conn: conn.execute(insert(store.DELIVERIES), doomed + kept_rows))
    chunks: list[int] = []
    prune = store.prune

    async def counted(*args: Any) -> int:
        deleted = await prune(*args)
        chunks.append(deleted)
        return deleted

    monkeypatch.setattr(store, "prune", counted)
    sender._next_prune = 0.0  # what comes every PRUNE_EVERY_S
    sender._wake.set()
    deadline = time.monotonic() + WAIT_S
    while not chunks or chunks[-1] >= store.PRUNE_CHUNK or sender._prune_before is not None:
        assert time.monotonic() < deadline, chunks
        await asyncio.sleep(0.05)
    async with server.db.read() as conn:
        kept = {r for (r,) in await conn.execute(select(store.DELIVERIES.c.id))}
    assert kept == {"msg_old_pending", "msg_recent_ok"}
    assert sum(chunks) == 2500 and len(chunks) == 3 and max(chunks) == store.PRUNE_CHUNK, chunks
    assert sender._next_prune > time.time() + 3000, "the next prune is not an hour away"


async def deliver_a_run(srv: EvalServer, url: str) -> None:
    """A webhook to `url`, then a one-item run to its end: the run's delivery is in the outbox."""
    assert srv.bootstrap_key
    async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
        webhooks = webhook_service_pb2_grpc.WebhookServiceStub(channel)
        runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
        await webhooks.CreateWebhook(create_webhook(url))
        await watch_all(runs, (await runs.CreateRun(create_request(1))).run.id)


async def the_one_delivery(db_url: str) -> dict[str, Any]:
    """The database's one delivery, read once its server has stopped."""
    from sqlalchemy import select

    from evalsvc.store.db import Database

    db = Database(db_url)
    try:
        async with db.read() as conn:
            [row] = (await conn.execute(select(webhook_store.DELIVERIES))).mappings().all()
    finally:
        await db.close()
    return dict(row)


async def test_a_stopping_server_abandons_attempts_in_flight_and_hands_their_deliveries_back(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, outbound_allow="127.0.0.1", webhook_timeout_s=120.0)
    receiver = HoldingReceiver()
    try:
        srv = EvalServer(settings)
        await srv.start()
        try:
            await deliver_a_run(srv, receiver.url)
            assert await asyncio.to_thread(receiver.wait_for, 1, WAIT_S)
        finally:
            stopping = time.monotonic()
            await srv.stop(grace=0.5)
        assert time.monotonic() - stopping < 30.0, "stop waited for the receiver"
    finally:
        receiver.close()
    row = await the_one_delivery(settings.db)
    assert (row["status"], row["attempts"], row["claim_id"], row["lease_expiry"]) == (
        webhook_store.PENDING,
        0,
        None,
        None,
    )


async def test_deliveries_a_claim_leased_as_the_stop_began_are_handed_back(tmp_path: Path) -> None:
    """A claim that commits after the sender's stop has begun starts its sends, which see the stop and
    return unattempted. They stayed leased (until 2 x the timeout + 5 s: another replica could not send
    them meanwhile), since the stop hands back only the sends still in flight, and these had ended. The
    sender polls once a minute here, so the run's delivery waits unclaimed until the test claims it."""
    settings = make_settings(tmp_path, outbound_allow="127.0.0.1", poll_interval_s=60.0)
    receiver = HoldingReceiver()
    try:
        srv = EvalServer(settings)
        await srv.start()
        try:
            await deliver_a_run(srv, receiver.url)
            sender = srv.webhook_sender
            sender._stopping = True  # the stop has begun; the claim below is the one it came during
            assert await sender._claim(1) == 1
            await asyncio.sleep(0)  # the send it started runs, and returns without an attempt
        finally:
            await srv.stop(grace=0.5)
    finally:
        receiver.close()
    assert receiver.ids == []
    row = await the_one_delivery(settings.db)
    assert (row["status"], row["attempts"], row["claim_id"], row["lease_expiry"]) == (
        webhook_store.PENDING,
        0,
        None,
        None,
    )
