"""Scratch databases for tests: a SQLite file by default, a fresh PostgreSQL database per test with
`EVALSVC_TEST_DB=postgres`.

Every test that needs a database asks `db_url(tmp_path, name)`. The same (tmp_path, name) gives the
same database, just as the same path gives the same SQLite file, so restart tests work unchanged.
Both start at head: a copy of a SQLite file migrated once per session, or a PostgreSQL clone.
On PostgreSQL each one is `CREATE DATABASE ... TEMPLATE` of a template migrated once per session
(cloning is far cheaper than migrating per test), and conftest drops them after each test.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import hashlib
import os
import shutil
import tempfile
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
_sqlite_template_path: Path | None = None
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
        return f"PostgreSQL at {ADMIN_URL} is not reachable ({exc!r})"
    return None


def _ensure_template() -> None:
    global _template_ready
    if _template_ready:
        return
    from evalsvc.store.migrate import upgrade

    _run(_drop_orphans())
    _run(_admin(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)', f'CREATE DATABASE "{TEMPLATE}"'))
    _run(_upgrade_and_close(upgrade, sqlalchemy_url(TEMPLATE)))
    _template_ready = True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _drop_orphans() -> None:
    """Drop scratch databases of test sessions that died without cleaning up (their pid is gone)."""
    import asyncpg

    conn = await asyncpg.connect(ADMIN_URL, timeout=5)
    try:
        for (name,) in await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE 'evalsvc_t_%'"):
            pid = name.split("_")[2]
            if pid.isdigit() and not _alive(int(pid)):
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


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
        path = tmp_path / name
        if migrated and tmp_path.is_dir() and not path.exists():
            shutil.copyfile(_sqlite_template(), path)
        return f"sqlite+aiosqlite:///{path}"
    return postgres_url(tmp_path, name, migrated=migrated)


def _sqlite_template() -> Path:
    """A SQLite file migrated to head once per session: copying it costs a millisecond, migrating a
    new file tens (the server finds the copy at head). tests/test_migrations.py migrates real new files."""
    global _sqlite_template_path
    if _sqlite_template_path is None:
        from evalsvc.store.migrate import upgrade

        folder = Path(tempfile.mkdtemp(prefix="evalsvc-template-"))
        path = folder / "template.db"
        _run(_upgrade_and_close(upgrade, f"sqlite+aiosqlite:///{path}"))  # closing checkpoints the WAL into the file
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _sqlite_template_path = path
    return _sqlite_template_path


def postgres_url(tmp_path: Path, name: str = "evalsvc.db", *, migrated: bool = True) -> str:
    """A scratch PostgreSQL database whatever EVALSVC_TEST_DB says (for tests of PostgreSQL itself);
    dropped after the test like every other."""
    database = PREFIX + hashlib.sha256(f"{tmp_path}/{name}".encode()).hexdigest()[:16]
    if database not in _created:
        if migrated:
            _ensure_template()
            _run(_admin(f'CREATE DATABASE "{database}" TEMPLATE "{TEMPLATE}"'))
        else:
            _run(_admin(f'CREATE DATABASE "{database}"'))
        _created.append(database)
    return sqlalchemy_url(database)


def created_count() -> int:
    """How many scratch databases exist now; pass it to `drop_created` to drop only later ones."""
    return len(_created)


def drop_created(since: int = 0) -> None:
    """Drop the scratch databases made after the first `since` (FORCE: killed servers may hold
    connections). A test drops its own; the session drops those of module-scoped fixtures at its end."""
    doomed = _created[since:]
    if doomed:
        _run(_admin(*(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in doomed)))
        del _created[since:]


def drop_template() -> None:
    """Drop the session's template database."""
    global _template_ready
    if _template_ready:
        _run(_admin(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)'))
        _template_ready = False


def stored_bytes(url: str) -> bytes:
    """Everything a test's database holds, for "this secret is never stored" checks: the SQLite
    files (WAL included), or every row of every table on PostgreSQL."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database or "")
        return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
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


async def transactions_open(url: str) -> int:
    """Transactions open now on a PostgreSQL database, other than this check's own connection."""
    import asyncpg

    conn = await asyncpg.connect(make_url(url).set(drivername="postgresql").render_as_string(False), timeout=5)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid() AND xact_start IS NOT NULL"
            )
        )
    finally:
        await conn.close()
