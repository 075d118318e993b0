"""The webhook sender: a loop in every server process, supervised (evalsvc.liveness), that sends the outbox.

Deliveries are written by the run transactions (evalsvc.store.webhooks.enqueue) and sent only after
they commit. The sender leases due deliveries (so replicas never send one at the same time), sends
each in its own task, bounded in number (`--webhook-concurrency`, divided fairly among tenants: `divide_slots`) and in
time (`--webhook-timeout-s` for a whole attempt), and records each attempt's outcome under its lease.
It shares nothing with the executor but the database, so a slow or dead receiver never slows runs.

Retries: after attempt n fails, the next waits `--webhook-retry-base-s` x 4^(n-1) (at most an hour),
less a random part of up to half of it (jitter), or what the receiver's Retry-After asked (at most
60 s). A 410 Gone fails the delivery and disables its webhook; after `--webhook-max-attempts` the
delivery is FAILED. A process killed mid-attempt leaves its lease to expire (or, on SQLite, released
at the next start), so the delivery is sent again, with the same webhook-id: at least once.

Circuit breaker, per webhook, in its database row (evalsvc.store.webhooks: every replica and a restart
honour it): a receiver that hangs held a slot for the whole timeout for each of its due deliveries, on
every retry, so receivers hanging for more tenants than there are slots held them all and every other
tenant's deliveries waited. After CIRCUIT_FAILURES failed attempts in a row (a timeout, a connection
error, a non-2xx but 410), its circuit opens for `circuit_cooldown`: no delivery of it is due, and those
waiting spend no attempt. Then one delivery (the probe) is attempted: a 2xx closes the circuit (and any
2xx resets the count), a failure opens it again for twice as long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.config import Settings
from evalsvc.http.outbound import (
    AllowList,
    OutboundError,
    call_tenant,
    check_destination,
    checked_transport,
    retry_after_s,
    shown_host,
)
from evalsvc.http.replies import attempt_reads
from evalsvc.liveness import Progress, Watched, supervise
from evalsvc.metrics import Metrics
from evalsvc.store import webhooks as store
from evalsvc.store.db import Database
from evalsvc.store.records import ClaimedDelivery
from evalsvc.webhooks import signing
from evalsvc.webhooks.bodies import OFF_LOOP_BYTES, Bodies

log = logging.getLogger(__name__)

LOOP_NAME = "webhook-sender"
MAX_RETRY_DELAY_S = 3600.0
# The part of --webhook-concurrency kept for tenants with no attempt in flight (see divide_slots).
RESERVED_FRACTION = 0.125
RETENTION_S = 30 * 24 * 3600.0  # finished deliveries are listed this long, then deleted
PRUNE_EVERY_S = 3600.0
# The first prune comes this long after start (times a random factor in [1, 2], so replicas started
# together spread theirs), not at once: a start is busy enough. Not minutes either: a prune is chunks of
# PRUNE_CHUNK rows through an index, and a server restarted every few minutes (deploys, an autoscaler)
# must still prune.
FIRST_PRUNE_AFTER_S = 30.0
CIRCUIT_FAILURES = 5  # failed attempts in a row of one webhook that open its circuit
CIRCUIT_COOLDOWN_S = 30.0  # how long it stays open the first time; twice as long at each re-open
MAX_CIRCUIT_COOLDOWN_S = 600.0


# An attempt's outcome: the HTTP status (0: none), why it failed (empty for a 2xx), Retry-After seconds.
Outcome = tuple[int, str, float | None]


def retry_delay(attempts: int, base_s: float, retry_after: float | None, rng: random.Random) -> float:
    """Seconds to wait after `attempts` failed attempts: the receiver's Retry-After (already at most 60 s)
    when it sent one, else exponential backoff with jitter: base x 4^(attempts-1), capped at an hour,
    times a random factor in [0.5, 1]."""
    if retry_after is not None and retry_after >= 0:
        return retry_after
    return min(base_s * 4.0 ** (attempts - 1), MAX_RETRY_DELAY_S) * rng.uniform(0.5, 1.0)


def circuit_cooldown(opened_before: int, rng: random.Random) -> float:
    """Seconds a webhook's circuit stays open after it opened `opened_before` times since it last closed
    (its probes failed): CIRCUIT_COOLDOWN_S doubled at each re-open, at most MAX_CIRCUIT_COOLDOWN_S,
    times a random factor in [0.75, 1] (jitter: the webhooks of a receiver that went down together are
    not all probed at the same moment)."""
    doubled = CIRCUIT_COOLDOWN_S * 2.0 ** min(opened_before, 32)  # bounded: a float overflows at 2^1024
    return min(doubled, MAX_CIRCUIT_COOLDOWN_S) * rng.uniform(0.75, 1.0)


def divide_slots(
    room: int, concurrency: int, in_flight: Mapping[str, int], due: Sequence[str], after: str = ""
) -> dict[str, int]:
    """How many of `room` free slots each tenant with due deliveries gets, round-robin: a slot each
    in turn, tenants with the fewest attempts in flight first, then (among equals) the tenants after
    `after` (the last one served) before those up to it, so with more tenants than slots each gets
    its turn over successive claims.

    A tenant holds at most its share: a quarter of `concurrency`, and no more than
    `concurrency` / the number of tenants with deliveries due or in flight (at least 1). A slot beyond a
    tenant's first is only taken while it leaves RESERVED_FRACTION of `concurrency` free, for tenants
    with nothing in flight. So tenants whose receivers hang or answer slowly hold their own share and no
    more, and another tenant's new delivery finds a slot at once: four such tenants took all 16 slots
    (a fixed quarter each, the freed slot back to the oldest backlog), and every other tenant's
    deliveries waited tens of seconds, growing."""
    active = len(set(due) | {tenant for tenant, n in in_flight.items() if n > 0})
    share = max(1, min(concurrency // 4, concurrency // max(1, active)))
    reserve = int(concurrency * RESERVED_FRACTION)
    held = {tenant: in_flight.get(tenant, 0) for tenant in due}
    order = sorted(held, key=lambda tenant: (held[tenant], tenant <= after, tenant))
    given: dict[str, int] = {}
    free = max(0, min(room, concurrency - sum(in_flight.values())))
    while free > 0:
        progress = False
        for tenant in order:
            if free <= 0:
                break
            if held[tenant] >= share or (held[tenant] > 0 and free - 1 < reserve):
                continue
            held[tenant] += 1
            given[tenant] = given.get(tenant, 0) + 1
            free -= 1
            progress = True
        if not progress:
            break
    return given


def signing_keys(claimed: ClaimedDelivery, now: float) -> list[bytes]:
    """The webhook's secret, and its previous one while a rotation's grace period lasts."""
    keys = [claimed.secret]
    if claimed.previous_secret is not None and (claimed.previous_secret_expire_time or 0) > now:
        keys.append(claimed.previous_secret)
    return keys


class WebhookSender:
    """Sends due webhook deliveries, together with any other replicas."""

    def __init__(self, db: Database, settings: Settings, allow: AllowList, metrics: Metrics) -> None:
        self._db = db
        self._allow = allow
        self._metrics = metrics
        self._concurrency = max(1, settings.webhook_concurrency)
        self._last_served = ""  # the tenant the last claim served last: the next claim starts after it
        self._timeout_s = settings.webhook_timeout_s
        # Longer than any attempt, so a live sender's lease never expires under it; a dead one's
        # deliveries are claimable again within this (well within 30 s with the default timeout).
        self._lease_s = 2 * self._timeout_s + 5.0
        self._retry_base_s = settings.webhook_retry_base_s
        self._max_attempts = max(1, settings.webhook_max_attempts)
        self._poll_s = settings.poll_interval_s
        self._rng = random.Random()
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            # The outbound rule at connect time too, as for targets: a name re-pointed to an internal
            # address between `check_destination` and the connection (DNS rebinding) is refused.
            transport=checked_transport(allow, httpx.Limits(max_connections=self._concurrency)),
            timeout=httpx.Timeout(self._timeout_s),  # per phase; asyncio.timeout bounds the whole attempt
        )
        self._in_flight: dict[asyncio.Task[None], tuple[str, str]] = {}  # task -> (tenant, delivery id)
        self._attempts: dict[str, asyncio.Task[Outcome | None]] = {}  # delivery id -> its HTTP call
        self._unsent: set[str] = set()  # deliveries claimed as a stop began, never attempted: stop() releases them
        self._wake = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        self._next_prune = 0.0  # when the next prune begins (set at start)
        self._prune_before: float | None = None  # the cutoff of the prune under way, a chunk per turn
        self._pruned = 0
        self._bodies = Bodies()
        self._progress = Progress()  # a turn of the loop: a claim (or none due), a prune chunk, a wait

    async def start(self) -> None:
        """Release leases a crashed predecessor left (SQLite has one server) and start the loop."""
        if self._db.is_sqlite:
            released = await self._db.transact(store.release_all)
            if released:
                log.info("resuming %d webhook deliveries leased before the last shutdown", released)
        self._stopping = False
        self._stop_requested.clear()
        self._next_prune = time.time() + FIRST_PRUNE_AFTER_S * self._rng.uniform(1.0, 2.0)
        self._progress.beat()
        self._loop_task = asyncio.create_task(
            supervise(LOOP_NAME, self._send_loop, self._stop_requested, self._metrics), name=LOOP_NAME
        )

    def watched(self, stall_s: float) -> Watched:
        """The loop, for the watchdog: it beats every turn, and turns come at least every poll interval
        (a claim, or a wait for a free slot or for due deliveries), so a loop silent past `stall_s` while
        deliveries are due (or a prune is under way) is stuck, and health turns NOT_SERVING. Unwatched,
        a sender stuck in a claim left every tenant's deliveries waiting with health SERVING."""
        return Watched(LOOP_NAME, self._progress, self._has_work, max(stall_s, 2 * self._poll_s))

    async def _has_work(self) -> bool:
        if self._stopping or self._loop_task is None:
            return False  # stopped (or not started): no loop to be stuck
        if self._prune_before is not None:
            return True
        async with self._db.read() as conn:
            return await store.any_due(conn, time.time())

    async def stop(self) -> None:
        """Stop sending: abandon HTTP attempts in flight and hand their deliveries back, due at once.

        Only the HTTP calls are cancelled; the loop and the recording of outcomes stop cooperatively,
        as the executor's do: a task cancelled inside a SQLite write transaction can leave its
        connection holding the write lock."""
        self._stopping = True
        self._stop_requested.set()
        self._wake.set()
        if self._loop_task is not None:
            await self._loop_task
        in_flight = list(self._in_flight.items())
        for attempt in list(self._attempts.values()):
            attempt.cancel()
        await asyncio.gather(*(task for task, _ in in_flight), return_exceptions=True)
        # The ones whose outcome was recorded are no longer leased: releasing them is a no-op.
        abandoned = sorted({delivery_id for _, (_, delivery_id) in in_flight} | self._unsent)
        self._unsent.clear()
        if abandoned:
            await self._db.transact(lambda conn: store.release(conn, abandoned))
        await self._client.aclose()

    async def _send_loop(self) -> None:
        while not self._stopping:
            # Cleared before the claim: a wake while it reads (a slot freed, a stop) makes the wait below
            # return at once; cleared after, it was lost for a poll interval (and every stop waited one).
            self._wake.clear()
            room = self._concurrency - len(self._in_flight)
            claimed = await self._claim(room) if room > 0 else 0
            pruning = await self._prune_now_and_then()
            self._progress.beat()
            if (room > 0 and claimed == room) or pruning:
                continue  # every slot filled: more may be due; or more to prune, a chunk a turn
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_s)
            self._progress.beat()

    async def _claim(self, room: int) -> int:
        """Lease up to `room` due deliveries, divided among the tenants that have some due (divide_slots),
        start a task for each. How many it leased (the loop claims again at once when that filled `room`)."""
        in_flight = Counter(tenant for tenant, _ in self._in_flight.values())
        claim_id = uuid.uuid4().hex
        now = time.time()
        # Past this (monotonic) an attempt could not end within the lease taken now: it is not sent.
        send_by = time.monotonic() + self._lease_s - self._timeout_s
        # Which tenants have deliveries due: a read (most polls find none), off the one SQLite writer.
        # The claim checks again what is due; a tenant whose deliveries were taken meanwhile gets none.
        async with self._db.read() as conn:
            due = await store.due_tenants(conn, now)
        after = self._last_served
        quotas = divide_slots(room, self._concurrency, in_flight, due, after)
        if not quotas:
            return 0
        claimed = await self._db.transact(
            lambda conn: store.claim_due(conn, claim_id=claim_id, now=now, lease_s=self._lease_s, quotas=quotas)
        )
        self._last_served = max(quotas, key=lambda tenant: (tenant <= after, tenant))
        for each in claimed:
            task = asyncio.create_task(self._send(each, send_by), name=f"webhook-{each.id}")
            self._in_flight[task] = (each.tenant, each.id)
            task.add_done_callback(self._finished)
        return len(claimed)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook delivery task failed", exc_info=task.exception())
        self._wake.set()  # a slot is free

    async def _prune_now_and_then(self) -> bool:
        """Every PRUNE_EVERY_S, delete the deliveries that ended more than RETENTION_S ago: one chunk
        (store.PRUNE_CHUNK rows, a short transaction of its own) per turn of the loop, between claims,
        so neither the writer nor the sending waits for a whole prune. Whether more may be left."""
        now = time.time()
        if self._prune_before is None:
            if now < self._next_prune:
                return False
            self._prune_before, self._pruned = now - RETENTION_S, 0
        before = self._prune_before
        deleted = await self._db.transact(lambda conn: store.prune(conn, before, store.PRUNE_CHUNK), alone=True)
        self._pruned += deleted
        if deleted >= store.PRUNE_CHUNK:
            return True
        if self._pruned:
            log.info("deleted %d webhook deliveries older than %d days", self._pruned, RETENTION_S // 86400)
        self._prune_before, self._next_prune = None, now + PRUNE_EVERY_S
        return False

    async def _send(self, claimed: ClaimedDelivery, send_by: float) -> None:
        """One attempt, then its outcome recorded under the claim (unless stop() abandoned the attempt, or
        the lease ran out before it was sent)."""
        if self._stopping:
            # Claimed as the stop began (by a claim it came during): handed back by stop() with the attempts
            # it abandons. Returning without a word left it leased until the lease ran out (2 x the webhook
            # timeout + 5 s), as stop() looks only at the tasks still in flight, and this one had ended.
            self._unsent.add(claimed.id)
            return
        attempt = asyncio.create_task(self._attempt(claimed, send_by))
        self._attempts[claimed.id] = attempt
        try:
            outcome = await attempt
        except asyncio.CancelledError:
            if self._stopping and attempt.cancelled():
                return  # abandoned: stop() hands the delivery back
            raise
        finally:
            self._attempts.pop(claimed.id, None)
        if outcome is None:
            log.info(
                "webhook delivery %s not sent: its lease ran out before it could be (this server was paused); "
                "it is sent under a new lease",
                claimed.id,
            )
            return
        await self._record(claimed, *outcome)

    async def _record(self, claimed: ClaimedDelivery, code: int, error: str, retry_after: float | None) -> None:
        """Record an attempt's outcome under the claim: success, the next retry, or failure (410 disables
        the webhook); and its webhook's circuit: a 2xx closes it, another failure counts towards opening it."""
        now = time.time()
        attempts = claimed.attempts + 1
        values: dict[str, Any] = {"attempts": attempts, "last_response_code": code, "last_attempt_time": now}
        gone = code == 410
        if 200 <= code < 300:
            values.update(status=store.SUCCEEDED, last_error="", next_attempt_time=None)
            outcome = "succeeded"
        elif gone:
            values.update(status=store.FAILED, last_error=f"{error}: the webhook was disabled", next_attempt_time=None)
            outcome = "gone"
        elif attempts >= self._max_attempts:
            values.update(
                status=store.FAILED, last_error=f"{error} (gave up after {attempts} attempts)", next_attempt_time=None
            )
            outcome = "failed"
        else:
            delay = retry_delay(attempts, self._retry_base_s, retry_after, self._rng)
            values.update(last_error=error, next_attempt_time=now + delay)
            outcome = "retrying"

        async def record(conn: AsyncConnection) -> tuple[bool, tuple[float | None, bool]]:
            recorded = await store.record_attempt(conn, claimed.id, claimed.claim_id, values)
            if recorded and outcome == "retrying":
                await store.fail_if_disabled(conn, claimed.id, error)
            circuit: tuple[float | None, bool] = (None, False)  # open until, opened now
            if recorded and outcome == "succeeded":
                await store.close_circuit(conn, claimed.tenant, claimed.webhook_id, now)
            elif recorded and not gone:
                circuit = await store.count_failure(
                    conn,
                    claimed.tenant,
                    claimed.webhook_id,
                    probe=claimed.probe,
                    now=now,
                    threshold=CIRCUIT_FAILURES,
                    cooldown=lambda opened_before: circuit_cooldown(opened_before, self._rng),
                )
            if recorded and gone:
                reason = f"{shown_host(claimed.url)} answered 410 Gone to delivery {claimed.id}"
                await store.update_webhook(
                    conn,
                    claimed.tenant,
                    claimed.webhook_id,
                    {"enabled": False, "disabled_reason": reason, "update_time": now},
                )
            return recorded, circuit

        recorded, (open_until, opened) = await self._db.transact(record)
        self._metrics.webhook_attempts.labels(outcome).inc()
        if open_until is not None and open_until > now:  # its deliveries wait for the end, this one too
            await self._db.transact(lambda conn: store.hold_for_circuit(conn, claimed.tenant, claimed.webhook_id))
        if opened and open_until is not None:
            self._metrics.webhook_circuit_opened.inc()
            log.info(
                "webhook %s failed %s: its circuit is open for %.0f s (%s)",
                claimed.webhook_id,
                "its probe" if claimed.probe else f"{CIRCUIT_FAILURES} attempts in a row",
                open_until - now,
                error,
            )
        if not recorded:
            log.info("webhook delivery %s changed while it was being sent; its attempt is not recorded", claimed.id)
        elif outcome != "succeeded":
            log.info("webhook delivery %s attempt %d: %s (%s)", claimed.id, attempts, error, outcome)

    async def _attempt(self, claimed: ClaimedDelivery, send_by: float) -> Outcome | None:
        """POST the delivery once: (HTTP status or 0, why it failed, Retry-After seconds); None, sending
        nothing, when it is past `send_by` (monotonic) as the request is about to go: a server paused
        (SIGSTOP, a VM's pause) longer than the lease woke and sent a delivery another replica had leased
        and sent meanwhile, the receiver getting it twice at once (a probe: in each of three seeds)."""
        url = claimed.url
        host = shown_host(url)
        payload = await self._bodies.body(claimed)  # built once per event, a large one in a thread
        now = int(time.time())
        keys = signing_keys(claimed, now)
        if len(payload) < OFF_LOOP_BYTES:
            headers = signing.headers(keys, claimed.id, now, payload)
        else:  # hashing megabytes releases the GIL: in a thread, it costs the loop nothing
            headers = await asyncio.to_thread(signing.headers, keys, claimed.id, now, payload)
        call_tenant.set(claimed.tenant)  # its name is looked up in its tenant's turn (this task's own context)
        try:
            # What the receiver may send before its status is bounded as a target's reply is (a flood of
            # `100 Continue` ran until the timeout), and its body is never read: it costs nothing.
            with attempt_reads(host):
                async with asyncio.timeout(self._timeout_s):
                    await check_destination(url, self._allow, self._timeout_s)
                    if time.monotonic() > send_by:
                        return None
                    async with self._client.stream("POST", url, content=payload, headers=headers) as response:
                        code = response.status_code
                        retry_after = retry_after_s(response.headers.get("retry-after"))
        except TimeoutError:
            return 0, f"no answer from {host} within {self._timeout_s:g} s", None
        except OutboundError as exc:
            return 0, exc.reason, None
        except httpx.HTTPError as exc:
            return 0, f"{type(exc).__name__} calling {host}", None
        except Exception as exc:
            # Whatever else the call raises (an InvalidURL is no HTTPError) is this attempt's failure:
            # unrecorded, it was an ERROR traceback, then the same delivery leased and tried again for
            # good, never counted towards --webhook-max-attempts. (Only the call is in this `try`.)
            return 0, f"{type(exc).__name__} calling {host}", None  # its text may quote the URL
        return code, "" if 200 <= code < 300 else f"HTTP {code} from {host}", retry_after
