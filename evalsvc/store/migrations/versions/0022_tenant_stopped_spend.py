"""What a tenant's jobs spent without a result, for --tenant-budget-usd (evalsvc.store.usage).

`tenant_run_totals.stopped_cost_usd`: the cost of the model calls answered in jobs that ended without a
recorded result - stopped by a cancel, a delete or a shutdown, or fenced out after their lease was lost -
which no run's cost_usd holds. Without it a tenant that cancelled runs spent past its budget across
restarts and replicas (a $20 budget, $47-58 spent, $0 of it counted after a restart). Starts at 0: what
such jobs spent before this revision was never written anywhere.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-06 23:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0022"
down_revision: str | Sequence[str] | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tenant_run_totals", schema=None) as batch_op:
        batch_op.add_column(sa.Column("stopped_cost_usd", sa.Float(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("tenant_run_totals", schema=None) as batch_op:
        batch_op.drop_column("stopped_cost_usd")
