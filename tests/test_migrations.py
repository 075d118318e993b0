"""Alembic migrations: they build exactly the schema the models declare, on SQLite and PostgreSQL;
`serve` migrates the embedded SQLite itself but refuses a PostgreSQL database until `evalsvc migrate`.

The PostgreSQL cases run whenever the test PostgreSQL is reachable (they are quick), and are
skipped, saying so, when it is not.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

from evalsvc.server import EvalServer
from evalsvc.store import migrate
from evalsvc.store.db import Database
from evalsvc.store.serve_lock import ServeLock
from tests import dbs
from tests.conftest import make_settings
from tests.procs import ServerProcess, evalsvc_run

_PG_DOWN: list[str | None] = []


def _postgres_down() -> str | None:
    if not _PG_DOWN:
        _PG_DOWN.append(dbs.postgres_unavailable())
    return _PG_DOWN[0]


def _empty_database(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
    reason = _postgres_down()
    if reason is not None:
        pytest.skip(reason)
    return dbs.postgres_url(tmp_path, "empty", migrated=False)


async def _on(url: str, fn: Callable[[Connection], Any]) -> Any:
    db = Database(url)
    try:
        async with db.read() as conn:
            return await conn.run_sync(fn)
    finally:
        await db.close()


def _to_baseline(connection: Connection) -> None:
    """Build the schema of the first revision only: a database a version behind head."""
    config = migrate.alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, migrate.BASELINE)


def _diffs(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True, "compare_server_default": True})
    return list(compare_metadata(context, SQLModel.metadata))


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_migrating_an_empty_database_builds_exactly_the_models_schema(kind: str, tmp_path: Path) -> None:
    url = _empty_database(kind, tmp_path)
    db = Database(url)
    try:
        before, head = await migrate.upgrade(db)
        assert before == frozenset() and head == migrate.head()
        assert (await migrate.state(db)).at_head
        assert await migrate.upgrade(db) == (frozenset({head}), head)  # idempotent
    finally:
        await db.close()
    assert await _on(url, _diffs) == []
    assert await _on(url, _tables) == {t.name for t in SQLModel.metadata.sorted_tables} | {"alembic_version"}


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_every_revision_downgrades_to_nothing_and_back(kind: str, tmp_path: Path) -> None:
    url = _empty_database(kind, tmp_path)
    db = Database(url)
    try:
        await migrate.upgrade(db)

        def downgrade(connection: Connection) -> None:
            config = migrate.alembic_config()
            config.attributes["connection"] = connection
            command.downgrade(config, "base")

        async with db.write() as conn:
            await conn.run_sync(downgrade)
        async with db.read() as conn:
            assert await conn.run_sync(_tables) == {"alembic_version"}
        await migrate.upgrade(db)
    finally:
        await db.close()
    assert await _on(url, _diffs) == []


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_revision_0015_counts_the_runs_each_tenant_already_stores(kind: str, tmp_path: Path) -> None:
    """--max-runs-per-tenant reads each tenant's count from tenant_run_totals, so an upgraded database
    must start with the runs it already holds counted (an empty table would give every tenant a
    fresh 100,000 on top of them), and no spend of purged runs yet."""
    url = _empty_database(kind, tmp_path)
    db = Database(url)

    def upgrade_to(revision: str) -> Callable[[Connection], None]:
        def upgrade(connection: Connection) -> None:
            config = migrate.alembic_config()
            config.attributes["connection"] = connection
            command.upgrade(config, revision)

        return upgrade

    try:
        async with db.write() as conn:
            await conn.run_sync(upgrade_to("0014"))
            for n, tenant in enumerate(["a", "a", "b", "a", "b"]):
                await conn.execute(
                    text(
                        "INSERT INTO runs (id, tenant, request_hash, dataset_id, run_number, display_name, description,"
                        " labels, annotations, spec, status, total_items, total_evaluations, completed, passed,"
                        " failed, errored, skipped, error_code, error_message, create_time, update_time,"
                        " last_seq, cost_usd, version) VALUES (:id, :tenant, '', '', 0, '', '', '{}', '{}', :spec,"
                        " 4, 0, 0, 0, 0, 0, 0, 0, '', '', 0, 0, 1, 0.5, 1)"
                    ),
                    {"id": f"run_{n}", "tenant": tenant, "spec": b""},
                )
            await conn.run_sync(upgrade_to("head"))
        async with db.read() as conn:
            totals = await conn.execute(text("SELECT tenant, runs, purged_cost_usd, spent_usd FROM tenant_run_totals"))
            # Revision 0022 fills each tenant's running spend from its runs' cost_usd.
            assert sorted(tuple(row) for row in totals) == [("a", 3, 0.0, 1.5), ("b", 2, 0.0, 1.0)]
    finally:
        await db.close()


def _collations(connection: Connection) -> dict[tuple[str, str], str | None]:
    """Every text column's collation on PostgreSQL, as the database has it and as the models declare it
    (None: the database's default). Alembic's comparison does not look at collations."""
    found = connection.execute(
        text(
            "SELECT table_name, column_name, collation_name FROM information_schema.columns "
            "WHERE table_schema = 'public' AND data_type IN ('character varying', 'text') "
            "AND table_name <> 'alembic_version'"
        )
    )
    return {(table, column): collation for table, column, collation in found}


def _declared_collations(connection: Connection) -> dict[tuple[str, str], str | None]:
    declared: dict[tuple[str, str], str | None] = {}
    for table in SQLModel.metadata.sorted_tables:
        for column in table.columns:
            rendered = column.type.compile(dialect=connection.dialect)
            if rendered.startswith(("VARCHAR", "TEXT")):
                declared[(table.name, column.name)] = (
                    rendered.split('COLLATE "')[1].rstrip('"') if "COLLATE" in rendered else None
                )
    return declared


async def test_text_columns_have_the_collations_the_models_declare_on_postgres(tmp_path: Path) -> None:
    """results.item_id and results.grader compare by code point (COLLATE "C", revision 0013): the
    order ListComparisonItems pages in, which must be Python's (evalsvc.store.comparisons)."""
    url = _empty_database("postgresql", tmp_path)
    db = Database(url)
    try:
        await migrate.upgrade(db)
    finally:
        await db.close()
    found, declared = await _on(url, lambda c: (_collations(c), _declared_collations(c)))
    assert found == declared
    assert found[("results", "item_id")] == found[("results", "grader")] == "C"


async def test_a_sqlite_file_from_before_migrations_is_adopted(tmp_path: Path) -> None:
    """A file whose tables create_all made (no alembic_version) is stamped as the baseline and upgraded."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    db = Database(url)
    try:

        def baseline_without_version(connection: Connection) -> None:
            config = migrate.alembic_config()
            config.attributes["connection"] = connection
            command.upgrade(config, migrate.BASELINE)
            connection.execute(text("DROP TABLE alembic_version"))

        async with db.write() as conn:
            await conn.run_sync(baseline_without_version)
        assert (await migrate.state(db)).unversioned_tables
        await migrate.prepare(db)
        assert (await migrate.state(db)).at_head
    finally:
        await db.close()
    assert await _on(url, _diffs) == []


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_a_database_behind_head_is_migrated_on_sqlite_and_refused_on_postgres(kind: str, tmp_path: Path) -> None:
    url = _empty_database(kind, tmp_path)
    db = Database(url)
    try:
        async with db.write() as conn:
            await conn.run_sync(_to_baseline)
        if kind == "sqlite":
            await migrate.prepare(db)
            assert (await migrate.state(db)).at_head
        else:
            with pytest.raises(migrate.SchemaError, match=f"at revision {migrate.BASELINE}; .*`evalsvc migrate --db"):
                await migrate.prepare(db)
            assert (await migrate.state(db)).current == {migrate.BASELINE}
    finally:
        await db.close()


async def test_a_revision_this_version_does_not_know_is_refused_even_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'newer.db'}"
    db = Database(url)
    try:
        await migrate.upgrade(db)
        async with db.write() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = 'f00dfeed'"))
        with pytest.raises(migrate.SchemaError, match="f00dfeed, which this evalsvc does not know"):
            await migrate.prepare(db)
    finally:
        await db.close()


def _evalsvc(*args: str, umask: int = -1) -> subprocess.CompletedProcess[str]:
    """`python -m evalsvc ARGS` to its end (a fork of the test forker: no interpreter start and imports
    each); `umask`: the child's (-1 keeps this process's)."""
    return evalsvc_run(list(args), os.environ, umask=umask)


def _modes(directory: Path, name: str) -> dict[str, int]:
    """The permission bits of a SQLite database file and its -wal/-shm/-journal files (not the serve lock)."""
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.glob(f"{name}*") if not p.name.endswith(".lock")}


async def test_a_new_sqlite_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """The database holds key hashes and the secrets' ciphertext: SQLite made a new file (and its -wal and
    -shm) 0644 under umask 0022, readable by every user, where `evalsvc backup` writes 0600. A file the
    operator made is left with the mode it has."""
    served = tmp_path / "served.db"
    before = os.umask(0o022)
    try:
        server = EvalServer(make_settings(tmp_path, db=f"sqlite+aiosqlite:///{served}"))
        await server.start()
        try:
            serving = _modes(tmp_path, "served.db")
        finally:
            await server.stop(grace=0.5)
    finally:
        os.umask(before)
    assert serving == {"served.db": 0o600, "served.db-wal": 0o600, "served.db-shm": 0o600}

    for name, words in (("keys.db", ("keys", "list")), ("migrated.db", ("migrate",))):
        made = _evalsvc(*words, "--db", f"sqlite+aiosqlite:///{tmp_path / name}", umask=0o022)
        assert made.returncode == 0, made.stderr
        assert _modes(tmp_path, name) == {name: 0o600}, words  # the -wal and -shm are gone with the last connection

    theirs = tmp_path / "theirs.db"
    sqlite3.connect(theirs).close()
    theirs.chmod(0o640)
    assert _evalsvc("keys", "list", "--db", f"sqlite+aiosqlite:///{theirs}").returncode == 0
    assert _modes(tmp_path, "theirs.db") == {"theirs.db": 0o640}


async def test_a_sqlite_uri_database_is_left_to_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `file:` URI (`?uri=true`) names its file in SQLite's terms: the owner-only file was made at the
    URI's literal text (an empty `file:uri.db` beside the real `uri.db`), and even for `mode=ro`."""
    monkeypatch.chdir(tmp_path)
    db = Database("sqlite+aiosqlite:///file:uri.db?mode=rwc&uri=true")
    try:
        async with db.read() as conn:
            await conn.exec_driver_sql("SELECT 1")
    finally:
        await db.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["uri.db"]


