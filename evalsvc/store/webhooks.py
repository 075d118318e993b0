"""Queries on webhooks and their delivery outbox.

`enqueue` runs inside the transaction that changes a run's status, so a notification commits (or
not) with the status it reports. Senders lease due deliveries as executors lease jobs (see
evalsvc.store.jobs): a claim gives a batch one `claim_id` and a lease; an attempt's outcome is
recorded only while that claim still holds it, and an expired lease (a sender that died) makes the
delivery claimable again. On PostgreSQL claims skip rows another replica is claiming.

A webhook's circuit breaker (evalsvc.webhooks.sender) is kept in its row, so every replica honours it:
no delivery of a webhook whose circuit is open is due (`_due`), and its deliveries are moved to the end
of its cooldown (`hold_for_circuit`, and `enqueue_many` for new ones), so claims do not read through
them while it lasts.

Lock order: a transaction that changes deliveries and their webhook changes the deliveries first.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from sqlalchemy import Select, Update, delete, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.ids import new_id
from evalsvc.messages import webhook_events as events
from evalsvc.store import quotas
from evalsvc.store.db import tally
from evalsvc.store.models import EventRow, WebhookDeliveryRow, WebhookRow
from evalsvc.store.records import ClaimedDelivery, WebhookDeliveryRecord, WebhookRecord
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import webhook_service_pb2 as wpb

log = logging.getLogger(__name__)

WEBHOOKS = WebhookRow.__table__  # type: ignore[attr-defined]
DELIVERIES = WebhookDeliveryRow.__table__  # type: ignore[attr-defined]
EVENTS = EventRow.__table__  # type: ignore[attr-defined]

# Deliveries one tenant may have waiting. Past it, new deliveries are not written (a WARNING says so, at
# most once a minute per tenant): receivers that never answer let 50 webhooks x 20 runs/s queue ~3,000
# deliveries a second, kept while pending, and every claim of due deliveries read through that
# tenant's backlog inside the write transaction (2.1 M waiting: another tenant's CreateRun 0.13 ->
# 0.35 s at worst). Written as FAILED instead, they still grew the table ~3,000 rows a second.
MAX_PENDING_PER_TENANT = 10_000
BACKLOG_WARNING_S = 60.0
_backlog_warned: dict[str, float] = {}  # tenant -> when its full backlog was last logged

PENDING = wpb.WEBHOOK_DELIVERY_STATUS_PENDING
SUCCEEDED = wpb.WEBHOOK_DELIVERY_STATUS_SUCCEEDED
FAILED = wpb.WEBHOOK_DELIVERY_STATUS_FAILED
# What a delivery its webhook was disabled before it was sent becomes (disabling fails those no sender
# holds; a sender handing back what it held fails those too).
_UNSENT_DISABLED: dict[str, Any] = {
    "status": FAILED,
    "next_attempt_time": None,
    "claim_id": None,
    "lease_expiry": None,
    "last_error": "not sent: the webhook was disabled",
}
# A closed circuit: what a 2xx, re-enabling the webhook or changing its url leaves (`close_circuit`).
CIRCUIT_CLOSED: dict[str, Any] = {"consecutive_failures": 0, "circuit_open_until": None, "circuit_opens": 0}
# The name of the count of events not queued, for evalsvc.metrics (evalsvc.store.db.tally).
EVENTS_DROPPED = "webhook_events_dropped"


async def enqueue(conn: AsyncConnection, tenant: str, event: pb.WatchRunResponse) -> None:
    """Write the deliveries of one run status event (see `enqueue_many`)."""
    await enqueue_many(conn, [(tenant, event)])


async def enqueue_many(conn: AsyncConnection, tenant_events: Sequence[tuple[str, pb.WatchRunResponse]]) -> None:
    """Write one delivery per enabled webhook of the event's tenant that subscribed to its run status
    event, for several events: one read of the tenants' webhooks, one insert. A delivery to a webhook
    whose circuit is open is first due when the circuit's cooldown ends, as its others are."""
    typed = [
        (tenant, event, event_type)
        for tenant, event in tenant_events
        if (event_type := events.type_of_status(event.run.status)) is not None
    ]
    if not typed:
        return
    subscribed = await conn.execute(
        select(WEBHOOKS.c.id, WEBHOOKS.c.tenant, WEBHOOKS.c.event_mask, WEBHOOKS.c.circuit_open_until).where(
            WEBHOOKS.c.tenant.in_(sorted({tenant for tenant, _, _ in typed})), WEBHOOKS.c.enabled.is_(True)
        )
    )
    now = time.time()
    hooks: dict[str, list[tuple[str, int, float]]] = {}  # tenant -> (webhook, event mask, when first due)
    for webhook_id, tenant, mask, open_until in subscribed:
        hooks.setdefault(tenant, []).append((webhook_id, mask, max(now, open_until or now)))
    if not hooks:
        return
    room = await _backlog_room(conn, sorted(hooks))
    rows = []
    dropped: dict[tuple[str, str], tuple[int, str, int]] = {}  # (tenant, webhook) -> (count, run, seq)
    for tenant, event, event_type in typed:
        for webhook_id, mask, due in hooks.get(tenant, ()):
            if not mask & events.bit(event_type):
                continue
            if room[tenant] <= 0:  # full: this delivery (and the tenant's others here) is not written
                _warn_of_full_backlog(tenant, now)
                count = dropped.get((tenant, webhook_id), (0, "", 0))[0]
                dropped[(tenant, webhook_id)] = (count + 1, event.run.id, event.seq)
                continue
            room[tenant] -= 1
            rows.append(
                {
                    "id": new_id("msg"),
                    "tenant": tenant,
                    "webhook_id": webhook_id,
                    "event_type": event_type,
                    "run_id": event.run.id,
                    "seq": event.seq,
                    "status": PENDING,
                    "attempts": 0,
                    "next_attempt_time": due,
                    "last_response_code": 0,
                    "last_error": "",
                    "create_time": now,
                }
            )
    if rows:
        await conn.execute(insert(DELIVERIES), rows)
    for (tenant, webhook_id), (count, run_id, seq) in sorted(dropped.items()):
        await _mark_dropped(conn, tenant, webhook_id, count, run_id, seq, now)


