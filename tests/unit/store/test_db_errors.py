"""How the store classifies database failures (evalsvc.store.db): `unavailable_cause` (the database
cannot serve now: UNAVAILABLE, a one-line warning, retried whole) and `is_refused_data` (the values
written are refused: the recorder splits a batch to leave out only them). Errors are built as the
drivers and SQLAlchemy hand them on."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy import exc as sa_exc

from evalsvc.store.db import is_refused_data, unavailable_cause


def pg(kind: type[Exception], message: str = "...") -> sa_exc.DBAPIError:
    """asyncpg's exception as SQLAlchemy's asyncpg dialect raises it: a plain DBAPIError around it
    (only integrity violations, syntax errors and client errors get a more specific class)."""
    return sa_exc.DBAPIError("SELECT ...", {}, kind(message))


@pytest.mark.parametrize(
    "exc",
    [
        pg(asyncpg.exceptions.TooManyConnectionsError, 'too many connections for database "evalsvc"'),
        pg(asyncpg.exceptions.LockNotAvailableError, "canceling statement due to lock timeout"),
        pg(asyncpg.exceptions.QueryCanceledError, "canceling statement due to statement timeout"),
        pg(asyncpg.exceptions.AdminShutdownError, "terminating connection due to administrator command"),
        sa_exc.OperationalError("INSERT ...", {}, ConnectionRefusedError("refused")),
    ],
    ids=["53300", "55P03", "57014", "57P01", "refused"],
)
def test_a_database_that_cannot_serve_is_unavailable_and_never_the_datas_fault(exc: Exception) -> None:
    assert unavailable_cause(exc) is not None
    assert not is_refused_data(exc)


@pytest.mark.parametrize(
    "exc",
    [
        pg(asyncpg.exceptions.CharacterNotInRepertoireError, "invalid byte sequence for encoding UTF8"),
        pg(asyncpg.exceptions.NumericValueOutOfRangeError, "value out of range"),
        pg(asyncpg.exceptions.ProgramLimitExceededError, "index row size exceeds maximum"),
        sa_exc.IntegrityError("INSERT ...", {}, Exception("UNIQUE constraint failed")),
        sa_exc.DataError("INSERT ...", {}, Exception("string or blob too big")),
    ],
    ids=["22021", "22003", "54000", "integrity", "data"],
)
def test_values_the_database_refuses_are_the_datas_fault(exc: Exception) -> None:
    assert is_refused_data(exc)
    assert unavailable_cause(exc) is None


@pytest.mark.parametrize(
    "exc",
    [RuntimeError("a bug"), sa_exc.DBAPIError("SELECT ...", {}, Exception("something new")), KeyError("x")],
    ids=["runtime", "plain-dbapi", "key"],
)
def test_an_unknown_failure_is_neither(exc: Exception) -> None:
    assert unavailable_cause(exc) is None
    assert not is_refused_data(exc)
