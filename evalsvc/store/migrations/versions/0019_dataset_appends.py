"""AddDatasetItems once per request_id (AIP-155): what each append with a request_id added.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-06 15:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0019"
down_revision: str | Sequence[str] | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dataset_appends",
        sa.Column("tenant", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("request_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("dataset_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("request_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("first_idx", sa.Integer(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("create_time", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "request_id"),
    )
    op.create_index("ix_dataset_appends_dataset", "dataset_appends", ["dataset_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_dataset_appends_dataset", table_name="dataset_appends")
    op.drop_table("dataset_appends")
