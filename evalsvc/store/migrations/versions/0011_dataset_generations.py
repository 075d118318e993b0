"""Dataset generations: items the server's generator model writes into a dataset.

Revision ID: 0011
Revises: 0006
Create Date: 2026-12-03 10:50:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dataset_generations",
        sa.Column("dataset_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("tenant", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("state", sa.Integer(), nullable=False),
        sa.Column("item_count", sa.Integer(), nullable=False),
        sa.Column("generated_count", sa.Integer(), nullable=False),
        sa.Column("instructions", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("error", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("claim_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True),
        sa.Column("lease_expiry", sa.Float(), nullable=True),
        sa.Column("create_time", sa.Float(), nullable=False),
        sa.Column("update_time", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("dataset_id"),
    )
    op.create_index("ix_dataset_generations_state", "dataset_generations", ["state", "create_time"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_dataset_generations_state", table_name="dataset_generations")
    op.drop_table("dataset_generations")
