"""Creating, listing, revoking and verifying API keys.

Verification runs on every RPC, so verified keys are cached for `cache_s` seconds (a revocation
takes effect within that time; 0 disables the cache), and `last_used_time` is written at most once
a minute per key, in the background: a call never waits for that write, nor fails with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from evalsvc.auth import keys
from evalsvc.errors import Reason, ServiceError
from evalsvc.ids import is_tenant_name
from evalsvc.store import keys as key_store
from evalsvc.store.db import Database
from evalsvc.store.records import ApiKeyRecord

log = logging.getLogger(__name__)

DEFAULT_TENANT = "default"
TOUCH_EVERY_S = 60.0
# How long a stop waits for the last uses noted to be written: a database that is gone does not hold it up.
TOUCH_CLOSE_WAIT_S = 5.0
# Key rows read from the database at once, at most: a few of the reader pool's connections (10). Calls are
# checked before they are admitted (--max-concurrent-rpcs), so a flood of well-formed keys with made-up key
# ids (each a read: no cache holds an unknown id) took every reader connection, and another tenant's reads
# waited behind hundreds of them (a ListRuns' worst 1.3 ms -> 550-630 ms at ~1,000 such calls a second).
# Only for keys not proven: the refresh of a key accepted before (its cached row expired) does not wait
# behind such a flood.
MAX_KEY_READS = 3
_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION_DAYS = 36_500  # 100 years


def parse_duration(text: str) -> float:
    """'90s', '15m', '12h', '30d' -> seconds. Zero is refused: `--expires-in 0d` made a key that never
    expired (a lifetime of 0 read as none), where its maker meant the opposite. So is more than
    MAX_DURATION_DAYS: `--expires-in 99999999999d` stored an expiry in the year 273792727, which no
    date can show (`keys list` failed for the whole database); a key meant to outlive that is one
    without --expires-in."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"duration {text!r} is not like 90s, 15m, 12h or 30d")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds == 0:
        raise ValueError(f"duration {text!r} must be longer than 0")
    if seconds > MAX_DURATION_DAYS * _UNITS["d"]:
        raise ValueError(f"duration {text!r} must be at most {MAX_DURATION_DAYS}d (100 years)")
    return seconds


# A key made without the server's --db went into ./evalsvc.db of whatever directory it was made in, a database
# this server never reads, and was refused here with nothing to say why.
KEY_HELP = (
    "the first `evalsvc serve` prints a key; `evalsvc keys create --tenant NAME --db URL` makes another in this"
    " server's database (URL: its --db or EVALSVC_DB)"
)


def unauthenticated(reason: Reason, message: str) -> ServiceError:
    """UNAUTHENTICATED with a stable reason and what to do about it; the message never repeats the key."""
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, reason, f"{message} ({KEY_HELP})")


