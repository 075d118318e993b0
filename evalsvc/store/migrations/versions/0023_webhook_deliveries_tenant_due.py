"""A tenant's due webhook deliveries in the order they are claimed: (tenant, status, next_attempt_time).

The sender claims each tenant's share of free slots with its own statement (`store.webhooks.claim_due`:
that tenant's due deliveries, oldest first, LIMIT its quota), so one tenant's backlog cannot take
every slot. With the index on (tenant, status) alone, each such claim read and sorted all of the
tenant's pending deliveries (up to 10,000, MAX_PENDING_PER_TENANT) inside the write transaction, at
every poll; with next_attempt_time in the index it reads its LIMIT rows in order. The count of a
tenant's backlog uses the same index's first two columns.

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-07 05:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0023"
down_revision: str | Sequence[str] | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_webhook_deliveries_tenant", table_name="webhook_deliveries")
    op.create_index("ix_webhook_deliveries_tenant_due", "webhook_deliveries", ["tenant", "status", "next_attempt_time"])


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_tenant_due", table_name="webhook_deliveries")
    op.create_index("ix_webhook_deliveries_tenant", "webhook_deliveries", ["tenant", "status"])
