"""A tenant's totals (`tenant_run_totals`): its stored runs, its spend, and the bytes it stores.

The bytes a tenant stores bound it (--max-stored-bytes-per-tenant), so that one tenant cannot fill the
disk every tenant shares. They are counted as data is written, never by reading it back:

- a run, when it is created (`new_run_bytes`): its definition and descriptive fields (names, labels,
  annotations) `RUN_COPIES` times (its row, and the events of its creation, its start and its end each
  hold the whole run), its copied items with `ITEM_DIGEST_BYTES` each (their comparison digests), and
  `JOB_BYTES` per job; every recording adds its outputs,
  serialized, and per result `RESULT_BYTES` plus its explanation and error reason twice (the result's row
  and its event each hold them: `result_bytes`). A run keeps its own sum (`runs.stored_bytes`), which its
  tenant's total loses when the run is purged (deleted runs count until then); UpdateRun adds (or gives
  back) the change of its descriptive fields, `RUN_COPIES` times too, refused when it grows past the cap.
- a dataset's items, serialized, as they are appended; DeleteDataset takes them back.
- a saved definition, when it is written (`saved_bytes`): a dataset's descriptive fields, a saved grader's
  (names, labels) and each of its versions' definition, a saved target's fields and definition, each row
  with `SAVED_ROW_BYTES`; DeleteDataset, DeleteGrader (with all its versions) and DeleteTarget take them back. The
  count caps alone allowed 1,000 graders x 1,000 versions x 256 KiB, about 256 GiB a tenant.

It is what the tenant's data takes, not the database's pages (free space, the engine's own overhead;
each result's share of its rows and indexes is estimated by RESULT_BYTES), and text is counted in
characters. Secrets and webhooks are bounded by their counts and sizes, and so are not counted: at the
default caps 100 secrets of at most 8 KiB and 50 webhooks of at most about 3 KiB (URL, description,
signing secrets) come to about 1 MiB a tenant; a webhook delivery names the run event it sends (counted
with the run) and holds no copy of it. The response cache is
not counted here: it is bounded by its own count and bytes, and evicts to make room (evalsvc.store.cache),
so it never refuses a tenant anything; its payload bytes are kept beside (`cache_bytes`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from sqlalchemy import JSON, ColumnElement, Select, Table, Text, cast, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.limits import StoredCap
from evalsvc.store import quotas
from evalsvc.store.models import RunRow, TenantRunTotalsRow

N = TypeVar("N", int, float)  # a totals column's number type
RUNS = RunRow.__table__  # type: ignore[attr-defined]
TOTALS = TenantRunTotalsRow.__table__  # type: ignore[attr-defined]
# Estimates of what rows and their index entries take beyond the data counted, so that runs of many small
# results, or of many jobs that never ran (cancelled, stopped), count what they take: a result's row and
# event (ids, state, scores, times, counts), a job's row. With no such estimate a SQLite file of runs with
# 100-byte replies was 2.6 times the bytes counted, and 1,000,000 cancelled jobs 137 MB uncounted
# (docs/operations.md).
RESULT_BYTES = 384
JOB_BYTES = 128
# A run item's two 32-byte comparison digests (models.RunItemRow), in its row and again in the index that
# covers their read (ix_run_items_digests).
ITEM_DIGEST_BYTES = 2 * 64
RUN_COPIES = 4  # a run's row, and the events of its creation, its start and its end


DESCRIPTIVE = ("display_name", "description", "labels", "annotations")  # the run columns UpdateRun changes
# A saved definition's row beyond its counted columns (ids, times, its index entries), as JOB_BYTES is a job's:
# 1,000 versions of a one-byte grader still take a page or two each thousand.
SAVED_ROW_BYTES = 128
# The columns each kind of saved row is counted by (`saved_bytes`); a grader's definitions are its versions'.
DATASET_COLUMNS = DESCRIPTIVE
GRADER_COLUMNS = ("display_name", "description", "labels")
VERSION_COLUMNS = ("definition",)
TARGET_COLUMNS = (*GRADER_COLUMNS, "definition")
ROOM_REMEDY = "nothing was written; delete runs, datasets, saved graders or saved targets to make room"


def column_bytes(value: str | bytes | Mapping[str, str]) -> int:
    """A column's size: a text's characters, a blob's bytes, a map's as the JSON it is stored as."""
    return len(value) if isinstance(value, str | bytes) else len(json.dumps(value))


def stored_size(table: Table, columns: Sequence[str]) -> ColumnElement[int]:
    """`saved_bytes` of a row without `SAVED_ROW_BYTES`, in SQL: what its `columns` hold, read from the
    stored lengths (a map's as its JSON text; a NULL as 0), for lists that choose their rows by size before
    reading them whole (evalsvc.ids.PageTokens.fitting_sizes)."""
    parts = [
        func.coalesce(
            func.length(cast(table.c[column], Text) if isinstance(table.c[column].type, JSON) else table.c[column]), 0
        )
        for column in columns
    ]
    total: ColumnElement[int] = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


async def sizes_page(
    conn: AsyncConnection,
    sized: Select[tuple[str, int]],
    id_column: ColumnElement[str],
    before_id: str | None,
    limit: int,
) -> list[tuple[str, int]]:
    """The (id, size) rows of `sized` (a tenant's rows with their `stored_size`) a list page would answer,
    newest first after the keyset position `before_id`: what it chooses its rows by before it reads them."""
    if before_id:
        sized = sized.where(id_column < before_id)
    rows: Any = await conn.execute(sized.order_by(id_column.desc()).limit(limit))
    return [(row_id, int(size)) for row_id, size in rows]


def described_bytes(row: Mapping[str, Any]) -> int:
    """A run row's definition and descriptive fields."""
    return sum(column_bytes(row[column]) for column in ("spec", *DESCRIPTIVE))


def saved_bytes(row: Mapping[Any, Any], columns: Sequence[str]) -> int:
    """What a saved row stores (see the module docstring): its `columns` and `SAVED_ROW_BYTES`."""
    return SAVED_ROW_BYTES + sum(column_bytes(row[column]) for column in columns)


def new_run_bytes(row: Mapping[str, Any], items: Sequence[bytes], jobs: int) -> int:
    """What a new run stores (see the module docstring), from the row CreateRun writes."""
    return RUN_COPIES * described_bytes(row) + sum(map(len, items)) + ITEM_DIGEST_BYTES * len(items) + JOB_BYTES * jobs


def result_bytes(explanation: str, error_reason: str) -> int:
    """What one result stores (see the module docstring)."""
    return RESULT_BYTES + 2 * (len(explanation) + len(error_reason))


async def lock(conn: AsyncConnection, tenants: Sequence[str]) -> None:
    """Hold the lock under which a tenant's stored bytes (and stored runs) are checked and raised, so that
    two replicas' writes cannot both take the last room (store.quotas): the runs table's, which CreateRun
    takes first."""
    await quotas.lock(conn, RUNS, tenants)


async def held_bytes(conn: AsyncConnection, tenant: str) -> int:
    """The bytes a tenant stores, read under its lock (`lock`) in the transaction that adds to them."""
    await lock(conn, [tenant])
    return (await stored_bytes(conn, [tenant]))[tenant]


def check_byte_room(cap: StoredCap, held: int, adding: int) -> None:
    """Refuse adding `adding` bytes to a tenant that stores `held` when that would pass its bytes (1 when
    what is added is not known yet: a generation's items, before the model writes them)."""
    cap.check(held, adding, remedy=ROOM_REMEDY)


async def take_room(conn: AsyncConnection, cap: StoredCap, tenant: str, adding: int) -> None:
    """Add `adding` bytes to what the tenant stores, for a write of this transaction, or refuse it when that
    would pass the bytes it may store: checked under its lock (`held_bytes`), so that two writes cannot both
    take the last room; the refusal rolls the transaction back."""
    check_byte_room(cap, await held_bytes(conn, tenant), adding)
    await add_to_totals(conn, stored_bytes={tenant: adding})


async def stored_bytes(conn: AsyncConnection, tenants: Sequence[str]) -> dict[str, int]:
    """The bytes each of these tenants stores, as last committed (no lock: for the executor's view)."""
    return await _totals(conn, TOTALS.c.stored_bytes, tenants, int)


async def cache_bytes(conn: AsyncConnection, tenants: Sequence[str]) -> dict[str, int]:
    """The payload bytes of each of these tenants' response cache entries, as last committed."""
    return await _totals(conn, TOTALS.c.cache_bytes, tenants, int)


async def _totals(conn: AsyncConnection, column: Any, tenants: Sequence[str], kind: Callable[[Any], N]) -> dict[str, N]:
    """One column of these tenants' totals, as `kind`, by tenant (0 for a tenant with no row yet)."""
    found = await conn.execute(select(TOTALS.c.tenant, column).where(TOTALS.c.tenant.in_(sorted(set(tenants)))))
    held = {tenant: kind(n) for tenant, n in found}
    return {tenant: held.get(tenant, kind(0)) for tenant in tenants}


async def add_to_totals(
    conn: AsyncConnection,
    *,
    runs: Mapping[str, int] | None = None,
    purged_cost_usd: Mapping[str, float] | None = None,
    stored_bytes: Mapping[str, int] | None = None,
    cache_bytes: Mapping[str, int] | None = None,
    spent_usd: Mapping[str, float] | None = None,
) -> None:
    """Add to tenants' totals (creating a tenant's row at its first write): `runs` stored (negative when
    purged), the spend of runs purged, `stored_bytes` and `cache_bytes` (negative when taken back), and
    `spent_usd`, what their model calls cost (`spend`). One upsert per tenant in one driver executemany,
    in tenant order (the lock order on PostgreSQL)."""
    runs, purged_cost_usd = runs or {}, purged_cost_usd or {}
    stored_bytes, cache_bytes = stored_bytes or {}, cache_bytes or {}
    spent_usd = spent_usd or {}
    tenants = sorted(set(runs) | set(purged_cost_usd) | set(stored_bytes) | set(cache_bytes) | set(spent_usd))
    if not tenants:
        return
    dialect_insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    statement = dialect_insert(TOTALS)
    await conn.execute(
        statement.on_conflict_do_update(
            index_elements=[TOTALS.c.tenant],
            set_={
                "runs": TOTALS.c.runs + statement.excluded.runs,
                "purged_cost_usd": TOTALS.c.purged_cost_usd + statement.excluded.purged_cost_usd,
                "stored_bytes": TOTALS.c.stored_bytes + statement.excluded.stored_bytes,
                "cache_bytes": TOTALS.c.cache_bytes + statement.excluded.cache_bytes,
                "spent_usd": TOTALS.c.spent_usd + statement.excluded.spent_usd,
            },
        ),
        [
            {
                "tenant": tenant,
                "runs": runs.get(tenant, 0),
                "purged_cost_usd": purged_cost_usd.get(tenant, 0.0),
                "stored_bytes": stored_bytes.get(tenant, 0),
                "cache_bytes": cache_bytes.get(tenant, 0),
                "spent_usd": spent_usd.get(tenant, 0.0),
            }
            for tenant in tenants
        ],
    )


async def spend(conn: AsyncConnection, tenants: Sequence[str]) -> dict[str, float]:
    """What each of these tenants has spent on model calls, in US dollars, as last committed (0 for a
    tenant with no row yet): its runs' cost_usd, purged ones included, and what its jobs that ended
    without a result had spent. Kept by the transactions that add to a run's cost_usd (recordings, a run
    ended over a limit) and that write stopped jobs' spend, so that a budget check reads one row."""
    return await _totals(conn, TOTALS.c.spent_usd, tenants, float)
