"""Scratch databases for tests: a SQLite file by default, a fresh PostgreSQL database per test with
`EVALSVC_TEST_DB=postgres`.

Every test that needs a database asks `db_url(tmp_path, name)`. The same (tmp_path, name) gives the
same database, just as the same path gives the same SQLite file, so restart tests work unchanged.
On PostgreSQL each one is `CREATE DATABASE ... TEMPLATE` of a template migrated once per session
(cloning is far cheaper than migrating per test), and conftest drops them after each test.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.engine import make_url

T = TypeVar("T")

USE_POSTGRES = os.environ.get("EVALSVC_TEST_DB", "sqlite").strip().lower() in {"postgres", "postgresql", "pg"}
# The maintenance database the scratch databases are created from (asyncpg's plain URL form).
ADMIN_URL = os.environ.get("EVALSVC_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
PREFIX = f"evalsvc_t_{os.getpid()}_"
TEMPLATE = f"{PREFIX}template"

_created: list[str] = []
_template_ready = False


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even inside a running event loop (tests are async)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def sqlalchemy_url(database: str) -> str:
    """The service's URL (postgresql+asyncpg://) of a database on the test server."""
    return make_url(ADMIN_URL).set(drivername="postgresql+asyncpg", database=database).render_as_string(False)


async def _admin(*statements: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(ADMIN_URL, timeout=5)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def postgres_unavailable() -> str | None:
    """Why the test PostgreSQL cannot be used, or None when it can."""
    try:
        _run(_admin("SELECT 1"))
    except Exception as exc:  # any failure to connect means: skip, with the reason
        return f"EVALSVC_TEST_DB=postgres but PostgreSQL at {ADMIN_URL} is not reachable ({exc!r})"
    return None


def _ensure_template() -> None:
    global _template_ready
    if _template_ready:
        return
    from evalsvc.store.migrate import upgrade

    _run(_admin(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)', f'CREATE DATABASE "{TEMPLATE}"'))
    _run(_upgrade_and_close(upgrade, sqlalchemy_url(TEMPLATE)))
    _template_ready = True


async def _upgrade_and_close(upgrade: Any, url: str) -> None:
    from evalsvc.store.db import Database

    db = Database(url, pool_size=1)
    try:
        await upgrade(db)
    finally:
        await db.close()


def db_url(tmp_path: Path, name: str = "evalsvc.db", *, migrated: bool = True) -> str:
    """The URL of this test's database `name`: a SQLite file in tmp_path, or a scratch PostgreSQL
    database (migrated to head unless `migrated=False`), created on first use."""
    if not USE_POSTGRES:
        return f"sqlite+aiosqlite:///{tmp_path / name}"
    database = PREFIX + hashlib.sha256(f"{tmp_path}/{name}".encode()).hexdigest()[:16]
    if database not in _created:
        if migrated:
            _ensure_template()
            _run(_admin(f'CREATE DATABASE "{database}" TEMPLATE "{TEMPLATE}"'))
        else:
            _run(_admin(f'CREATE DATABASE "{database}"'))
        _created.append(database)
    return sqlalchemy_url(database)


def drop_created() -> None:
    """Drop every scratch database made since the last call (FORCE: killed servers may hold connections)."""
    if _created:
        _run(_admin(*(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in _created)))
        _created.clear()


def drop_template() -> None:
    """Drop the session's template database."""
    global _template_ready
    if _template_ready:
        _run(_admin(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)'))
        _template_ready = False


def stored_bytes(tmp_path: Path, url: str) -> bytes:
    """Everything a test's database holds, for "this secret is never stored" checks: the SQLite
    files (WAL included), or every row of every table on PostgreSQL."""
    if not USE_POSTGRES:
        return b"".join(p.read_bytes() for p in tmp_path.glob(make_url(url).database.rsplit("/", 1)[-1] + "*"))
    return _run(_dump(url))


async def _dump(url: str) -> bytes:
    import asyncpg
    from sqlmodel import SQLModel

    conn = await asyncpg.connect(make_url(url).set(drivername="postgresql").render_as_string(False), timeout=5)
    try:
        chunks = [repr(await conn.fetch(f'SELECT * FROM "{t.name}"')) for t in SQLModel.metadata.sorted_tables]
    finally:
        await conn.close()
    return "".join(chunks).encode()