@pytest.mark.slow
async def test_serve_refuses_an_unmigrated_postgres_database_until_evalsvc_migrate(tmp_path: Path) -> None:
    url = _empty_database("postgresql", tmp_path)
    refused = _evalsvc("serve", "--grpc-addr", "127.0.0.1:0", "--db", url)
    assert refused.returncode == 2, refused.stderr
    assert "has no evalsvc schema" in refused.stderr and f"evalsvc migrate --db {url}" in refused.stderr
    keys = _evalsvc("keys", "list", "--db", url)
    assert keys.returncode == 2 and "evalsvc migrate" in keys.stderr
    assert await _on(url, _tables) == set(), "a refused start must not create anything"

    migrated = _evalsvc("migrate", "--db", url)
    assert migrated.returncode == 0, migrated.stderr
    assert f"to {migrate.head()}" in migrated.stderr

    server = ServerProcess(url, tmp_path / "serve.log", forked=True)
    try:
        assert server.bootstrap_key()
    finally:
        assert server.terminate() == 0
    assert await _on(url, _diffs) == []


async def test_the_server_and_keys_migrate_a_new_sqlite_file_themselves(tmp_path: Path) -> None:
    served = f"sqlite+aiosqlite:///{tmp_path / 'served.db'}"
    server = EvalServer(make_settings(tmp_path, db=served))
    await server.start()
    await server.stop(grace=0.5)
    assert server.bootstrap_key and await _on(served, _diffs) == []

    keyed = f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}"
    listed = _evalsvc("keys", "list", "--db", keyed)
    assert listed.returncode == 0, listed.stderr
    assert await _on(keyed, _diffs) == []
    # A new file is said to be new (a key minted at a mistyped path would be lost unseen); an existing one is not.
    assert f"there was no database at {tmp_path / 'keys.db'}; made a new, empty one" in listed.stderr
    assert "no database" not in _evalsvc("keys", "list", "--db", keyed).stderr
    fresh = _evalsvc("migrate", "--db", f"sqlite+aiosqlite:///{tmp_path / 'typo.db'}")  # migrate says so too
    assert f"there was no database at {tmp_path / 'typo.db'}; made a new, empty one" in fresh.stderr, fresh.stderr
    assert "no database" not in _evalsvc("migrate", "--db", f"sqlite+aiosqlite:///{tmp_path / 'typo.db'}").stderr
    for words in (("migrate",), ("secrets", "list"), ("keys", "list")):  # one line each, no traceback
        foreign = _evalsvc(*words, "--db", f"sqlite:///{tmp_path / 'keys.db'}")
        assert foreign.returncode == 2 and len(foreign.stderr.strip().splitlines()) == 1, foreign.stderr
        assert "'sqlite' is not a database evalsvc can use" in foreign.stderr
    nowhere = _evalsvc("keys", "create", "--tenant", "t", "--db", f"sqlite+aiosqlite:///{tmp_path / 'no' / 'k.db'}")
    assert nowhere.returncode == 2 and nowhere.stdout == "", nowhere.stderr
    assert nowhere.stderr.strip().splitlines() == [
        f"evalsvc keys: --db (EVALSVC_DB): cannot use the database {tmp_path / 'no' / 'k.db'}: "
        f"its directory {tmp_path / 'no'} does not exist"
    ]