@dataclass(frozen=True)
class KeyInfo:
    """A key as listed: never its secret."""

    key_id: str
    tenant: str
    name: str
    create_time: float
    expire_time: float | None
    revoke_time: float | None
    last_used_time: float | None


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a verified key acts for: its tenant, and its id (streams are filed under it)."""

    tenant: str
    key_id: str


def _info(key: ApiKeyRecord) -> KeyInfo:
    return KeyInfo(
        key_id=key.id,
        tenant=key.tenant,
        name=key.name,
        create_time=key.create_time,
        expire_time=key.expire_time,
        revoke_time=key.revoke_time,
        last_used_time=key.last_used_time,
    )


def _refusal(key: ApiKeyRecord, now: float) -> ServiceError | None:
    """Why a known key may not be used at `now`, or None."""
    if key.revoke_time is not None:
        return unauthenticated(Reason.API_KEY_REVOKED, "the API key was revoked")
    if key.expire_time is not None and key.expire_time <= now:
        return unauthenticated(Reason.API_KEY_EXPIRED, "the API key has expired")
    return None


class KeyService:
    """API keys of one database."""

    def __init__(self, db: Database, *, cache_s: float = 2.0) -> None:
        self._db = db
        self._cache_s = cache_s
        self._verified: dict[str, tuple[float, ApiKeyRecord]] = {}
        self._accepted: dict[str, tuple[float, ApiKeyRecord]] = {}
        # Reads in progress by (key id, proven): a flood presenting a known key id must not hold back its owner.
        self._reading: dict[tuple[str, bool], asyncio.Future[ApiKeyRecord | None]] = {}
        self._touched: dict[str, float] = {}
        self._unwritten_uses: dict[str, float] = {}  # key id -> last use, noted but not yet written
        self._use_writer: asyncio.Task[None] | None = None
        self._closed = False
        self._reads = asyncio.Semaphore(MAX_KEY_READS)

    async def create(self, tenant: str, name: str = "", expires_in_s: float | None = None) -> tuple[str, KeyInfo]:
        """Mint a key; returns (the key, shown once, and its listing)."""
        if not is_tenant_name(tenant):
            raise ValueError("tenant must be 1-64 characters of [a-z0-9_-], starting with a letter or digit")
        full, parsed = keys.new_key()
        now = time.time()
        key = ApiKeyRecord(
            id=parsed.key_id,
            tenant=tenant,
            name=name,
            secret_hash=keys.hash_secret(parsed.secret),
            create_time=now,
            expire_time=now + expires_in_s if expires_in_s else None,
            revoke_time=None,
            last_used_time=None,
        )
        await self._db.transact(lambda conn: key_store.insert_key(conn, key))
        return full, _info(key)

    async def list(self, tenant: str | None = None) -> list[KeyInfo]:
        """Keys, oldest first, optionally of one tenant."""
        async with self._db.read() as conn:
            return [_info(key) for key in await key_store.list_keys(conn, tenant)]

    async def revoke(self, key_id: str) -> bool:
        """Revoke a key (idempotent); False when there is no such key."""
        now = time.time()
        found = await self._db.transact(lambda conn: key_store.revoke(conn, key_id, now))
        self._forget(key_id)
        return found

    def _forget(self, key_id: str) -> None:
        """Drop a key from the caches, so its next call reads the database."""
        self._verified.pop(key_id, None)
        self._reading.pop((key_id, True), None)
        self._reading.pop((key_id, False), None)
        self._accepted = {key: entry for key, entry in self._accepted.items() if entry[1].id != key_id}

    async def bootstrap(self) -> str | None:
        """A key for tenant `default` when the database has no key at all, else None."""
        if await self.any_exist():
            return None
        key, _ = await self.create(DEFAULT_TENANT, name="bootstrap")
        return key

    async def any_exist(self) -> bool:
        """Whether the database holds any key (revoked and expired ones count: they were handed out)."""
        async with self._db.read() as conn:
            return bool(await key_store.count(conn))

    async def authenticate(self, presented: str | None) -> Caller:
        """The caller of a valid key; UNAUTHENTICATED for a missing, malformed, unknown, revoked or expired one."""
        if not presented:
            # Over gRPC and REST alike: "metadata" was wrong over REST, where these are headers.
            raise unauthenticated(
                Reason.API_KEY_MISSING,
                "an API key is required: 'authorization: Bearer <key>' or 'x-api-key: <key>' (gRPC metadata; HTTP"
                " headers over REST)",
            )
        now = time.time()
        key = await self._verify(presented, now)
        if (refused := _refusal(key, now)) is not None:
            raise refused
        if now - self._touched.get(key.id, 0.0) >= TOUCH_EVERY_S:
            self._touched[key.id] = now
            self._note_use(key.id, now)
        return Caller(tenant=key.tenant, key_id=key.id)

    def _note_use(self, key_id: str, now: float) -> None:
        """Have `last_used_time` written in the background. It was awaited in the call: once a minute per
        key, a GetRun waited behind the writer's queue (running work's recordings), and failed UNAVAILABLE
        when that write did, for a field that only informs `keys list`. Uses noted while a write is going
        are written together by the next one."""
        if self._closed:
            return
        self._unwritten_uses[key_id] = now
        if self._use_writer is None or self._use_writer.done():
            self._use_writer = asyncio.create_task(self._write_uses(), name="api-key-last-used")

    async def _write_uses(self) -> None:
        while self._unwritten_uses:
            uses, self._unwritten_uses = self._unwritten_uses, {}
            try:
                await self._db.transact(functools.partial(key_store.touch_many, uses=uses))
            except Exception as exc:
                # Not retried: the next use of each key, a minute later, writes it again.
                log.warning("could not record the last use of %d API keys (%s: %s)", len(uses), type(exc).__name__, exc)

    async def flush(self) -> None:
        """Wait until the uses noted so far are written (or their write failed)."""
        while (writer := self._use_writer) is not None and not writer.done():
            await asyncio.shield(writer)

    async def close(self) -> None:
        """Write the uses noted, waiting at most TOUCH_CLOSE_WAIT_S; none is noted after."""
        self._closed = True
        writer = self._use_writer
        if writer is None:
            return
        done, _ = await asyncio.wait({writer}, timeout=TOUCH_CLOSE_WAIT_S)
        if not done:
            writer.cancel()
            await asyncio.wait({writer})  # until it has ended (a cancellation of `close` itself still propagates)

    async def refused_now(self, key_ids: Sequence[str]) -> dict[str, ServiceError]:
        """Of keys that were valid, those no longer valid (revoked, expired or deleted), each with the
        UNAUTHENTICATED error a new call with it would get. Read from the database, past the cache:
        for open streams, which checked their key once, when they started. Refused keys leave the cache."""
        now = time.time()
        async with self._db.read() as conn:
            found = {key.id: key for key in await key_store.get_many(conn, key_ids)}
        refused = {}
        for key_id in key_ids:
            key = found.get(key_id)
            error = (
                unauthenticated(Reason.API_KEY_INVALID, "the API key is not valid")
                if key is None
                else _refusal(key, now)
            )
            if error is not None:
                refused[key_id] = error
                self._forget(key_id)  # new calls with it are refused from now on too, not when the cache expires
        return refused

    async def _verify(self, presented: str, now: float) -> ApiKeyRecord:
        """The key whose secret `presented` carries; UNAUTHENTICATED when there is none.

        A key verified less than `cache_s` ago is not parsed and hashed again: every RPC of a client
        presents the same key, and on the cheapest calls (GetRun) those steps were a visible share."""
        accepted = self._accepted.get(presented)
        if accepted is not None and now - accepted[0] < self._cache_s:
            return accepted[1]
        parsed = keys.parse(presented)
        if parsed is None:
            raise unauthenticated(Reason.API_KEY_INVALID, "the API key is malformed or mistyped")
        cached = self._verified.get(parsed.key_id)
        from_cache = cached is not None and now - cached[0] < self._cache_s
        # Proven: this very key was accepted before (its entry expired). Its row is read outside the line
        # that unproven keys wait in (MAX_KEY_READS): a wrong secret of a known key id waits there too.
        key = await self._lookup(parsed.key_id, now, proven=accepted is not None)
        if key is None or not keys.secret_matches(parsed.secret, key.secret_hash):
            if from_cache:
                # As long as an unknown key id takes (its lookup is a read, shared by concurrent lookups):
                # a wrong secret answered from the cache took half the time (0.98 ms against 2.13 ms),
                # and one read each (not shared) took ten times as long in a burst; both told that it exists.
                await self._read_shared(parsed.key_id, now, proven=False)
            raise unauthenticated(Reason.API_KEY_INVALID, "the API key is not valid")
        if self._cache_s > 0:
            if len(self._accepted) > 10_000:
                self._accepted.clear()
            self._accepted[presented] = (now, key)
        return key

    async def _lookup(self, key_id: str, now: float, *, proven: bool) -> ApiKeyRecord | None:
        """The key's row, cached for `cache_s`. Concurrent lookups of one key share one read: when the
        cached row expires under load, every call in flight missed it at once and each read it again
        (on GetRun, 12% of the process's time went to those reads). Only with the cache on: a call
        that may use a row `cache_s` old may use one being read now; without it, each call reads."""
        cached = self._verified.get(key_id)
        if cached is not None and now - cached[0] < self._cache_s:
            return cached[1]
        return await self._read_shared(key_id, now, proven=proven)

    async def _read_shared(self, key_id: str, now: float, *, proven: bool) -> ApiKeyRecord | None:
        """The key's row read from the database (and cached), concurrent reads of one key sharing one."""
        if self._cache_s <= 0:
            return await self._read(key_id, proven=proven)
        line = (key_id, proven)
        reading = self._reading.get(line)
        if reading is None:
            reading = self._reading[line] = asyncio.ensure_future(self._read_and_cache(key_id, now, proven=proven))
            reading.add_done_callback(lambda done: self._reading.get(line) is done and self._reading.pop(line))
        return await asyncio.shield(reading)  # a caller that goes away does not cancel the others' read

    async def _read_and_cache(self, key_id: str, now: float, *, proven: bool) -> ApiKeyRecord | None:
        key = await self._read(key_id, proven=proven)
        # Not when the key was revoked while it was read (`_forget`): the row may predate the revocation.
        if key is not None and self._reading.get((key_id, proven)) is asyncio.current_task():
            if len(self._verified) > 10_000:
                self._verified.clear()
            self._verified[key_id] = (now, key)
        return key

    async def _read(self, key_id: str, *, proven: bool) -> ApiKeyRecord | None:
        """The key's row; unless `proven`, read in turn (MAX_KEY_READS at once), known and unknown key ids
        in the same line, so how long a refusal takes tells nothing of which key ids exist."""
        async with contextlib.nullcontext() if proven else self._reads, self._db.read() as conn:
            return await key_store.get(conn, key_id)
