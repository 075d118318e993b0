"""results.item_id and results.grader compare by code point on PostgreSQL (COLLATE "C"), as on SQLite.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 10:00:00.000000

ListComparisonItems reads each run's evaluations after a page token's key, (item_id, repetition,
grader), as an ordered range of uq_results_evaluation, and merges the two runs' keys in Python: the
database's order and Python's must be the same, on both engines. SQLite's BINARY collation is code
point order already (nothing to do there). On PostgreSQL the columns took the database's collation,
possibly a locale; an index of that collation cannot serve a `COLLATE "C"` comparison (the plan was a
scan and sort of the whole run), so the columns themselves change collation. That rebuilds
uq_results_evaluation (not the table: the type is unchanged): ~0.2 s per 200,000 results on the test
machine, under an exclusive lock on `results` (reads wait too), held to the end of the migration's
transaction (docs/scaling.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _collate(collation: str) -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    # One statement, so the index is rebuilt once for both columns.
    op.execute(
        f'ALTER TABLE results ALTER COLUMN item_id TYPE VARCHAR(128) COLLATE "{collation}", '
        f'ALTER COLUMN grader TYPE VARCHAR(63) COLLATE "{collation}"'
    )


def upgrade() -> None:
    _collate("C")


def downgrade() -> None:
    _collate("default")
