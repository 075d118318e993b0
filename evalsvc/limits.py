"""Per-tenant limits, so one tenant cannot exhaust the service for the others.

Over a limit a call gets RESOURCE_EXHAUSTED with ErrorInfo reason `TENANT_QUOTA_EXCEEDED` (its
`quota` metadata names which), plus `google.rpc.RetryInfo` where waiting helps. Rates, stream and
call counts are kept per process: behind a load balancer with N replicas a tenant gets up to N times
them (docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import resource
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc

from evalsvc.config import Settings, flag_name
from evalsvc.errors import Reason, ServiceError

# The initial metadata of an authenticated server-streaming call names the caller's tenant under this key
# (sent with its first message): the REST gateway, which knows callers only by their keys, holds each
# tenant to its share of the gateway's connections with it (--max-http-streams-per-tenant).
TENANT_METADATA = "evalsvc-tenant"
# When too many runs are in flight: how long a caller is told to wait (RetryInfo, Retry-After) before trying
# again, here and for the REST gateway's own in-flight caps (Omni's 2 runs).
ACTIVE_RUNS_RETRY_AFTER_S = 5.0


class Holdings:
    """How many of something each key (a tenant, a key, a connection) holds now, and all keys together;
    a key that holds none is forgotten, so the keys of every caller ever seen are not kept."""

    __slots__ = ("_held", "total")

    def __init__(self) -> None:
        self._held: dict[str, int] = {}
        self.total = 0

    def of(self, key: str) -> int:
        """What `key` holds now."""
        return self._held.get(key, 0)

    def take(self, key: str, amount: int = 1) -> None:
        self._held[key] = self._held.get(key, 0) + amount
        self.total += amount

    def give_back(self, key: str, amount: int = 1) -> None:
        left = self._held[key] - amount
        if left:
            self._held[key] = left
        else:
            del self._held[key]
        self.total -= amount


def quota_exceeded(quota: str, message: str, retry_after_s: float | None = None) -> ServiceError:
    """RESOURCE_EXHAUSTED for a tenant over one of its limits."""
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.TENANT_QUOTA_EXCEEDED,
        message,
        metadata={"quota": quota},
        retry_after_s=retry_after_s,
    )


def streams_full(message: str) -> ServiceError:
    """UNAVAILABLE for a stream past the part of --max-concurrent-rpcs its kind may hold (not a tenant's
    quota: the server's streams of that kind are all taken); it frees up as streams end."""
    return ServiceError(grpc.StatusCode.UNAVAILABLE, Reason.SERVER_STREAMS_FULL, message, retry_after_s=1.0)


@dataclass(frozen=True)
class StoredCap:
    """How many of one kind of stored resource a tenant (or one dataset) may hold: one of the
    `max_..._per_...` settings. Past it, adding is refused whole until something is deleted; waiting
    frees nothing, so no RetryInfo. The count it is checked against must be read in the transaction
    that adds, under a lock (evalsvc.store.quotas), or two concurrent creates could both take the last
    place."""

    setting: str  # the Settings field, which the ErrorInfo's `quota` metadata names
    what: str  # what is counted, in the message: "datasets", "items"
    limit: int

    def check(
        self, held: int, adding: int = 1, *, holder: str = "the tenant", remedy: str = "delete one to make room"
    ) -> None:
        """Refuse adding `adding` to a holder that has `held`, when that would pass the limit."""
        if held + adding > self.limit:
            more = "one more" if adding == 1 else f"{adding} more"
            raise quota_exceeded(
                self.setting,
                f"{holder} has {held} {self.what}; {more} would pass the {self.limit} it may hold "
                f"({flag_name(self.setting)}): {remedy}",
            )


@dataclass(frozen=True)
class StoredCaps:
    """Every StoredCap of the service, from the one Settings."""

    datasets: StoredCap
    dataset_items: StoredCap
    graders: StoredCap
    grader_versions: StoredCap
    targets: StoredCap
    secrets: StoredCap
    webhooks: StoredCap
    runs: StoredCap  # deleted runs count until they are purged (evalsvc.runs.retention)
    stored_bytes: StoredCap  # what runs and datasets store (evalsvc.store.usage)

    @classmethod
    def of(cls, settings: Settings) -> StoredCaps:
        """The caps the settings give."""
        return cls(
            datasets=StoredCap("max_datasets_per_tenant", "datasets", settings.max_datasets_per_tenant),
            dataset_items=StoredCap("max_items_per_dataset", "items", settings.max_items_per_dataset),
            graders=StoredCap("max_graders_per_tenant", "saved graders", settings.max_graders_per_tenant),
            grader_versions=StoredCap("max_versions_per_grader", "versions", settings.max_versions_per_grader),
            targets=StoredCap("max_targets_per_tenant", "saved targets", settings.max_targets_per_tenant),
            secrets=StoredCap("max_secrets_per_tenant", "secrets", settings.max_secrets_per_tenant),
            webhooks=StoredCap("max_webhooks_per_tenant", "webhooks", settings.max_webhooks_per_tenant),
            runs=StoredCap("max_runs_per_tenant", "runs", settings.max_runs_per_tenant),
            stored_bytes=StoredCap("max_stored_bytes_per_tenant", "bytes stored", settings.max_stored_bytes_per_tenant),
        )


@dataclass
class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    def take(self, now: float) -> float:
        """Take a token: 0 when granted, else the seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate if self.rate > 0 else 60.0


class TenantLimits:
    """The limits of every tenant in this process."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._buckets: dict[str, TokenBucket] = {}
        self._watches = Holdings()  # WatchRun streams, by tenant
        self._watch_bytes = Holdings()  # what those streams may hold, in bytes (`watch_memory`)
        self._calls = Holdings()  # calls being served (streams aside), by tenant: gRPC's and in-process together
        self._page_lines: dict[str, _Line] = {}  # page reads in progress or waiting, by tenant

    def take_create_run(self, tenant: str) -> None:
        """Spend one CreateRun token of the tenant."""
        now = time.monotonic()
        bucket = self._buckets.get(tenant)
        if bucket is None:
            burst = float(self._settings.create_run_burst)
            bucket = self._buckets[tenant] = TokenBucket(self._settings.create_run_rate, burst, burst, now)
        wait = bucket.take(now)
        if wait > 0:
            raise quota_exceeded(
                "create_run_rate",
                f"too many CreateRun calls: at most {self._settings.create_run_rate:g}/s "
                f"(bursts of {self._settings.create_run_burst})",
                retry_after_s=wait,
            )

    def check_run_size(self, items: int, graders: int, repetitions: int = 1) -> None:
        """Items, jobs and graders of one run; waiting does not help, so no RetryInfo. Jobs (items x
        repetitions) are bounded on their own: a run's jobs are inserted in the one transaction that
        creates it, and every tenant's writes wait for that transaction (2,000,000 jobs held them 9 s)."""
        if items > self._settings.max_items_per_run:
            raise quota_exceeded(
                "max_items_per_run", f"a run may have at most {self._settings.max_items_per_run} items (got {items})"
            )
        if items * repetitions > self._settings.max_jobs_per_run:
            raise quota_exceeded(
                "max_jobs_per_run",
                f"a run may have at most {self._settings.max_jobs_per_run} jobs, items x repetitions "
                f"(got {items} x {repetitions}); split it into runs",
            )
        if graders > self._settings.max_graders_per_run:
            raise quota_exceeded(
                "max_graders_per_run",
                f"a run may have at most {self._settings.max_graders_per_run} graders (got {graders})",
            )

    def check_active_runs(self, active: int) -> None:
        """PENDING or RUNNING runs of a tenant, before it adds one."""
        if active >= self._settings.max_active_runs:
            raise quota_exceeded(
                "max_active_runs",
                f"the tenant already has {active} runs pending or running (at most {self._settings.max_active_runs})",
                retry_after_s=ACTIVE_RUNS_RETRY_AFTER_S,
            )

    def take_call(self, tenant: str) -> HeldCall:
        """Count one more call of the tenant as served, or refuse it: past its
        share of --max-concurrent-rpcs (`Settings.calls_per_tenant`) one tenant's slow calls took every
        place, and every other tenant's calls and the health check got SERVER_CALLS_FULL. Taken and given
        back by the interceptor's two hooks, which run apart: hence no context manager, as for watches."""
        served = self._calls.of(tenant)
        share = self._settings.calls_per_tenant
        if served >= share:
            raise quota_exceeded(
                "max_calls_per_tenant",
                f"the tenant already has {served} calls being served (at most {share}, "
                f"{flag_name('max_calls_per_tenant')}); retry once one has ended",
                retry_after_s=1.0,
            )
        self._calls.take(tenant)
        return HeldCall(lambda: self._calls.give_back(tenant))

    def calls_of(self, tenant: str) -> int:
        """The tenant's calls being served now."""
        return self._calls.of(tenant)

    @asynccontextmanager
    async def page_read(self, tenant: str) -> AsyncIterator[None]:
        """Hold one of the tenant's turns to read and build a page of runs or results, waiting for one
        when --max-page-reads-per-tenant of them are under way. A page is CPU work on the one event loop
        (a page of 1,000 results ~0.1 s), done between awaits: a tenant reading 8 large pages at once
        put its stretches ahead of every other tenant's calls (a quiet tenant's GetRun p50 3 -> 100 ms,
        p99 ~1.4 s). In line, a tenant's pages take at most that many turns of the loop at a time; the
        waiting cost nothing but their place in --max-calls-per-tenant."""
        line = self._page_lines.get(tenant)
        if line is None:
            line = self._page_lines[tenant] = _Line(asyncio.Semaphore(self._settings.max_page_reads_per_tenant))
        line.users += 1
        try:
            async with line.turns:
                yield
        finally:
            line.users -= 1
            if not line.users:
                del self._page_lines[tenant]

    def page_reads_of(self, tenant: str) -> int:
        """The tenant's page reads under way or waiting for a turn."""
        line = self._page_lines.get(tenant)
        return 0 if line is None else line.users

    @contextmanager
    def watch_slot(self, tenant: str) -> Iterator[None]:
        """Hold one of the tenant's WatchRun streams for the duration of a watch: within the tenant's
        share, and within all tenants' part of --max-concurrent-rpcs (`Settings.watch_streams_in_all`)."""
        open_now = self._watches.of(tenant)
        share = self._settings.watch_streams_per_tenant
        if open_now >= share:
            raise quota_exceeded(
                "max_watch_streams", f"the tenant has {open_now} WatchRun streams open (at most {share})", 1.0
            )
        if self._watches.total >= self._settings.watch_streams_in_all:
            raise streams_full(
                f"all tenants' WatchRun streams ({self._watches.total}) fill their part of this server's "
                "--max-concurrent-rpcs; retry shortly"
            )
        self._watches.take(tenant)
        try:
            yield
        finally:
            self._watches.give_back(tenant)

    @contextmanager
    def watch_memory(self, tenant: str, cost: int) -> Iterator[None]:
        """Hold `cost` bytes of the tenant's watch memory for the duration of a watch: within the tenant's
        budget (`Settings.watch_bytes_per_tenant`), and within all tenants' (--max-watch-bytes).

        The stream count alone did not bound memory: every run event carries the whole run (definitions
        up to a quarter of --max-message-bytes), and a stream whose client does not read holds the event
        it is sending (and grpc a copy of it) until the client reads. One tenant's 100 non-reading streams
        on a run of 3.8 MB of graders held 1.3 GB; at its 2,000 streams it would have taken ~26 GB. So a
        stream is counted by what it may hold (the watch works it out from the run when it opens:
        evalsvc.events.watch.watch_cost) and refused past the budget, as a count quota is, with RetryInfo:
        the bytes come back when a stream ends. A tenant's first stream always fits (a run larger than a
        small budget could never be watched otherwise); all tenants' total is checked all the same."""
        held = self._watch_bytes.of(tenant)
        share = self._settings.watch_bytes_per_tenant
        if held and held + cost > share:
            raise quota_exceeded(
                "max_watch_bytes_per_tenant",
                f"the tenant's open watch streams may hold {held} bytes; this one ({cost} bytes, by the size of "
                f"the run) would pass the {share} they may hold ({flag_name('max_watch_bytes_per_tenant')}); "
                "retry once one has ended",
                1.0,
            )
        total = self._watch_bytes.total
        if total and total + cost > self._settings.max_watch_bytes:
            raise streams_full(
                f"all tenants' watch streams may hold {total} bytes; this one ({cost} bytes) would pass this "
                f"server's {flag_name('max_watch_bytes')} ({self._settings.max_watch_bytes}); retry shortly"
            )
        self._watch_bytes.take(tenant, cost)
        try:
            yield
        finally:
            self._watch_bytes.give_back(tenant, cost)

    def watch_bytes_of(self, tenant: str) -> int:
        """The bytes the tenant's open watch streams are counted for now."""
        return self._watch_bytes.of(tenant)


@dataclass(slots=True)
class _Line:
    """A tenant's turns for one kind of work, and how many hold or wait for one (the line is dropped at 0)."""

    turns: asyncio.Semaphore
    users: int = 0


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit, and return it. Each HTTP and
    gRPC connection is a file descriptor; the connection caps (--max-connections,
    --max-http-connections) keep their number bounded, and need a limit above their sum (shells often
    start processes at 1024 while allowing far more)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):  # an unlimited hard limit may be refused as is
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
    return soft