# The event type of the FAILED delivery that tells a tenant its events were not queued (`_mark_dropped`).
DROPPED = "events.dropped"
_DROPPED_ERROR = re.compile(r"(\d+) events? not queued")


async def _mark_dropped(
    conn: AsyncConnection, tenant: str, webhook_id: str, count: int, run_id: str, seq: int, now: float
) -> None:
    """Record, where the tenant looks (ListWebhookDeliveries), that `count` events for a webhook were not
    queued because the tenant's backlog was full: one FAILED delivery of event type DROPPED per streak
    of drops, counting them (`last_error`), its run_id and seq the last event dropped (from which
    WatchRun or GetRun catch up). A streak goes on while that marker is the webhook's newest delivery;
    a delivery queued since starts a new one. So the markers are at most one per delivery actually
    queued, and the drops (a log line only, once a minute, before) cost an indexed read and a write of
    one row per webhook and transaction, not a row per event (~3,000 a second with 50 webhooks).
    The webhook counts them too (its dropped_event_count), and so does this process's metric once the
    transaction commits."""
    newest = (
        await conn.execute(
            select(DELIVERIES.c.id, DELIVERIES.c.event_type, DELIVERIES.c.last_error)
            .where(DELIVERIES.c.webhook_id == webhook_id, DELIVERIES.c.tenant == tenant)
            .order_by(DELIVERIES.c.id.desc())
            .limit(1)
        )
    ).first()
    streak = count
    if newest is not None and newest.event_type == DROPPED and (counted := _DROPPED_ERROR.match(newest.last_error)):
        streak += int(counted.group(1))
    else:
        newest = None
    error = (
        f"{streak} event{'s' if streak != 1 else ''} not queued: the tenant had {MAX_PENDING_PER_TENANT} "
        "deliveries waiting (run_id and seq: the last one; GetRun or WatchRun has them)"
    )
    values = {"run_id": run_id, "seq": seq, "last_error": error, "last_attempt_time": now}
    if newest is not None:
        await conn.execute(update(DELIVERIES).where(DELIVERIES.c.id == newest.id).values(**values))
    else:
        await _insert_dropped_marker(conn, tenant, webhook_id, values, now)
    await conn.execute(
        update(WEBHOOKS)
        .where(WEBHOOKS.c.id == webhook_id, WEBHOOKS.c.tenant == tenant)
        .values(dropped_events=WEBHOOKS.c.dropped_events + count)
    )
    tally(conn, EVENTS_DROPPED, count)


