"""Schema migrations (Alembic): bring a database to the newest revision, or check that it is there.

The embedded SQLite default migrates itself at start: one process owns the file, so there is nobody
to coordinate with. The operator commands (`migrate`, and `keys`, `cache`, `secrets`, which bring a
SQLite file to their version before using it) change a SQLite file's schema only while no server
serves it: a server runs on the schema it started with, and a newer evalsvc's migration beside it
would change the tables under it. A shared database (PostgreSQL) is migrated deliberately, with `evalsvc migrate`,
before replicas of a new version start; `serve` refuses one that is behind or at a revision it does
not know, rather than racing other replicas to change it or serving a schema it does not understand.

Alembic's command API is synchronous; it runs here on the sync face of one of the service's own
async connections (`run_sync`), inside one transaction, so a failed migration changes nothing
(PostgreSQL and SQLite both have transactional DDL).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, make_url
from sqlmodel import SQLModel

from evalsvc.store.db import Database, sqlite_path
from evalsvc.store.serve_lock import MIGRATING, DatabaseInUse, ServeLock

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
# The first revision. On SQLite it is exactly what `SQLModel.metadata.create_all` made before
# migrations existed, so such a file (tables but no alembic_version) is stamped with it and upgraded.
BASELINE = "0001"
# Serialises concurrent `evalsvc migrate` runs on one PostgreSQL database (any constant would do).
_PG_LOCK_KEY = 0x65766C73
# A database without alembic_version is taken for one create_all made before migrations only when it
# has all of these tables with (at least) these columns of the baseline: a table named `runs` alone was
# enough, so another program's database was stamped and altered (refused only by luck: the ALTERs failed).
_BASELINE_SIGNATURE: dict[str, frozenset[str]] = {
    "runs": frozenset({"id", "tenant", "request_id", "request_hash", "spec", "status", "total_evaluations"}),
    "jobs": frozenset({"id", "run_id", "item_idx", "repetition", "state", "claim_id", "lease_expiry", "attempt"}),
    "results": frozenset({"id", "run_id", "job_id", "item_id", "grader", "state", "score", "error_reason"}),
    "events": frozenset({"run_id", "seq", "tenant", "payload"}),
    "api_keys": frozenset({"id", "tenant", "secret_hash"}),
}


class SchemaError(RuntimeError):
    """The database's schema is not one this evalsvc can serve (behind, unknown or absent)."""


@dataclass(frozen=True)
class SchemaState:
    """Where a database's schema is, compared with this evalsvc's migrations."""

    current: frozenset[str]
    heads: frozenset[str]
    known: frozenset[str]
    unversioned_tables: bool  # evalsvc tables without alembic_version: made before migrations existed
    # Without alembic_version, tables named like evalsvc's that are not its baseline: another program's.
    foreign_tables: frozenset[str] = frozenset()

    @property
    def at_head(self) -> bool:
        return self.current == self.heads

    @property
    def unknown(self) -> frozenset[str]:
        return self.current - self.known


