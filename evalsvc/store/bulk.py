"""Driver-level statements for the hot paths: bulk inserts (recording results, creating a run's items and
jobs), per-row updates of many rows, and the watchers' page reads.

SQLAlchemy Core's executemany runs every parameter of every row through Python (key lookups, bind
processors, per-row dicts). At 250,000 results plus as many events per large run that was about a
quarter of the event loop's time (docs/performance.md). These rows hold only ints, floats, strings,
bytes and NULLs, which both drivers take as they are, so they go straight to the driver's
executemany as tuples, written in the driver's own placeholder style.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncConnection

T = TypeVar("T")
R = TypeVar("R")

# Rows per executemany for a driver that encodes them on the event loop (~2-4 us per row).
ON_LOOP_CHUNK = 2000


async def insert_tuples(
    conn: AsyncConnection, table: Table, columns: Sequence[str], rows: list[tuple[Any, ...]]
) -> None:
    """INSERT rows (tuples in `columns` order) with driver executemany calls: one on SQLite (aiosqlite
    works in its own thread), one per ON_LOOP_CHUNK rows on PostgreSQL, whose driver (asyncpg) encodes
    every row on the event loop: a large run's recording of 25,000 results in one call held the loop
    for half a second."""
    sql = _insert_sql(conn.dialect.paramstyle, table.name, tuple(columns))
    chunk = ON_LOOP_CHUNK if conn.dialect.name == "postgresql" else max(1, len(rows))
    for start in range(0, len(rows), chunk):
        await conn.exec_driver_sql(sql, rows[start : start + chunk])


async def execute_many(conn: AsyncConnection, sql: str, rows: list[tuple[Any, ...]]) -> None:
    """Run one statement written with `?` placeholders once per row, with one driver executemany: for
    per-row UPDATEs of many rows, which as one SQLAlchemy statement (a CASE per column over every
    row) cost more to build and compile than to run."""
    if rows:
        await conn.exec_driver_sql(in_driver_style(conn, sql), rows)


async def fetch_all(conn: AsyncConnection, sql: str, parameters: tuple[Any, ...]) -> Sequence[Sequence[Any]]:
    """Run one query written with `?` placeholders as the driver's own SQL text: for hot reads whose
    SQLAlchemy construct would cost more to build and key for the statement cache than to run."""
    return (await conn.exec_driver_sql(in_driver_style(conn, sql), parameters)).all()


def in_driver_style(conn: AsyncConnection, sql: str) -> str:
    """`sql`, written with `?` placeholders (and no `?` elsewhere), in the connection's driver's style."""
    return _in_paramstyle(conn.dialect.paramstyle, sql)


@functools.cache
def _insert_sql(paramstyle: str, table: str, columns: tuple[str, ...]) -> str:
    placeholders = ", ".join("?" * len(columns))
    return _in_paramstyle(paramstyle, f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders})")


@functools.cache
def _in_paramstyle(paramstyle: str, sql: str) -> str:
    """`sql`, written with `?` placeholders (and no `?` elsewhere), in the driver's own style."""
    if paramstyle == "qmark":  # sqlite3 / aiosqlite
        return sql
    if paramstyle == "numeric_dollar":  # asyncpg
        parts = sql.split("?")
        return parts[0] + "".join(f"${i}{part}" for i, part in enumerate(parts[1:], start=1))
    raise ValueError(f"no bulk statements for the {paramstyle!r} parameter style")
