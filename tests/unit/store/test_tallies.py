"""What write transactions count for the metrics (evalsvc.store.db.tally): only what they commit."""

from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.store.db import Database, savepoint, tally


async def test_a_tally_counts_once_its_transaction_commits_and_never_what_rolled_back(db: Database) -> None:
    async def counted(conn: AsyncConnection) -> None:
        tally(conn, "things", 2)
        tally(conn, "things", 3)

    await db.transact(counted)
    assert db.tallies["things"] == 5

    async def rolled_back(conn: AsyncConnection) -> None:
        tally(conn, "things", 7)
        raise ValueError("refused")

    with pytest.raises(ValueError):
        await db.transact(rolled_back, alone=True)
    assert db.tallies["things"] == 5

    async def partly(conn: AsyncConnection) -> None:
        tally(conn, "things", 1)
        with pytest.raises(ValueError):
            async with savepoint(conn):
                tally(conn, "things", 100)
                raise ValueError("this part only")

    await db.transact(partly)
    assert db.tallies["things"] == 6
