"""The webhook outbox's claim (evalsvc.store.webhooks) over a bare database: what each tenant's share reads."""

from __future__ import annotations

import pytest
from sqlalchemy.dialects import sqlite

from evalsvc.store import webhooks as outbox
from evalsvc.store.db import Database


async def test_a_tenants_share_is_read_in_due_order_from_its_index_not_sorted(db: Database) -> None:
    """The sender claims each tenant's share of free slots with its own statement. Through the index on
    (tenant, status) alone, each read and sorted all of the tenant's pending deliveries (up to 10,000)
    inside SQLite's one write transaction, at every poll; through (tenant, status, next_attempt_time) it
    reads its share in order (revision 0023)."""
    if db.writer.dialect.name != "sqlite":
        pytest.skip("the plan asserted is SQLite's, whose one writer the claim holds")
    sql = str(
        outbox.due_of_tenant("acme", 1_000.0, 4).compile(
            dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True}
        )
    )
    async with db.read() as conn:
        steps = [row[-1] for row in await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)]
    assert any("ix_webhook_deliveries_tenant_due" in step for step in steps), steps
    assert not any("TEMP B-TREE" in step for step in steps), steps
