"""Engines and transactions.

SQLite allows one writer at a time, and a transaction that reads first and writes later fails at
once with "database is locked" when another writer got in between. So writes go through a
dedicated single-connection engine whose transactions start with `BEGIN IMMEDIATE` (they queue for
the lock instead of failing), while reads use a separate pool that never blocks the writer (WAL).
On PostgreSQL both engines are ordinary pools and row locks do the serialising.
"""

from __future__ import annotations

import errno
import os
import socket
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from sqlalchemy import event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from evalsvc.store import models as _models  # noqa: F401  (registers the tables)
from evalsvc.store.run_cache import RunRowCache, forget_since, noted, take_changed
from evalsvc.store.writer import Batch, DatabaseClosed, GroupWriter

T = TypeVar("T")
P = TypeVar("P")
R = TypeVar("R")


# The URL schemes (engine + async driver) the store speaks.
DRIVERS = ("sqlite+aiosqlite", "postgresql+asyncpg")


# How long a write transaction may sit idle between its statements (PostgreSQL; `Database.write`), when
# the caller does not say: `Settings.idle_in_transaction_s` is what a server uses.
IDLE_IN_TRANSACTION_S = 15.0
_BOUND_IDLE = text("SELECT set_config('idle_in_transaction_session_timeout', :ms, true)")


class DatabaseLost(RuntimeError):
    """A write asked of a database whose files are gone from under the server (`Database.lose`)."""


