"""The raw write ceiling of the database evalsvc runs on, measured in the same run as evalsvc.

evalsvc's large run writes one result row and one event row per evaluation. The most a Python
process can write to the same database is a driver-level batched `executemany` with no ORM, no
SQLAlchemy, no events and no service logic; evalsvc's results-plus-events rate is compared with
that. The table has the 10 columns of a typical result row; rows are built before the clock starts.

SQLite gets the pragmas evalsvc uses (WAL, synchronous=FULL), so the ceiling pays the same fsync
per transaction evalsvc does. PostgreSQL runs in a scratch database created and dropped here.

`python -m bench.dbceiling '{"backend": "sqlite", "path": "...", "rows": N, "batch": 1000}'`
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

COLUMNS = "id, run_id, item_id, grader, state, score, raw_score, explanation, attempt, complete_time"
CREATE = (
    "CREATE TABLE ceiling (id BIGINT PRIMARY KEY, run_id VARCHAR(40) NOT NULL, item_id VARCHAR(128) NOT NULL,"
    " grader VARCHAR(63) NOT NULL, state INTEGER NOT NULL, score DOUBLE PRECISION NOT NULL,"
    " raw_score DOUBLE PRECISION NOT NULL, explanation TEXT NOT NULL, attempt INTEGER NOT NULL,"
    " complete_time DOUBLE PRECISION NOT NULL)"
)
ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def rows(n: int) -> list[tuple[Any, ...]]:
    """n result-like rows, as a 5,000 x 50 run would produce them."""
    now = time.time()
    return [
        (i, "run_0123456789abcdef0123456789", f"i{i // 50}", f"grader_{i % 50}", 1 + i % 2, 1.0, 1.0,
         "output equals expected output", 1, now)
        for i in range(n)
    ]  # fmt: skip


async def sqlite_ceiling(path: str, n: int, batch: int) -> float:
    """Rows/s of aiosqlite executemany, `batch` rows per transaction, WAL + synchronous=FULL."""
    import aiosqlite

    data = rows(n)
    async with aiosqlite.connect(path) as db:
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute(CREATE)
        await db.commit()
        insert = f"INSERT INTO ceiling ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        started = time.perf_counter()
        for start in range(0, n, batch):
            await db.executemany(insert, data[start : start + batch])
            await db.commit()
        return n / (time.perf_counter() - started)


async def postgres_ceiling(dsn: str, n: int, batch: int) -> float:
    """Rows/s of asyncpg executemany, `batch` rows per transaction."""
    import asyncpg

    data = rows(n)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(CREATE)
        insert = f"INSERT INTO ceiling ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        started = time.perf_counter()
        for start in range(0, n, batch):
            async with conn.transaction():
                await conn.executemany(insert, data[start : start + batch])
        return n / (time.perf_counter() - started)
    finally:
        await conn.close()


async def _admin(statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(ADMIN_DSN, timeout=5)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def create_scratch_database(name: str) -> None:
    """CREATE DATABASE name on the local PostgreSQL (dropping a leftover of the same name first)."""
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))


def drop_scratch_database(name: str) -> None:
    """DROP DATABASE name, ending any connection a killed server left behind."""
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def postgres_available() -> str:
    """'' when the local PostgreSQL accepts connections, else why not."""
    try:
        asyncio.run(_admin("SELECT 1"))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def main() -> None:
    """Measure one ceiling and print {"rows_per_s": ...}."""
    args = json.loads(sys.argv[1])
    n, batch = int(args["rows"]), int(args.get("batch", 1000))
    if args["backend"] == "sqlite":
        rate = asyncio.run(sqlite_ceiling(args["path"], n, batch))
    else:
        rate = asyncio.run(postgres_ceiling(args["dsn"], n, batch))
    print(json.dumps({"backend": args["backend"], "rows": n, "batch": batch, "rows_per_s": rate}), flush=True)


if __name__ == "__main__":
    main()
