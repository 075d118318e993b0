"""Saved definitions count towards --max-stored-bytes-per-tenant (evalsvc.store.usage).

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-07 08:10:00.000000

The service now adds to `tenant_run_totals.stored_bytes` what a dataset's descriptive fields, a saved
grader's (and each of its versions' definition) and a saved target's store, as they are written, and
takes it back as they are deleted. Without this revision the definitions a tenant already holds would
never have been counted, and deleting them would take back bytes that were never added (a total below
what the tenant stores, even below zero). So it adds them here, as the service counts them: 128 bytes a row
(usage.SAVED_ROW_BYTES), texts in characters, a map as the JSON it is stored as, a definition in bytes;
with a totals row for a tenant that has only definitions. The downgrade takes the same sums back.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0025"
down_revision: str | Sequence[str] | None = "0024"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# What each row of a table stores (evalsvc.store.usage.saved_bytes, frozen as of this revision).
NAMED = "length(display_name) + length(description) + length(CAST(labels AS TEXT))"
SIZES = {
    "datasets": f"128 + {NAMED} + length(CAST(annotations AS TEXT))",
    "saved_graders": f"128 + {NAMED}",
    "saved_grader_versions": "128 + length(definition)",
    "saved_targets": f"128 + {NAMED} + length(definition)",
}


def _add(sign: str) -> None:
    """Add (`+`) or take back (`-`) each tenant's definitions' bytes, one grouped read of each table."""
    for table, size in SIZES.items():
        op.execute(
            f"UPDATE tenant_run_totals SET stored_bytes = tenant_run_totals.stored_bytes {sign} part.size "
            f"FROM (SELECT tenant, SUM({size}) AS size FROM {table} GROUP BY tenant) AS part "
            "WHERE part.tenant = tenant_run_totals.tenant"
        )


def upgrade() -> None:
    holders = " UNION ".join(f"SELECT tenant FROM {table}" for table in SIZES)
    op.execute(
        "INSERT INTO tenant_run_totals (tenant, runs, purged_cost_usd, stored_bytes) "
        f"SELECT tenant, 0, 0, 0 FROM ({holders}) AS t "
        "WHERE tenant NOT IN (SELECT tenant FROM tenant_run_totals)"
    )
    _add("+")


def downgrade() -> None:
    _add("-")
