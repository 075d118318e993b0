"""A run's source run, for runs RerunRun created.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07 09:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0016"
down_revision: str | Sequence[str] | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Runs from before were all created by CreateRun: "" (no source), from a temporary server default
    # dropped in a second step, as the model declares none (the service always writes the column).
    column = sqlmodel.sql.sqltypes.AutoString(length=40)
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rerun_of", column, server_default="", nullable=False))
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.alter_column("rerun_of", existing_type=column, server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("rerun_of")
