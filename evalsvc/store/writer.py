"""One writer, group commit.

Every write of the service is an intent put on one queue. A single writer task takes everything
queued, applies it in one transaction and commits once - one fsync for the whole group on SQLite
(`synchronous=FULL` unchanged), one round trip for BEGIN and COMMIT on PostgreSQL - and only then
resolves each caller's future. So nothing is acknowledged before it is durable, and a burst of
small writes (CreateRuns, claims, status changes, recordings of many small runs) costs one
transaction instead of one each. While a group commits, the next one gathers: no timer, no added
latency when the service is idle.

Two kinds of intent:
- `transact(work)`: any function of a connection; the group runs it in queue order.
- `submit(batch, payload)`: payloads of one `Batch` kind are applied together by the batch's own
  function, with multi-row statements (CreateRun: one count, one insert of runs, items, jobs and
  events for the whole group). The function answers each payload on its own - a value, or an
  exception for a payload it refused *before writing anything for it* (a limit, a conflict) - so one
  caller's refusal does not cost the others their group.

A `transact` intent that raises on its own account - an ordinary refusal such as NOT_FOUND or a
stale etag, found after reading, or a row the database refused - fails its group's transaction, which
is then applied once more with each intent in a savepoint: the refused intent rolls back its own
writes only, its caller alone gets the error, and the rest commit together. Savepoints only on that
second pass, because one costs two statements (a thread hop each on SQLite, a round trip each on
PostgreSQL): ~0.6 ms per intent, paid by every shared write if taken always. Without the second
pass, any tenant could break every group up by sending requests that are refused (a DeleteRun of a
run that does not exist), each group's other writes being applied again one by one: measured, 60
such requests beside 60 CreateRuns of another tenant took 124 transactions instead of 4, and that
tenant's CreateRuns 3-7x as long.

What is not one intent's alone - a conflict with another server's transaction (PostgreSQL's deadlock
or serialization failure), a batch's function that raises on the second pass too - rolls the group
back, and each intent is then applied again alone, in its own transaction, so only the intent at
fault gets the error (intents are therefore written to be run again: they keep no state outside what
they return). A database that is unavailable fails every intent of the group at once: retrying
them one by one would not help.

On PostgreSQL each replica has a writer, and their transactions run at once. An intent takes its
locks in one order (store/jobs.py), but a group holds every lock its intents took until it commits,
taken in the order the intents arrived, so two replicas' groups could take the same two locks in
opposite orders - UpdateRuns of two runs, creates of two capped kinds - and deadlock: both groups
waited PostgreSQL's deadlock_timeout (1 s) before one was applied again intent by intent, and every
tenant's writes on both replicas waited with them (a probe made 43 deadlocks in 45 s; another
tenant's UpdateRun p50 5 -> 968 ms). So a group of several intents first takes the writers' lock
(`GROUP_LOCK`, a transaction-scoped advisory lock) alone, and a single intent takes it shared: groups
of several run one at a time across replicas, single intents beside each other, each keeping its own
lock order. A replica alone pays one statement per group for it.

A caller cancelled while waiting does not cancel its write: the intent stays in its group and
commits or fails with it (the caller is gone; a retry with the same request_id finds the result).
Every intent taken off the queue is answered, whatever ends its group: a writer interrupted while it
applies a group answers the intents it had not answered with that interruption.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

log = logging.getLogger(__name__)

T = TypeVar("T")
P = TypeVar("P")
R = TypeVar("R")

# The PostgreSQL advisory lock a group of several intents holds alone (see the module docstring); any
# constant other than the migrations' own would do.
GROUP_LOCK = 0x65766C77
# Most intents one transaction takes.
MAX_GROUP_INTENTS = 1024
# Times one intent is applied again after a conflict with another server's transaction.
MAX_CONFLICT_RETRIES = 3


@dataclass(frozen=True)
class Batch(Generic[P, R]):
    """A kind of intent applied many at a time: `apply(conn, payloads)` returns one answer per
    payload, in order: its result, or an exception (raised to that caller alone) for a payload it
    refused before writing anything for it."""

    name: str
    apply: Callable[[AsyncConnection, list[P]], Awaitable[Sequence[R | BaseException]]]


@dataclass
class _Intent:
    future: asyncio.Future[Any]
    work: Callable[[AsyncConnection], Awaitable[Any]] | None = None
    batch: Batch[Any, Any] | None = None
    payload: Any = None
    alone: bool = False


class DatabaseClosed(RuntimeError):
    """A write asked of a database the server has closed: it is stopping, and a call still running after
    its grace (a large CreateRun staging its next chunk) gets UNAVAILABLE (`db.unavailable_cause`), not
    INTERNAL with a traceback."""


class GroupWriter:
    """Owns the write path of one Database. `transaction()` is the database's own: a context manager
    that opens a write transaction, commits it and does whatever must follow a commit in order;
    `savepoint(conn)` one that rolls back to where it was entered when its block raises (and forgets
    whatever the block noted for after the commit)."""

    def __init__(
        self,
        transaction: Callable[[], contextlib.AbstractAsyncContextManager[AsyncConnection]],
        savepoint: Callable[[AsyncConnection], contextlib.AbstractAsyncContextManager[object]],
        *,
        is_unavailable: Callable[[BaseException], bool],
        is_conflict: Callable[[BaseException], bool] = lambda exc: False,
    ) -> None:
        self._transaction = transaction
        self._savepoint = savepoint
        self._is_unavailable = is_unavailable
        self._is_conflict = is_conflict
        self._queue: list[_Intent] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        # Called after every group (and while idle, never): the watchdog's view of the writer.
        self.on_turn: Callable[[], None] = lambda: None
        self.groups = 0  # committed or failed groups, for tests and metrics
        self.intents = 0

    def queued(self) -> int:
        """Intents waiting for the writer."""
        return len(self._queue)

    async def transact(self, work: Callable[[AsyncConnection], Awaitable[T]], *, alone: bool = False) -> T:
        """Apply `work` in the next group's transaction; return its result once the group committed.

        `alone` gives the work a transaction of its own, for work so large (a recording of thousands
        of results) that sharing its commit would hold small writes - claims, CreateRuns - for as long
        as it takes, and whose failure would have every intent of the group applied again."""
        result: T = await self._enqueue(_Intent(self._future(), work=work, alone=alone))
        return result

    async def submit(self, batch: Batch[P, R], payload: P) -> R:
        """Apply `payload` with the other payloads of its batch kind in the next group; return its
        answer once the group committed."""
        result: R = await self._enqueue(_Intent(self._future(), batch=batch, payload=payload))
        return result

    async def close(self) -> None:
        """Commit what is queued, then stop the writer."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None

    @staticmethod
    def _future() -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _enqueue(self, intent: _Intent) -> Any:
        if self._closing:
            raise DatabaseClosed("the database is closed")
        # A caller that went away never retrieves its failure: mark it seen, or asyncio logs it.
        intent.future.add_done_callback(_retrieve)
        self._queue.append(intent)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="database-writer")
        # Shielded: a caller that goes away leaves its write to finish with its group.
        return await asyncio.shield(intent.future)

    async def _run(self) -> None:
        """The writer loop: one group per turn until closed and drained. A cancellation reaching it that
        was not a shutdown is not allowed to end it (queued callers would wait forever)."""
        while True:
            try:
                if not self._queue:
                    if self._closing:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                group = self._next_group()
                try:
                    await self._commit(group)
                except BaseException as exc:
                    for intent in group:  # whatever ended the group, no caller waits forever
                        _resolve(intent, exc)
                    raise
                self.on_turn()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                log.error("the database writer was cancelled; it goes on (it ends only when the database closes)")

    def _next_group(self) -> list[_Intent]:
        """Take the next group off the queue, in order: up to MAX_GROUP_INTENTS intents, cut before
        an intent that must be alone (which then forms the following group by itself)."""
        if self._queue[0].alone:
            size = 1
        else:
            size = next(
                (i for i, intent in enumerate(self._queue[:MAX_GROUP_INTENTS]) if intent.alone),
                min(len(self._queue), MAX_GROUP_INTENTS),
            )
        group, self._queue = self._queue[:size], self._queue[size:]
        return group

    async def _commit(self, group: list[_Intent], conflicts: int = 0, *, isolated: bool = False) -> None:
        """Apply and commit a group. When one of its writes fails on its own (a refusal), the group is
        applied once more with each write in a savepoint; when that fails too, or for any other
        failure, each intent alone (see the module docstring). A conflict with another server's
        transaction (PostgreSQL's deadlock or serialization failure) is nobody's fault: the intent is
        applied again, a few times, before its caller hears of it."""
        self.groups += 1
        self.intents += len(group)
        try:
            answers = await self._apply(group, isolated)
        except BaseException as exc:
            if not isinstance(exc, Exception) and not _stray_cancellation(exc):
                raise  # the writer itself is interrupted: `_run` answers the group's callers
            if self._is_unavailable(exc):
                for intent in group:
                    _resolve(intent, exc)
                return
            if len(group) == 1:
                if self._is_conflict(exc) and conflicts < MAX_CONFLICT_RETRIES:
                    await asyncio.sleep(0.005 * 2**conflicts)
                    await self._commit(group, conflicts + 1)
                else:
                    _resolve(group[0], exc)
                return
            if not isolated and self._fails_alone(exc):
                log.debug(
                    "a write of a group of %d failed (%s); each again in a savepoint", len(group), type(exc).__name__
                )
                await self._commit(group, isolated=True)
                return
            log.debug("a group of %d writes failed (%s); applying each alone", len(group), type(exc).__name__)
            for intent in group:
                await self._commit([intent])
            return
        for intent, answer in zip(group, answers, strict=True):
            _resolve(intent, answer)

    async def _apply(self, group: list[_Intent], isolated: bool) -> list[Any]:
        """Run a group in one transaction, `isolated`: each `transact` intent in a savepoint of its own;
        the answers, in group order, once it committed."""
        answers: list[Any] = [None] * len(group)
        batches: dict[str, list[int]] = {}
        for i, intent in enumerate(group):
            if intent.batch is not None:
                batches.setdefault(intent.batch.name, []).append(i)
        async with self._transaction() as conn:
            if conn.dialect.name == "postgresql":  # see the module docstring
                taken = "pg_advisory_xact_lock" if len(group) > 1 else "pg_advisory_xact_lock_shared"
                await conn.execute(text(f"SELECT {taken}(:key)"), {"key": GROUP_LOCK})
            applied: set[str] = set()
            for i, intent in enumerate(group):
                if intent.work is not None:
                    answers[i] = await (self._isolated(conn, intent.work) if isolated else intent.work(conn))
                    continue
                assert intent.batch is not None
                if intent.batch.name in applied:
                    continue
                applied.add(intent.batch.name)
                members = batches[intent.batch.name]
                results = await intent.batch.apply(conn, [group[j].payload for j in members])
                for j, result in zip(members, results, strict=True):
                    answers[j] = result
        return answers

    async def _isolated(self, conn: AsyncConnection, work: Callable[[AsyncConnection], Awaitable[Any]]) -> Any:
        """Apply one intent inside a savepoint: its result, or the exception that fails it alone (its
        writes rolled back, the group going on; see the module docstring). Raises what must fail the
        group, and any failure of the savepoint itself."""
        raised: BaseException | None = None
        try:
            async with self._savepoint(conn):
                try:
                    return await work(conn)
                except BaseException as exc:
                    raised = exc
                    raise
        except BaseException as exc:
            if raised is None:
                raise  # the savepoint itself failed
            if exc is not raised:
                # The rollback to the savepoint failed: SQLite rolls a whole transaction back by itself
                # (on a full disk) and the savepoint goes with it. The group is judged by the write's
                # own failure, which says the database is unavailable.
                raise raised from exc
            if self._fails_alone(raised):
                return raised
            raise

    def _fails_alone(self, exc: BaseException) -> bool:
        """Whether an intent's exception is its own failure, which rolling back its savepoint undoes:
        not the database being unavailable, not a conflict that another attempt may win, and not the
        writer itself being cancelled."""
        if isinstance(exc, Exception):
            return not self._is_unavailable(exc) and not self._is_conflict(exc)
        return _stray_cancellation(exc)


def _stray_cancellation(exc: BaseException) -> bool:
    """A CancelledError that an intent raised (one meant for something it awaited), not a cancellation
    of the writer: a failure of that intent like any other."""
    task = asyncio.current_task()
    return isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling() == 0


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _resolve(intent: _Intent, answer: Any) -> None:
    if intent.future.done():  # cannot happen (one writer resolves each once), but never raise here
        return
    if isinstance(answer, BaseException):
        intent.future.set_exception(answer)
    else:
        intent.future.set_result(answer)
