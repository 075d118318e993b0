"""A result's person's verdict (Item.human_verdicts), for a grader's agreement with people.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-06 12:45:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | Sequence[str] | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Results from before were compared with no person's verdict: NULL, which is what the model declares.
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("human_verdict", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_column("human_verdict")