async def _insert_dropped_marker(
    conn: AsyncConnection, tenant: str, webhook_id: str, values: Mapping[str, Any], now: float
) -> None:
    """The FAILED delivery of event type DROPPED that starts a streak of drops (`_mark_dropped`)."""
    await conn.execute(
        insert(DELIVERIES).values(
            id=new_id("msg"),
            tenant=tenant,
            webhook_id=webhook_id,
            event_type=DROPPED,
            status=FAILED,
            attempts=0,
            next_attempt_time=None,
            last_response_code=0,
            create_time=now,
            **values,
        )
    )


def _warn_of_full_backlog(tenant: str, now: float) -> None:
    """Say, at most once a BACKLOG_WARNING_S per tenant, that its new deliveries are not written."""
    if now - _backlog_warned.get(tenant, 0.0) < BACKLOG_WARNING_S:
        return
    _backlog_warned[tenant] = now
    log.warning(
        "tenant %r has %d webhook deliveries waiting: new ones are not queued until its receivers catch up "
        "(or its webhooks are disabled)",
        tenant,
        MAX_PENDING_PER_TENANT,
    )


async def _backlog_room(conn: AsyncConnection, tenants: Sequence[str]) -> dict[str, int]:
    """How many more deliveries each tenant may have waiting, up to MAX_PENDING_PER_TENANT: one count
    each, through ix_webhook_deliveries_tenant_due, reading at most that many index entries. The cap is on
    what a transaction adds, not only checked before it: one event to 50 webhooks (or a transaction
    changing many runs) passed it by 50 x the runs."""
    room = {}
    for tenant in tenants:
        waiting = (
            select(DELIVERIES.c.id)
            .where(DELIVERIES.c.tenant == tenant, DELIVERIES.c.status == PENDING)
            .limit(MAX_PENDING_PER_TENANT)
            .subquery()
        )
        counted = (await conn.execute(select(func.count()).select_from(waiting))).scalar_one()
        room[tenant] = MAX_PENDING_PER_TENANT - int(counted)
    return room


async def insert_webhook(conn: AsyncConnection, webhook: WebhookRecord) -> None:
    """Store a new webhook."""
    await conn.execute(insert(WEBHOOKS).values(**asdict(webhook)))


async def get_webhook(conn: AsyncConnection, tenant: str, webhook_id: str) -> WebhookRecord | None:
    """A tenant's webhook, or None (also for another tenant's)."""
    found = await conn.execute(select(WEBHOOKS).where(WEBHOOKS.c.id == webhook_id, WEBHOOKS.c.tenant == tenant))
    row = found.mappings().first()
    return None if row is None else WebhookRecord.from_row(row)


async def find_by_request_id(conn: AsyncConnection, tenant: str, request_id: str) -> WebhookRecord | None:
    """The webhook created with this idempotency key."""
    found = await conn.execute(select(WEBHOOKS).where(WEBHOOKS.c.tenant == tenant, WEBHOOKS.c.request_id == request_id))
    row = found.mappings().first()
    return None if row is None else WebhookRecord.from_row(row)


async def count_webhooks(conn: AsyncConnection, tenant: str) -> int:
    """How many webhooks a tenant has, for its cap (a write transaction: evalsvc.store.quotas)."""
    return await quotas.held(conn, WEBHOOKS, tenant)


