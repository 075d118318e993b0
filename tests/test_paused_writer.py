"""A replica stopped inside a write transaction (SIGSTOP, a VM or GC pause, a partition) must not stop
every other replica's writes (PostgreSQL; evalsvc.store.db.Database.write): PostgreSQL ends the paused
session once it has sat idle in its transaction for `idle_in_transaction_s`, and its locks go with it.

A probe stopped one of three replicas while it held the writers' lock shared: the next group of the
others asked for it exclusively, every later write queued behind that request, and nothing moved on
any replica for the whole pause (26 s), their watchdogs turning the healthy replicas NOT_SERVING."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.config import Settings
from evalsvc.store.db import Database, unavailable_cause
from evalsvc.store.writer import GROUP_LOCK
from tests import dbs


def put(key: str):  # type: ignore[no-untyped-def]
    async def work(conn: AsyncConnection) -> str:
        await conn.execute(text("INSERT INTO t (k) VALUES (:k)"), {"k": key})
        return key

    return work


async def test_a_replica_paused_inside_a_write_transaction_holds_the_others_for_its_bound_only(
    tmp_path: Path,
) -> None:
    url = dbs.postgres_url(tmp_path, "paused", migrated=False)
    paused, other = Database(url, idle_in_transaction_s=1.0), Database(url, idle_in_transaction_s=1.0)
    try:
        async with other.write() as conn:
            await conn.execute(text("CREATE TABLE t (k TEXT PRIMARY KEY)"))
        holding, wake = asyncio.Event(), asyncio.Event()

        async def stopped_mid_transaction() -> None:
            # What a replica's single write holds when the process stops: the writers' lock, shared.
            async with paused.write() as conn:
                await conn.execute(text("SELECT pg_advisory_xact_lock_shared(:key)"), {"key": GROUP_LOCK})
                await conn.execute(text("INSERT INTO t (k) VALUES ('paused')"))
                holding.set()
                await wake.wait()  # idle in its transaction, as a stopped process is

        stopped = asyncio.ensure_future(stopped_mid_transaction())
        await holding.wait()
        # A group of two (the writers' lock exclusively) and the single writes after it: all committed,
        # once PostgreSQL has ended the paused session (about a second), not when it wakes.
        writes = [asyncio.ensure_future(other.transact(put(f"k{i}"))) for i in range(6)]
        done, _ = await asyncio.wait(writes, timeout=30)
        wake.set()  # from here the writes finish either way: what the test saw is asserted next
        assert len(done) == len(writes), "the other replica's writes waited for the paused one"
        assert sorted(write.result() for write in writes) == [f"k{i}" for i in range(6)]
        # The paused replica learns on waking that its transaction is gone: the database was unavailable
        # to it (its callers retry), and nothing it wrote is there.
        with pytest.raises(Exception) as ended:
            await stopped
        assert unavailable_cause(ended.value) is not None, repr(ended.value)
        async with other.read() as conn:
            keys = sorted(row[0] for row in await conn.execute(text("SELECT k FROM t")))
        assert keys == [f"k{i}" for i in range(6)]
    finally:
        await paused.close()
        await other.close()


def test_a_servers_bound_is_half_of_its_lease_or_stall_but_at_least_five_seconds() -> None:
    """Short enough that a paused replica's locks are gone before the others' leases run out or their
    watchdogs see a stall; long enough that no healthy transaction is ever ended."""
    assert Settings.from_env({}).idle_in_transaction_s == 15.0
    assert Settings.from_env({}, lease_ttl_s=60.0, stall_s=20.0).idle_in_transaction_s == 10.0
    assert Settings.from_env({}, lease_ttl_s=2.0).idle_in_transaction_s == 5.0


async def test_every_connection_has_tcp_keepalives_and_only_writes_are_bounded(tmp_path: Path) -> None:
    """A replica whose host died or was cut off holds its connections until PostgreSQL notices: with
    keepalives, in about a minute and a half rather than the kernel's two hours. Reads (a slow watcher's,
    a comparison's) are never ended for idling."""
    db = Database(dbs.postgres_url(tmp_path, "keepalive", migrated=False), idle_in_transaction_s=7.0)
    try:
        show = text(
            "SELECT current_setting('tcp_keepalives_idle'), current_setting('tcp_keepalives_interval'), "
            "current_setting('tcp_keepalives_count'), current_setting('idle_in_transaction_session_timeout')"
        )
        async with db.read() as conn:
            assert tuple((await conn.execute(show)).one()) == ("60", "10", "3", "0")
        async with db.write() as conn:
            assert tuple((await conn.execute(show)).one()) == ("60", "10", "3", "7s")
    finally:
        await db.close()
