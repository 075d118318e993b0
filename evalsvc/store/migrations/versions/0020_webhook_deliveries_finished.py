"""The prune of finished webhook deliveries deletes in chunks through an index: (status, create_time).

Without it each prune read the whole table (create_time had no index): 4,000,000 rows held SQLite's
one writer 3.8 s.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-06 16:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0020"
down_revision: str | Sequence[str] | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_webhook_deliveries_finished", "webhook_deliveries", ["status", "create_time"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_finished", table_name="webhook_deliveries")
