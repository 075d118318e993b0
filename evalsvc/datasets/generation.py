"""Dataset generation: the server's generator model writes a dataset's items in the background.

`GenerateDatasetItems` stores a PENDING generation and returns; a supervised loop in every server
process leases pending generations (and running ones whose lease expired: a crashed or restarted
process), asks the generator model for the items in batches, and appends each batch to the dataset in
the same transaction that records the progress, so a resumed generation continues where it stopped.
A generation whose model cannot be reached or gives no usable answer ends FAILED with the reason.

The generator is an OpenAI-compatible chat model: --generator-model (with --generator-base-url and
--generator-api-key), by default the server's default judge. Its calls go through the shared
`Outbound` client (SSRF rule, retries, adaptive per-endpoint limits waited for in the tenant's turn).
Bounds: at most MAX_ITEMS items per generation, TENANT_CONCURRENCY generations of one tenant and
PROCESS_CONCURRENCY in all are worked on at once by a process, so one tenant's large generations
cannot hold back another's.

A dataset holds at most --max-items-per-dataset items. GenerateDatasetItems asking for more than the
dataset has room for is refused up front (RESOURCE_EXHAUSTED, nothing stored), as AddDatasetItems is;
items added meanwhile by other calls can still fill the room, and then the batch that no longer fits
is not written and the generation ends FAILED saying so (the batches before it stay). ContinueConversations
is refused whole, before any model call and again when its turns are written.

ContinueConversations is synchronous: its model calls last as long as its call, and end with it (a caller
that goes away or whose deadline passes, a server that stops: only its final write is shielded, so that
what it wrote is never half-written). A tenant has at most CONTINUES_PER_TENANT of them in progress.

A generation whose dataset is deleted is deleted with it: a pending one is never claimed, and a running
one stops at its next write (which finds no generation: the model's batch in flight is dropped).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.config import Settings
from evalsvc.datasets.service import (
    append_items,
    check_item_room,
    generation_from,
    number_new_items,
)
from evalsvc.errors import FieldViolation, Reason, ServiceError, invalid_argument, not_found
from evalsvc.graders.judge import JudgeDefaults
from evalsvc.http.outbound import Outbound, OutboundError, call_tenant
from evalsvc.limits import Holdings, StoredCap, quota_exceeded
from evalsvc.liveness import Progress, Watched, supervise
from evalsvc.messages.validation import check_items, check_metadata, check_roles
from evalsvc.metrics import Metrics
from evalsvc.storable import storable_json
from evalsvc.store import datasets as dataset_store
from evalsvc.store import usage
from evalsvc.store.db import Database
from evalsvc.store.records import DatasetGenerationRecord
from evalsvc.targets import chat_url
from evalsvc.v1 import item_pb2, target_pb2
from evalsvc.v1.dataset_generation_pb2 import (
    ContinueConversationsRequest,
    DatasetGeneration,
    GenerateDatasetItemsRequest,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

State = DatasetGeneration.State
PENDING, RUNNING = DatasetGeneration.STATE_PENDING, DatasetGeneration.STATE_RUNNING
SUCCEEDED, FAILED = DatasetGeneration.STATE_SUCCEEDED, DatasetGeneration.STATE_FAILED
CLAIMABLE = (PENDING, RUNNING)
MAX_ITEMS = 1000
MAX_INSTRUCTIONS = 64 * 1024
MAX_ITEM_CHARS = 16 * 1024  # a generated input longer than this is cut
BATCH = 20  # items asked for in one model call
PARSE_ATTEMPTS = 3  # model calls per batch before an unusable answer fails the generation
TENANT_CONCURRENCY = 2
PROCESS_CONCURRENCY = 8
LEASE_TTL_S = 120.0
LOOP_NAME = "dataset-generations"
SEEN_CHARS = 4096  # how much of the items already written is shown to the model, to avoid repeats
MAX_CONVERSATIONS = 100  # conversations continued in one ContinueConversations call
MAX_CONVERSATION_BYTES = 1024 * 1024  # all their turns together
CONTINUE_CONCURRENCY = 4  # generator calls of one ContinueConversations call at once
# ContinueConversations calls of one tenant in progress at once in a process (so at most 8 of its generator
# calls): each holds its request (up to 1 MiB of turns) and the generator's time while it lasts; past it
# RESOURCE_EXHAUSTED, quota CONTINUES_QUOTA, with RetryInfo.
CONTINUES_PER_TENANT = 2
CONTINUES_QUOTA = "continue_conversations_in_flight"
CONTINUES_RETRY_AFTER_S = 5.0


def generator_model(settings: Settings) -> JudgeDefaults:
    """The generator model: --generator-* where given, else the default judge. A generator on its own
    base URL uses only its own key: the judge's key is never sent to another endpoint."""
    if settings.generator_base_url:
        return JudgeDefaults(
            settings.generator_base_url, settings.generator_model or settings.judge_model, settings.generator_api_key
        )
    return JudgeDefaults(
        settings.judge_base_url, settings.generator_model or settings.judge_model, settings.judge_api_key
    )