def database_lost(exc: BaseException) -> DatabaseLost | None:
    """The DatabaseLost `exc` is or was raised from: no retry can help, only a restart."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, DatabaseLost):
        cause = getattr(cause, "orig", None) or cause.__cause__ or cause.__context__
    return cause


class Database:
    """The service's database: a write engine (one writer on SQLite) and a read engine."""

    def __init__(
        self,
        url: str,
        *,
        sqlite_synchronous: str = "FULL",
        pool_size: int = 10,
        idle_in_transaction_s: float = IDLE_IN_TRANSACTION_S,
    ) -> None:
        """ValueError for a URL of another engine or driver than the two the store speaks (without it,
        `mysql://` or `sqlite:///...` failed deep in SQLAlchemy, with a traceback).

        `idle_in_transaction_s` (PostgreSQL): how long a write transaction of this process may sit idle
        between its statements before PostgreSQL ends its session, releasing its locks (see `write`)."""
        self.url = url
        self.lost: str | None = None  # set by `lose`: why no write may be made any more
        self._idle_in_transaction_ms = str(max(1, round(idle_in_transaction_s * 1000)))
        parsed = database_url(url)
        if parsed.drivername not in DRIVERS:
            raise ValueError(
                f"{parsed.drivername!r} is not a database evalsvc can use: "
                "write sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST/DATABASE"
            )
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite and _in_memory(parsed.database, parsed.query):
            # Each connection (the writer, every reader) would have an empty database of its own: it was
            # a TypeError traceback from the pool arguments.
            raise ValueError(
                "an in-memory SQLite database cannot be used: the writer and the readers would each see "
                "a database of their own, and everything is lost at exit; "
                "write sqlite+aiosqlite:///PATH for a file (a temporary directory's, for throwaway data)"
            )
        if self.is_sqlite:
            self.writer = create_async_engine(url, pool_size=1, max_overflow=0, pool_timeout=300)
            # Readers run in autocommit: each SELECT is its own snapshot, with no BEGIN before it and
            # no ROLLBACK when the connection goes back to the pool (each is a thread hop in aiosqlite).
            self.reader = create_async_engine(
                url, pool_size=pool_size, max_overflow=0, pool_timeout=60, pool_reset_on_return=None
            )
            for engine in (self.writer, self.reader):
                _configure_sqlite(engine, sqlite_synchronous, immediate=engine is self.writer)
                if not _sqlite_uri(parsed):
                    _create_owner_only(engine, Path(str(parsed.database)))
        else:
            # pre-ping: a pooled connection whose backend died (terminated, a restart, a failover) costs
            # a reconnect at checkout, not the call that drew it (a round trip per checkout).
            self.writer = create_async_engine(
                url,
                pool_size=pool_size,
                max_overflow=pool_size,
                pool_pre_ping=True,
            )
            _configure_postgres(self.writer)
            self.reader = self.writer
        # This process writes every change of a SQLite database (it has one server), so it can keep
        # run rows current in memory; other servers change a PostgreSQL database behind its back.
        self.run_rows: RunRowCache | None = RunRowCache() if self.is_sqlite else None
        # What this process's committed write transactions counted (`tally`), for evalsvc.metrics.
        self.tallies: Counter[str] = Counter()
        self.group_writer = GroupWriter(
            self.write,
            savepoint,
            is_unavailable=lambda exc: unavailable_cause(exc) is not None,
            is_conflict=is_conflict,
        )

    async def transact(self, work: Callable[[AsyncConnection], Awaitable[T]], *, alone: bool = False) -> T:
        """Apply `work` in the writer's next group transaction (evalsvc.store.writer); its result once
        committed. `work` may run twice (alone, after its group failed): it must keep no state outside
        what it returns. `alone`: a transaction of its own (GroupWriter.transact)."""
        return await self.group_writer.transact(work, alone=alone)

    async def submit(self, batch: Batch[P, R], payload: P) -> R:
        """Apply `payload` with the other payloads of its batch kind in the writer's next group."""
        return await self.group_writer.submit(batch, payload)

    def lose(self, why: str) -> None:
        """Refuse every write from now on (DatabaseLost: UNAVAILABLE to callers): the files this server
        writes are no longer the database's (evalsvc.store.serve_lock.ServeLock.lost), so a write
        acknowledged now would vanish at its exit."""
        self.lost = why

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction of its own: commits on success, rolls back on any exception. The writer
        uses it for each group; elsewhere only for start-up, maintenance and tests, where nothing else
        writes (on SQLite it waits for the one write connection, so it never races the writer).

        On PostgreSQL the transaction may sit idle between statements for `idle_in_transaction_s` at
        most; past it PostgreSQL ends the session and its locks go with it. A replica stopped inside a
        write transaction (SIGSTOP, a VM or GC pause, a network partition) held the writers' lock
        (evalsvc.store.writer's GROUP_LOCK) and its row locks until it woke: every replica's claims,
        recordings, lease renewals and CreateRuns waited behind it, and their watchdogs turned the
        healthy replicas NOT_SERVING (a probe: nothing moved for a 26 s pause). Reads hold no lock
        another server waits for and are not bounded (a watch or comparison may read slowly)."""
        if self.lost is not None:
            raise DatabaseLost(self.lost)
        async with self.writer.connect() as conn:
            take_changed(conn)
            try:
                async with conn.begin():
                    if not self.is_sqlite:
                        await conn.execute(_BOUND_IDLE, {"ms": self._idle_in_transaction_ms})
                    yield conn
            except BaseException:
                # A connection the failure invalidated (the server went away) has lost its info with
                # it; asking for it would try to reconnect from sync code (MissingGreenlet).
                if not conn.invalidated:
                    take_changed(conn)
                    conn.info.pop(_TALLIES, None)
                raise
            # Committed, and the connection (SQLite's one writer) is still ours: commit order.
            changed = take_changed(conn)
            self.tallies.update(conn.info.pop(_TALLIES, {}))
            if self.run_rows is not None:
                self.run_rows.committed(changed)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads. On SQLite each statement sees the latest commit (no multi-statement
        snapshot); callers that need consistency across statements read in one statement."""
        async with self.reader.connect() as conn:
            yield conn

    async def close(self) -> None:
        """Commit what the writer holds, then dispose of every pooled connection."""
        await self.group_writer.close()
        await self.writer.dispose()
        if self.reader is not self.writer:
            await self.reader.dispose()


@asynccontextmanager
async def savepoint(conn: AsyncConnection) -> AsyncIterator[None]:
    """A savepoint in a write transaction: when the block raises, its writes are rolled back and the
    run rows it noted for the cache are forgotten; the transaction goes on (the group writer applies
    each intent of a shared group in one)."""
    mark = noted(conn)
    counted = dict(conn.info.get(_TALLIES, {}))
    try:
        async with conn.begin_nested():
            yield
    except BaseException:
        if not conn.invalidated:
            forget_since(conn, mark)
            conn.info[_TALLIES] = counted
        raise


_TALLIES = "evalsvc.tallies"


def tally(conn: AsyncConnection, name: str, count: int) -> None:
    """Count `count` of `name` in this write transaction: added to the database's `tallies` once it
    commits, and never if it (or the savepoint it is in) rolls back, so a metric of what a store
    function did (evalsvc.metrics) counts what the database holds, whichever write transaction did it."""
    counts: dict[str, int] = conn.info.setdefault(_TALLIES, {})
    counts[name] = counts.get(name, 0) + count


# SQLite result codes (sqlite3 exceptions' `sqlite_errorname`, extended codes by prefix) and
# PostgreSQL SQLSTATE classes that mean "the database cannot serve now", not "this request is wrong".
_SQLITE_UNAVAILABLE = {
    "SQLITE_FULL": "the disk is full",
    "SQLITE_READONLY": "the database is read-only",
    "SQLITE_CANTOPEN": "the database file cannot be opened",
    "SQLITE_IOERR": "disk I/O error",
    "SQLITE_BUSY": "the database is locked by another process",
    # Not the moment's but the file's: no retry helps until the operator acts, yet it is no bug
    # either, and start-up and the operator commands must say so in one line naming the file.
    "SQLITE_NOTADB": "the file is not a SQLite database (a wrong --db path, or another program's file)",
    "SQLITE_CORRUPT": (
        "the database file is corrupt (restore a backup; `sqlite3 FILE 'PRAGMA integrity_check'` shows the damage)"
    ),
}
_SQLSTATE_UNAVAILABLE = {
    "53100": "the database server's disk is full",
    "53": "the database server is out of resources",
    "08": "the connection to the database failed",
    "57P": "the database server is shutting down or starting",
    "3D000": "the database does not exist on the database server",
    "28": "the database server refused the login (no such role, or a wrong password)",
    # A DBA's lock_timeout or statement_timeout, or pg_cancel_backend: the statement would succeed later.
    "55P03": "a lock the statement needed was not granted in time (lock_timeout)",
    "57014": "the statement was cancelled (statement_timeout, or an administrator)",
}
# What the database refuses because of the values written, whenever they are written: PostgreSQL's
# data_exception (22: an untranslatable character, a number out of range), integrity_constraint_violation
# (23) and program_limit_exceeded (54: a row or index entry too large); SQLite's equivalents.
_SQLSTATE_DATA = ("22", "23", "54")
_SQLITE_DATA = ("SQLITE_TOOBIG", "SQLITE_CONSTRAINT", "SQLITE_MISMATCH")


# A reached resource that failed (not a bug in the service): full, read-only or failing storage.
_OS_UNAVAILABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


def unavailable_cause(exc: BaseException) -> str | None:
    """Why the database cannot serve at the moment (a full disk, a read-only or unopenable file, a
    refused or dropped connection, an exhausted pool), or None when `exc` is something else.

    Such failures are the operator's to fix and the caller's to retry: the API answers UNAVAILABLE
    with RetryInfo and start-up exits naming the cause, instead of INTERNAL and a traceback."""
    cause: BaseException | None = exc
    while cause is not None:
        name = getattr(cause, "sqlite_errorname", None)
        if isinstance(name, str):
            for prefix, text in _SQLITE_UNAVAILABLE.items():
                if name.startswith(prefix):
                    return text
        state = getattr(cause, "sqlstate", None)
        if isinstance(state, str):
            for prefix, text in _SQLSTATE_UNAVAILABLE.items():
                if state.startswith(prefix):
                    return text
        if isinstance(cause, (ConnectionError, TimeoutError, socket.gaierror)) or (
            isinstance(cause, OSError) and cause.errno in _OS_UNAVAILABLE
        ):
            return "the disk is full" if cause.errno in (errno.ENOSPC, errno.EDQUOT) else cause.strerror or str(cause)
        if isinstance(cause, sa_exc.TimeoutError):
            return "no database connection became free in time"
        if isinstance(cause, DatabaseClosed):
            return "the server is stopping (its database is closed)"
        if isinstance(cause, DatabaseLost):
            return f"{cause}: restart the server"
        if _connection_lost(cause):
            return "the connection to the database was lost"
        cause = getattr(cause, "orig", None) or cause.__cause__
    return None


def is_database_error(exc: BaseException) -> bool:
    """Whether `exc` (or what it was raised from) is the database's or its driver's error, whose text
    may quote a statement and its bound values (other tenants' among them, for a batched statement)."""
    cause: BaseException | None = exc
    seen = 0
    while cause is not None and seen < 16:
        if isinstance(cause, (sa_exc.SQLAlchemyError, asyncpg.PostgresError, asyncpg.InterfaceError, sqlite3.Error)):
            return True
        cause, seen = getattr(cause, "orig", None) or cause.__cause__ or cause.__context__, seen + 1
    return False


def public_text(exc: BaseException) -> str:
    """What an exception may say to a tenant (an error_reason, a run's error): its text, except for a
    database error, whose text names the statement and its parameters: then only why the database
    could not serve, or that it failed (the server logs the rest)."""
    if is_database_error(exc):
        return unavailable_cause(exc) or "the database failed on this request (the server logged its reason)"
    return str(exc)


def _connection_lost(exc: BaseException) -> bool:
    """Whether `exc` says the connection it was raised on is gone (the server terminated its backend,
    restarted, or failed over): SQLAlchemy marks such an error `connection_invalidated`; asyncpg's own
    errors have no SQLSTATE (its DataError, an InterfaceError too, is a value it could not encode)."""
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, asyncpg.exceptions.ConnectionDoesNotExistError):
        return True
    return (
        isinstance(exc, asyncpg.exceptions.InterfaceError)
        and not isinstance(exc, asyncpg.exceptions.DataError)
        and "closed" in str(exc)
    )