async def list_webhooks(
    conn: AsyncConnection, tenant: str, *, before_id: str | None, limit: int
) -> list[WebhookRecord]:
    """A tenant's webhooks, newest first."""
    query = select(WEBHOOKS).where(WEBHOOKS.c.tenant == tenant)
    if before_id:
        query = query.where(WEBHOOKS.c.id < before_id)
    rows = await conn.execute(query.order_by(WEBHOOKS.c.id.desc()).limit(limit))
    return [WebhookRecord.from_row(row) for row in rows.mappings()]


async def update_webhook(
    conn: AsyncConnection, tenant: str, webhook_id: str, values: Mapping[str, Any]
) -> WebhookRecord | None:
    """Change a webhook's columns. Disabling it fails its deliveries not yet sent (they would never be),
    first: deliveries are changed before their webhook. A delivery a sender holds (its attempt may be
    under way) is left to the sender, which records what the receiver answered and does not retry it
    (`fail_if_disabled`): it was marked "not sent" although the receiver had got it and answered 200.
    Returns the changed webhook, or None when there is no such webhook."""
    if values.get("enabled") is False:
        now = time.time()
        await conn.execute(
            update(DELIVERIES)
            .where(
                DELIVERIES.c.webhook_id == webhook_id,
                DELIVERIES.c.tenant == tenant,
                DELIVERIES.c.status == PENDING,
                or_(DELIVERIES.c.claim_id.is_(None), DELIVERIES.c.lease_expiry < now),
            )
            .values(**_UNSENT_DISABLED)
        )
    changed = await conn.execute(
        update(WEBHOOKS)
        .where(WEBHOOKS.c.id == webhook_id, WEBHOOKS.c.tenant == tenant)
        .values(**values)
        .returning(*WEBHOOKS.c)
    )
    row = changed.mappings().first()
    return None if row is None else WebhookRecord.from_row(row)


async def delete_webhook(conn: AsyncConnection, tenant: str, webhook_id: str) -> bool:
    """Delete a webhook and (first) its deliveries; False when there is no such webhook."""
    await conn.execute(delete(DELIVERIES).where(DELIVERIES.c.webhook_id == webhook_id, DELIVERIES.c.tenant == tenant))
    deleted = await conn.execute(
        delete(WEBHOOKS).where(WEBHOOKS.c.id == webhook_id, WEBHOOKS.c.tenant == tenant).returning(WEBHOOKS.c.id)
    )
    return deleted.first() is not None


async def list_deliveries(
    conn: AsyncConnection, tenant: str, webhook_id: str, *, status: int, before_id: str | None, limit: int
) -> list[WebhookDeliveryRecord]:
    """A webhook's deliveries, newest first."""
    query = select(DELIVERIES).where(DELIVERIES.c.webhook_id == webhook_id, DELIVERIES.c.tenant == tenant)
    if status:
        query = query.where(DELIVERIES.c.status == status)
    if before_id:
        query = query.where(DELIVERIES.c.id < before_id)
    rows = await conn.execute(query.order_by(DELIVERIES.c.id.desc()).limit(limit))
    return [WebhookDeliveryRecord.from_row(row) for row in rows.mappings()]


# What `claim_due` reads of a delivery it leased, its webhook and its event: a ClaimedDelivery's fields.
# A delivery claimed while its webhook's circuit is half-open (its cooldown over: an open one's are not
# due) is sent only as that webhook's probe (`_screen`).
CLAIMED_COLUMNS = (
    DELIVERIES.c.id,
    DELIVERIES.c.tenant,
    DELIVERIES.c.webhook_id,
    DELIVERIES.c.event_type,
    DELIVERIES.c.run_id,
    DELIVERIES.c.seq,
    DELIVERIES.c.attempts,
    DELIVERIES.c.claim_id,
    WEBHOOKS.c.url,
    WEBHOOKS.c.secret,
    WEBHOOKS.c.previous_secret,
    WEBHOOKS.c.previous_secret_expire_time,
    EVENTS.c.payload,
    WEBHOOKS.c.circuit_open_until.is_not(None).label("probe"),
)


