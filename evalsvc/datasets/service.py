"""The dataset service: create, read, list and delete datasets; append and list their items.

A tenant holds at most --max-datasets-per-tenant datasets and a dataset at most
--max-items-per-dataset items (evalsvc.limits.StoredCaps); its descriptive fields and its items count
towards --max-stored-bytes-per-tenant (evalsvc.store.usage). Deleting a dataset removes its items and
its generation and gives their bytes back at once; its item rows are deleted in chunks, in the purge loop's
passes shortly after the call answers (evalsvc.store.retention); runs made from it keep the copies of
the items they took (run_items) and their results, and keep its id (ListRuns finds them by it). Dataset ids are the
server's, never reused, so nothing kept under a deleted dataset's id (its run counter, which numbers its
runs on) can reach another dataset.
"""

from __future__ import annotations

import builtins
import copy
import time
import uuid
from collections.abc import Callable, Sequence
from typing import cast

from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.errors import FieldViolation, invalid_argument, not_found
from evalsvc.idempotency import conflict, create_once, fingerprint
from evalsvc.ids import PageTokens, new_id, page_size
from evalsvc.limits import StoredCap, StoredCaps, TenantLimits, in_page_line
from evalsvc.messages.convert import timestamp
from evalsvc.messages.validation import (
    MAX_DESCRIPTION,
    MAX_DISPLAY_NAME,
    MAX_REQUEST_ID,
    assign_item_ids,
    check_annotations,
    check_items,
    check_labels,
    check_length,
)
from evalsvc.store import datasets as dataset_store
from evalsvc.store import usage
from evalsvc.store.db import Database
from evalsvc.store.records import DatasetAppendRecord, DatasetGenerationRecord, DatasetRecord
from evalsvc.turns import mapped
from evalsvc.v1 import dataset_service_pb2 as pb
from evalsvc.v1 import item_pb2
from evalsvc.v1.dataset_generation_pb2 import DatasetGeneration

MAX_ITEMS_PER_CALL = 10_000
# What AddDatasetItems answers: the added items' ids, the dataset after them, and its generation if any.
Appended = tuple[list[str], DatasetRecord, DatasetGenerationRecord | None]


def generation_from(generation: DatasetGenerationRecord) -> DatasetGeneration:
    """The DatasetGeneration message of a generation."""
    return DatasetGeneration(
        state=cast("DatasetGeneration.State", generation.state),
        item_count=generation.item_count,
        generated_count=generation.generated_count,
        error=generation.error,
        create_time=timestamp(generation.create_time),
        update_time=timestamp(generation.update_time),
    )


def dataset_from(dataset: DatasetRecord, generation: DatasetGenerationRecord | None = None) -> pb.Dataset:
    """The Dataset message of a dataset, with its generation when it has one."""
    return pb.Dataset(
        generation=generation_from(generation) if generation else None,
        id=dataset.id,
        display_name=dataset.display_name,
        description=dataset.description,
        labels=dataset.labels or {},
        annotations=dataset.annotations or {},
        item_count=dataset.item_count,
        create_time=timestamp(dataset.create_time),
        update_time=timestamp(dataset.update_time),
    )


async def number_new_items(conn: AsyncConnection, dataset_id: str, items: Sequence[item_pb2.Item], start: int) -> None:
    """Give the items without an id one: `item-N`, numbered on from the dataset's `start` items, or a
    random `item-...` where that id is taken - by an item of the dataset or of the same request. Ids
    callers chose are theirs to keep unique (the caller reports a clash).

    Numbered from the item count alone, a dataset whose caller had once added an `item-2` of its own
    refused every later item without an id, for good: the next number was always `item-2`."""
    chosen = {item.id for item in items if item.id}
    numbered = [item for item in items if not item.id]
    await assign_item_ids(items, start=start)
    taken = await dataset_store.existing_item_ids(conn, dataset_id, [item.id for item in numbered])
    for item in numbered:
        if item.id in taken or item.id in chosen:
            item.id = f"item-{uuid.uuid4().hex[:12]}"


def check_item_room(cap: StoredCap, dataset: DatasetRecord, adding: int) -> None:
    """Refuse items that would take `dataset` past its cap, all of them (nothing is written)."""
    cap.check(
        dataset.item_count,
        adding,
        holder=f"dataset {dataset.id!r}",
        remedy="nothing was written; add fewer, or put the rest in another dataset",
    )


