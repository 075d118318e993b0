"""Run annotations and soft delete (AIP-128, AIP-164), dataset annotations.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 14:53:55.887042
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ("datasets", "runs"):
        # Old rows get {} from a temporary server default, dropped in a second step: the models declare
        # none (PostgreSQL cannot compare JSON defaults) and the service always writes the column.
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("annotations", sa.JSON(), server_default="{}", nullable=False))
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column("annotations", existing_type=sa.JSON(), server_default=None)
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("delete_time", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("delete_time")
        batch_op.drop_column("annotations")
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_column("annotations")