def _due(now: float) -> list[Any]:
    """Deliveries that wait for an attempt now, that no live sender holds, and whose webhook's circuit is
    not open (while it is, they wait: those `hold_for_circuit` has not moved to its end yet, or a
    half-open webhook's handed back while its probe is under way, are read past here)."""
    return [
        DELIVERIES.c.status == PENDING,
        DELIVERIES.c.next_attempt_time <= now,
        or_(DELIVERIES.c.lease_expiry.is_(None), DELIVERIES.c.lease_expiry < now),
        ~_of_webhook(WEBHOOKS.c.circuit_open_until > now),
    ]


def _of_webhook(condition: Any) -> Any:
    """A delivery's webhook meets `condition` (a correlated EXISTS, through the webhook's primary key)."""
    return select(WEBHOOKS.c.id).where(WEBHOOKS.c.id == DELIVERIES.c.webhook_id, condition).exists()


async def any_due(conn: AsyncConnection, now: float) -> bool:
    """Whether any delivery is due (a read, before taking a write transaction to claim)."""
    found = await conn.execute(select(DELIVERIES.c.id).where(*_due(now)).limit(1))
    return found.first() is not None


async def due_tenants(conn: AsyncConnection, now: float) -> list[str]:
    """The tenants that have deliveries due now, by name: the sender divides its free slots among
    them (evalsvc.webhooks.sender.divide_slots), so a tenant with a long backlog of old deliveries
    does not take the slot another tenant's new delivery is waiting for. Read through
    ix_webhook_deliveries_due: it costs the due deliveries, which MAX_PENDING_PER_TENANT bounds."""
    found = await conn.execute(select(DELIVERIES.c.tenant).where(*_due(now)).distinct())
    return sorted(tenant for (tenant,) in found)


def due_of_tenant(tenant: str, now: float, quota: int) -> Select[Any]:
    """The ids of up to `quota` of the tenant's due deliveries, oldest due first: read in order from
    ix_webhook_deliveries_tenant_due (revision 0023), not all the tenant's pending ones sorted."""
    return (
        select(DELIVERIES.c.id)
        .where(*_due(now), DELIVERIES.c.tenant == tenant)
        .order_by(DELIVERIES.c.next_attempt_time)
        .limit(quota)
    )


async def claim_due(
    conn: AsyncConnection,
    *,
    claim_id: str,
    now: float,
    lease_s: float,
    quotas: Mapping[str, int],
) -> list[ClaimedDelivery]:
    """Lease up to `quotas[tenant]` deliveries of each tenant that are due and not leased (or whose
    lease expired), each tenant's oldest due first. Each comes with what sending it needs: its
    webhook's url and secrets and the run event it reports (`payload`).

    What the claim took but must not send is not returned (`_screen`): a delivery whose webhook was
    disabled is failed, as disabling fails those not leased (it was leased then, by a sender that died:
    it was sent once when its lease expired); of a half-open webhook's, one is its probe and the others
    are handed back.

    A tenant's quota is its own statement's LIMIT: a claim in global due order gave every freed slot
    to the tenant with the oldest backlog (four tenants with hung receivers held all 16 slots and
    every other tenant's deliveries waited behind them). On PostgreSQL a delivery another replica is
    claiming is skipped, not waited for, and only the deliveries taken are locked."""
    taken = 0
    for tenant, quota in sorted(quotas.items()):
        if quota <= 0:
            continue
        due = due_of_tenant(tenant, now, quota).with_for_update(skip_locked=True)
        leased = await conn.execute(
            update(DELIVERIES)
            .where(DELIVERIES.c.id.in_(due.scalar_subquery()))
            .values(claim_id=claim_id, lease_expiry=now + lease_s)
            .returning(DELIVERIES.c.id)
        )
        taken += len(leased.all())
    if not taken:
        return []
    claimed = (
        await conn.execute(
            select(*(column for column in CLAIMED_COLUMNS if column is not EVENTS.c.payload), WEBHOOKS.c.enabled)
            .select_from(DELIVERIES)
            .join(WEBHOOKS, WEBHOOKS.c.id == DELIVERIES.c.webhook_id)
            .where(DELIVERIES.c.claim_id == claim_id)
            .order_by(DELIVERIES.c.next_attempt_time)
        )
    ).all()
    rows = await _screen(conn, claimed, now=now, lease_s=lease_s)
    # Each event once, however many of its deliveries the claim holds: one event to 50 webhooks was
    # its payload (up to 4 MiB: the whole run) read 50 times inside the write transaction.
    wanted = sorted({(row.run_id, row.seq) for row in rows})
    payloads: dict[tuple[str, int], bytes] = {}
    for run_id in sorted({run_id for run_id, _ in wanted}):
        found = await conn.execute(
            select(EVENTS.c.seq, EVENTS.c.payload).where(
                EVENTS.c.run_id == run_id, EVENTS.c.seq.in_([seq for each, seq in wanted if each == run_id])
            )
        )
        payloads.update(((run_id, seq), payload) for seq, payload in found)
    # A delivery whose event is gone (its run purged) is not returned, as the join with events did.
    return [
        ClaimedDelivery.from_columns((*row[: len(CLAIMED_COLUMNS) - 2], payloads[(row.run_id, row.seq)], row.probe))
        for row in rows
        if (row.run_id, row.seq) in payloads
    ]


