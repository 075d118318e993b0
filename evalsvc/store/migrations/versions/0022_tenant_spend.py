"""A tenant's spend kept as a running total, for --tenant-budget-usd (evalsvc.store.usage).

`tenant_run_totals.spent_usd`: everything the tenant's model calls cost - its runs' cost_usd, purged runs
included, and the calls answered in jobs that ended without a recorded result (stopped by a cancel, a
delete or a shutdown, or fenced out after their lease was lost), which no run's cost_usd holds. Without the
latter a tenant that cancelled runs spent past its budget across restarts and replicas (a $20 budget,
$47-58 spent, $0 of it counted after a restart); and a budget read as SUM(runs.cost_usd) cost a read of
every run of the tenant at each check. Filled here from the runs' cost_usd and purged_cost_usd: what
stopped jobs spent before this revision was never written anywhere.

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
        batch_op.add_column(sa.Column("spent_usd", sa.Float(), server_default="0", nullable=False))
    # Every tenant with runs has its row (revision 0015 made them, insert_runs keeps them).
    op.execute(
        "UPDATE tenant_run_totals SET spent_usd = purged_cost_usd"
        " + COALESCE((SELECT SUM(runs.cost_usd) FROM runs WHERE runs.tenant = tenant_run_totals.tenant), 0)"
    )


def downgrade() -> None:
    with op.batch_alter_table("tenant_run_totals", schema=None) as batch_op:
        batch_op.drop_column("spent_usd")
