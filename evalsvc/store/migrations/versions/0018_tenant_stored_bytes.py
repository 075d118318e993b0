"""The bytes a tenant stores, for --max-stored-bytes-per-tenant (evalsvc.store.usage).

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-06 15:30:00.000000

- `runs.stored_bytes`: what a run stores. Filled here from what each run already holds, as the service
  counts it (evalsvc.store.usage): its definition and descriptive fields four times, its copied items, 128
  bytes a job, its outputs, and per result 384 bytes plus its explanation and error reason twice.
- `tenant_run_totals.stored_bytes`: a tenant's runs' bytes and its datasets' items'; `cache_bytes`: its
  response cache entries' payloads (--cache-max-bytes). Filled here, with a row for a tenant that has
  datasets or cache entries and no run yet.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | Sequence[str] | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("stored_bytes", BIG, server_default="0", nullable=False))
    with op.batch_alter_table("tenant_run_totals", schema=None) as batch_op:
        batch_op.add_column(sa.Column("stored_bytes", BIG, server_default="0", nullable=False))
        batch_op.add_column(sa.Column("cache_bytes", BIG, server_default="0", nullable=False))
    # One grouped read of each table (outputs has no index by run: a correlated subquery per run would
    # read the whole table once per run), added to the runs it names.
    op.execute(
        "UPDATE runs SET stored_bytes = 4 * (length(spec) + length(display_name) + length(description)"
        " + length(CAST(labels AS TEXT)) + length(CAST(annotations AS TEXT)))"
    )
    for table, size in (
        ("run_items", "length(item)"),
        ("jobs", "128"),
        ("outputs", "length(output)"),
        ("results", "384 + 2 * (length(explanation) + length(error_reason))"),
    ):
        op.execute(
            f"UPDATE runs SET stored_bytes = runs.stored_bytes + part.size "
            f"FROM (SELECT run_id, SUM({size}) AS size FROM {table} GROUP BY run_id) AS part "
            "WHERE part.run_id = runs.id"
        )
    op.execute(
        "INSERT INTO tenant_run_totals (tenant, runs, purged_cost_usd, stored_bytes) "
        "SELECT tenant, 0, 0, 0 FROM (SELECT tenant FROM dataset_items UNION SELECT tenant FROM cache_entries) AS t "
        "WHERE tenant NOT IN (SELECT tenant FROM tenant_run_totals)"
    )
    for column, size, table in (
        ("stored_bytes", "stored_bytes", "runs"),
        ("stored_bytes", "length(item)", "dataset_items"),
        ("cache_bytes", "length(payload)", "cache_entries"),
    ):
        op.execute(
            f"UPDATE tenant_run_totals SET {column} = tenant_run_totals.{column} + part.size "
            f"FROM (SELECT tenant, SUM({size}) AS size FROM {table} GROUP BY tenant) AS part "
            "WHERE part.tenant = tenant_run_totals.tenant"
        )


def downgrade() -> None:
    with op.batch_alter_table("tenant_run_totals", schema=None) as batch_op:
        batch_op.drop_column("cache_bytes")
        batch_op.drop_column("stored_bytes")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("stored_bytes")