async def _screen(conn: AsyncConnection, claimed: Sequence[Any], *, now: float, lease_s: float) -> list[Any]:
    """Of the deliveries a claim leased (oldest due first, with `probe`: their webhook's circuit is
    half-open, and its `enabled`), those to send.

    A delivery whose webhook is disabled is failed unsent. A webhook whose circuit is half-open (its
    cooldown over: an open one's deliveries are not due) gets one attempt, its oldest due delivery: the
    probe, whose lease its circuit takes as its new end (`circuit_open_until`), so no other delivery of
    it is claimed meanwhile, by any replica, and a probe whose sender died is followed by another once
    that lease ends. Its other deliveries are handed back, due; so are all of them when another claim
    took the probe first (on PostgreSQL the update waits for that claim and sees its end)."""
    disabled = [row.id for row in claimed if not row.enabled]
    if disabled:
        await conn.execute(update(DELIVERIES).where(DELIVERIES.c.id.in_(disabled)).values(**_UNSENT_DISABLED))
    half_open: dict[str, list[str]] = {}
    for row in claimed:
        if row.enabled and row.probe:
            half_open.setdefault(row.webhook_id, []).append(row.id)
    probes: set[str] = set()
    handed_back: list[str] = []
    for webhook_id, delivery_ids in sorted(half_open.items()):
        probing = await conn.execute(
            update(WEBHOOKS)
            .where(WEBHOOKS.c.id == webhook_id, WEBHOOKS.c.circuit_open_until <= now)
            .values(circuit_open_until=now + lease_s)
            .returning(WEBHOOKS.c.id)
        )
        first = 1 if probing.first() is not None else 0
        probes.update(delivery_ids[:first])
        handed_back.extend(delivery_ids[first:])
    if handed_back:
        await conn.execute(
            update(DELIVERIES).where(DELIVERIES.c.id.in_(handed_back)).values(claim_id=None, lease_expiry=None)
        )
    return [row for row in claimed if row.enabled and (not row.probe or row.id in probes)]


async def record_attempt(conn: AsyncConnection, delivery_id: str, claim_id: str, values: Mapping[str, Any]) -> bool:
    """Record an attempt's outcome and end the claim, if the claim still holds the delivery."""
    changed = await conn.execute(
        update(DELIVERIES)
        .where(DELIVERIES.c.id == delivery_id, DELIVERIES.c.claim_id == claim_id)
        .values(**values, claim_id=None, lease_expiry=None)
        .returning(DELIVERIES.c.id)
    )
    return changed.first() is not None


