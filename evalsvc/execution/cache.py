"""The response cache: keys for target outputs and judge verdicts, and batched lookups.

A key is the SHA-256 of everything that can change what a call returns, and of the tenant, so one
tenant never reads another's entries:
- a target output: the target's kind and its whole definition except what cannot change the output
  (the name of the API key's secret, the timeout) - endpoint URL, headers (secret references, never
  their values), model, system prompt, temperature, max_tokens, tools, extra parameters; the item's
  input, context and conversation (and, for webhooks, which are sent them, its id and metadata); and
  the repetition, so repeated runs of a nondeterministic model keep distinct outputs;
- a judge verdict: the judge's endpoint URL and model, its whole rubric (mode, criteria, scoring,
  threshold, levels, guidelines) and the exact prompt it is sent, which holds the output judged.
Adding a field to a target or judge definition needs no change here: the definitions are hashed whole.

Lookups of jobs that start together are answered by one SELECT (`ResponseCache.get`). Writes are
not made here: the recorder stores entries in the transaction that records the results using them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, cast

from evalsvc.graders import Grade
from evalsvc.messages.canonical import definition, digest
from evalsvc.store import cache as cache_store
from evalsvc.store.cache import CacheEntry
from evalsvc.store.db import Database, unavailable_cause
from evalsvc.targets import sends_item_metadata
from evalsvc.v1 import cache_pb2, item_pb2, run_pb2, target_pb2

MODE_NAMES: Mapping[str, int] = {
    "off": cache_pb2.CACHE_MODE_OFF,
    "read_write": cache_pb2.CACHE_MODE_READ_WRITE,
    "refresh": cache_pb2.CACHE_MODE_REFRESH,
    "replay": cache_pb2.CACHE_MODE_REPLAY,
}
log = logging.getLogger(__name__)
READS = (cache_pb2.CACHE_MODE_READ_WRITE, cache_pb2.CACHE_MODE_REPLAY)
WRITES = (cache_pb2.CACHE_MODE_READ_WRITE, cache_pb2.CACHE_MODE_REFRESH)
USED = (cache_pb2.CACHE_MODE_READ_WRITE, cache_pb2.CACHE_MODE_REFRESH, cache_pb2.CACHE_MODE_REPLAY)
MISS_REASON = "CACHE_MISS"


def mode_from_setting(name: str) -> int:
    """The CacheMode a --cache-default value names (any case; the settings refuse any other name)."""
    return MODE_NAMES[name.lower()]


def without_transport(endpoint: target_pb2.Endpoint) -> target_pb2.Endpoint:
    """An endpoint without what cannot change an answer: the secret's name and the timeout."""
    kept = target_pb2.Endpoint()
    kept.CopyFrom(endpoint)
    kept.ClearField("api_key_secret")
    kept.ClearField("timeout_s")
    return kept


def target_key(tenant: str, target: target_pb2.Target, item: item_pb2.Item, repetition: int) -> str | None:
    """The cache key of a target's output for one item and repetition; None for targets that make
    no call (provided, echo): there is nothing to save."""
    kind = target.WhichOneof("kind")
    if kind not in ("chat", "http"):
        return None
    spec = target_pb2.ChatTarget() if kind == "chat" else target_pb2.HttpTarget()
    spec.CopyFrom(getattr(target, kind))
    spec.endpoint.CopyFrom(without_transport(spec.endpoint))
    sent: dict[str, Any] = {
        "input": item.input,
        "context": item.context,
        "conversation": [[m.role, m.content] for m in item.conversation],
    }
    if sends_item_metadata(target):  # a webhook receives these too
        sent["id"] = item.id
        sent["metadata"] = dict(item.metadata)
    return digest({"tenant": tenant, "kind": kind, "target": definition(spec), "item": sent, "rep": repetition})


def verdict_payload(grade: Grade) -> bytes:
    """A judge's verdict as a cache entry stores it."""
    result = run_pb2.Result(
        state=cast("run_pb2.ResultState", grade.state),
        score=grade.score,
        raw_score=grade.raw_score,
        explanation=grade.explanation,
        scoring_cost_usd=grade.cost_usd,
    )
    if grade.confidence is not None:
        result.confidence = grade.confidence
    return result.SerializeToString()


def cached_verdict(payload: bytes) -> Grade:
    """The verdict a cache entry holds, marked as cached (its cost is what it cost when recorded)."""
    result = run_pb2.Result.FromString(payload)
    return Grade(
        result.state,
        result.score,
        result.raw_score,
        result.explanation,
        cost_usd=result.scoring_cost_usd,
        confidence=result.confidence if result.HasField("confidence") else None,
        cached=True,
    )


class LookupFailed(Exception):
    """A cache lookup the database could not answer. Its text is safe for any tenant to read: the
    cause (`unavailable_cause`) or the exception's type, never the statement, its parameters, or
    another tenant's keys (one SELECT serves the lookups of every tenant, and the driver's message
    quotes them all)."""

    def __init__(self, reason: str, *, transient: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


class ResponseCache:
    """Reads the cache for the executor, one SELECT for all the lookups made in the same moment.

    A SELECT that fails hands each waiting lookup its own `LookupFailed`, which names nothing of the
    statement (the executor then treats the lookup as a miss, or hands the job back: see `_respond`)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._waiting: dict[tuple[str, str], list[asyncio.Future[CacheEntry | None]]] = {}
        self._flusher: asyncio.Task[None] | None = None

    async def get(self, tenant: str, key: str) -> CacheEntry | None:
        """The tenant's entry under key, or None; raises LookupFailed when the database cannot answer."""
        future: asyncio.Future[CacheEntry | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault((tenant, key), []).append(future)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="response-cache-lookup")
        return await future

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let the other jobs started in this turn of the loop ask too
        waiting, self._waiting = self._waiting, {}
        self._flusher = None
        try:
            async with self._db.read() as conn:
                found = await cache_store.fetch(conn, list(waiting))
        except BaseException as exc:  # each asking job gets its own safe error (or is cancelled)
            if isinstance(exc, Exception):
                cause = unavailable_cause(exc)
                if cause is not None:
                    log.warning("response cache lookup of %d keys failed (%s)", len(waiting), cause)
                else:
                    log.error("response cache lookup of %d keys failed", len(waiting), exc_info=exc)
            for futures in waiting.values():
                for future in futures:
                    if future.done():
                        continue
                    if isinstance(exc, Exception):
                        future.set_exception(LookupFailed(cause or type(exc).__name__, transient=cause is not None))
                    else:
                        future.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        for pair, futures in waiting.items():
            for future in futures:
                if not future.done():
                    future.set_result(found.get(pair))
