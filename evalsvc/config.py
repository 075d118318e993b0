"""One settings object for the whole service, read from flags and `EVALSVC_*` environment variables.

Each setting has a flag (`--grpc-addr`) and an environment variable (`EVALSVC_GRPC_ADDR`); a flag
wins over the environment, which wins over the default. The README's configuration table lists the
fields of `Settings` below (`describe`); tests/test_server.py checks that it names every flag and variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, cast

ENV_PREFIX = "EVALSVC_"
# Evaluations a process executes at once by default; half of it is a tenant's share of calls
# (`Settings.workers_per_tenant`), also on an API-only replica (`--workers 0`), which calls endpoints
# only for dataset generation.
DEFAULT_WORKERS = 64


# Hosts that bind every address (so clash with any host on their port), and names of the loopback address.
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "*"})
_LOOPBACK_NAMES = {"localhost": "127.0.0.1"}


class SettingsError(ValueError):
    """A setting's value cannot be used; the message names its flag and variable. The commands exit 2
    with it, in one line."""


@dataclass(frozen=True)
class Settings:
    """Everything the server can be configured with. Field docs are the help text of their flag.
    Numeric values outside their MINIMUMS and MAXIMUMS, and a tenant's share of the REST connections over half of
    them, are refused when the object is made (`SettingsError`)."""

    grpc_addr: str = dataclasses.field(
        default="127.0.0.1:50051", metadata={"help": "host:port the gRPC server listens on (port 0 picks one)"}
    )
    db: str = dataclasses.field(
        default="sqlite+aiosqlite:///./evalsvc.db",
        metadata={"help": "SQLAlchemy URL of the database (sqlite+aiosqlite:// or postgresql+asyncpg://)"},
    )
    http_addr: str = dataclasses.field(
        default="",
        metadata={"help": "host:port of the REST gateway in this process (make run uses 127.0.0.1:8080); empty: off"},
    )
    dialects: str = dataclasses.field(
        default="all",
        metadata={
            "help": "vendor dialects the gateway mounts: all, none, or a list of name[=/prefix] "
            "(omni, agno, bland, vogent, aymara; docs/dialects.md)"
        },
    )
    workers: int = dataclasses.field(
        default=DEFAULT_WORKERS, metadata={"help": "evaluations (target calls) executed concurrently by this process"}
    )
    max_workers_per_tenant: int = dataclasses.field(
        default=0,
        metadata={
            "help": "calls (each holding one of --workers) one tenant may have in progress in this process; "
            "its other jobs wait for room holding no worker, so one tenant's hung or slow endpoints leave the "
            "rest to others (docs/targets.md). At most --workers (when it is not 0); 0: half of --workers "
            "(with --workers 0, an API-only replica whose only calls are dataset generation's: 32)"
        },
    )
    claim_batch: int = dataclasses.field(
        default=500, metadata={"help": "jobs claimed and committed together; larger is faster for big runs"}
    )
    lease_ttl_s: float = dataclasses.field(
        default=30.0, metadata={"help": "seconds a claimed job stays leased before another worker may reclaim it"}
    )
    poll_interval_s: float = dataclasses.field(
        default=1.0, metadata={"help": "seconds between looks for claimable jobs when nothing woke the workers"}
    )
    stall_s: float = dataclasses.field(
        default=30.0,
        metadata={
            "help": "seconds a loop (claim, record, lease renewal) may make no progress while work waits for it "
            "before the watchdog logs it and health turns NOT_SERVING"
        },
    )
    heartbeat_s: float = dataclasses.field(
        default=10.0, metadata={"help": "seconds of silence after which a WatchRun stream gets a heartbeat"}
    )
    watch_buffer: int = dataclasses.field(
        default=2048,
        metadata={
            "help": "events buffered per watcher, and 128 bytes each of their serialized size, before it falls "
            "back to reading the database"
        },
    )
    grace_s: float = dataclasses.field(
        default=10.0, metadata={"help": "seconds unary calls get to finish on SIGTERM/SIGINT"}
    )
    max_message_bytes: int = dataclasses.field(
        default=16 * 1024 * 1024,
        metadata={"help": "largest gRPC message accepted or sent; also the REST gateway's largest request body (413)"},
    )
    max_concurrent_streams: int = dataclasses.field(
        default=1000, metadata={"help": "HTTP/2 streams per client connection"}
    )
    max_connections: int = dataclasses.field(
        default=1000,
        metadata={
            "help": "gRPC client connections at once; past it a new connection is closed at once "
            "(clients see UNAVAILABLE and reconnect with backoff)"
        },
    )
    request_timeout_s: float = dataclasses.field(
        default=300.0,
        metadata={
            "help": "seconds a gRPC call may wait for its whole request message (and each message of a client "
            "stream) once it has begun; past it the call ends DEADLINE_EXCEEDED (REQUEST_TIMEOUT). Long "
            "enough for a 16 MiB request at 56 KB/s: calls that wait do not hold --max-concurrent-rpcs"
        },
    )
    max_waiting_calls_per_connection: int = dataclasses.field(
        default=16,
        metadata={
            "help": "gRPC calls of one connection that may go on waiting once they have waited a second for "
            "their request messages; the newer ones are ended (RESOURCE_EXHAUSTED). Calls waiting for requests "
            "do not count against --max-concurrent-rpcs"
        },
    )
    connection_idle_s: float = dataclasses.field(
        default=30.0,
        metadata={
            "help": "seconds a gRPC connection may carry no call before the server closes it (GOAWAY), so that "
            "connections that never call cannot hold --max-connections; an open stream is a call. Clients "
            "reconnect on their next call"
        },
    )
    max_http_connections: int = dataclasses.field(
        default=2000,
        metadata={"help": "REST gateway connections at once; past it a connection gets 503 with Retry-After"},
    )
    max_http_streams_per_tenant: int = dataclasses.field(
        default=0,
        metadata={
            "help": "long-lived REST requests (SSE/NDJSON watches, synchronous dialect waits) one tenant may "
            "have open in the gateway at once, each holding an HTTP connection; past it 429 RESOURCE_EXHAUSTED "
            "(docs/operations.md). At most half of --max-http-connections; 0: a quarter of it"
        },
    )
    http_header_timeout_s: float = dataclasses.field(
        default=30.0,
        metadata={"help": "seconds an HTTP connection has to send a request's headers, when new and between requests"},
    )
    http_body_timeout_s: float = dataclasses.field(
        default=30.0,
        metadata={
            "help": "seconds a REST request's body has, from the end of its headers, to arrive whole; past it "
            "408 and the connection is closed (30 s for a 16 MiB body: ~4.5 Mbit/s; raise it for slow links)"
        },
    )
    http_keepalive_timeout_s: float = dataclasses.field(
        default=30.0, metadata={"help": "seconds an idle HTTP keep-alive connection is kept between requests"}
    )
    gateway_streams_per_channel: int = dataclasses.field(
        default=500,
        metadata={
            "help": "watches (SSE/NDJSON) the gateway puts on one upstream gRPC connection before it opens "
            "another (keep below the server's --max-concurrent-streams)"
        },
    )
    sqlite_synchronous: str = dataclasses.field(
        default="FULL", metadata={"help": "SQLite synchronous pragma: FULL survives power loss, NORMAL only crashes"}
    )
    log_level: str = dataclasses.field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR"})
    log_format: str = dataclasses.field(
        default="text", metadata={"help": "text, or json for one JSON object per line (method, tenant, code, latency)"}
    )
    metrics_addr: str = dataclasses.field(
        default="", metadata={"help": "host:port for Prometheus metrics at /metrics; empty turns them off"}
    )
    tls_cert: str = dataclasses.field(
        default="",
        metadata={"help": "PEM certificate chain file; enables TLS on the gRPC port and HTTPS on the REST gateway"},
    )
    tls_key: str = dataclasses.field(default="", metadata={"help": "PEM private key file of --tls-cert (unencrypted)"})
    tls_client_ca: str = dataclasses.field(
        default="",
        metadata={"help": "PEM CA file; when set, gRPC and REST clients must present a certificate it signed (mTLS)"},
    )
    bootstrap_key: bool = dataclasses.field(
        default=True,
        metadata={"help": "on first start with no API key, mint one for tenant 'default' and print it (false in prod)"},
    )
    auth_cache_s: float = dataclasses.field(
        default=2.0,
        metadata={
            "help": "seconds a verified API key is cached; a revocation or expiry takes effect within it, "
            "open watch streams included"
        },
    )
    max_concurrent_rpcs: int = dataclasses.field(
        default=8000,
        metadata={
            "help": "RPCs (including open streams) served at once, counted from the arrival of their requests; "
            "the excess gets RESOURCE_EXHAUSTED. Streams take at most three quarters of it (WatchRun streams of "
            "all tenants five eighths, health Watch and reflection streams an eighth), so ordinary calls always "
            "have room, and one tenant's calls at most --max-calls-per-tenant. Health and reflection calls "
            "count but are never refused by it (their own bounds hold them)"
        },
    )
    max_calls_per_tenant: int = dataclasses.field(
        default=0,
        metadata={
            "help": "calls one tenant may have served at once in this process (gRPC and REST together; streams "
            "are not counted: WatchRun has --max-watch-streams); past it RESOURCE_EXHAUSTED "
            "TENANT_QUOTA_EXCEEDED with RetryInfo, so one tenant's slow calls leave --max-concurrent-rpcs to the "
            "others. At most half of --max-concurrent-rpcs; 0: a quarter of it"
        },
    )
    max_page_reads_per_tenant: int = dataclasses.field(
        default=2,
        metadata={
            "help": "pages (ListRuns, ListRunResults, ListDatasets, ListDatasetItems, ListGraders, ListTargets) one "
            "tenant may have read and built at once in this process; its others wait their turn (within their "
            "deadline): a page of 1,000 results is ~0.1 s of the event loop, and one tenant's 8 at once made every "
            "other tenant's GetRun ~30x slower"
        },
    )
    create_run_rate: float = dataclasses.field(
        default=20.0, metadata={"help": "CreateRun calls per second per tenant (token bucket refill rate)"}
    )
    create_run_burst: int = dataclasses.field(
        default=100, metadata={"help": "CreateRun calls a tenant may make at once (token bucket size)"}
    )
    max_watch_streams: int = dataclasses.field(
        default=2000,
        metadata={
            "help": "open WatchRun streams per tenant and process; at most half of the WatchRun streams of all "
            "tenants (five eighths of --max-concurrent-rpcs), whatever is set"
        },
    )
    max_watch_bytes_per_tenant: int = dataclasses.field(
        default=512 * 1024 * 1024,
        metadata={
            "help": "bytes one tenant's open WatchRun/WatchRunBatched streams may hold in this process, each "
            "counted by the run it watches (about 5x the run's size, whose every run event repeats its "
            "definition: see docs/operations.md); past it RESOURCE_EXHAUSTED TENANT_QUOTA_EXCEEDED with "
            "RetryInfo. At most half of --max-watch-bytes; a tenant's first stream always fits"
        },
    )
    max_watch_bytes: int = dataclasses.field(
        default=2 * 1024 * 1024 * 1024,
        metadata={
            "help": "bytes all tenants' open WatchRun/WatchRunBatched streams may hold in this process, counted "
            "as for --max-watch-bytes-per-tenant; past it UNAVAILABLE SERVER_STREAMS_FULL"
        },
    )
    max_active_runs: int = dataclasses.field(
        default=100,
        metadata={
            "help": "PENDING or RUNNING runs per tenant; 0 refuses every CreateRun (a replica that takes no new runs)"
        },
    )
    max_items_per_run: int = dataclasses.field(default=100_000, metadata={"help": "items per run"})
    max_jobs_per_run: int = dataclasses.field(
        default=200_000,
        metadata={
            "help": "jobs (items x repetitions) per run (a large run's rows are written in chunks of "
            "2,000 before its run row, each its own short write: docs/architecture.md)"
        },
    )
    max_datasets_per_tenant: int = dataclasses.field(
        default=1000, metadata={"help": "datasets a tenant may hold; past it CreateDataset asks to delete one"}
    )
    max_items_per_dataset: int = dataclasses.field(
        default=100_000,
        metadata={
            "help": "items one dataset may hold (as many as --max-items-per-run by default, so a whole dataset "
            "can be run); an AddDatasetItems, GenerateDatasetItems or ContinueConversations that would pass it "
            "is refused whole"
        },
    )
    max_graders_per_tenant: int = dataclasses.field(
        default=1000, metadata={"help": "saved graders a tenant may hold (each with all its versions)"}
    )
    max_versions_per_grader: int = dataclasses.field(
        default=1000,
        metadata={"help": "versions one saved grader may have (UpdateGrader adds one); past it, save a new grader"},
    )
    max_targets_per_tenant: int = dataclasses.field(default=1000, metadata={"help": "saved targets a tenant may hold"})
    max_secrets_per_tenant: int = dataclasses.field(default=100, metadata={"help": "secrets a tenant may hold"})
    max_webhooks_per_tenant: int = dataclasses.field(default=50, metadata={"help": "webhooks a tenant may hold"})
    max_runs_per_tenant: int = dataclasses.field(
        default=100_000,
        metadata={
            "help": "runs a tenant may hold, deleted ones included until they are purged "
            "(--deleted-run-retention-s); past it CreateRun asks to delete some"
        },
    )
    max_stored_bytes_per_tenant: int = dataclasses.field(
        default=10 * 1024**3,
        metadata={
            "help": "bytes a tenant may store: its runs (definitions, copied items, jobs, outputs, results and "
            "their events; deleted runs until they are purged), its datasets with their items, and its saved "
            "graders (every version) and targets; past it CreateRun, adding items and saving definitions are "
            "refused, and its running runs end FAILED (STORAGE_QUOTA_EXCEEDED) keeping their results"
        },
    )
    deleted_run_retention_s: float = dataclasses.field(
        default=30 * 24 * 3600.0,
        metadata={
            "help": "seconds a deleted run can still be restored (UndeleteRun, AIP-164) before it and everything "
            "of it (items, jobs, results, events, webhook deliveries) is purged for good, its spend still "
            "counting against --tenant-budget-usd; 0: purged at the next pass (one starts every minute), so "
            "about a minute after DeleteRun at most, plus the pass itself"
        },
    )
    judge_base_url: str = dataclasses.field(
        default="",
        metadata={"help": "OpenAI-compatible base URL of the default LLM judge (e.g. http://127.0.0.1:11434/v1)"},
    )
    judge_model: str = dataclasses.field(default="", metadata={"help": "model name of the default LLM judge"})
    judge_api_key: str = dataclasses.field(
        default="", metadata={"help": "API key of the default LLM judge (never logged or returned)"}
    )
    generator_model: str = dataclasses.field(
        default="",
        metadata={"help": "model that writes dataset items (Aymara prompts, next turns); empty: --judge-model"},
    )
    generator_base_url: str = dataclasses.field(
        default="", metadata={"help": "OpenAI-compatible base URL of --generator-model; empty: --judge-base-url"}
    )
    generator_api_key: str = dataclasses.field(
        default="", metadata={"help": "API key of --generator-base-url; empty: --judge-api-key (never logged)"}
    )
    dialect_sync_wait_s: float = dataclasses.field(
        default=58.0,
        metadata={
            "help": "seconds after its request arrived that a synchronous dialect route (Agno POST /eval-runs, Aymara "
            "score-responses) stops waiting for its run and answers as the vendor does for a long evaluation (the "
            "vendors' clients wait 60 s)"
        },
    )
    outbound_allow: str = dataclasses.field(
        default="",
        metadata={
            "help": "comma-separated host names, IP addresses or CIDRs, each with an optional :PORT (IPv6 in "
            "brackets: [::1]:11434), that targets, judges and webhooks may call although they are not globally "
            "routable (e.g. 127.0.0.1:11434,10.0.0.0/8:443,llm.internal); an entry without a port allows every port "
            "of its host or network; every other such destination is refused (docs/security.md)"
        },
    )
    secrets_file: str = dataclasses.field(
        default="",
        metadata={
            "help": 'JSON file {"NAME": {"value": "...", "tenants": ["t1"]}} of operator secrets for endpoints '
            "(tenants: '*' for all); EVALSVC_SECRET_<NAME> (+ _TENANTS) too; docs/security.md"
        },
    )
    secrets_key: str = dataclasses.field(
        default="",
        repr=False,
        metadata={
            "help": "AES-256 key (URL-safe base64 of 32 bytes: evalsvc secrets generate-key) sealing tenants' "
            "own secrets; empty: tenants cannot store secrets. Prefer the variable to the flag"
        },
    )
    price_table: str = dataclasses.field(
        default="",
        metadata={"help": 'JSON file {"model": {"input_per_mtok": USD, "output_per_mtok": USD}} for token costs'},
    )
    http_retries: int = dataclasses.field(
        default=4, metadata={"help": "retries of a target or judge call on 408/429/5xx/connection errors"}
    )
    max_reply_bytes: int = dataclasses.field(
        default=0,
        metadata={
            "help": "largest body a target, judge or generator endpoint may answer with; a larger one fails "
            "that evaluation (it is read as it arrives, never whole). At most a quarter of "
            "--max-message-bytes, so that every result (its output and its judge's explanation) can be read "
            "back; 0: that quarter (4 MiB by default)"
        },
    )
    tenant_budget_usd: float = dataclasses.field(
        default=0.0, metadata={"help": "total model spend allowed per tenant, in US dollars; 0 means no limit"}
    )
    max_graders_per_run: int = dataclasses.field(default=100, metadata={"help": "graders per run"})
    grade_timeout_s: float = dataclasses.field(
        default=5.0,
        metadata={
            "help": "seconds one grading sent to a grading process (estimated over ~1 ms inline: a large "
            "output or an expensive grader) may compute; over it the process is killed and the evaluation is "
            "ERROR GRADER_TIMEOUT"
        },
    )
    grade_processes: int = dataclasses.field(
        default=2,
        metadata={
            "help": "worker processes that run expensive gradings (large outputs, costly graders) off the event loop"
        },
    )
    cache_default: str = dataclasses.field(
        default="off",
        metadata={
            "help": "response cache mode of runs that do not choose one: off, read_write, refresh or replay "
            "(docs/targets.md)"
        },
    )
    cache_max_entries: int = dataclasses.field(
        default=100_000,
        metadata={"help": "cached outputs and verdicts kept per tenant; the least recently used go first"},
    )
    cache_max_bytes: int = dataclasses.field(
        default=1024**3,
        metadata={
            "help": "bytes of cached outputs and verdicts kept per tenant (beside --max-stored-bytes-per-tenant, "
            "not in it); the least recently used go first"
        },
    )
    webhook_concurrency: int = dataclasses.field(
        default=16,
        metadata={
            "help": "webhook deliveries this process sends at once (divided among tenants, a quarter at most each)"
        },
    )
    webhook_timeout_s: float = dataclasses.field(
        default=10.0, metadata={"help": "seconds a webhook receiver has to answer one delivery attempt"}
    )
    webhook_retry_base_s: float = dataclasses.field(
        default=5.0,
        metadata={
            "help": "seconds before the first retry of a webhook delivery; each next one waits 4x longer, "
            "at most an hour, less up to half as jitter (docs/webhooks.md)"
        },
    )
    webhook_max_attempts: int = dataclasses.field(
        default=8, metadata={"help": "attempts of a webhook delivery before it is FAILED"}
    )

    def __post_init__(self) -> None:
        for name, choices in CHOICES.items():
            if getattr(self, name).upper() not in (choice.upper() for choice in choices):
                raise SettingsError(f"{named(name)} must be one of {', '.join(choices)}, not {getattr(self, name)!r}")
        for name, (minimum, inclusive) in MINIMUMS.items():
            value = getattr(self, name)
            if not math.isfinite(value):  # NaN passes every comparison: a NaN lease was stored as NULL
                raise SettingsError(f"{named(name)} must be a finite number, not {value!r}")
            if value < minimum or (value == minimum and not inclusive) or value > MAXIMUMS.get(name, math.inf):
                raise SettingsError(f"{named(name)} must be {_bound(name)}, not {value!r}")
        if self.workers and self.max_workers_per_tenant > self.workers:
            raise SettingsError(
                f"{named('max_workers_per_tenant')} must be at most {named('workers')} ({self.workers}), "
                f"not {self.max_workers_per_tenant}"
            )
        if self.http_streams_per_tenant > self.max_http_connections // 2:
            # One tenant's watches could hold every REST connection: every other tenant's calls got 503.
            raise SettingsError(
                f"{named('max_http_streams_per_tenant')} must be at most half of {named('max_http_connections')}, "
                f"so that one tenant's streams leave connections for the others: "
                f"{self.http_streams_per_tenant} is more than {self.max_http_connections // 2}"
            )
        if self.calls_per_tenant > (half := max(1, self.max_concurrent_rpcs // 2)):
            # One tenant's slow calls (ContinueConversations waiting on a model) took every place: every other
            # tenant's calls, and the health check, got RESOURCE_EXHAUSTED.
            raise SettingsError(
                f"{named('max_calls_per_tenant')} must be at most half of {named('max_concurrent_rpcs')}, "
                f"so that one tenant's calls leave places for the others: {self.calls_per_tenant} is more than {half}"
            )

        try:
            allow_entries(self.outbound_allow)
        except ValueError as exc:
            raise SettingsError(f"{named('outbound_allow')}: {exc}") from None
        if self.max_reply_bytes and not MIN_REPLY_BYTES <= self.max_reply_bytes <= self.max_message_bytes // 4:
            # A result carries its output and its judge's explanation, each up to this: a larger one made a
            # result no call could send (ListRunResults failed RESOURCE_EXHAUSTED on that run for good).
            raise SettingsError(
                f"{named('max_reply_bytes')} must be 0 or from {MIN_REPLY_BYTES} to a quarter of "
                f"{named('max_message_bytes')} ({self.max_message_bytes // 4}), so that every result can be read "
                f"back, not {self.max_reply_bytes}"
            )

    def check_listeners(self) -> None:
        """SettingsError naming both flags when two of the server's listeners (`serve`'s gRPC, HTTP and
        metrics addresses) are the same HOST:PORT: it was found only once the database had been migrated,
        and said as "is another evalsvc running?". Port 0 picks a free port for each."""
        seen: list[tuple[str, int, str]] = []  # (host, port, setting) of the listeners before
        for name, _ in LISTENERS:
            host, colon, port = getattr(self, name).strip().rpartition(":")
            if not colon or not port.isdigit() or int(port) == 0:
                continue  # none, or not HOST:PORT (the address check says so)
            host = _LOOPBACK_NAMES.get(host.strip("[]").lower(), host.strip("[]").lower())
            for other_host, other_port, other in seen:
                if other_port == int(port) and (host == other_host or _WILDCARD_HOSTS & {host, other_host}):
                    raise SettingsError(
                        f"{named(other)} ({getattr(self, other).strip()}) and {named(name)} "
                        f"({getattr(self, name).strip()}) take the same port: each listener needs an address "
                        "of its own"
                    )
            seen.append((host, int(port), name))

    @property
    def idle_in_transaction_s(self) -> float:
        """How long a write transaction may sit idle on PostgreSQL before the database ends it (a replica
        paused inside one held every replica's writes): half of the shorter of `lease_ttl_s` and
        `stall_s`, so a paused replica's locks go before the other replicas' watchdogs see a stall, but
        at least 5 s, which no healthy transaction idles for."""
        return max(5.0, min(self.lease_ttl_s, self.stall_s) / 2)

    @property
    def reply_bytes(self) -> int:
        """The largest reply read from a target, judge or generator: `max_reply_bytes`, or when that is 0,
        a quarter of `max_message_bytes`."""
        return self.max_reply_bytes or self.max_message_bytes // 4

    @property
    def workers_per_tenant(self) -> int:
        """The calls (workers) one tenant may hold: `max_workers_per_tenant`, or when that is 0, half of
        `workers` (at least 1)."""
        return self.max_workers_per_tenant or max(1, (self.workers or DEFAULT_WORKERS) // 2)

    @property
    def http_streams_per_tenant(self) -> int:
        """The REST streams one tenant may hold open in the gateway: `max_http_streams_per_tenant`, or
        when that is 0, a quarter of `max_http_connections` (at least 1)."""
        return self.max_http_streams_per_tenant or max(1, self.max_http_connections // 4)

    @property
    def calls_per_tenant(self) -> int:
        """The calls (streams aside) one tenant may have served at once in one process:
        `max_calls_per_tenant`, or when that is 0, a quarter of `max_concurrent_rpcs` (at least 1)."""
        return self.max_calls_per_tenant or max(1, self.max_concurrent_rpcs // 4)

    @property
    def watch_streams_in_all(self) -> int:
        """The WatchRun streams all tenants together may hold open in one process: five eighths of
        `max_concurrent_rpcs` (at least 1). With the health Watch streams' eighth, streams leave a quarter
        of the RPCs to ordinary calls: three tenants' watches within their quota took all 5,000 places,
        and every other tenant's GetRun got RESOURCE_EXHAUSTED."""
        return max(1, self.max_concurrent_rpcs * 5 // 8)

    @property
    def watch_streams_per_tenant(self) -> int:
        """One tenant's WatchRun streams: `max_watch_streams`, but at most half of `watch_streams_in_all`,
        so one tenant's watches leave room for the others' (at least 1)."""
        return max(1, min(self.max_watch_streams, self.watch_streams_in_all // 2))

    @property
    def watch_bytes_per_tenant(self) -> int:
        """The bytes one tenant's watch streams may hold: `max_watch_bytes_per_tenant`, but at most half of
        `max_watch_bytes`, so one tenant's watches leave room for the others'."""
        return max(1, min(self.max_watch_bytes_per_tenant, self.max_watch_bytes // 2))

    @property
    def health_watches_in_all(self) -> int:
        """The health Watch and reflection streams (no API key needed) all clients together may hold open:
        an eighth of `max_concurrent_rpcs` (at least 1); one anonymous client opened 5,000 and every
        tenant's calls got RESOURCE_EXHAUSTED."""
        return max(1, self.max_concurrent_rpcs // 8)

    @property
    def http_streams_in_all(self) -> int:
        """The REST streams all tenants together may hold open in the gateway: three quarters of
        `max_http_connections`, so that several tenants at their share still leave a quarter of the
        connections to everyone's ordinary calls (at least one stream)."""
        return max(1, self.max_http_connections - self.max_http_connections // 4)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from the environment, with keyword overrides (used by tests and embedders)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(env_name(f.name))
            # Empty: unset, but for free text (a setting of a few words has no empty one: unset too).
            if raw is not None and (raw.strip() or (str(f.type) == "str" and f.name not in CHOICES)):
                try:
                    values[f.name] = _coerce(f.type, raw)
                except ValueError as exc:
                    raise SettingsError(f"{env_name(f.name)}: {exc}") from None
        values.update(overrides)
        return cls(**values)


# Text settings that name one of a few things (any case): the one place they are checked, so that every
# refusal names the flag and the variable.
CHOICES: dict[str, tuple[str, ...]] = {
    "log_level": ("DEBUG", "INFO", "WARNING", "ERROR"),
    "log_format": ("text", "json"),
    "sqlite_synchronous": ("FULL", "NORMAL", "EXTRA"),
    "cache_default": ("off", "read_write", "refresh", "replay"),  # evalsvc.execution.cache.MODE_NAMES
}

# A gRPC channel argument is a C int: a larger value (`--max-message-bytes 99999999999`) crashed the start
# with an OverflowError traceback, after the database had been migrated.
INT_MAX = 2**31 - 1

MIN_REPLY_BYTES = 1024  # a reply bound smaller than this would fail ordinary answers

# The smallest value each numeric setting works with: (minimum, whether the minimum itself is allowed).
# Below it a server would start and then do nothing, or spin: a claim of 0 jobs, leases that have
# expired when taken, a poll interval of 0, a watcher buffer of 0 events. Zero is allowed where it
# means something: no executor (`--workers 0`, an API-only replica), no budget, no retries.
MINIMUMS: dict[str, tuple[float, bool]] = {
    "workers": (0, True),
    "max_workers_per_tenant": (0, True),  # 0: half of workers
    "claim_batch": (1, True),
    "lease_ttl_s": (0, False),
    # A poll interval or heartbeat of 1e-300 s was accepted: an idle server spun at ~97% of a core.
    "poll_interval_s": (0.01, True),
    "stall_s": (0, False),
    "heartbeat_s": (0.01, True),
    "watch_buffer": (1, True),
    "grace_s": (0, True),
    # Below it what a response echoes (a run's labels, annotations and definitions, a result's output
    # and explanation) could outgrow a message: a run created whose CreateRun could not answer.
    "max_message_bytes": (256 * 1024, True),
    "max_concurrent_streams": (1, True),
    "max_connections": (1, True),
    "connection_idle_s": (0, False),
    "request_timeout_s": (0, False),
    "max_waiting_calls_per_connection": (1, True),
    "max_http_connections": (2, True),  # one connection cannot be shared: a tenant's one stream would take it
    "max_http_streams_per_tenant": (0, True),  # 0: a quarter of max_http_connections
    "http_header_timeout_s": (0, False),
    "http_body_timeout_s": (0, False),
    "http_keepalive_timeout_s": (0, True),
    "gateway_streams_per_channel": (1, True),
    "auth_cache_s": (0, True),
    "max_concurrent_rpcs": (1, True),
    "max_calls_per_tenant": (0, True),  # 0: a quarter of max_concurrent_rpcs
    "max_page_reads_per_tenant": (1, True),
    "create_run_rate": (0, False),
    "create_run_burst": (1, True),
    "max_watch_streams": (1, True),
    "max_watch_bytes_per_tenant": (1, True),
    "max_watch_bytes": (1, True),
    "max_active_runs": (0, True),  # 0: every CreateRun refused (a replica that takes no new runs)
    "max_items_per_run": (1, True),
    "max_jobs_per_run": (1, True),
    "max_datasets_per_tenant": (1, True),
    "max_items_per_dataset": (1, True),
    "max_graders_per_tenant": (1, True),
    "max_versions_per_grader": (1, True),
    "max_targets_per_tenant": (1, True),
    "max_secrets_per_tenant": (1, True),
    "max_webhooks_per_tenant": (1, True),
    "max_runs_per_tenant": (1, True),
    "max_stored_bytes_per_tenant": (1, True),
    "deleted_run_retention_s": (0, True),
    "dialect_sync_wait_s": (0, True),
    "http_retries": (0, True),
    "max_reply_bytes": (0, True),  # 0: a quarter of max_message_bytes
    "tenant_budget_usd": (0, True),
    "max_graders_per_run": (1, True),
    "grade_timeout_s": (0, False),
    "grade_processes": (1, True),
    "cache_max_entries": (0, True),
    "cache_max_bytes": (0, True),
    "webhook_concurrency": (1, True),
    "webhook_timeout_s": (0, False),
    "webhook_retry_base_s": (0, True),
    "webhook_max_attempts": (1, True),
}

# The largest value of the settings that become gRPC channel arguments (evalsvc.server.server_options).
MAXIMUMS: dict[str, float] = {
    "max_message_bytes": INT_MAX,
    "max_concurrent_streams": INT_MAX,
    "max_connections": INT_MAX,
    # In milliseconds a C int (grpc.max_connection_idle_ms): 1e308 crashed the start with an OverflowError
    # traceback, after the database had been migrated.
    "connection_idle_s": INT_MAX // 1000,
    "max_graders_per_run": 1024,  # as documented; runs were capped at 1024 whatever it said
    # A typo's bounds: `--workers 99999999999999999999` and `--grace-s 1e308` were accepted (the shutdown then
    # said "at most 1e308+10 s in all").
    "workers": 10_000,
    "grace_s": 86_400,
}


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_PORT = 65535
# One label of a host name: letters, digits, hyphens inside, underscores (container names have them).
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?", re.IGNORECASE)


@dataclass(frozen=True)
class AllowEntry:
    """One `--outbound-allow` entry: a network (an address is one of a single address) or a host name
    (lower case, as it is matched), and the one port it allows, or None for every port. A port is what
    keeps an entry for one local model server (`127.0.0.1:11434`) from opening every other service on
    its host to the tenants' targets, judges and webhooks: the gateway, metrics, a database."""

    destination: Network | str
    port: int | None = None


def allow_entries(spec: str) -> list[AllowEntry]:
    """The entries of an `--outbound-allow` list: `HOST` or `HOST:PORT`, HOST an IP address, a network in
    CIDR form or a host name, an IPv6 address or network in brackets when a port follows (`[::1]:11434`:
    unbracketed, `::1:8080` is an address). ValueError for an entry that is none of these, or whose port
    is not from 1 to 65535: it was kept as a host name that no URL's host can be (`10.0.0.0/33`), so the
    destination the operator meant to allow stayed refused, and nothing said why."""
    return [_allow_entry(entry) for entry in filter(None, (e.strip() for e in spec.split(",")))]


def _allow_entry(entry: str) -> AllowEntry:
    """One entry of `allow_entries`."""
    if "%" not in entry:  # an IPv6 zone is refused (`_allow_destination`)
        try:  # an address or a network without a port (an unbracketed IPv6 one never has one)
            return AllowEntry(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            pass
    bracketed = entry.startswith("[")
    if bracketed:
        host, _, after = entry[1:].partition("]")
        sep, port = after[:1], after[1:]
    else:
        host, sep, port = entry.rpartition(":") if ":" in entry else (entry, "", "")
    destination = _allow_destination(host, bracketed)
    if destination is None or (sep and not (sep == ":" and port.isascii() and port.isdigit())):
        raise ValueError(
            f"{entry!r} is neither an IP address, a network in CIDR form (such as 10.0.0.0/8) nor a host name, "
            "with an optional :PORT"
        )
    if isinstance(destination, ipaddress.IPv6Network) and sep and not bracketed:
        raise ValueError(f"{entry!r}: an IPv6 address or network with a port is written in brackets: '[{host}]:{port}'")
    if not sep:
        return AllowEntry(destination)
    if not 1 <= int(port) <= MAX_PORT:
        raise ValueError(f"{entry!r}: a port is from 1 to {MAX_PORT}, not {port}")
    return AllowEntry(destination, int(port))


def _allow_destination(host: str, bracketed: bool) -> Network | str | None:
    """What an entry's HOST part names (an IPv6 network only, in brackets), or None. An IPv6 zone
    (`fe80::1%eth0`) is None: it was accepted and then ignored in matching, so an entry for one interface
    allowed the address on every interface."""
    if "%" in host:
        return None
    try:
        network = ipaddress.ip_network(host, strict=False)
    except ValueError:
        return None if bracketed or "/" in host or not _is_host_name(host) else host.lower()
    return network if network.version == 6 or not bracketed else None


def _is_host_name(text: str) -> bool:
    """A DNS name of letters, digits, hyphens (and underscores) whose last label is not all digits:
    `999.1.1.1` is an IPv4 address that is not one, not a name."""
    labels = text.removesuffix(".").split(".")
    return len(text) <= 253 and all(_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()


def named(field_name: str) -> str:
    """`claim_batch` -> `--claim-batch (EVALSVC_CLAIM_BATCH)`: how a message names a setting."""
    return f"{flag_name(field_name)} ({env_name(field_name)})"


def env_name(field_name: str) -> str:
    """`grpc_addr` -> `EVALSVC_GRPC_ADDR`."""
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    """`grpc_addr` -> `--grpc-addr`."""
    return "--" + field_name.replace("_", "-")


def _coerce(type_name: Any, raw: str) -> Any:
    """A flag's or variable's text as the setting's type; ValueError naming what was expected."""
    kind = str(type_name)
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not a whole number") from None
    if kind == "float":
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not a number") from None
    if kind == "bool":
        word = raw.strip().lower()
        if word not in _TRUE | _FALSE:
            raise ValueError(f"{raw!r} is not one of {', '.join(sorted(_TRUE))} or {', '.join(sorted(_FALSE))}")
        return word in _TRUE
    return raw


# A switch's words: anything else is refused (`--bootstrap-key maybe` started a server that minted no key).
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


# EVALSVC_ variables that are not settings: operator secrets (`EVALSVC_SECRET_<NAME>`, evalsvc.secrets.operator)
# and the test suite's (`EVALSVC_TEST_DB`, `EVALSVC_LIVENESS_SEED`, ...), by prefix; the clients' key and retry
# bound (evalctl, the SDKs: a shell that exports them for evalctl starts the server too), by name (a prefix
# let `EVALSVC_RETRY_MAX_ELAPSED_SECONDS`, a misspelling, pass unsaid).
OTHER_VARIABLES = ("EVALSVC_SECRET_", "EVALSVC_TEST_", "EVALSVC_LIVENESS_")
CLIENT_VARIABLES = frozenset({"EVALSVC_API_KEY", "EVALSVC_RETRY_MAX_ELAPSED_S"})
OTHER_VARIABLE_SUFFIXES = ("_SEED",)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """What to say of each EVALSVC_ variable that names no setting, nor one of OTHER_VARIABLES: a misspelled
    setting (`EVALSVC_WOKERS=8`) was ignored without a word, and the server ran with the default."""
    settings = [f.name.upper() for f in fields(Settings)]
    out = []
    for name in sorted(environ):
        if (
            not name.startswith(ENV_PREFIX)
            or name.removeprefix(ENV_PREFIX) in settings
            or name.startswith(OTHER_VARIABLES)
            or name in CLIENT_VARIABLES
            or name.endswith(OTHER_VARIABLE_SUFFIXES)
        ):
            continue
        # Compared without the prefix every name shares, which made any name look close to a short one.
        close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), settings, n=1, cutoff=0.75)
        out.append(f"{name} (did you mean {ENV_PREFIX}{close[0]}?)" if close else name)
    return out


# The listen addresses of `evalsvc serve`: (setting, what listens there).
LISTENERS = (("grpc_addr", "gRPC"), ("http_addr", "HTTP"), ("metrics_addr", "metrics"))

# The settings `evalsvc gateway` takes as flags besides --http-addr and --dialects (every one also from its
# EVALSVC_* variable): those the gateway reads (evalsvc.gateway.server.Gateway), as `serve --http-addr` does.
GATEWAY_SETTINGS = (
    "max_message_bytes",
    "dialect_sync_wait_s",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "max_http_connections",
    "max_http_streams_per_tenant",
    "http_header_timeout_s",
    "http_body_timeout_s",
    "http_keepalive_timeout_s",
    "gateway_streams_per_channel",
)


def add_flags(
    parser: argparse.ArgumentParser, names: Sequence[str] | None = None, helps: Mapping[str, str] | None = None
) -> None:
    """Add one flag per setting (or per setting in `names`); unset flags fall back to the environment,
    then the default. `helps`: another command's own help text of a setting (the gateway's --http-addr)."""
    for f in fields(Settings):
        if names is not None and f.name not in names:
            continue
        text = (helps or {}).get(f.name) or _help(f.name, f.metadata.get("help", ""))
        parser.add_argument(
            flag_name(f.name),
            dest=f.name,
            default=None,
            type=cast("Callable[[str], Any]", functools.partial(_flag_value, f.type)),
            help=f"{text} (env {env_name(f.name)}, default {f.default!r})",
        )


def _flag_value(type_name: Any, raw: str) -> Any:
    """`_coerce` for argparse, which prints an ArgumentTypeError's message as it is (a ValueError's as
    "invalid <lambda> value")."""
    try:
        return _coerce(type_name, raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from parsed flags over the environment."""
    given = {f.name: getattr(args, f.name) for f in fields(Settings) if getattr(args, f.name, None) is not None}
    # Subcommands that take only some flags (e.g. `keys --db`) leave the rest to the environment.
    return Settings.from_env(environ, **given)


def describe() -> Sequence[tuple[str, str, str, str]]:
    """(flag, env var, default, help) for every setting: the README's configuration table. A numeric
    setting's help ends with its bound (MINIMUMS)."""
    return [
        (flag_name(f.name), env_name(f.name), repr(f.default), _help(f.name, f.metadata.get("help", "")))
        for f in fields(Settings)
    ]


def _help(field_name: str, text: str) -> str:
    return f"{text} ({_bound(field_name)})" if field_name in MINIMUMS else text


def _bound(field_name: str) -> str:
    """`at least 1`, `more than 0`, `from 1 to 2147483647`: a numeric setting's bounds, in words."""
    minimum, inclusive = MINIMUMS[field_name]
    if field_name in MAXIMUMS:
        if not inclusive:
            return f"more than {minimum:g} and at most {MAXIMUMS[field_name]:.0f}"
        return f"from {minimum:g} to {MAXIMUMS[field_name]:.0f}"
    return f"{'at least' if inclusive else 'more than'} {minimum:g}"