def _webhook_disabled() -> Any:
    """A delivery's webhook is disabled."""
    return _of_webhook(WEBHOOKS.c.enabled.is_(False))


async def close_circuit(
    conn: AsyncConnection, tenant: str, webhook_id: str, now: float, *, try_now: bool = False
) -> None:
    """Close the webhook's circuit (a 2xx from its receiver, re-enabling it, a new url): its failures
    forgotten, and every delivery still waiting for its next attempt due at once, the receiver being
    back (a probe: only those due before the cooldown's end moved, so a delivery on its own backoff
    waited up to an hour after "try now" while the webhook showed healthy). A read of the webhook's row
    when there is nothing to close (every 2xx comes here) and not `try_now` (UpdateWebhook's): nothing
    is rewritten."""
    state = (
        await conn.execute(
            select(WEBHOOKS.c.consecutive_failures, WEBHOOKS.c.circuit_open_until).where(
                WEBHOOKS.c.id == webhook_id, WEBHOOKS.c.tenant == tenant
            )
        )
    ).first()
    if state is None:
        return
    closed = state.consecutive_failures == 0 and state.circuit_open_until is None
    if closed and not try_now:
        return
    await conn.execute(
        update(DELIVERIES)
        .where(*_of_webhook_pending(tenant, webhook_id), DELIVERIES.c.next_attempt_time > now)
        .values(next_attempt_time=now)
    )
    if not closed:
        await conn.execute(
            update(WEBHOOKS).where(WEBHOOKS.c.id == webhook_id, WEBHOOKS.c.tenant == tenant).values(**CIRCUIT_CLOSED)
        )


async def count_failure(
    conn: AsyncConnection,
    tenant: str,
    webhook_id: str,
    *,
    probe: bool,
    now: float,
    threshold: int,
    cooldown: Callable[[int], float],
) -> tuple[float | None, bool]:
    """Count a failed attempt of the webhook's against its circuit, and open the circuit when this is
    the `threshold`-th failure in a row of a closed one, or the failed probe of a half-open one: for
    `cooldown(times it opened since it last closed)` seconds. A failure while it is open that is no
    probe (an attempt under way when it opened) only counts. Until when the circuit is open now (None:
    closed), and whether this failure opened it; `hold_for_circuit` then moves its deliveries there.

    The count is one UPDATE first, which takes the webhook's row lock (after the delivery's, the lock
    order): replicas recording failures of one webhook at once decide in turn, each on what the one
    before committed, so the circuit opens once."""
    counted = (
        await conn.execute(
            update(WEBHOOKS)
            .where(WEBHOOKS.c.id == webhook_id, WEBHOOKS.c.tenant == tenant)
            .values(consecutive_failures=WEBHOOKS.c.consecutive_failures + 1)
            .returning(WEBHOOKS.c.consecutive_failures, WEBHOOKS.c.circuit_open_until, WEBHOOKS.c.circuit_opens)
        )
    ).first()
    if counted is None:
        return None, False  # deleted meanwhile
    closed = counted.circuit_open_until is None
    if not ((closed and counted.consecutive_failures >= threshold) or (probe and not closed)):
        return counted.circuit_open_until, False
    until = now + cooldown(counted.circuit_opens)
    await conn.execute(
        update(WEBHOOKS)
        .where(WEBHOOKS.c.id == webhook_id)
        .values(circuit_open_until=until, circuit_opens=counted.circuit_opens + 1)
    )
    return until, True


def held_by_circuit(tenant: str, webhook_id: str) -> Update:
    """Move the webhook's pending deliveries due before its open circuit's end to that end (nothing
    while it is closed). Read through ix_webhook_deliveries_tenant_due: what it reads is bounded by
    the tenant's backlog (MAX_PENDING_PER_TENANT), not the webhook's whole history."""
    open_until = select(WEBHOOKS.c.circuit_open_until).where(WEBHOOKS.c.id == webhook_id).scalar_subquery()
    return (
        update(DELIVERIES)
        .where(*_of_webhook_pending(tenant, webhook_id), DELIVERIES.c.next_attempt_time < open_until)
        .values(next_attempt_time=open_until)
    )