class UnusableAnswer(ValueError):
    """The model answered, but not with items."""


async def answer_json(reply: Any, parse: Callable[[str], Awaitable[Any]]) -> Any:
    """The JSON a model's chat answer holds in its message (`parse`: `Outbound.parse_json`, off the loop
    when it is large); UnusableAnswer when there is none."""
    try:
        return storable_json(await parse(reply["choices"][0]["message"]["content"]))
    except (KeyError, IndexError, TypeError, ValueError) as exc:  # nested too deep included (`loads`)
        raise UnusableAnswer(f"not a JSON answer: {exc}") from exc
    except RecursionError:  # whatever parsed it, a walk of the answer would not end
        raise UnusableAnswer("not a JSON answer: it is nested too deeply") from None


def parse_items(parsed: Any, wanted: int) -> list[str]:
    """The item inputs of a model's answer `{"items": ["...", ...]}` (strings, or objects with an
    `input` or `content`), at most `wanted`; UnusableAnswer when it holds none."""
    listed = parsed.get("items") if isinstance(parsed, dict) else parsed
    if not isinstance(listed, list):
        raise UnusableAnswer('the answer has no "items" list')
    texts = [entry.get("input") or entry.get("content") if isinstance(entry, dict) else entry for entry in listed]
    inputs = [text.strip()[:MAX_ITEM_CHARS] for text in texts if isinstance(text, str) and text.strip()]
    if not inputs:
        raise UnusableAnswer("the answer holds no items")
    return inputs[:wanted]


def ask(instructions: str, wanted: int, written: list[str]) -> list[dict[str, str]]:
    """The chat messages asking for `wanted` more items."""
    seen = ""
    if written:
        shown = json.dumps(written[-50:], ensure_ascii=False)[-SEEN_CHARS:]
        seen = f"\n\nItems already written (write different ones): {shown}"
    return [
        {
            "role": "system",
            "content": "You write test inputs for evaluating AI systems. Reply with one JSON object only.",
        },
        {
            "role": "user",
            "content": f"Write {wanted} distinct test inputs (prompts) following these instructions.\n\n"
            f"{instructions}{seen}\n\n"
            f'Answer with JSON {{"items": ["<input 1>", ...]}} holding exactly {wanted} inputs.',
        },
    ]


def next_turn_messages(instructions: str, turns: list[item_pb2.Message]) -> list[dict[str, str]]:
    """The chat messages asking for the next user turn of a conversation."""
    shown = "\n\n".join(f"{turn.role or 'user'}: {turn.content}" for turn in turns)
    purpose = f"{instructions}\n\n" if instructions else ""
    return [
        {
            "role": "system",
            "content": "You write test inputs for evaluating AI systems. Reply with one JSON object only.",
        },
        {
            "role": "user",
            "content": f"{purpose}Write the user's next message in this conversation, continuing the test.\n\n"
            f"{shown}\n\n"
            'Answer with JSON {"items": ["<the next user message>"]}.',
        },
    ]