def is_refused_data(exc: BaseException) -> bool:
    """Whether the database refused `exc`'s statement for the values it wrote (a value out of range or
    that cannot be encoded, a constraint broken, a row past a limit): applied again alone it would fail
    the same way. False for a database that cannot serve, a lost race, and anything not known to be the
    data's (the recorder tries a job that fails alone for an unknown reason again before giving up on it)."""
    if unavailable_cause(exc) is not None or is_conflict(exc):
        return False
    cause: BaseException | None = exc
    while cause is not None:
        state = getattr(cause, "sqlstate", None)
        if isinstance(state, str) and state.startswith(_SQLSTATE_DATA):
            return True
        name = getattr(cause, "sqlite_errorname", None)
        if isinstance(name, str) and name.startswith(_SQLITE_DATA):
            return True
        if isinstance(cause, (sa_exc.DataError, sa_exc.IntegrityError, asyncpg.exceptions.DataError)):
            return True
        cause = getattr(cause, "orig", None) or cause.__cause__
    return False


def is_conflict(exc: BaseException) -> bool:
    """Whether `exc` is PostgreSQL's deadlock_detected (40P01) or serialization_failure (40001): this
    transaction lost a race with another one and would succeed if applied again."""
    cause: BaseException | None = exc
    while cause is not None:
        state = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
        if isinstance(state, str) and state in ("40P01", "40001"):
            return True
        cause = getattr(cause, "orig", None) or cause.__cause__
    return False