async def append_items(
    conn: AsyncConnection,
    bytes_cap: StoredCap,
    tenant: str,
    dataset_id: str,
    rows: Sequence[tuple[str, bytes]],
    now: float,
) -> DatasetRecord:
    """Append (item id, serialized item) rows to a dataset the transaction holds, unless they would take
    the tenant past the bytes it may store (evalsvc.store.usage): then all of them are refused."""
    usage.check_byte_room(bytes_cap, await usage.held_bytes(conn, tenant), sum(len(item) for _, item in rows))
    return await dataset_store.append_items(conn, tenant, dataset_id, rows, now)


async def _appended(conn: AsyncConnection, tenant: str, first: DatasetAppendRecord) -> Appended:
    """What an AddDatasetItems with a request_id answers again: the ids it added, and the dataset now."""
    generations = await dataset_store.generations_of(conn, [first.dataset_id])  # first, as `get` reads them
    dataset = await dataset_store.get(conn, tenant, first.dataset_id)
    if dataset is None:  # deleted since (its appends went with it): as for any call on it
        raise not_found("dataset", first.dataset_id)
    ids = await dataset_store.item_ids_between(conn, first.dataset_id, first.first_idx, first.count)
    return ids, dataset, generations.get(first.dataset_id)


class DatasetService:
    """Datasets of one database, for any tenant the caller names."""

    def __init__(
        self,
        db: Database,
        page_tokens: PageTokens,
        caps: StoredCaps,
        limits: TenantLimits,
        *,
        on_deleted: Callable[[], None] = lambda: None,
    ) -> None:
        self._db = db
        self._on_deleted = on_deleted  # wakes the purge loop (evalsvc.runs.retention.RunPurger.wake)
        self._limits = limits
        self._page_tokens = page_tokens
        self._caps = caps

    @property
    def limits(self) -> TenantLimits:
        """The tenants' limits, whose line its page reads take their turns in (`in_page_line`)."""
        return self._limits

    async def create(self, tenant: str, request: pb.CreateDatasetRequest) -> pb.Dataset:
        """Create an empty dataset (idempotent by request_id)."""
        spec = request.dataset
        violations: list[FieldViolation] = []
        if not request.HasField("dataset"):
            violations.append(FieldViolation("dataset", "required"))
        check_length(request.request_id, MAX_REQUEST_ID, "request_id", violations)
        check_length(spec.display_name, MAX_DISPLAY_NAME, "dataset.display_name", violations)
        check_length(spec.description, MAX_DESCRIPTION, "dataset.description", violations)
        check_labels(spec.labels, "dataset.labels", violations)
        check_annotations(spec.annotations, "dataset.annotations", violations)
        if violations:
            raise invalid_argument(violations)
        definition = pb.Dataset(
            display_name=spec.display_name,
            description=spec.description,
            labels=spec.labels,
            annotations=spec.annotations,
        )
        digest = fingerprint(definition)
        now = time.time()
        dataset = DatasetRecord(
            id=new_id("ds"),
            tenant=tenant,
            request_id=request.request_id or None,
            request_hash=digest,
            display_name=spec.display_name,
            description=spec.description,
            labels=dict(spec.labels),
            annotations=dict(spec.annotations),
            item_count=0,
            create_time=now,
            update_time=now,
        )

        async def create(conn: AsyncConnection) -> pb.Dataset:
            self._caps.datasets.check(await dataset_store.count(conn, tenant))
            await dataset_store.insert_dataset(conn, dataset, self._caps.stored_bytes)
            return dataset_from(dataset)

        async def replay(existing: DatasetRecord) -> pb.Dataset:
            return dataset_from(existing)

        return await create_once(
            self._db,
            kind="dataset",
            request_id=request.request_id,
            fingerprint=digest,
            find=lambda conn: dataset_store.find_by_request_id(conn, tenant, request.request_id),
            create=create,
            replay=replay,
        )

    async def get(self, tenant: str, dataset_id: str) -> pb.Dataset:
        """A dataset; NOT_FOUND when missing or another tenant's."""
        async with self._db.read() as conn:
            # The generation first: each read sees the latest commit (SQLite's autocommit readers), and
            # a generation's items commit before its end does, so a dataset read after a finished
            # generation holds all its items. Read the other way round, a generation that finished
            # between the two reads showed SUCCEEDED beside the item count from before it.
            generations = await dataset_store.generations_of(conn, [dataset_id])
            dataset = await dataset_store.get(conn, tenant, dataset_id)
            if dataset is None:
                raise not_found("dataset", dataset_id)
        return dataset_from(dataset, generations.get(dataset_id))

    @in_page_line
    async def list(self, tenant: str, request: pb.ListDatasetsRequest) -> tuple[list[pb.Dataset], str]:
        """A page of datasets, newest first. Bounded by bytes too (a dataset's annotations alone may be
        64 KiB), it chooses its datasets by their stored sizes and reads only those (as `list_items`): read
        whole, a page of 1,000 datasets of ~70 KB read 70 MB to answer with the ~60 that fit."""
        limit = page_size(request.page_size, 50)
        before_id = self._page_tokens.decode(tenant, "datasets", {}, request.page_token)
        async with self._db.read() as conn:
            sizes = await dataset_store.list_sizes(conn, tenant, before_id=before_id, limit=limit + 1)
            chosen = self._page_tokens.choose(sizes, limit)
            # By id: read again by position, a dataset created between the reads took the first place and
            # pushed the last chosen one off a last page (no token): a dataset silently missing.
            rows = await dataset_store.list_page(conn, tenant, chosen.positions)
            generations = await dataset_store.generations_of(conn, [row.id for row in rows])
        datasets = [dataset_from(row, generations.get(row.id)) for row in rows]
        return self._page_tokens.chosen_page(tenant, "datasets", {}, datasets, lambda i: datasets[i].id, chosen)

    async def add_items(self, tenant: str, request: pb.AddDatasetItemsRequest) -> tuple[builtins.list[str], pb.Dataset]:
        """Append items; their ids must be new to the dataset. With a request_id, once (AIP-155): a retry
        adds nothing and answers with the first call's item ids and the dataset as it is now."""
        problems: list[FieldViolation] = []
        if not request.items:
            problems.append(FieldViolation("items", "at least one item is required"))
        if len(request.items) > MAX_ITEMS_PER_CALL:  # before numbering: that reads the dataset under its lock
            problems.append(
                FieldViolation("items", f"at most {MAX_ITEMS_PER_CALL} items per request (got {len(request.items)})")
            )
        check_length(request.request_id, MAX_REQUEST_ID, "request_id", problems)
        if problems:
            raise invalid_argument(problems)
        digest = fingerprint(request)

        def used_for(first: DatasetAppendRecord) -> str:
            """What a request_id reused with other content was used for: the dataset was this one (the
            items differ) or another (`for a different dataset` was said of both)."""
            if first.dataset_id == request.dataset_id:
                return f"to add other items to dataset {first.dataset_id!r}"
            return f"to add items to another dataset, {first.dataset_id!r}"

        async def add(conn: AsyncConnection) -> Appended:
            # On copies: the writer may run this twice, and ids are numbered from the count it reads.
            # Copied in turns (evalsvc.turns): a request may hold a million conversation turns.
            items = await mapped(copy.deepcopy, request.items)
            violations: list[FieldViolation] = []
            dataset = await dataset_store.get(conn, tenant, request.dataset_id, lock=True)
            if dataset is None:
                raise not_found("dataset", request.dataset_id)
            first = await dataset_store.find_append(conn, tenant, request.request_id) if request.request_id else None
            if first is not None:
                # A retry of this request_id that committed while this one waited for the dataset's lock
                # (PostgreSQL replicas): answer as it did, or its ids read as taken.
                if first.request_hash != digest:
                    raise conflict("dataset", request.request_id, first.dataset_id, used_for(first))
                return await _appended(conn, tenant, first)
            check_item_room(self._caps.dataset_items, dataset, len(items))
            await number_new_items(conn, request.dataset_id, items, dataset.item_count)
            await check_items(items, "items", violations, MAX_ITEMS_PER_CALL)
            ids = [item.id for item in items]
            taken = await dataset_store.existing_item_ids(conn, request.dataset_id, ids)
            violations.extend(
                FieldViolation(f"items[{i}].id", f"the dataset already has an item {item_id!r}")
                for i, item_id in enumerate(ids)
                if item_id in taken
            )
            if violations:
                raise invalid_argument(violations)
            updated = await append_items(
                conn,
                self._caps.stored_bytes,
                tenant,
                request.dataset_id,
                [(item.id, item.SerializeToString()) for item in items],
                time.time(),
            )
            if request.request_id:
                append = DatasetAppendRecord(
                    tenant,
                    request.request_id,
                    request.dataset_id,
                    digest,
                    first_idx=updated.item_count - len(ids),
                    count=len(ids),
                    create_time=updated.update_time,
                )
                await dataset_store.insert_append(conn, append)
            generations = await dataset_store.generations_of(conn, [request.dataset_id])
            return ids, updated, generations.get(request.dataset_id)

        async def replay(first: DatasetAppendRecord) -> Appended:
            async with self._db.read() as conn:
                return await _appended(conn, tenant, first)

        ids, updated, generation = await create_once(
            self._db,
            kind="dataset",
            request_id=request.request_id,
            fingerprint=digest,
            find=lambda conn: dataset_store.find_append(conn, tenant, request.request_id),
            create=add,
            replay=replay,
            used=used_for,
        )
        return ids, dataset_from(updated, generation)

    async def delete(self, tenant: str, dataset_id: str) -> None:
        """Delete a dataset, its items and its generation; NOT_FOUND when missing or another tenant's
        (the module docstring says what becomes of its runs)."""
        if not await self._db.transact(lambda conn: dataset_store.remove(conn, tenant, dataset_id)):
            raise not_found("dataset", dataset_id)
        # NOT_FOUND from that commit on, and the call answers: its items go in the purge loop's passes, a
        # chunk per transaction, other writes between them. Deleting them before answering took past the
        # client's deadline for a large dataset (~700 MB in 10 s), and its retry said NOT_FOUND for a
        # delete that was done; a chunk that failed had the call fail after the dataset was gone.
        self._on_deleted()

    @in_page_line
    async def list_items(
        self, tenant: str, request: pb.ListDatasetItemsRequest
    ) -> tuple[builtins.list[item_pb2.Item], str]:
        """A page of a dataset's items in insertion order.

        The page chooses its items by their stored sizes (`fitting_sizes`) and then reads and parses only
        those: it read its `page_size` items whole and parsed them all on the event loop before the byte
        bound dropped what did not fit, so a page of 4 MiB items read 1,000 of them to answer with one
        (6 such calls at once: ~9 s each, the server's RSS 683 MiB -> 3.2 GiB, another tenant's GetRun
        p99 3.15 s). Now a page reads at most `page_bytes`, or its one first item when that is larger."""
        limit = page_size(request.page_size, 100)
        query = {"dataset_id": request.dataset_id}
        after = self._page_tokens.decode(tenant, "dataset_items", query, request.page_token)
        after_idx = -1 if after is None else int(after)
        async with self._db.read() as conn:
            if await dataset_store.get(conn, tenant, request.dataset_id) is None:
                raise not_found("dataset", request.dataset_id)
            sizes = await dataset_store.item_sizes(conn, request.dataset_id, after_idx=after_idx, limit=limit + 1)
            fitting = self._page_tokens.fitting_sizes(size for _, size in sizes[:limit])
            rows = await dataset_store.items_page(conn, request.dataset_id, after_idx=after_idx, limit=fitting)
            # Still there after its items were read: no chunk of a DeleteDataset's purge ran before them (the
            # row goes in the transaction before the first chunk). Gone, what was read may be the tail the
            # chunks left, answered as the dataset's last page.
            if await dataset_store.get(conn, tenant, request.dataset_id) is None:
                raise not_found("dataset", request.dataset_id)
        if not rows:  # none after the position
            return [], ""
        # Parsed in turns (evalsvc.turns): a page of items of 10,000 conversation turns each holds millions.
        items = await mapped(item_pb2.Item.FromString, [item for _, item in rows])
        return self._page_tokens.page(tenant, "dataset_items", query, items, len(sizes), lambda i: rows[i][0])
