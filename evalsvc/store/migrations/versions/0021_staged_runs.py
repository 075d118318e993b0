"""Large CreateRuns write their items and jobs in chunks before their run row: `staged_runs` names the
runs being written that way (evalsvc.store.staging).

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-06 20:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0021"
down_revision: str | Sequence[str] | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "staged_runs",
        sa.Column("run_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("tenant", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("stage_time", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("run_id"),
    )
    op.create_index("ix_staged_runs_stage_time", "staged_runs", ["stage_time"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_staged_runs_stage_time", table_name="staged_runs")
    op.drop_table("staged_runs")
