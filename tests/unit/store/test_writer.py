"""The group writer (evalsvc.store.writer) over a bare SQLite file: no server, no network."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.store.db import Database
from evalsvc.store.writer import Batch


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'w.db'}")
    async with database.write() as conn:
        await conn.execute(text("CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER NOT NULL)"))
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
    assert "UNIQUE" in str(results[5])
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
