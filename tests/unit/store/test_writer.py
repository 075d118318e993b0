"""The group writer (evalsvc.store.writer) over a bare SQLite file: no server, no network."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.store.db import Database, unavailable_cause
from evalsvc.store.run_cache import remember
from evalsvc.store.writer import Batch, DatabaseClosed
from tests import dbs
from tests.unit.stored import run_record


async def _database(url: str) -> Database:
    database = Database(url)
    async with database.write() as conn:
        await conn.execute(text("CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER NOT NULL)"))
    return database


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    """A bare database of the engine under test (SQLite, or PostgreSQL with EVALSVC_TEST_DB=postgres)."""
    database = await _database(dbs.db_url(tmp_path, "w.db", migrated=False))
    yield database
    await database.close()


@pytest.fixture
async def sqlite_db(tmp_path: Path) -> AsyncIterator[Database]:
    """A bare SQLite file, for what only SQLite does."""
    database = await _database(f"sqlite+aiosqlite:///{tmp_path / 'sqlite.db'}")
    yield database
    await database.close()


async def stored(db: Database) -> dict[str, int]:
    async with db.read() as conn:
        return {k: v for k, v in await conn.execute(text("SELECT k, v FROM t"))}


def put(key: str, value: int = 1):  # type: ignore[no-untyped-def]
    async def work(conn: AsyncConnection) -> str:
        await conn.execute(text("INSERT INTO t (k, v) VALUES (:k, :v)"), {"k": key, "v": value})
        return key

    return work


async def test_concurrent_writes_share_transactions_and_each_gets_its_answer(db: Database) -> None:
    answers = await asyncio.gather(*(db.transact(put(f"k{i}")) for i in range(200)))
    assert answers == [f"k{i}" for i in range(200)]
    assert len(await stored(db)) == 200
    assert db.group_writer.groups < 20, "writes queued together must commit together"


async def test_a_failing_write_fails_alone_and_the_rest_of_its_group_commits(db: Database) -> None:
    await db.transact(put("taken"))
    results = await asyncio.gather(
        *(db.transact(put(f"ok{i}")) for i in range(5)), db.transact(put("taken")), return_exceptions=True
    )
    assert results[:5] == [f"ok{i}" for i in range(5)]
    assert isinstance(results[5], IntegrityError), "the duplicate key, on either engine"
    assert set(await stored(db)) == {"taken", *(f"ok{i}" for i in range(5))}


async def test_work_asked_to_be_alone_gets_a_transaction_of_its_own_and_order_is_kept(db: Database) -> None:
    """A large recording goes alone: the small writes queued before it commit without waiting for it,
    and those queued after it share the next group."""
    order: list[str] = []

    def tracked(key: str):  # type: ignore[no-untyped-def]
        async def work(conn: AsyncConnection) -> int:
            order.append(key)
            await put(key)(conn)
            return db.group_writer.groups

        return work

    before = [db.transact(tracked(f"a{i}")) for i in range(3)]
    big = db.transact(tracked("big"), alone=True)
    after = [db.transact(tracked(f"z{i}")) for i in range(3)]
    groups = await asyncio.gather(*before, big, *after)
    assert order == ["a0", "a1", "a2", "big", "z0", "z1", "z2"]
    assert len(set(groups[:3])) == 1 and len(set(groups[4:])) == 1, "the small writes still share groups"
    assert groups[2] < groups[3] < groups[4], "the alone work has a group to itself"


async def _apply(conn: AsyncConnection, payloads: list[int]) -> Sequence[int | BaseException]:
    """Stores every even payload in one statement; refuses odd ones before writing anything for them."""
    keep = [p for p in payloads if p % 2 == 0]
    if keep:
        await conn.execute(text("INSERT INTO t (k, v) VALUES (:k, :v)"), [{"k": f"b{p}", "v": p} for p in keep])
    return [ValueError(f"odd {p}") if p % 2 else p * 10 for p in payloads]


EVENS = Batch("evens", _apply)


async def test_a_batch_answers_each_payload_and_a_refusal_costs_the_others_nothing(db: Database) -> None:
    results = await asyncio.gather(*(db.submit(EVENS, p) for p in range(10)), return_exceptions=True)
    assert [r for r in results if not isinstance(r, BaseException)] == [0, 20, 40, 60, 80]
    assert [str(r) for r in results if isinstance(r, BaseException)] == [f"odd {p}" for p in (1, 3, 5, 7, 9)]
    assert sorted(await stored(db)) == sorted(f"b{p}" for p in (0, 2, 4, 6, 8))


async def test_a_cancelled_caller_does_not_cancel_its_write(db: Database) -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow(conn: AsyncConnection) -> None:
        started.set()
        await release.wait()
        await conn.execute(text("INSERT INTO t (k, v) VALUES ('slow', 1)"))

    caller = asyncio.create_task(db.transact(slow))
    await started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    release.set()
    await db.transact(put("after"))  # queued behind the slow write: it committed first
    assert await stored(db) == {"slow": 1, "after": 1}


async def test_a_stray_cancellation_of_the_writer_does_not_end_it(db: Database) -> None:
    await db.transact(put("first"))
    task = db.group_writer._task
    assert task is not None
    task.cancel()
    await asyncio.sleep(0)  # the writer sees the cancellation while it waits for work
    assert not task.done()
    assert await db.transact(put("second")) == "second"
    assert set(await stored(db)) == {"first", "second"}


async def test_close_commits_what_is_queued_then_refuses_new_writes(db: Database) -> None:
    pending = [asyncio.create_task(db.transact(put(f"q{i}"))) for i in range(20)]
    await asyncio.sleep(0)
    await db.group_writer.close()
    assert await asyncio.gather(*pending) == [f"q{i}" for i in range(20)]
    with pytest.raises(RuntimeError, match="closed"):
        await db.transact(put("late"))


class Conflict(Exception):
    """What a lost race between two servers' transactions looks like (PostgreSQL's 40P01)."""

    sqlstate = "40P01"


async def test_a_write_that_lost_a_race_with_another_server_is_applied_again(db: Database) -> None:
    attempts = []

    async def racy(conn: AsyncConnection) -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise Conflict("deadlock detected")
        return await put("won")(conn)

    assert await db.transact(racy) == "won"
    assert len(attempts) == 3
    assert set(await stored(db)) == {"won"}


async def test_a_cancellation_raised_by_a_write_fails_that_write_alone(db: Database) -> None:
    """A CancelledError meant for something a write awaited is that write's failure, not the writer's end."""

    async def stray(conn: AsyncConnection) -> None:
        raise asyncio.CancelledError

    results = await asyncio.gather(
        db.transact(put("a")), db.transact(stray), db.transact(put("b")), return_exceptions=True
    )
    assert results[0] == "a" and results[2] == "b"
    assert isinstance(results[1], asyncio.CancelledError)
    assert await db.transact(put("after")) == "after"
    assert set(await stored(db)) == {"a", "b", "after"}


class Refused(Exception):
    """An ordinary refusal raised inside a write, like NOT_FOUND for a run that does not exist."""


def refuse_after_writing(key: str):  # type: ignore[no-untyped-def]
    async def work(conn: AsyncConnection) -> None:
        await put(key)(conn)
        raise Refused(key)

    return work


async def test_a_refused_write_rolls_back_alone_and_its_group_commits_together(db: Database) -> None:
    """One caller's refusal must not cost the others their shared transaction: the group is applied
    once more with each write in a savepoint (before, every other write of the group was applied
    again alone: one transaction and fsync each)."""
    runs: dict[str, int] = {}

    def counted(key: str):  # type: ignore[no-untyped-def]
        async def work(conn: AsyncConnection) -> str:
            runs[key] = runs.get(key, 0) + 1
            return await put(key)(conn)

        return work

    groups_before = db.group_writer.groups
    calls = [db.transact(counted(f"k{i}")) for i in range(10)]
    calls[5:5] = [db.transact(refuse_after_writing("refused"))]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[5], Refused)
    assert [r for i, r in enumerate(results) if i != 5] == [f"k{i}" for i in range(10)]
    assert db.group_writer.groups - groups_before == 2, "the group, then the group in savepoints"
    assert max(runs.values()) <= 2
    assert set(await stored(db)) == {f"k{i}" for i in range(10)}, "the refused write's own row is rolled back"


async def test_a_full_disk_inside_a_savepoint_still_fails_the_group_at_once(sqlite_db: Database) -> None:
    """SQLite rolls the whole transaction back by itself on a full disk, taking the savepoints with it:
    rolling back to one then fails with "no such savepoint". The group must still be judged by the
    full disk (every caller told at once, no write applied again alone), not by that rollback."""
    db = sqlite_db
    groups_before = db.group_writer.groups

    @event.listens_for(db.writer.sync_engine, "begin")
    def nearly_full(conn: Any) -> None:
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar()
        conn.exec_driver_sql(f"PRAGMA max_page_count = {pages + 2}")

    async def too_big(conn: AsyncConnection) -> None:
        await conn.execute(text("INSERT INTO t (k, v) VALUES (:k, 1)"), {"k": "x" * 200_000})

    results = await asyncio.gather(
        db.transact(refuse_after_writing("refused")),  # sends the group to its second pass
        db.transact(put("a")),
        db.transact(too_big),
        db.transact(put("b")),
        return_exceptions=True,
    )
    event.remove(db.writer.sync_engine, "begin", nearly_full)
    assert all("full" in str(r) for r in results), results
    assert db.group_writer.groups - groups_before == 2, "the group, then the group in savepoints; nothing alone"
    assert await stored(db) == {}


async def test_a_write_refused_in_a_shared_group_leaves_nothing_for_the_run_cache(sqlite_db: Database) -> None:
    """Run rows a write noted for the cache before it was refused were rolled back with it (the cache
    is SQLite's: there this process is the only writer)."""
    db = sqlite_db

    def noting(run_id: str, then_refuse: bool):  # type: ignore[no-untyped-def]
        async def work(conn: AsyncConnection) -> None:
            remember(conn, run_record(run_id))
            if then_refuse:
                raise Refused(run_id)

        return work

    results = await asyncio.gather(
        db.transact(noting("run_kept", False)), db.transact(noting("run_refused", True)), return_exceptions=True
    )
    assert results[0] is None and isinstance(results[1], Refused)
    assert db.run_rows is not None
    assert db.run_rows.get("run_kept") is not None
    assert db.run_rows.get("run_refused") is None


async def _fail_the_group(conn: AsyncConnection, payloads: list[int]) -> Sequence[int | BaseException]:
    raise RuntimeError("a batch that raises fails its whole group")


FAILING = Batch("failing", _fail_the_group)


async def test_a_writer_interrupted_while_applying_a_failed_group_again_answers_every_caller(db: Database) -> None:
    """A failed group is applied again intent by intent; a cancellation of the writer in the middle of
    that must still answer every caller of the group (they were off the queue, and waited forever)."""
    task_of_writer: list[asyncio.Task[None]] = []
    attempts: list[int] = []

    async def blocks_when_alone(conn: AsyncConnection) -> str:
        attempts.append(1)
        if len(attempts) == 2:  # applied again alone: interrupt the writer right here
            writer = asyncio.current_task()
            assert writer is not None
            task_of_writer.append(writer)
            writer.cancel()
            await asyncio.sleep(0)
        return await put("first")(conn)

    calls = [
        asyncio.ensure_future(db.transact(blocks_when_alone)),
        asyncio.ensure_future(db.transact(put("second"))),
        asyncio.ensure_future(db.submit(FAILING, 1)),
    ]
    _, pending = await asyncio.wait(calls, timeout=10)
    assert not pending, "every caller of the group is answered"
    assert all(call.cancelled() for call in calls), "each is answered with the interruption"
    assert task_of_writer and not task_of_writer[0].done(), "the writer goes on"
    assert await db.transact(put("after")) == "after"


async def test_a_writer_interrupted_while_it_backs_off_from_a_conflict_answers_the_caller(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_sleep = asyncio.sleep

    async def interrupted_back_off(delay: float) -> None:
        writer = asyncio.current_task()
        if writer is not None and writer is db.group_writer._task and delay > 0:
            writer.cancel()  # the writer is interrupted while it waits to try the write again
        await real_sleep(delay)

    async def conflicts(conn: AsyncConnection) -> str:
        raise Conflict("deadlock detected")

    monkeypatch.setattr(asyncio, "sleep", interrupted_back_off)
    call = asyncio.ensure_future(db.transact(conflicts))
    done, _ = await asyncio.wait([call], timeout=10)
    assert done, "the caller is answered"
    assert call.cancelled(), "it is answered with the interruption"
    monkeypatch.undo()
    assert await db.transact(put("after")) == "after"


async def test_two_writers_groups_never_deadlock_over_the_same_rows(db: Database) -> None:
    """Two replicas' writers on one PostgreSQL database: each group held the locks its intents took, in
    arrival order, so groups taking the same two rows in opposite orders deadlocked (PostgreSQL then
    waited its deadlock_timeout, 1 s, with every write of both replicas behind them). A group of several
    intents now runs alone across writers. (On SQLite one writer at a time holds the file anyway.)"""
    other = Database(db.url)
    try:
        async with db.write() as conn:
            await conn.execute(text("INSERT INTO t (k, v) VALUES ('x', 0), ('y', 0)"))
        deadlocks: list[Exception] = []
        took = {name: asyncio.Event() for name in ("first x", "second y")}

        def bump(key: str, signal: str | None = None, then_await: str | None = None):  # type: ignore[no-untyped-def]
            async def work(conn: AsyncConnection) -> str:
                try:
                    await conn.execute(text("UPDATE t SET v = v + 1 WHERE k = :k"), {"k": key})
                except Exception as exc:
                    if "deadlock" in str(exc):
                        deadlocks.append(exc)
                    raise
                if signal:
                    took[signal].set()
                if then_await:  # let the other writer take its first row, if it can
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(took[then_await].wait(), 0.5)
                return key

            return work

        groups = db.group_writer.groups, other.group_writer.groups
        answers = await asyncio.gather(
            db.transact(bump("x", "first x", "second y")),
            db.transact(bump("y")),
            other.transact(bump("y", "second y", "first x")),
            other.transact(bump("x")),
        )
        assert (db.group_writer.groups - groups[0], other.group_writer.groups - groups[1]) == (1, 1)  # one each
        assert answers == ["x", "y", "y", "x"] and deadlocks == []
        assert await stored(db) == {"x": 2, "y": 2}
    finally:
        await other.close()


async def test_a_write_after_close_is_the_database_being_unavailable_not_a_bug(tmp_path: Path) -> None:
    """A SIGTERM during a large CreateRun: the call, still staging its chunks after the grace, wrote to the
    closed database and was logged `ERROR unexpected error in CreateRun` with a RuntimeError traceback (a
    probe, 7 of 8 such stops). It is the database being unavailable while the server stops: UNAVAILABLE
    to the caller, a WARNING naming the cause."""
    database = await _database(f"sqlite+aiosqlite:///{tmp_path / 'closed.db'}")
    await database.close()
    with pytest.raises(DatabaseClosed) as closed:
        await database.transact(put("late"))
    assert unavailable_cause(closed.value) == "the server is stopping (its database is closed)"
