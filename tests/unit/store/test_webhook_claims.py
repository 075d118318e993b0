"""The webhook outbox's claim (evalsvc.store.webhooks) over a bare database: what each tenant's share reads,
and what a webhook's circuit breaker reads and writes."""

from __future__ import annotations

import random
from typing import Any

import pytest
from sqlalchemy import insert, select, update
from sqlalchemy.dialects import sqlite

from evalsvc.store import webhooks as outbox
from evalsvc.store.db import Database
from evalsvc.webhooks.sender import MAX_CIRCUIT_COOLDOWN_S, circuit_cooldown


async def plan(db: Database, statement: Any) -> list[str]:
    """SQLite's query plan of a statement, its steps' descriptions."""
    sql = str(statement.compile(dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True}))
    async with db.read() as conn:
        return [row[-1] for row in await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)]


async def test_a_tenants_share_is_read_in_due_order_from_its_index_not_sorted(db: Database) -> None:
    """The sender claims each tenant's share of free slots with its own statement. Through the index on
    (tenant, status) alone, each read and sorted all of the tenant's pending deliveries (up to 10,000)
    inside SQLite's one write transaction, at every poll; through (tenant, status, next_attempt_time) it
    reads its share in order (revision 0023). The check of the webhook's circuit is a lookup of the
    webhook by its primary key, not another order."""
    if db.writer.dialect.name != "sqlite":
        pytest.skip("the plan asserted is SQLite's, whose one writer the claim holds")
    steps = await plan(db, outbox.due_of_tenant("acme", 1_000.0, 4))
    assert any("ix_webhook_deliveries_tenant_due" in step for step in steps), steps
    assert not any("TEMP B-TREE" in step for step in steps), steps
    assert "SEARCH webhooks USING INDEX sqlite_autoindex_webhooks_1 (id=?)" in steps, steps


async def test_opening_a_circuit_moves_its_webhooks_waiting_deliveries_through_the_tenants_backlog(
    db: Database,
) -> None:
    """Opening a circuit moves the webhook's waiting deliveries to its end, once per cooldown, inside the
    record's write transaction: read through the tenant's pending deliveries (at most 10,000), not
    through the webhook's whole history (30 days of finished deliveries)."""
    if db.writer.dialect.name != "sqlite":
        pytest.skip("the plan asserted is SQLite's, whose one writer the record holds")
    moved = outbox.held_by_circuit("acme", "wh_x")
    steps = await plan(db, moved)
    assert any("ix_webhook_deliveries_tenant_due" in step for step in steps), steps


def test_a_circuit_cools_down_30_s_doubling_at_each_reopen_up_to_10_minutes_with_jitter() -> None:
    rng = random.Random(3)
    for _ in range(200):
        assert 22.5 <= circuit_cooldown(0, rng) <= 30.0
        assert 45.0 <= circuit_cooldown(1, rng) <= 60.0
        assert 240.0 <= circuit_cooldown(4, rng) <= 480.0
        assert 0.75 * MAX_CIRCUIT_COOLDOWN_S <= circuit_cooldown(5, rng) <= MAX_CIRCUIT_COOLDOWN_S
        # However often it re-opened (a receiver down for weeks): capped, never a float overflow.
        assert circuit_cooldown(5000, rng) <= MAX_CIRCUIT_COOLDOWN_S
    assert len({round(circuit_cooldown(0, rng), 3) for _ in range(20)}) > 10, "no jitter"


async def webhook(db: Database, webhook_id: str, **values: Any) -> None:
    row = {
        **{"id": webhook_id, "tenant": "t", "request_hash": "", "url": "http://127.0.0.1:9/", "event_mask": 1},
        **{"description": "", "enabled": True, "disabled_reason": "", "secret": b"s" * 32},
        **{"create_time": 0.0, "update_time": 0.0},
    }
    await db.transact(lambda conn: conn.execute(insert(outbox.WEBHOOKS).values({**row, **values})))


async def deliveries(db: Database, webhook_id: str, count: int, due: float) -> list[str]:
    ids = [f"msg_{webhook_id}_{i}" for i in range(count)]
    rows = [
        {
            **{"id": delivery_id, "tenant": "t", "webhook_id": webhook_id, "event_type": "run.failed"},
            **{"run_id": "run_x", "seq": 1, "status": outbox.PENDING, "attempts": 0, "last_response_code": 0},
            **{"last_error": "", "create_time": due, "next_attempt_time": due + i / 1000},
        }
        for i, delivery_id in enumerate(ids)
    ]
    await db.transact(lambda conn: conn.execute(insert(outbox.DELIVERIES), rows))
    return ids


async def test_a_half_open_circuit_hands_out_one_probe_and_no_delivery_of_an_open_or_disabled_webhook(
    db: Database,
) -> None:
    """The claim, on both engines: an open circuit's deliveries are not due; a half-open one's oldest is
    its probe (its circuit's end becomes the probe's lease, so a second claim gets none of them), the
    others are handed back unattempted; a disabled webhook's due delivery (leased by a sender that died
    before the webhook was disabled) is failed unsent, not handed out."""
    now = 1_000.0
    await webhook(db, "wh_open", circuit_open_until=now + 30, circuit_opens=1, consecutive_failures=5)
    await webhook(db, "wh_half", circuit_open_until=now - 1, circuit_opens=1, consecutive_failures=5)
    await webhook(db, "wh_off", enabled=False)
    await deliveries(db, "wh_open", 2, now - 10)
    half = await deliveries(db, "wh_half", 3, now - 10)
    [orphan] = await deliveries(db, "wh_off", 1, now - 10)
    await db.transact(
        lambda conn: conn.execute(
            update(outbox.DELIVERIES)
            .where(outbox.DELIVERIES.c.id == orphan)
            .values(claim_id="dead", lease_expiry=now - 1)
        )
    )
    await db.transact(
        lambda conn: conn.execute(insert(outbox.EVENTS).values(run_id="run_x", seq=1, tenant="t", payload=b""))
    )
    async with db.read() as conn:
        assert await outbox.due_tenants(conn, now) == ["t"]

    def claim(claim_id: str) -> Any:
        return lambda conn: outbox.claim_due(conn, claim_id=claim_id, now=now, lease_s=25, quotas={"t": 4})

    claimed = await db.transact(claim("c1"))
    assert [(each.id, each.probe) for each in claimed] == [(half[0], True)]
    assert await db.transact(claim("c2")) == []
    async with db.read() as conn:
        rows = {r.id: r for r in await conn.execute(select(outbox.DELIVERIES))}
        [until] = (
            await conn.execute(select(outbox.WEBHOOKS.c.circuit_open_until).where(outbox.WEBHOOKS.c.id == "wh_half"))
        ).one()
    assert until == now + 25, "the probe's lease is not the circuit's end"
    assert all(rows[i].claim_id is None and rows[i].attempts == 0 for i in half[1:])
    assert (rows[orphan].status, rows[orphan].claim_id) == (outbox.FAILED, None)
    assert rows[orphan].last_error == "not sent: the webhook was disabled"
