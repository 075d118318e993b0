"""An index of webhook deliveries by tenant and status: a tenant's backlog is probed at each enqueue.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06 12:00:00.000000

evalsvc.store.webhooks.MAX_PENDING_PER_TENANT bounds the deliveries one tenant may have waiting; the
probe reads at most that many entries of this index (without it, every pending delivery of the table).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0014"
down_revision: str | Sequence[str] | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_webhook_deliveries_tenant", "webhook_deliveries", ["tenant", "status"])


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_tenant", table_name="webhook_deliveries")
