"""A write-through cache of run records, for databases this process is the only writer of (SQLite).

GetRun is the hottest read: dashboards and pipelines poll it. Reading the row from SQLite costs a
pooled connection, a thread hop and SQLAlchemy's statement machinery on every call, several times
what gRPC itself costs. Every change to a run row goes through three store functions that already
return the changed row (`RETURNING`, as a RunRecord), so the writer can keep a copy current for free:

- a write transaction collects the rows it changed (`remember`), and the ids of the runs it removed
  (`remember_removed`: a purge, evalsvc.store.retention); they enter (or leave) the cache only once
  the transaction has committed, while the writer still holds the connection, so cache updates
  happen in commit order and a rolled-back change is never seen (nor one rolled back to a
  savepoint: `forget_since`);
- a read that missed fills the cache only when no write it might have missed could be lost:
  a row already in the cache is never overwritten by a fill, and evicting an entry raises a
  watermark that refuses fills by reads started before the evicted entry's write.

Each entry can also keep one value derived from its row (the Run message GetRun returns), built on
first use and dropped with the row, so polling an unchanged run does not rebuild it every time.

With several servers on one database (PostgreSQL) other processes change runs too, so there the
cache is off and every read goes to the database.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.store.records import RunRecord

T = TypeVar("T")

_PENDING = "evalsvc.changed_runs"


@dataclass(frozen=True)
class Removed:
    """A run row this write transaction deleted."""

    id: str


def remember(conn: AsyncConnection, row: RunRecord) -> None:
    """Note a run row changed (or created) by this write transaction."""
    conn.info.setdefault(_PENDING, []).append(row)


def remember_removed(conn: AsyncConnection, run_id: str) -> None:
    """Note a run row deleted by this write transaction: once it commits, the cache forgets the run (a
    purged run that GetRun still answered from memory would be restorable in appearance only)."""
    conn.info.setdefault(_PENDING, []).append(Removed(run_id))


def noted(conn: AsyncConnection) -> int:
    """How many changed rows this write transaction has noted so far: a mark for `forget_since`."""
    return len(conn.info.get(_PENDING, ()))


def forget_since(conn: AsyncConnection, mark: int) -> None:
    """Forget the rows noted after `mark`: their changes were rolled back to a savepoint."""
    del conn.info.get(_PENDING, [])[mark:]


def take_changed(conn: AsyncConnection) -> list[RunRecord | Removed]:
    """The rows this transaction changed (or removed), forgotten by the connection (call once it ends)."""
    rows: list[RunRecord | Removed] = conn.info.pop(_PENDING, [])
    return rows


# What the cache may hold: 4,096 runs, and 64 MiB of them. Bounded by count alone, it held whatever the
# runs weighed: a tenant's runs of 4 MiB definitions (the most a run may have) took RSS past 1 GB in 200
# runs, on the way to 16 GiB. A run too heavy for a sixteenth of the bytes is not kept (its GetRun reads
# the database, as on PostgreSQL); it would push out dozens of others.
CAPACITY = 4096
CAPACITY_BYTES = 64 << 20
ENTRY_OVERHEAD_BYTES = 1024  # the record's object and its small fields, roughly


def weight(row: RunRecord) -> int:
    """What keeping a row costs, roughly: its large fields twice (the row, and the Run message derived
    from it, which holds the same definition, annotations and aggregate), and a fixed overhead."""
    annotations = sum(len(k) + len(v) for k, v in row.annotations.items())
    large = len(row.spec) + len(row.aggregate or b"") + annotations + len(row.description)
    return 2 * large + ENTRY_OVERHEAD_BYTES


class _Entry:
    __slots__ = ("derived", "generation", "row", "weight")

    def __init__(self, generation: int, row: RunRecord, weight: int) -> None:
        self.generation = generation
        self.row = row
        self.weight = weight
        self.derived: object = None


class RunRowCache:
    """Run records by id, least recently used first out, bounded by count and by weight (`weight`)."""

    def __init__(self, capacity: int = CAPACITY, capacity_bytes: int = CAPACITY_BYTES) -> None:
        self._capacity = capacity
        self._capacity_bytes = capacity_bytes
        self._bytes = 0  # the weight of the entries held
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._writes = 0  # committed run writes so far: the generation of the newest one
        self._evicted_up_to = 0  # the newest generation an evicted (or refused) entry held

    def get(self, run_id: str) -> RunRecord | None:
        """The current row of a run, or None when it is not cached."""
        entry = self._entries.get(run_id)
        if entry is None:
            return None
        self._entries.move_to_end(run_id)
        return entry.row

    def derived(self, row: RunRecord, build: Callable[[RunRecord], T]) -> T:
        """`build(row)`, kept with the row while it is the cached one: callers share the value and
        must not change it. A row that is not (or no longer) the cached one is built afresh."""
        entry = self._entries.get(row.id)
        if entry is None or entry.row is not row:
            return build(row)
        if entry.derived is None:
            entry.derived = build(row)
        return cast("T", entry.derived)

    def committed(self, rows: Sequence[RunRecord | Removed]) -> None:
        """Rows a write transaction changed (or removed), applied in commit order. A removed run is
        dropped, and, as for an eviction, no read that started before its removal may fill it back."""
        for row in rows:
            self._writes += 1
            if isinstance(row, Removed):
                dropped = self._entries.pop(row.id, None)
                if dropped is not None:
                    self._bytes -= dropped.weight
                self._evicted_up_to = self._writes
            else:
                self._put(row.id, self._writes, row)

    def read_started(self) -> int:
        """A token for a database read about to start; give it back to `fill`."""
        return self._writes

    def fill(self, row: RunRecord, started: int) -> None:
        """Cache a row read from the database, unless a write since `started` may make it stale."""
        if row.id in self._entries or self._evicted_up_to > started:
            return
        self._put(row.id, started, row)

    @property
    def held_bytes(self) -> int:
        """The weight of the rows held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def _put(self, run_id: str, generation: int, row: RunRecord) -> None:
        replaced = self._entries.pop(run_id, None)
        if replaced is not None:
            self._bytes -= replaced.weight
        cost = weight(row)
        if cost > self._capacity_bytes // 16:
            # Not kept, and (like an eviction) no read that started before this write may fill it:
            # it could put back the row this write replaced.
            self._evicted_up_to = max(self._evicted_up_to, generation)
            return
        self._entries[run_id] = _Entry(generation, row, cost)
        self._bytes += cost
        while len(self._entries) > self._capacity or self._bytes > self._capacity_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.weight
            self._evicted_up_to = max(self._evicted_up_to, evicted.generation)
