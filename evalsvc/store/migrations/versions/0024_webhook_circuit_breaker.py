"""A webhook's circuit breaker and its count of events not queued.

`consecutive_failures`, `circuit_open_until` and `circuit_opens` hold the breaker's state in the
database, so every replica (and a restarted server) honours an open circuit: a receiver that hangs or
keeps failing no longer holds a delivery slot per due delivery for the whole timeout, on every retry
(evalsvc.webhooks.sender). `dropped_events` counts the events not queued for the webhook because its
tenant's backlog was full, which were visible only as FAILED `events.dropped` deliveries.

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-07 08:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0024"
down_revision: str | Sequence[str] | None = "0023"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("webhooks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("consecutive_failures", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("circuit_open_until", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("circuit_opens", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("dropped_events", BIG, server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("webhooks", schema=None) as batch_op:
        batch_op.drop_column("dropped_events")
        batch_op.drop_column("circuit_opens")
        batch_op.drop_column("circuit_open_until")
        batch_op.drop_column("consecutive_failures")
