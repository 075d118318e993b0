"""Run items' digests as comparisons compare them (models.RunItemRow, evalsvc.runs.compare `item_digests`).

CompareRuns leaves out pairs whose items differ between the runs; it read and hashed every item behind
both runs on every call. A run item now stores its two digests (metadata included and left out) as it is
written, and a comparison reads those: two runs of 50,000 items of ~1 KB x 2 graders, 4.5 -> 1.6 s on
SQLite and 5.3 -> 2.3 s on PostgreSQL (`python -m bench.compare_digests`, best of 3, 2 shared cores;
docs/compare.md). Nullable, and not filled here: hashing every stored item would hold the
migration for as long as the items take to read and parse; a comparison hashes the items of runs from
before as it always did, and gets the same digests.

ix_run_items_digests (run_id, idx, both digests) covers a comparison's read of them: in the table they
follow the item, and SQLite walked each large item's overflow pages to reach them (60 items of 1 MB:
20-26 ms a read, 1.2 ms from the index; PostgreSQL keeps large items out of line, ~1.3 ms either way).

Revision ID: 0028
Revises: 0027
Create Date: 2026-12-07 20:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0028"
down_revision: str | Sequence[str] | None = "0027"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("digest_with_metadata", "digest_without_metadata")
INDEX = "ix_run_items_digests"


def upgrade() -> None:
    with op.batch_alter_table("run_items", schema=None) as batch_op:
        for column in COLUMNS:
            batch_op.add_column(sa.Column(column, sa.LargeBinary(), nullable=True))
    op.create_index(INDEX, "run_items", ["run_id", "idx", *COLUMNS])


def downgrade() -> None:
    op.drop_index(INDEX, table_name="run_items")
    with op.batch_alter_table("run_items", schema=None) as batch_op:
        for column in reversed(COLUMNS):
            batch_op.drop_column(column)