def alembic_config() -> Config:
    """Alembic's configuration, in code: the service needs no alembic.ini."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


@cache
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    """The newest revision (the migrations are one linear history)."""
    return _script().get_current_head() or ""


def _state(connection: Connection) -> SchemaState:
    script = _script()
    current = frozenset(MigrationContext.configure(connection).get_current_heads())
    ours: frozenset[str] = frozenset()
    baseline = False
    if not current:
        inspector = inspect(connection)
        ours = frozenset(inspector.get_table_names()) & SQLModel.metadata.tables.keys()
        baseline = bool(ours) and all(
            table in ours and columns <= {column["name"] for column in inspector.get_columns(table)}
            for table, columns in _BASELINE_SIGNATURE.items()
        )
    return SchemaState(
        current=current,
        heads=frozenset(script.get_heads()),
        known=frozenset(rev.revision for rev in script.walk_revisions()),
        unversioned_tables=baseline,
        foreign_tables=frozenset() if baseline else ours,
    )


def _foreign_message(found: SchemaState, url: str) -> str:
    where = sqlite_path(url) or make_url(url).render_as_string(hide_password=True)
    return (
        f"the database {where} is not an evalsvc database: it has tables named like evalsvc's "
        f"({', '.join(sorted(found.foreign_tables))}) but no evalsvc schema revision and not evalsvc's columns; "
        "is --db another program's database? Give evalsvc a database of its own"
    )


async def state(db: Database) -> SchemaState:
    """The schema state of a database."""
    async with db.read() as conn:
        return await conn.run_sync(_state)


def _unknown_message(found: SchemaState) -> str:
    return (
        f"the database schema is at revision {', '.join(sorted(found.unknown))}, which this evalsvc does not know "
        f"(its newest is {head()}); was it migrated by a newer evalsvc? Run that version, or restore a backup"
    )


async def upgrade(db: Database, *, unless_served: bool = False) -> tuple[frozenset[str], str]:
    """Migrate a database to head in one transaction; returns (revisions before, head).

    Raises SchemaError for a revision this evalsvc does not know (a newer version's). With
    `unless_served` (the operator commands; a server holds the lock itself), a SQLite file is changed
    only under its serve lock (evalsvc.store.serve_lock), and SchemaError says which server to stop
    when one holds it and the schema is behind; a schema at head changes nothing, so it is not refused."""
    path = sqlite_path(db.url) if unless_served else None
    lock = ServeLock(path, MIGRATING) if path is not None and path.exists() else None
    if lock is not None:
        try:
            lock.acquire()
        except DatabaseInUse as exc:
            found = await state(db)
            if not found.at_head and not found.unknown:
                then = (
                    "; run one at a time"
                    if exc.doing == MIGRATING
                    else " on the schema it started with; stop it first (`evalsvc serve` of this version "
                    "migrates the file itself when it starts)"
                )
                raise SchemaError(
                    f"cannot migrate the database {path} to revision {head()}: {exc} (it holds {exc.lock_file}){then}"
                ) from None
            lock = None  # nothing to change (or an unknown revision, which the upgrade names)
    try:
        async with db.write() as conn:
            if conn.dialect.name == "postgresql":
                # Two `migrate`s at once would both try to create the same tables; the second waits and then finds head.
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
            return await conn.run_sync(_upgrade)
    finally:
        if lock is not None:
            lock.release()


def _upgrade(connection: Connection) -> tuple[frozenset[str], str]:
    found = _state(connection)
    if found.unknown:
        raise SchemaError(_unknown_message(found))
    if found.foreign_tables:
        raise SchemaError(_foreign_message(found, connection.engine.url.render_as_string(hide_password=False)))
    if found.at_head:
        return found.current, head()
    config = alembic_config()
    config.attributes["connection"] = connection
    if found.unversioned_tables:
        if connection.dialect.name != "sqlite":
            # Only on SQLite is the old create_all schema identical to the baseline (there INTEGER is 64-bit anyway).
            raise SchemaError(
                "the database has evalsvc tables but no schema revision (made before evalsvc had migrations); "
                "migrate a new database with `evalsvc migrate` and copy the data over"
            )
        log.warning("the database has evalsvc tables but no schema revision; marking it %s (their schema)", BASELINE)
        command.stamp(config, BASELINE)
    command.upgrade(config, "head")
    log.info("migrated the database schema from %s to %s", ", ".join(sorted(found.current)) or "nothing", head())
    return found.current, head()


async def require_head(db: Database) -> None:
    """Raise SchemaError, saying what to do, unless the database is at head."""
    found = await state(db)
    if found.at_head:
        return
    if found.unknown:
        raise SchemaError(_unknown_message(found))
    if found.foreign_tables:
        raise SchemaError(_foreign_message(found, db.url))
    if found.unversioned_tables:
        raise SchemaError(
            "the database has evalsvc tables but no schema revision (made before evalsvc had migrations); "
            "migrate a new database with `evalsvc migrate` and copy the data over"
        )
    where = f"schema is at revision {', '.join(sorted(found.current))}" if found.current else "has no evalsvc schema"
    url = make_url(db.url).render_as_string(hide_password=True)
    raise SchemaError(
        f"the database {where}; this evalsvc needs revision {head()}. "
        f"Run `evalsvc migrate --db {url}` first (once, not per replica)"
    )


async def prepare(db: Database, *, unless_served: bool = False) -> None:
    """What `serve` and the operator commands do before using a database: the embedded SQLite migrates
    itself (`unless_served` as for `upgrade`), a shared database must already be at head (SchemaError
    otherwise)."""
    if db.is_sqlite:
        await upgrade(db, unless_served=unless_served)
    else:
        await require_head(db)