async def test_an_operator_command_does_not_migrate_a_sqlite_file_under_a_running_server(tmp_path: Path) -> None:
    """A newer evalsvc's `migrate` (or `keys`, which migrates a SQLite file before using it) beside a server
    of the older version changed the tables under that server. This process holds the file's serve lock,
    as a server of the schema at the baseline revision would."""
    path = tmp_path / "served.db"
    url = f"sqlite+aiosqlite:///{path}"
    db = Database(url)
    try:
        async with db.write() as conn:
            await conn.run_sync(_to_baseline)
        server = ServeLock(path)
        server.acquire()
        try:
            for words in (("migrate",), ("keys", "list"), ("secrets", "list"), ("cache", "prune", "--all")):
                refused = _evalsvc(*words, "--db", url)
                assert refused.returncode == 2 and refused.stdout == "", refused.stderr
                # One line naming the cause, last (`migrate` logs alembic's INFO lines before it), no traceback.
                said = refused.stderr.strip().splitlines()[-1]
                assert "Traceback" not in refused.stderr and "ERROR" not in "".join(refused.stderr.splitlines()[:-1])
                assert f"cannot migrate the database {path} to revision {migrate.head()}" in said
                assert f"(pid {os.getpid()}) serves it" in said
                assert (await migrate.state(db)).current == {migrate.BASELINE}, "nothing changed"
        finally:
            server.release()
        migrated = _evalsvc("migrate", "--db", url)  # the server stopped
        assert migrated.returncode == 0, migrated.stderr
        assert (await migrate.state(db)).at_head
        server.acquire()  # a server of this version: the operator commands work beside it
        try:
            for words in (("migrate",), ("keys", "list")):
                beside = _evalsvc(*words, "--db", url)
                assert beside.returncode == 0, beside.stderr
        finally:
            server.release()
        # The migration held the lock while it changed the file, and gave it back.
        ServeLock(path).acquire()
    finally:
        await db.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_revision_0026_refuses_to_downgrade_while_deleted_definitions_have_parts_left(
    kind: str, tmp_path: Path
) -> None:
    """Downgraded below 0026, a deleted dataset's items waiting for their purge were orphaned for good, their
    bytes still counted to the tenant: refused while `definition_purges` has rows, done once it is empty."""
    url = _empty_database(kind, tmp_path)
    db = Database(url)

    def downgrade(connection: Connection) -> None:
        config = migrate.alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, "0025")

    try:
        await migrate.upgrade(db)
        async with db.write() as conn:
            await conn.execute(
                text(
                    "INSERT INTO definition_purges (kind, owner_id, tenant, purge_time)"
                    " VALUES ('dataset', 'ds_1', 't', 0)"
                )
            )
        with pytest.raises(RuntimeError, match="definition_purges"):
            async with db.write() as conn:
                await conn.run_sync(downgrade)
        async with db.read() as conn:
            assert "definition_purges" in await conn.run_sync(_tables)
            assert (await conn.execute(text("SELECT count(*) FROM definition_purges"))).scalar_one() == 1
        async with db.write() as conn:
            await conn.execute(text("DELETE FROM definition_purges"))
        async with db.write() as conn:
            await conn.run_sync(downgrade)
        async with db.read() as conn:
            assert "definition_purges" not in await conn.run_sync(_tables)
    finally:
        await db.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_revision_0028_adds_run_items_digests_empty_and_takes_them_back(kind: str, tmp_path: Path) -> None:
    """Run items stored before 0028 keep their rows and get NULL digests (a comparison hashes those items
    itself) and the index that covers their read; the downgrade drops both and keeps the items."""
    url = _empty_database(kind, tmp_path)
    db = Database(url)

    def to(revision: str, step: Callable[..., None]) -> Callable[[Connection], None]:
        def move(connection: Connection) -> None:
            config = migrate.alembic_config()
            config.attributes["connection"] = connection
            step(config, revision)

        return move

    def columns(connection: Connection) -> set[str]:
        return {column["name"] for column in inspect(connection).get_columns("run_items")}

    def indexes(connection: Connection) -> set[str]:
        return {index["name"] or "" for index in inspect(connection).get_indexes("run_items")}

    insert = text("INSERT INTO run_items (run_id, idx, tenant, item) VALUES ('run_1', 0, 't', :item)")
    try:
        async with db.write() as conn:
            await conn.run_sync(to("0027", command.upgrade))
            await conn.execute(insert, {"item": b"\n\x01a"})
            await conn.run_sync(to("0028", command.upgrade))
        async with db.read() as conn:
            assert {"digest_with_metadata", "digest_without_metadata"} <= await conn.run_sync(columns)
            assert "ix_run_items_digests" in await conn.run_sync(indexes)
            found = await conn.execute(
                text("SELECT item, digest_with_metadata, digest_without_metadata FROM run_items")
            )
            assert [tuple(row) for row in found] == [(b"\n\x01a", None, None)]
        async with db.write() as conn:
            await conn.run_sync(to("0027", command.downgrade))
        async with db.read() as conn:
            assert await conn.run_sync(columns) == {"run_id", "idx", "tenant", "item"}
            assert "ix_run_items_digests" not in await conn.run_sync(indexes)
            assert [tuple(row) for row in await conn.execute(text("SELECT item FROM run_items"))] == [(b"\n\x01a",)]
    finally:
        await db.close()
