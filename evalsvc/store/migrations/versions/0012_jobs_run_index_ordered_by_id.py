"""ix_jobs_run orders each run's jobs of one state by id, so a claim reads only the jobs it takes.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04 23:20:00.000000

A claim leases a run's oldest claimable jobs. With the index on (run_id, state) alone, PostgreSQL
read every job of the run in the claimable states and sorted them for each claim (SQLite's index
carries the rowid, which is the id, already; the index is rebuilt there too, so both engines have
the schema the models declare). In one transaction with the rest of the migration, the rebuild holds
writes to `jobs` until it is done (docs/scaling.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_jobs_run", table_name="jobs")
    op.create_index("ix_jobs_run", "jobs", ["run_id", "state", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_jobs_run", table_name="jobs")
    op.create_index("ix_jobs_run", "jobs", ["run_id", "state"], unique=False)