class DatasetGenerations:
    """Starts generations (the RPC) and works on them (the supervised loop)."""

    def __init__(
        self,
        db: Database,
        outbound: Outbound,
        model: JudgeDefaults,
        poll_interval_s: float,
        item_cap: StoredCap,
        bytes_cap: StoredCap,
        metrics: Metrics,
    ) -> None:
        """`item_cap`: the items a dataset may hold (--max-items-per-dataset); `bytes_cap`: the bytes a
        tenant may store (--max-stored-bytes-per-tenant)."""
        self._db = db
        self._metrics = metrics
        self._progress = Progress()
        self._item_cap = item_cap
        self._bytes_cap = bytes_cap
        self._outbound = outbound
        self._model = model
        self._poll_s = poll_interval_s
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._working: dict[str, tuple[str, str, asyncio.Task[None]]] = {}  # claim id -> (dataset, tenant, task)
        self._writes: set[asyncio.Future[Any]] = set()
        self.continuing = Holdings()  # ContinueConversations calls in progress, by tenant

    async def generate(self, tenant: str, request: GenerateDatasetItemsRequest) -> DatasetGeneration:
        """Accept a generation for a tenant's dataset. The same request again returns the existing one;
        with validate_only, what it would accept (nothing is written)."""
        violations: list[FieldViolation] = []
        if not 1 <= request.item_count <= MAX_ITEMS:
            violations.append(FieldViolation("item_count", f"must be between 1 and {MAX_ITEMS}"))
        if not request.instructions.strip():
            violations.append(FieldViolation("instructions", "required"))
        elif len(request.instructions.encode()) > MAX_INSTRUCTIONS:
            violations.append(FieldViolation("instructions", f"at most {MAX_INSTRUCTIONS} bytes"))
        if violations:
            raise invalid_argument(violations)
        if not self._model.configured:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                Reason.GENERATOR_NOT_CONFIGURED,
                "the server has no generator model (--generator-model or --judge-base-url/--judge-model)",
            )
        if request.validate_only:
            return DatasetGeneration(state=PENDING, item_count=request.item_count)
        now = time.time()

        async def create(conn: AsyncConnection) -> tuple[DatasetGenerationRecord, bool]:
            dataset = await dataset_store.get(conn, tenant, request.dataset_id, lock=True)
            if dataset is None:
                raise not_found("dataset", request.dataset_id)
            existing = (await dataset_store.generations_of(conn, [request.dataset_id])).get(request.dataset_id)
            if existing is not None:
                if (existing.item_count, existing.instructions) != (request.item_count, request.instructions):
                    raise ServiceError(
                        grpc.StatusCode.ALREADY_EXISTS,
                        Reason.GENERATION_EXISTS,
                        f"dataset {request.dataset_id!r} already has a generation with other parameters",
                    )
                return existing, False
            check_item_room(self._item_cap, dataset, request.item_count)
            usage.check_byte_room(self._bytes_cap, await usage.held_bytes(conn, tenant), 1)  # before paying the model
            generation = DatasetGenerationRecord(
                dataset_id=request.dataset_id,
                tenant=tenant,
                state=PENDING,
                item_count=request.item_count,
                generated_count=0,
                instructions=request.instructions,
                error="",
                claim_id=None,
                lease_expiry=None,
                create_time=now,
                update_time=now,
            )
            await dataset_store.insert_generation(conn, generation)
            return generation, True

        generation, created = await self._db.transact(create)
        if created:
            self._wake.set()
        return generation_from(generation)

    async def continue_conversations(self, tenant: str, request: ContinueConversationsRequest) -> list[item_pb2.Item]:
        """The next user turn of each conversation, appended to the dataset (existing ids are returned
        as stored, not written again). Synchronous: at most MAX_CONVERSATIONS short model calls, cancelled
        with the call; at most CONTINUES_PER_TENANT such calls of a tenant at once."""
        violations: list[FieldViolation] = []
        if not 1 <= len(request.conversations) <= MAX_CONVERSATIONS:
            violations.append(FieldViolation("conversations", f"1 to {MAX_CONVERSATIONS} conversations"))
        if len(request.instructions.encode()) > MAX_INSTRUCTIONS:
            violations.append(FieldViolation("instructions", f"at most {MAX_INSTRUCTIONS} bytes"))
        size = sum(len(t.content.encode()) for c in request.conversations for t in c.turns)
        if size > MAX_CONVERSATION_BYTES:
            violations.append(FieldViolation("conversations", f"the turns take {size} bytes; at most 1 MiB"))
        for i, conversation in enumerate(request.conversations):
            if not conversation.turns:
                violations.append(FieldViolation(f"conversations[{i}].turns", "at least one turn"))
            check_roles(conversation.turns, f"conversations[{i}].turns", violations)
            check_metadata(conversation.metadata, f"conversations[{i}].metadata", violations)
        items = [item_pb2.Item(id=c.item_id) for c in request.conversations]
        for i, conversation in enumerate(request.conversations):
            if not conversation.item_id:
                violations.append(FieldViolation(f"conversations[{i}].item_id", "required"))
        await check_items(items, "conversations", violations, id_field="item_id")
        if violations:
            raise invalid_argument(violations)
        for item, conversation in zip(items, request.conversations, strict=True):
            item.metadata.update(conversation.metadata)  # copied once bounded (check_metadata, above)
        if not self._model.configured:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                Reason.GENERATOR_NOT_CONFIGURED,
                "the server has no generator model (--generator-model or --judge-base-url/--judge-model)",
            )
        if (held := self.continuing.of(tenant)) >= CONTINUES_PER_TENANT:
            raise quota_exceeded(
                CONTINUES_QUOTA,
                f"the tenant already has {held} ContinueConversations calls in progress (at most "
                f"{CONTINUES_PER_TENANT}); retry once one has ended",
                retry_after_s=CONTINUES_RETRY_AFTER_S,
            )
        self.continuing.take(tenant)
        try:
            return await self._continue(tenant, request, items)
        finally:
            self.continuing.give_back(tenant)

    async def _continue(
        self, tenant: str, request: ContinueConversationsRequest, items: list[item_pb2.Item]
    ) -> list[item_pb2.Item]:
        """`continue_conversations` once the request is valid and the tenant has room for one more."""
        async with self._db.read() as conn:
            dataset = await dataset_store.get(conn, tenant, request.dataset_id)
            if dataset is None:
                raise not_found("dataset", request.dataset_id)
            stored = await dataset_store.items_by_id(conn, request.dataset_id, [item.id for item in items])
            held = (await usage.stored_bytes(conn, [tenant]))[tenant]
        # Before the model calls, which cost the tenant; checked again under the lock when writing.
        check_item_room(self._item_cap, dataset, sum(item.id not in stored for item in items))
        usage.check_byte_room(self._bytes_cap, held, 1)
        slots = asyncio.Semaphore(CONTINUE_CONCURRENCY)

        async def write(conversation: Any, item: item_pb2.Item) -> None:
            call_tenant.set(tenant)  # its own task (gather): whose turn its calls wait for at the endpoint
            async with slots:
                body = {
                    "model": self._model.model,
                    "messages": next_turn_messages(request.instructions, list(conversation.turns)),
                    "response_format": {"type": "json_object"},
                }
                for attempt in range(PARSE_ATTEMPTS):
                    reply = await self._outbound.post_json(
                        chat_url(self._endpoint),
                        body,
                        self._model.headers(),
                        120.0,
                        secrets=self._model.secret_values(),
                    )
                    try:
                        [item.input] = parse_items(await answer_json(reply.body, self._outbound.parse_json), 1)
                        return
                    except UnusableAnswer as exc:
                        if attempt == PARSE_ATTEMPTS - 1:
                            raise ServiceError(
                                grpc.StatusCode.UNAVAILABLE,
                                Reason.GENERATOR_UNAVAILABLE,
                                f"the generator model gave no usable next turn: {exc}",
                            ) from None

        missing = [(c, item) for c, item in zip(request.conversations, items, strict=True) if item.id not in stored]
        writing = [asyncio.ensure_future(write(c, item)) for c, item in missing]
        try:
            await asyncio.gather(*writing)
        except OutboundError as exc:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, Reason.GENERATOR_UNAVAILABLE, exc.reason) from None
        finally:
            # A conversation that failed ends the call: the others' model calls end with it. gather passed
            # the first failure on and left them running, uncounted once the call had given its places
            # back (a tenant could pile up background generator calls by failing one conversation fast).
            for task in writing:
                task.cancel()
            if writing:
                await asyncio.wait(writing)

        async def append(conn: AsyncConnection) -> dict[str, bytes]:
            dataset = await dataset_store.get(conn, tenant, request.dataset_id, lock=True)
            if dataset is None:
                raise not_found("dataset", request.dataset_id)
            found = await dataset_store.items_by_id(conn, request.dataset_id, [item.id for item in items])
            new = [
                item for _, item in missing if item.id not in found and item.id not in stored
            ]  # a retry may have won
            if new:
                check_item_room(self._item_cap, dataset, len(new))
                rows = [(item.id, item.SerializeToString()) for item in new]
                await append_items(conn, self._bytes_cap, tenant, request.dataset_id, rows, time.time())
            return dict(found)

        stored.update(await self._write(self._db.transact(append)))  # shielded: the call may end meanwhile
        return [item_pb2.Item.FromString(stored[item.id]) if item.id in stored else item for item in items]

    @property
    def _endpoint(self) -> target_pb2.Endpoint:
        return target_pb2.Endpoint(base_url=self._model.base_url)

    # ---- The worker ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Requeue what a previous process left running (SQLite has one server), then start the loop."""
        self._stopping.clear()
        if self._db.is_sqlite:
            released = await self._db.transact(lambda conn: dataset_store.release_generations(conn, RUNNING, PENDING))
            if released:
                log.info("resuming %d dataset generations left running before the last shutdown", released)
        self._loop = asyncio.create_task(
            supervise(LOOP_NAME, self._claim_loop, self._stopping, self._metrics), name=LOOP_NAME
        )

    def watched(self, stall_s: float) -> Watched:
        """The claim loop, for the watchdog: it beats every poll, so a loop silent past `stall_s` (or two
        polls) while a generation waits to be claimed is stuck, and health turns NOT_SERVING."""
        return Watched(LOOP_NAME, self._progress, self._claimable, max(stall_s, 2 * self._poll_s))

    async def _claimable(self) -> bool:
        async with self._db.read() as conn:
            return bool(await dataset_store.claimable_generations(conn, CLAIMABLE, time.time(), 1))

    async def stop(self) -> None:
        """Stop claiming, abandon the generations in flight (their leases lapse; SQLite requeues at
        start) after their current write, which is shielded from the cancellation."""
        self._stopping.set()
        if self._loop is not None:
            await self._loop
        tasks = [task for _, _, task in self._working.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*self._writes, return_exceptions=True)

    async def _claim_loop(self) -> None:
        next_extension = time.monotonic() + LEASE_TTL_S / 4
        while not self._stopping.is_set():
            self._wake.clear()
            await self._claim()
            if time.monotonic() >= next_extension:
                working, expiry = list(self._working), time.time() + LEASE_TTL_S
                await self._db.transact(
                    functools.partial(dataset_store.extend_generations, claim_ids=working, expiry=expiry)
                )
                next_extension = time.monotonic() + LEASE_TTL_S / 4
            waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(self._stopping.wait())]
            await asyncio.wait(waits, timeout=self._poll_s, return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                waiting.cancel()
            # After the turn, not as the loop (re)starts: restarts after failures are no progress.
            self._progress.beat()

    async def _claim(self) -> None:
        """Lease what this process has room for, no tenant beyond its share."""
        room = PROCESS_CONCURRENCY - len(self._working)
        if room <= 0:
            return
        busy = Counter(tenant for _, tenant, _ in self._working.values())
        async with self._db.read() as conn:
            candidates = await dataset_store.claimable_generations(conn, CLAIMABLE, time.time(), 100)
        for candidate in candidates:
            if room == 0:
                break
            if busy[candidate.tenant] >= TENANT_CONCURRENCY:
                continue
            claim_id = uuid.uuid4().hex
            now = time.time()
            claimed = await self._db.transact(
                functools.partial(
                    dataset_store.claim_generation,
                    dataset_id=candidate.dataset_id,
                    states=CLAIMABLE,
                    claim_id=claim_id,
                    now=now,
                    expiry=now + LEASE_TTL_S,
                )
            )
            if claimed is None:
                continue  # another process took it
            task = asyncio.create_task(self._work(claimed, claim_id), name=f"generate-{claimed.dataset_id}")
            self._working[claim_id] = (claimed.dataset_id, claimed.tenant, task)
            task.add_done_callback(functools.partial(self._done, claim_id))
            busy[claimed.tenant] += 1
            room -= 1

    def _done(self, claim_id: str, task: asyncio.Task[None]) -> None:
        entry = self._working.pop(claim_id, None)
        self._wake.set()  # a slot is free
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Not even FAILED could be recorded: the lease runs out and the generation is claimed again.
            dataset_id = entry[0] if entry else "?"
            log.error("dataset %s: generation ended with an error", dataset_id, exc_info=exc)

    async def _work(self, generation: DatasetGenerationRecord, claim_id: str) -> None:
        """Write the remaining items batch by batch; record the outcome."""
        call_tenant.set(generation.tenant)  # its own task: whose turn its calls wait for at the endpoint
        dataset_id = generation.dataset_id
        written: list[str] = []
        try:
            remaining = generation.item_count - generation.generated_count
            while remaining > 0:
                inputs = await self._batch(generation.instructions, min(BATCH, remaining), written)
                if not await self._write(self._append(generation.tenant, dataset_id, claim_id, inputs)):
                    # The lease was lost (another process has it now), or the dataset was deleted.
                    log.info("dataset %s: generation stopped: no longer held (or its dataset deleted)", dataset_id)
                    return
                written.extend(inputs)
                remaining -= len(inputs)
            await self._write(self._finish(dataset_id, claim_id, SUCCEEDED, ""))
        except (OutboundError, UnusableAnswer, ServiceError) as exc:
            if isinstance(exc, OutboundError):
                reason = exc.reason
            elif isinstance(exc, UnusableAnswer):
                reason = f"the generator model gave no usable items: {exc}"
            else:  # the batch would pass the dataset's item cap or its tenant's bytes (_append)
                reason = f"no more items could be added: {exc.message}"
            log.warning("dataset %s: generation failed: %s", dataset_id, reason)
            await self._write(self._finish(dataset_id, claim_id, FAILED, reason))
        except Exception as exc:
            # Last resort: a bug ended the work; left RUNNING, the generation would be claimed again at
            # every lease's end and call the model again, for good (an answer nested 700 deep did).
            log.exception("dataset %s: generation failed with an unexpected error", dataset_id)
            reason = f"internal error ({type(exc).__name__}); the server's log has the details"
            await self._write(self._finish(dataset_id, claim_id, FAILED, reason))

    async def _batch(self, instructions: str, wanted: int, written: list[str]) -> list[str]:
        """Up to `wanted` new inputs from the model, asking again when an answer is unusable."""
        body = {
            "model": self._model.model,
            "messages": ask(instructions, wanted, written),
            "response_format": {"type": "json_object"},
        }
        problem = UnusableAnswer("no answer")
        for _ in range(PARSE_ATTEMPTS):
            reply = await self._outbound.post_json(
                chat_url(self._endpoint), body, self._model.headers(), 120.0, secrets=self._model.secret_values()
            )
            try:
                return parse_items(await answer_json(reply.body, self._outbound.parse_json), wanted)
            except UnusableAnswer as exc:
                problem = exc
        raise problem

    async def _write(self, write: Awaitable[T]) -> T:
        """Run a write to completion even if this task is cancelled meanwhile (a SQLite write
        transaction must not be abandoned half-way); `stop` waits for it. Its outcome is taken when it
        ends, so the error of a write whose call had gone is not logged as "never retrieved"."""
        future = asyncio.ensure_future(write)
        self._writes.add(future)
        future.add_done_callback(_settled)
        future.add_done_callback(self._writes.discard)
        return await asyncio.shield(future)

    async def _append(self, tenant: str, dataset_id: str, claim_id: str, inputs: list[str]) -> bool:
        """Append a batch and count it, while the claim holds; False when it no longer does (or the
        dataset was deleted). A ServiceError (and nothing written) when the batch would pass the
        dataset's item cap or the bytes its tenant may store."""
        now = time.time()

        async def append(conn: AsyncConnection) -> bool:
            # The dataset's lock before the generation's, as DeleteDataset takes them (no deadlock).
            dataset = await dataset_store.get(conn, tenant, dataset_id, lock=True)
            generation = await dataset_store.held_generation(conn, dataset_id, claim_id) if dataset else None
            if generation is None or dataset is None:
                return False
            check_item_room(self._item_cap, dataset, len(inputs))
            items = [item_pb2.Item(input=text) for text in inputs]
            await number_new_items(conn, dataset_id, items, dataset.item_count)
            violations: list[FieldViolation] = []
            await check_items(items, "items", violations)
            if violations:
                raise UnusableAnswer(violations[0].description)
            rows = [(item.id, item.SerializeToString()) for item in items]
            await append_items(conn, self._bytes_cap, generation.tenant, dataset_id, rows, now)
            await dataset_store.update_generation(
                conn,
                dataset_id,
                generated_count=generation.generated_count + len(items),
                lease_expiry=now + LEASE_TTL_S,
                update_time=now,
            )
            return True

        return await self._db.transact(append)

    async def _finish(self, dataset_id: str, claim_id: str, state: State, error: str) -> bool:
        async def finish(conn: AsyncConnection) -> bool:
            if await dataset_store.held_generation(conn, dataset_id, claim_id) is None:
                return False
            await dataset_store.update_generation(
                conn, dataset_id, state=state, error=error, claim_id=None, lease_expiry=None, update_time=time.time()
            )
            return True

        return await self._db.transact(finish)


def _settled(write: asyncio.Future[Any]) -> None:
    """Take a write's outcome once it has ended, so that asyncio never logs "exception was never
    retrieved" at ERROR for it. A caller still waiting gets the exception (and reports it as any call's);
    one that has gone (a ContinueConversations whose client left during the write) leaves a debug line."""
    if not write.cancelled() and (exc := write.exception()) is not None:
        log.debug("a dataset write ended with %s: %s", type(exc).__name__, exc)
