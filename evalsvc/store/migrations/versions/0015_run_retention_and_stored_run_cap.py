"""Purging deleted runs after their retention, and a cap on the runs a tenant stores.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06 07:00:00.000000

- `tenant_run_totals`: per tenant, the runs it stores (for --max-runs-per-tenant, without counting its
  runs at every CreateRun) and the spend of its purged runs (its --tenant-budget-usd keeps counting
  it). Filled here from the runs already stored: every tenant's count, no purged spend yet.
- `run_purges`: runs whose row is gone and whose other rows are being deleted, in chunks.
- `ix_runs_deleted`: the soft-deleted runs alone (a partial index), by deletion time.
- `ix_webhook_deliveries_run`: a purged run's deliveries, without reading its tenant's.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0015"
down_revision: str | Sequence[str] | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "tenant_run_totals",
        sa.Column("tenant", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("runs", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=False, nullable=False),
        sa.Column("purged_cost_usd", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("tenant"),
    )
    op.create_table(
        "run_purges",
        sa.Column("run_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("tenant", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("purge_time", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("run_id"),
    )
    op.create_index(
        "ix_runs_deleted",
        "runs",
        ["delete_time"],
        unique=False,
        sqlite_where=sa.text("delete_time IS NOT NULL"),
        postgresql_where=sa.text("delete_time IS NOT NULL"),
    )
    op.create_index("ix_webhook_deliveries_run", "webhook_deliveries", ["run_id"], unique=False)
    op.execute(
        "INSERT INTO tenant_run_totals (tenant, runs, purged_cost_usd) "
        "SELECT tenant, COUNT(*), 0 FROM runs GROUP BY tenant"
    )


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_run", table_name="webhook_deliveries")
    op.drop_index("ix_runs_deleted", table_name="runs")
    op.drop_table("run_purges")
    op.drop_table("tenant_run_totals")
