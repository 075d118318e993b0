"""Deleted datasets and saved graders lose their parts in chunks.

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-07 14:10:00.000000

- `definition_purges`: a deleted dataset (or saved grader) whose items (versions) are still being
  deleted, a chunk per transaction (evalsvc.store.retention.definition_purge_step). DeleteDataset held
  SQLite's one writer while it deleted every item of the dataset at once: ~4.6 s a GB, every other
  tenant's writes waiting.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0026"
down_revision: str | Sequence[str] | None = "0025"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "definition_purges",
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("owner_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("tenant", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("purge_time", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("kind", "owner_id"),
    )


def downgrade() -> None:
    # Each row is a deleted dataset (grader) whose items (versions) are still there: dropped, nothing
    # would ever delete them (revision 0025's server knows no such rows), and they would take disk for
    # good. Refused until they are gone.
    left = op.get_bind().execute(sa.text("SELECT count(*) FROM definition_purges")).scalar_one()
    if left:
        raise RuntimeError(
            f"cannot downgrade below 0026: {left} deleted datasets or saved graders still have items or "
            "versions waiting to be deleted (table definition_purges); start the server at this version and "
            'let its purge loop delete them (evalsvc_purged_total{what="rows"}; the table empties), '
            "then downgrade"
        )
    op.drop_table("definition_purges")
