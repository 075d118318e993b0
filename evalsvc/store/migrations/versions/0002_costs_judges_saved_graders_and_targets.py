"""Costs, judges, saved graders and targets (issue 4): spend per run, output and result; saved definitions.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 06:07:46.781470
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "saved_grader_versions",
        sa.Column("grader_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("tenant", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("definition", sa.LargeBinary(), nullable=False),
        sa.Column("create_time", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("grader_id", "version"),
    )
    op.create_table(
        "saved_graders",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("tenant", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("request_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("request_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("display_name", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("description", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("latest_version", sa.Integer(), nullable=False),
        sa.Column("create_time", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant", "request_id", name="uq_saved_graders_tenant_request_id"),
    )
    with op.batch_alter_table("saved_graders", schema=None) as batch_op:
        batch_op.create_index("ix_saved_graders_tenant_id", ["tenant", "id"], unique=False)

    op.create_table(
        "saved_targets",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("tenant", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("request_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("request_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("display_name", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("description", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("definition", sa.LargeBinary(), nullable=False),
        sa.Column("create_time", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant", "request_id", name="uq_saved_targets_tenant_request_id"),
    )
    with op.batch_alter_table("saved_targets", schema=None) as batch_op:
        batch_op.create_index("ix_saved_targets_tenant_id", ["tenant", "id"], unique=False)

    with op.batch_alter_table("outputs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("latency_ms", sa.Float(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("cost_usd", sa.Float(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("item_score", sa.Float(), nullable=True))

    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("scoring_cost_usd", sa.Float(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("confidence", sa.Float(), nullable=True))

    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cost_usd", sa.Float(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("cost_usd")

    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_column("confidence")
        batch_op.drop_column("scoring_cost_usd")

    with op.batch_alter_table("outputs", schema=None) as batch_op:
        batch_op.drop_column("item_score")
        batch_op.drop_column("cost_usd")
        batch_op.drop_column("latency_ms")

    with op.batch_alter_table("saved_targets", schema=None) as batch_op:
        batch_op.drop_index("ix_saved_targets_tenant_id")

    op.drop_table("saved_targets")
    with op.batch_alter_table("saved_graders", schema=None) as batch_op:
        batch_op.drop_index("ix_saved_graders_tenant_id")

    op.drop_table("saved_graders")
    op.drop_table("saved_grader_versions")
