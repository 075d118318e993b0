"""Alembic environment for evalsvc.

The service runs migrations through `evalsvc.store.migrate`, which hands over an open connection of
its own (async) engine in `config.attributes["connection"]`, inside a transaction it commits. The
`alembic` command line (for authoring revisions) has no connection to hand over, so this file then
opens one itself, asynchronously, from the URL in alembic.ini or `EVALSVC_DB`:

    EVALSVC_DB=sqlite+aiosqlite:////tmp/head.db evalsvc migrate   # a database at head to compare with
    EVALSVC_DB=sqlite+aiosqlite:////tmp/head.db \
        alembic -c evalsvc/store/migrations/alembic.ini revision --autogenerate -m "what changed"

SQLite cannot ALTER most things, so migrations render in batch mode there (copy-and-move tables).
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

from evalsvc.store import models as _models  # noqa: F401  (registers the tables on SQLModel.metadata)

config = context.config
target_metadata = SQLModel.metadata


def _url() -> str:
    return (
        os.environ.get("EVALSVC_DB") or config.get_main_option("sqlalchemy.url") or "sqlite+aiosqlite:///./evalsvc.db"
    )


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        compare_server_default=True,
    )


def _run_with(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = create_async_engine(_url(), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_with)
            await connection.commit()
    finally:
        await engine.dispose()


def _run_offline() -> None:
    url = _url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    _run_offline()
elif (given := config.attributes.get("connection")) is not None:
    _run_with(given)
else:
    asyncio.run(_run_async())