class HeldCall:
    """A call's place of its tenant's share of the served calls, given back when the call ends, or, when
    work of the call goes on without it (a shielded write whose caller's deadline passed), when that work
    ends: a tenant whose calls kept giving up early had more writes going than its share (a review: 2
    with a share of 1), none of them counted."""

    __slots__ = ("_give_back", "kept")

    def __init__(self, give_back: Callable[[], None]) -> None:
        self._give_back = give_back
        self.kept = False  # by work that outlives the call: the place is that work's to give back

    def keep(self) -> Callable[[], None]:
        """Keep the place past the call's end; what gives it back, to call once when the work ends."""
        self.kept = True
        return self._give_back

    def end(self) -> None:
        """The call has ended: give the place back unless work of the call keeps it."""
        if not self.kept:
            self._give_back()


# The place the current call holds (set by the interceptor when it counts the call), for work that may
# outlive it (evalsvc.api.status's shielded writes).
HELD_CALL: ContextVar[HeldCall | None] = ContextVar("held_call", default=None)


class _Paging(Protocol):
    """A service whose page reads take their turn of their tenant's line."""

    @property
    def limits(self) -> TenantLimits: ...


Service = TypeVar("Service", bound=_Paging)
Request = TypeVar("Request")
Page = TypeVar("Page")


def in_page_line(
    read: Callable[[Service, str, Request], Awaitable[Page]],
) -> Callable[[Service, str, Request], Awaitable[Page]]:
    """A page read of the tenant's, done in its turn of the tenant's line (`TenantLimits.page_read`): a page
    is Python on the one event loop between its reads, and one tenant's many at once went ahead of every
    other tenant's calls. Every list of the services reads its pages so (ListRuns, ListRunResults,
    ListDatasets, ListDatasetItems, ListGraders, ListTargets)."""

    @functools.wraps(read)
    async def in_turn(service: Service, tenant: str, request: Request) -> Page:
        async with service.limits.page_read(tenant):
            return await read(service, tenant, request)

    return in_turn
