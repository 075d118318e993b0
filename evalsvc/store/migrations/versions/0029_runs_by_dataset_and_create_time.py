"""ListRuns of one dataset by (tenant, dataset_id, create_time, id): its runs newest or oldest first.

ListRuns orders by (create_time, id) since 0027; with `dataset_id` (the filter `dataset_id = "..."`, and the
request field) a page of a dataset's runs had two plans, both poor when the dataset's runs are a small
share of the tenant's: read `ix_runs_tenant_create_time` in order and filter out the other datasets' runs
(a page of 50 read ~500 rows when one run in ten was the dataset's), or read the dataset's runs from
`ix_runs_tenant_dataset` (tenant, dataset_id, id) and sort all of them. With create_time in the dataset's
index, a page reads its rows in order from the dataset's range. The index it replaces served only ListRuns.

Revision ID: 0029
Revises: 0028
Create Date: 2026-12-07 20:10:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0029"
down_revision: str | Sequence[str] | None = "0028"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_runs_tenant_dataset_create_time", "runs", ["tenant", "dataset_id", "create_time", "id"])
    op.drop_index("ix_runs_tenant_dataset", table_name="runs")


def downgrade() -> None:
    op.create_index("ix_runs_tenant_dataset", "runs", ["tenant", "dataset_id", "id"])
    op.drop_index("ix_runs_tenant_dataset_create_time", table_name="runs")