async def hold_for_circuit(conn: AsyncConnection, tenant: str, webhook_id: str) -> None:
    """After a failure left the webhook's circuit open: its deliveries wait for its end, spending no
    attempt, and claims do not read through them while it lasts (due, they would be read past at every
    claim). A transaction of its own, after the one that opened the circuit, which holds the webhook's
    row lock: deliveries are changed before their webhook. It moves them to the end the circuit has
    when it runs, so one closed meanwhile holds none back; one that never runs (the process died)
    costs only those reads: `_due` holds the deliveries of an open circuit anyway."""
    await conn.execute(held_by_circuit(tenant, webhook_id))


def _of_webhook_pending(tenant: str, webhook_id: str) -> list[Any]:
    """A webhook's pending deliveries (through the tenant's backlog's index, with a bound on
    next_attempt_time)."""
    return [DELIVERIES.c.tenant == tenant, DELIVERIES.c.status == PENDING, DELIVERIES.c.webhook_id == webhook_id]


async def fail_if_disabled(conn: AsyncConnection, delivery_id: str, error: str) -> bool:
    """After an attempt whose delivery is to be retried: fail it instead when its webhook was disabled
    meanwhile (UpdateWebhook, or a 410 to another of its deliveries), as disabling fails the deliveries
    not leased. Whether it did."""
    failed = await conn.execute(
        update(DELIVERIES)
        .where(DELIVERIES.c.id == delivery_id, DELIVERIES.c.status == PENDING, _webhook_disabled())
        .values(status=FAILED, next_attempt_time=None, last_error=f"{error}; not retried: the webhook was disabled")
        .returning(DELIVERIES.c.id)
    )
    return failed.first() is not None


async def release(conn: AsyncConnection, delivery_ids: Sequence[str]) -> None:
    """Hand claimed deliveries back unattempted (a sender stopping): due again, unless their webhook
    was disabled while they were held (then failed, as disabling fails the deliveries not leased)."""
    if delivery_ids:
        await conn.execute(
            update(DELIVERIES)
            .where(DELIVERIES.c.id.in_(list(delivery_ids)), DELIVERIES.c.status == PENDING, _webhook_disabled())
            .values(**_UNSENT_DISABLED)
        )
        await conn.execute(
            update(DELIVERIES)
            .where(DELIVERIES.c.id.in_(list(delivery_ids)), DELIVERIES.c.status == PENDING)
            .values(claim_id=None, lease_expiry=None)
        )


async def release_all(conn: AsyncConnection) -> int:
    """Release every lease. Only safe where this process is the database's one server (SQLite)."""
    released = await conn.execute(
        update(DELIVERIES).where(DELIVERIES.c.claim_id.is_not(None)).values(claim_id=None, lease_expiry=None)
    )
    return int(released.rowcount or 0)


# Deliveries one prune transaction deletes, at most: a short hold of SQLite's one writer. Deleted whole,
# 3,000,000 recent and 1,000,000 old rows held it 3.8 s (another tenant's CreateRun took 4.4 s).
PRUNE_CHUNK = 1000


async def prune(conn: AsyncConnection, finished_before: float, limit: int = PRUNE_CHUNK) -> int:
    """Delete up to `limit` deliveries that ended (succeeded or failed) before a time, through
    ix_webhook_deliveries_finished: the history is bounded, a chunk per transaction (fewer deleted
    than `limit`: none are left). On PostgreSQL a replica pruning at the same time takes other rows."""
    chosen = (
        select(DELIVERIES.c.id)
        .where(DELIVERIES.c.status.in_([SUCCEEDED, FAILED]), DELIVERIES.c.create_time < finished_before)
        .limit(limit)
    )
    if conn.dialect.name == "postgresql":
        chosen = chosen.with_for_update(skip_locked=True)
    deleted = await conn.execute(delete(DELIVERIES).where(DELIVERIES.c.id.in_(chosen.scalar_subquery())))
    return int(deleted.rowcount or 0)
