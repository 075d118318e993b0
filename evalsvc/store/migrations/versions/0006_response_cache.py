"""Response cache: cache_entries, and which outputs, results and verdicts came from it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 10:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "cache_entries",
        sa.Column("tenant", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("key", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("kind", sa.Integer(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=False),
        sa.Column("create_time", sa.Float(), nullable=False),
        sa.Column("last_used", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "key"),
    )
    with op.batch_alter_table("cache_entries", schema=None) as batch_op:
        batch_op.create_index("ix_cache_entries_lru", ["tenant", "last_used"], unique=False)
    with op.batch_alter_table("outputs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cached", sa.Boolean(), server_default=sa.false(), nullable=False))
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cached", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column("verdict_cached", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_column("verdict_cached")
        batch_op.drop_column("cached")
    with op.batch_alter_table("outputs", schema=None) as batch_op:
        batch_op.drop_column("cached")
    with op.batch_alter_table("cache_entries", schema=None) as batch_op:
        batch_op.drop_index("ix_cache_entries_lru")
    op.drop_table("cache_entries")