async def read_in_index_order(conn: AsyncConnection) -> None:
    """Have PostgreSQL read the rest of this transaction's ordered, limited ranges down their index
    (the connection's reset at the end of the read rolls the setting back); nothing on SQLite.

    A large run's rows are inserted after the table's statistics were taken (autovacuum's ANALYZE
    comes a minute later, or, for a run far larger than the table's average, never helps), so
    PostgreSQL planned a page of them as a bitmap scan of every later row of the run and a sort:
    40-50 ms for 101 keys of a 100,000-evaluation run, instead of ~0.1 ms down the index."""
    if conn.dialect.name == "postgresql":
        await conn.exec_driver_sql("SET LOCAL enable_bitmapscan = off")


def database_url(url: str) -> URL:
    """`--db` parsed; ValueError saying which URL to write for a bare path (`--db ./evalsvc.db`), of
    which SQLAlchemy said only "Could not parse SQLAlchemy URL from given URL string"."""
    if "://" not in url:
        raise ValueError(
            f"{url!r} is not a database URL: write sqlite+aiosqlite:///{url} for a SQLite file, "
            "or postgresql+asyncpg://USER@HOST/DATABASE"
        )
    return make_url(url)


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL; None for PostgreSQL and in-memory SQLite (which Database refuses).
    ValueError for a bare path (`database_url`)."""
    parsed = database_url(url)
    if parsed.get_backend_name() != "sqlite" or _in_memory(parsed.database, parsed.query):
        return None
    return Path(str(parsed.database))


def _in_memory(database: str | None, query: Any) -> bool:
    """Whether a SQLite URL's database is in memory: none, `:memory:`, or a URI with `mode=memory`."""
    mode = query.get("mode") if query else None
    return database in (None, "", ":memory:") or "mode=memory" in (database or "") or mode == "memory"


