"""Driver-level bulk inserts, for the hot paths: recording results and creating a run's items and jobs.

SQLAlchemy Core's executemany runs every parameter of every row through Python (key lookups, bind
processors, per-row dicts). At 250,000 results plus as many events per large run that was about a
quarter of the event loop's time (docs/performance.md). These rows hold only ints, floats, strings,
bytes and NULLs, which both drivers take as they are, so they go straight to the driver's
executemany as tuples, written in the driver's own placeholder style.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncConnection


async def insert_tuples(
    conn: AsyncConnection, table: Table, columns: Sequence[str], rows: list[tuple[Any, ...]]
) -> None:
    """INSERT rows (tuples in `columns` order) with one driver executemany."""
    if rows:
        await conn.exec_driver_sql(_insert_sql(conn.dialect.paramstyle, table.name, tuple(columns)), rows)


@functools.cache
def _insert_sql(paramstyle: str, table: str, columns: tuple[str, ...]) -> str:
    if paramstyle == "qmark":  # sqlite3 / aiosqlite
        placeholders = ["?"] * len(columns)
    elif paramstyle == "numeric_dollar":  # asyncpg
        placeholders = [f"${i}" for i in range(1, len(columns) + 1)]
    else:
        raise ValueError(f"no bulk insert for the {paramstyle!r} parameter style")
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(placeholders)})"
