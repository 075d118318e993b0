"""Server keys: the secret that signs page tokens (issue 15), shared by replicas, kept across restarts.

Revision ID: 0010
Revises: 0007
Create Date: 2026-12-03 10:10:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The key itself is made by the first server that starts (evalsvc/store/server_keys.py), not
    # here: a migration's output is the same for every database, a key must not be.
    op.create_table(
        "server_keys",
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("secret", sa.LargeBinary(), nullable=False),
        sa.Column("create_time", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("server_keys")
