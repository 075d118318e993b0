"""ListRuns by (tenant, create_time, id): its order_by (newest or oldest first) and create_time filters.

ListRuns listed a tenant's runs by id (ids sort by creation time) on `ix_runs_tenant_id`; it now orders
by create_time, then id, and filters on create_time ranges (`filter`, AIP-160). With the index on
(tenant, id) only, a page of "the oldest runs" or "runs of last week" read and sorted every run of the
tenant; with create_time in it, a page reads its rows in order from the range it asks for. The index it
replaces served ListRuns only (every other read of runs by tenant also names the run's id, its key).

Revision ID: 0027
Revises: 0026
Create Date: 2026-12-07 17:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0027"
down_revision: str | Sequence[str] | None = "0026"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_runs_tenant_create_time", "runs", ["tenant", "create_time", "id"])
    op.drop_index("ix_runs_tenant_id", table_name="runs")


def downgrade() -> None:
    op.create_index("ix_runs_tenant_id", "runs", ["tenant", "id"])
    op.drop_index("ix_runs_tenant_create_time", table_name="runs")
