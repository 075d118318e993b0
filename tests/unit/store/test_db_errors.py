"""How the store classifies database failures (evalsvc.store.db): `unavailable_cause` (the database
cannot serve now: UNAVAILABLE, a one-line warning, retried whole) and `is_refused_data` (the values
written are refused: a job failing alone so is recorded as ERROR at once, one failing for an unknown
reason only at its last attempt). Errors are built as the drivers and SQLAlchemy hand them on."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from evalsvc.store.db import Database, is_refused_data, unavailable_cause
from tests import dbs
from tests.test_database_unavailable import terminate_backends
from tests.unit.stored import pg_error


@pytest.mark.parametrize(
    "exc",
    [
        pg_error(asyncpg.exceptions.TooManyConnectionsError, 'too many connections for database "evalsvc"'),
        pg_error(asyncpg.exceptions.LockNotAvailableError, "canceling statement due to lock timeout"),
        pg_error(asyncpg.exceptions.QueryCanceledError, "canceling statement due to statement timeout"),
        pg_error(asyncpg.exceptions.AdminShutdownError, "terminating connection due to administrator command"),
        sa_exc.OperationalError("INSERT ...", {}, ConnectionRefusedError("refused")),
        # A connection killed under the pool (pg_terminate_backend, a restart, a failover), as
        # SQLAlchemy raises it (the dialect invalidates the connection) and as asyncpg does.
        sa_exc.InterfaceError("SELECT ...", {}, Exception("connection is closed"), connection_invalidated=True),
        asyncpg.exceptions.InterfaceError("connection is closed"),
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    ],
    ids=["53300", "55P03", "57014", "57P01", "refused", "invalidated", "asyncpg-closed", "asyncpg-gone"],
)
def test_a_database_that_cannot_serve_is_unavailable_and_never_the_datas_fault(exc: Exception) -> None:
    assert unavailable_cause(exc) is not None and not is_refused_data(exc)


@pytest.mark.parametrize(
    "exc",
    [
        pg_error(asyncpg.exceptions.CharacterNotInRepertoireError, "invalid byte sequence for encoding UTF8"),
        pg_error(asyncpg.exceptions.NumericValueOutOfRangeError, "value out of range"),
        pg_error(asyncpg.exceptions.ProgramLimitExceededError, "index row size exceeds maximum"),
        sa_exc.IntegrityError("INSERT ...", {}, Exception("UNIQUE constraint failed")),
        sa_exc.DataError("INSERT ...", {}, Exception("string or blob too big")),
        # asyncpg's DataError is an InterfaceError too: a value it could not encode, no lost connection.
        sa_exc.InterfaceError("INSERT ...", {}, asyncpg.exceptions.DataError("invalid input for query argument $1")),
    ],
    ids=["22021", "22003", "54000", "integrity", "data", "asyncpg-data"],
)
def test_values_the_database_refuses_are_the_datas_fault(exc: Exception) -> None:
    assert is_refused_data(exc) and unavailable_cause(exc) is None


@pytest.mark.parametrize(
    "exc",
    [RuntimeError("a bug"), sa_exc.DBAPIError("SELECT ...", {}, Exception("something new"))],
    ids=["runtime", "plain-dbapi"],
)
def test_an_unknown_failure_is_neither(exc: Exception) -> None:
    assert not is_refused_data(exc) and unavailable_cause(exc) is None


@pytest.mark.skipif(not dbs.USE_POSTGRES, reason="PostgreSQL only: run with EVALSVC_TEST_DB=postgres")
async def test_a_pooled_connection_whose_backend_was_terminated_costs_a_reconnect_not_the_read(
    tmp_path: Path,
) -> None:
    url = dbs.db_url(tmp_path)
    db = Database(url, pool_size=1)
    try:
        async with db.read() as conn:
            await conn.execute(text("SELECT 1"))
        assert await terminate_backends(url) == 1
        async with db.read() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1
    finally:
        await db.close()