def _sqlite_uri(url: URL) -> bool:
    """Whether the URL names its SQLite database as a `file:` URI (`?uri=true`): its path is SQLite's to
    resolve, with its own options (`mode=ro` must create nothing), so no file is made for it here."""
    return str(url.database or "").startswith("file:") or str(url.query.get("uri", "")).lower() == "true"


def _create_owner_only(engine: AsyncEngine, path: Path) -> None:
    """Have every connection of `engine` find its SQLite file made readable by this user only (0600)
    when it does not exist yet: the file holds key hashes and the secrets' ciphertext, as a backup does
    (`evalsvc backup` writes 0600), and SQLite itself creates it 0644 under the usual umask. SQLite
    gives its -wal, -shm and -journal files the database file's mode, so they follow. A file that
    exists is the operator's and is left as it is (O_EXCL: a file or link there is never touched)."""

    @event.listens_for(engine.sync_engine, "do_connect")
    def _before_connect(*_: Any) -> None:
        # FileExistsError is the usual case (an existing database); any other OSError (a missing or
        # read-only directory) is SQLite's own open's to report, as before.
        with suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))


_KEEPALIVES = (
    "SELECT set_config('tcp_keepalives_idle', '60', false), set_config('tcp_keepalives_interval', '10', false), "
    "set_config('tcp_keepalives_count', '3', false)"
)


def _configure_postgres(engine: AsyncEngine) -> None:
    """TCP keepalives on every connection: PostgreSQL finds a session whose client vanished (a host that
    died, a partition) within about a minute and a half, not the kernel's two hours, and frees its
    connection slot. Set once per new connection rather than as startup parameters, which poolers such
    as PgBouncer refuse unless told to ignore them."""

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute(_KEEPALIVES)
        cursor.close()
        dbapi_conn.commit()  # a setting made in a transaction that is rolled back is undone with it


def _configure_sqlite(engine: AsyncEngine, synchronous: str, *, immediate: bool) -> None:
    if synchronous.upper() not in {"FULL", "NORMAL", "EXTRA"}:
        raise ValueError(f"sqlite synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module so BEGIN is ours to choose.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous.upper()}")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    if immediate:

        @event.listens_for(engine.sync_engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
