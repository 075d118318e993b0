"""The gRPC server: wiring, lifecycle and graceful shutdown.

`EvalServer` owns the database, the event bus, the executor and the grpc.aio server. Tests and
embedders start it in-process on port 0; `evalsvc serve` runs it until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import shutil
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from sqlalchemy.exc import ArgumentError

from evalsvc import package_version
from evalsvc.api.admission import Admission, grpc_limit
from evalsvc.api.auth import Authenticator
from evalsvc.api.datasets import DatasetGenerationServicer, DatasetServicer
from evalsvc.api.decoding import RequestChecker
from evalsvc.api.definitions import GraderServicer, TargetServicer
from evalsvc.api.eval_runs import EvalRunServicer
from evalsvc.api.health import BoundedHealthServicer, BoundedReflectionServicer, KeylessStreams
from evalsvc.api.interceptor import CallInterceptor
from evalsvc.api.local import LocalChannel, LocalServices
from evalsvc.api.observability import Observer
from evalsvc.api.secrets import SecretServicer
from evalsvc.api.webhooks import WebhookServicer
from evalsvc.auth.revocation import StreamRevoker
from evalsvc.auth.service import KeyService
from evalsvc.config import LISTENERS, Settings, env_name, flag_name, named
from evalsvc.datasets.generation import DatasetGenerations, generator_model
from evalsvc.datasets.service import DatasetService
from evalsvc.definitions.service import DefinitionService
from evalsvc.events.bus import EventBus
from evalsvc.events.listener import EventListener
from evalsvc.execution.cache import mode_from_setting
from evalsvc.execution.executor import Executor
from evalsvc.gateway.dialects import mounts as dialect_mounts
from evalsvc.gateway.server import Gateway
from evalsvc.graders.judge import JudgeDefaults
from evalsvc.graders.pool import GradingPool
from evalsvc.http.outbound import Outbound
from evalsvc.ids import PageTokens
from evalsvc.limits import StoredCaps, TenantLimits
from evalsvc.liveness import Progress, Watchdog, Watched, supervise
from evalsvc.metrics import Metrics
from evalsvc.runs.retention import RunPurger
from evalsvc.runs.service import RunService
from evalsvc.secrets.operator import OperatorSecrets
from evalsvc.secrets.service import SecretService
from evalsvc.store import migrate, server_keys
from evalsvc.store.db import Database, sqlite_path, unavailable_cause
from evalsvc.store.serve_lock import DatabaseInUse, ServeLock
from evalsvc.targets import PriceTable
from evalsvc.tls import http_ssl_context, server_credentials, warn_if_exposed
from evalsvc.v1 import (
    dataset_generation_pb2,
    dataset_generation_pb2_grpc,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    eval_run_service_pb2,
    eval_run_service_pb2_grpc,
    grader_service_pb2,
    grader_service_pb2_grpc,
    secret_service_pb2,
    secret_service_pb2_grpc,
    target_service_pb2,
    target_service_pb2_grpc,
    webhook_service_pb2,
    webhook_service_pb2_grpc,
)
from evalsvc.webhooks.sender import WebhookSender
from evalsvc.webhooks.service import WebhookService

log = logging.getLogger(__name__)

PAGE_TOKEN_KEY = "page_tokens"  # the server_keys row that signs page tokens
# Said after an address in use, most often because another evalsvc is running.
ADDRESS_HINT = (
    "; is another evalsvc running? Choose other addresses: --grpc-addr, --http-addr, --metrics-addr "
    "(make run GRPC_ADDR=HOST:PORT HTTP_ADDR=HOST:PORT)"
)
# Time a new gRPC connection has to finish its TLS handshake and send HTTP/2 SETTINGS: generous for a
# real client (it sends them at once), short enough that a connection that sends nothing frees its place.
HANDSHAKE_TIMEOUT_MS = 10_000
INT_MAX = 2**31 - 1  # grpc's integer channel arguments are C ints: a longer idle time means "never"
# Free space under which a database write failure is reported as a full disk.
LOW_DISK_BYTES = 1 << 20

SERVICE_NAMES = (
    eval_run_service_pb2.DESCRIPTOR.services_by_name["EvalRunService"].full_name,
    dataset_service_pb2.DESCRIPTOR.services_by_name["DatasetService"].full_name,
    dataset_generation_pb2.DESCRIPTOR.services_by_name["DatasetGenerationService"].full_name,
    grader_service_pb2.DESCRIPTOR.services_by_name["GraderService"].full_name,
    target_service_pb2.DESCRIPTOR.services_by_name["TargetService"].full_name,
    secret_service_pb2.DESCRIPTOR.services_by_name["SecretService"].full_name,
    webhook_service_pb2.DESCRIPTOR.services_by_name["WebhookService"].full_name,
)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel arguments: no port sharing, message size, stream and connection limits (idle connections
    reaped), keepalive, and room for reconnect bursts."""
    return [
        # One server per address: with port sharing a second server on the same address would get half
        # of every client's calls.
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        # Past it a new connection is closed as soon as it is accepted: file descriptors stay bounded.
        ("grpc.max_allowed_incoming_connections", settings.max_connections),
        # The cap alone let connections that never call hold every place forever: 1,000 of them, opened
        # by anyone who can reach the port, kept every tenant out (UNAVAILABLE) for as long as they stayed.
        # A connection with no call for --connection-idle-s gets a GOAWAY and is closed (an open stream,
        # a WatchRun, is a call: it is never idle); one that has not finished its (TLS and) HTTP/2
        # handshake, SETTINGS included, within HANDSHAKE_TIMEOUT_MS is closed (grpc's default is 120 s).
        ("grpc.max_connection_idle_ms", min(round(settings.connection_idle_s * 1000), INT_MAX)),
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
        # Ping idle clients every 30 s so dead watchers are noticed; allow client pings every 10 s.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        # Every watcher reconnects at once after a deploy; without these, bursts get CANCELLED.
        ("grpc.server.max_pending_requests", 10_000),
        ("grpc.server.max_pending_requests_hard_limit", 20_000),
    ]


class EvalServer:
    """One evalsvc process: gRPC server, executor and database."""

    def __init__(self, settings: Settings) -> None:
        """Build the parts from the settings (nothing is opened or bound yet). ConfigError names the
        flag whose value cannot be used (an unknown database URL, a missing or malformed file);
        SecretsConfigError or SecretsKeyError the secrets settings."""
        self.settings = settings
        settings.check_listeners()  # before the database is touched, as every setting is
        with _setting("dialects"):  # checked without --http-addr too: a typo must not wait for the day it is set
            dialect_mounts(settings.dialects)
        operator_secrets = OperatorSecrets(os.environ, settings.secrets_file)
        with _setting("db"):
            self.db = Database(
                settings.db,
                sqlite_synchronous=settings.sqlite_synchronous,
                idle_in_transaction_s=settings.idle_in_transaction_s,
            )
        # Keyed at start, from the database: every replica of a database signs with the same key.
        self.page_tokens = PageTokens(page_bytes=settings.max_message_bytes // 2)
        caps = StoredCaps.of(settings)
        self.secrets = SecretService(self.db, operator_secrets, self.page_tokens, caps.secrets, settings.secrets_key)
        self.bus = EventBus()
        self.metrics = Metrics(self.db)
        self.outbound = Outbound(settings)
        with _setting("price_table"):
            prices = PriceTable.from_file(settings.price_table)
        judge = JudgeDefaults(settings.judge_base_url, settings.judge_model, settings.judge_api_key)
        self.grading = GradingPool(settings.grade_processes, settings.grade_timeout_s, self.metrics)
        self.executor = Executor(
            self.db,
            self.bus,
            settings,
            self.metrics,
            outbound=self.outbound,
            prices=prices,
            judge=judge,
            secrets=self.secrets,
            grading=self.grading,
        )
        # Other replicas' commits reach this process's watchers, and the runs they end its executor (which
        # stops its work on them), through PostgreSQL notifications.
        self.listener = (
            None
            if self.db.is_sqlite
            else EventListener(settings.db, self.bus, self.db, self.metrics, on_run_ended=self.executor.run_ended)
        )
        self.limits = TenantLimits(settings)
        self.purger = RunPurger(self.db, settings.deleted_run_retention_s, self.metrics, on_expired=self.bus.end_runs)
        self.definitions = DefinitionService(
            self.db, self.secrets, self.outbound.allow, self.page_tokens, caps, self.limits, on_deleted=self.purger.wake
        )
        self.runs = RunService(
            self.db,
            self.bus,
            on_created=self.executor.created,
            on_cancelled=self.executor.run_ended,
            limits=self.limits,
            runs_cap=caps.runs,
            bytes_cap=caps.stored_bytes,
            deleted_run_retention_s=settings.deleted_run_retention_s,
            definitions=self.definitions,
            outbound=self.outbound,
            judge=judge,
            cache_default=mode_from_setting(settings.cache_default),
            secrets=self.secrets,
            page_tokens=self.page_tokens,
            # A run's target and graders together: every Run returned (and every run event) repeats them.
            max_definition_bytes=settings.max_message_bytes // 4,
        )
        self.datasets = DatasetService(self.db, self.page_tokens, caps, self.limits, on_deleted=self.purger.wake)
        self.generations = DatasetGenerations(
            self.db,
            self.outbound,
            generator_model(settings),
            settings.poll_interval_s,
            caps.dataset_items,
            caps.stored_bytes,
            self.metrics,
        )
        self.webhooks = WebhookService(self.db, self.outbound.allow, self.page_tokens, caps.webhooks)
        self.webhook_sender = WebhookSender(self.db, settings, self.outbound.allow, self.metrics)
        self.keys = KeyService(self.db, cache_s=settings.auth_cache_s)
        self.revoker = StreamRevoker(self.keys, self.bus, settings.auth_cache_s)
        self.bootstrap_key: str | None = None
        self.has_keys = False  # whether any API key exists, as of the start (for the start's key hint)
        self.keyless_streams = KeylessStreams(settings.health_watches_in_all)
        self.health = BoundedHealthServicer(self.keyless_streams)
        self.reflection = BoundedReflectionServicer(
            (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.keyless_streams,
        )
        # Checks four times per stall limit, but never more often than every 50 ms nor less than every 5 s.
        self.watchdog = Watchdog(self.metrics, self._report_progress, check_s=max(0.05, min(5.0, settings.stall_s / 4)))
        self._watchdog_task: asyncio.Task[None] | None = None
        self._serve_lock: ServeLock | None = None
        self._watchdog_stop = asyncio.Event()
        self._shutting_down = False
        self.port = 0
        self.metrics_port = 0
        self.gateway: Gateway | None = None
        authenticator, observer = Authenticator(self.keys), Observer(self.metrics)
        self.admission = Admission(settings, self.metrics)
        self.checker = RequestChecker()  # parses requests over 1 MiB before the loop may (evalsvc.api.decoding)
        self._interceptor = CallInterceptor(
            authenticator,
            observer,
            self.limits,
            max_message_bytes=settings.max_message_bytes,
            admission=self.admission,
            checker=self.checker,
        )
        # This process's services for in-process callers (the embedded gateway); filled by `_grpc_server`.
        self.local = LocalServices(
            CallInterceptor(authenticator, observer, self.limits, max_message_bytes=settings.max_message_bytes),
            max_message_bytes=settings.max_message_bytes,
            admission=self.admission,
            auth=authenticator,
        )
        self._server: grpc.aio.Server | None = None
        self._grpc_stopping: asyncio.Future[None] | None = None  # gRPC's stop, begun at the start of `stop`
        self._stack = contextlib.AsyncExitStack()
        self._started = False
        self._grace = settings.grace_s

    async def start(self) -> int:
        """Migrate (SQLite) or check (PostgreSQL) the schema, listen, start the executor; returns the bound port.

        Every step that starts something registers how to stop it on one exit stack, so `stop` undoes
        exactly what `start` did and a start that fails part-way stops what it had started before
        raising. Raises StartupError (an address, the database or its disk is unusable, said in one
        line), SchemaError (the database is not at this version's schema) or TlsConfigError."""
        # Before anything is written: a bad TLS setting must not cost a bootstrap key nobody saw.
        credentials = server_credentials(self.settings)
        http_tls = http_ssl_context(self.settings) if self.settings.http_addr else None
        async with contextlib.AsyncExitStack() as stack:
            await self._start(stack, credentials, http_tls)
            self._stack = stack.pop_all()
        self._started = True
        return self.port

    async def _start(
        self,
        stack: contextlib.AsyncExitStack,
        credentials: grpc.ServerCredentials | None,
        http_tls: ssl.SSLContext | None,
    ) -> None:
        # Every address first: an address in use fails the start before the database is touched.
        for field_name, what in LISTENERS:
            # gRPC always listens (an empty address was passed on to grpc, which failed after the migration);
            # the others listen only when given.
            if (addr := getattr(self.settings, field_name)) or field_name == "grpc_addr":
                check_bindable(addr, what, f"{flag_name(field_name)} / {env_name(field_name)}")
        # Then, before anything is written, this server's claim on a SQLite file; released last on stop.
        self._hold_database(stack)
        stack.push_async_callback(self.db.close)
        stack.push_async_callback(self.keys.close)  # after every call has ended, before the database closes
        stack.push_async_callback(self.outbound.close)
        stack.push_async_callback(self.grading.close)
        stack.push_async_callback(self.checker.close)  # after gRPC has stopped: no call starts a new checker
        async with self._database_step():
            await migrate.prepare(self.db)
            if self._serve_lock is not None:
                self._serve_lock.lost()  # takes the identity of the database file it has just opened
            await self.secrets.check_key()
            self.page_tokens.key = await server_keys.get_or_create(self.db, PAGE_TOKEN_KEY)
        server = self._grpc_server()
        warn_if_exposed("gRPC", self.settings.grpc_addr, credentials is not None)
        self.port = bind_grpc(server, self.settings.grpc_addr, credentials)
        self._server = server
        await server.start()
        stack.push_async_callback(self._stop_grpc)
        self.metrics.start_lag_sampler()
        stack.push_async_callback(self.metrics.close)  # the sampler, and /metrics once it serves
        if self.settings.http_addr:
            # In process: the gateway's calls go straight to the servicers (evalsvc.api.local).
            local = LocalChannel(self.local)
            self.gateway = Gateway(
                lambda _index: local,
                self.settings.http_addr,
                dialects=self.settings.dialects,
                settings=self.settings,
                tls=http_tls,
                key_check=local.key_refusal,
            )
            await listen("HTTP", self.settings.http_addr, self.gateway.start())
            stack.push_async_callback(self.gateway.stop)
        if self.settings.metrics_addr:
            self.metrics_port = await listen(
                "metrics", self.settings.metrics_addr, self.metrics.serve(self.settings.metrics_addr)
            )
        async with self._database_step():
            await self.executor.start()
        stack.push_async_callback(self.executor.stop)
        await self.generations.start()
        stack.push_async_callback(self.generations.stop)
        await self.webhook_sender.start()
        stack.push_async_callback(self.webhook_sender.stop)
        await self.purger.start()
        stack.push_async_callback(self.purger.stop)
        if self.listener is not None:
            self.listener.start()
            stack.push_async_callback(self.listener.stop)
        stack.callback(self.bus.close)
        self.revoker.start()
        stack.push_async_callback(self.revoker.stop)
        # Last of the steps that can fail, so a key is never minted by a start that then fails: the
        # next start would find a key and print none.
        async with self._database_step():
            if self.settings.bootstrap_key:  # after it a key exists: it found one or minted one
                self.bootstrap_key = await self.keys.bootstrap()
                self.has_keys = True
            else:
                self.has_keys = await self.keys.any_exist()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        stack.push_async_callback(self.health.enter_graceful_shutdown)
        for loop in self.executor.watched_loops():
            self.watchdog.watch(loop)
        self.watchdog.watch(self._watched_writer())
        self.watchdog.watch(self.generations.watched(self.settings.stall_s))
        self.watchdog.watch(self.purger.watched(self.settings.stall_s))
        self.watchdog.watch(self.webhook_sender.watched(self.settings.stall_s))
        if self._serve_lock is not None:
            self.watchdog.require(self._database_files_held)
        self._watchdog_task = asyncio.create_task(
            supervise("watchdog", lambda: self.watchdog.run(self._watchdog_stop), self._watchdog_stop, self.metrics),
            name="watchdog",
        )
        stack.push_async_callback(self._stop_watchdog)
        host = self.settings.grpc_addr.rsplit(":", 1)[0]
        log.info("evalsvc listening on %s:%d (database %s)", host, self.port, _safe_url(self.settings.db))

    def _hold_database(self, stack: contextlib.AsyncExitStack) -> None:
        """On a SQLite file: check its directory, then take its serve lock (evalsvc.store.serve_lock) for
        as long as this server runs, registering its release on `stack`. StartupError when another
        server holds it: this one would requeue the jobs that one is running. PostgreSQL (replicas share
        it) and in-memory SQLite take no lock."""
        path = sqlite_path(self.settings.db)
        if path is None:
            return
        check_database_directory(self.settings.db)
        lock = ServeLock(path)
        try:
            lock.acquire()
        except DatabaseInUse as exc:
            raise StartupError(
                f"cannot use the database {path}: {exc} (it holds {exc.lock_file}); "
                "SQLite takes one server per file: stop that one first, or use PostgreSQL for replicas"
            ) from exc
        except OSError as exc:
            raise StartupError(f"cannot use the database {path}: cannot lock {lock.path}: {_why(exc)}") from exc
        stack.callback(lock.release)
        self._serve_lock = lock
        # The lock is by path, and a hard link is another path to the same file: a second server started
        # through one served the file beside the first. A database with more than one link is refused.
        links = _link_count(path)
        if links > 1:
            raise StartupError(
                f"cannot use the database {path}: the file has {links} hard links, and the one-server-per-file "
                "lock is taken by path (a server started through another link would serve it too): remove the "
                "other links (a hard-linked backup, e.g. by `cp -al` or rsnapshot, is one: keep a copy instead, "
                "`evalsvc backup`; docs/operations.md, Backups)"
            )

    def _watched_writer(self) -> Watched:
        """The database writer, for the watchdog: every write of the service waits for it."""
        progress = Progress()
        self.db.group_writer.on_turn = progress.beat

        async def writes_waiting() -> bool:
            return self.db.group_writer.queued() > 0

        return Watched("writer", progress, writes_waiting, self.settings.stall_s)

    def _grpc_server(self) -> grpc.aio.Server:
        """The grpc.aio server with every service added (not bound yet); the same servicers, behind the
        same interceptor, are registered in `self.local` for the embedded gateway."""
        server = grpc.aio.server(
            options=server_options(self.settings),
            interceptors=[self._interceptor],
            maximum_concurrent_rpcs=grpc_limit(self.settings),
        )
        # (the generated add_*_to_server function, its servicer); each takes a server or LocalServices.
        services: tuple[tuple[Callable[[Any, Any], None], Any], ...] = (
            (
                eval_run_service_pb2_grpc.add_EvalRunServiceServicer_to_server,
                EvalRunServicer(self.runs, self.db, self.bus, self.settings, self.limits, self.page_tokens),
            ),
            (dataset_service_pb2_grpc.add_DatasetServiceServicer_to_server, DatasetServicer(self.datasets)),
            (
                dataset_generation_pb2_grpc.add_DatasetGenerationServiceServicer_to_server,
                DatasetGenerationServicer(self.generations),
            ),
            (grader_service_pb2_grpc.add_GraderServiceServicer_to_server, GraderServicer(self.definitions)),
            (target_service_pb2_grpc.add_TargetServiceServicer_to_server, TargetServicer(self.definitions)),
            (secret_service_pb2_grpc.add_SecretServiceServicer_to_server, SecretServicer(self.secrets)),
            (webhook_service_pb2_grpc.add_WebhookServiceServicer_to_server, WebhookServicer(self.webhooks)),
        )
        for add, servicer in services:
            add(servicer, server)
            add(servicer, self.local)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.local)  # the gateway's GET /healthz
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(self.reflection, server)
        return server

    @contextlib.asynccontextmanager
    async def _database_step(self) -> AsyncIterator[None]:
        """Turn a database that cannot serve (see `unavailable_cause`) into a one-line StartupError."""
        try:
            yield
        except Exception as exc:
            cause = unavailable_cause(exc)
            if cause is None:
                raise
            raise StartupError(f"cannot use the database {database_where(self.settings.db)}: {cause}") from exc

    async def _stop_watchdog(self) -> None:
        """From here on health stays NOT_SERVING, whatever the watchdog would say."""
        self._shutting_down = True
        self._watchdog_stop.set()
        if self._watchdog_task is not None:
            await self._watchdog_task

    async def _stop_grpc(self) -> None:
        """Wait until gRPC has stopped (started by `stop`): unary calls in progress had the grace period
        to finish."""
        if self._grpc_stopping is None and self._server is not None:
            self._grpc_stopping = asyncio.ensure_future(self._server.stop(self._grace))
        if self._grpc_stopping is not None:
            await self._grpc_stopping
            self._grpc_stopping = self._server = None

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: gRPC and the REST gateway take no new calls from the first moment, then the
        start is undone in reverse: report NOT_SERVING, end watches with UNAVAILABLE, stop claiming jobs and hand
        unfinished ones back, let unary calls finish within the grace period, then close the database.

        gRPC stopped taking calls only after the executor had stopped, and the executor's last writes
        wait for the database: with the database locked, new calls were taken and run for minutes
        after SIGTERM."""
        self._grace = self.settings.grace_s if grace is None else grace
        if self._server is not None and self._grpc_stopping is None:
            self._grpc_stopping = asyncio.ensure_future(self._server.stop(self._grace))
        if self.gateway is not None:  # the REST gateway too: its calls go straight to the services
            self.gateway.stop_accepting()
        stack, self._stack = self._stack, contextlib.AsyncExitStack()
        await stack.aclose()
        if self._started:  # a start that failed says only why, in one line
            self._started = False
            log.info("evalsvc stopped")

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    def _database_files_held(self) -> str | None:
        """For the watchdog: why this server's SQLite files are no longer the database's (removed or
        replaced while it served), after which it writes nothing more (see ServeLock.lost)."""
        assert self._serve_lock is not None
        if self.db.lost is None and (why := self._serve_lock.lost()) is not None:
            self.db.lose(f"the database {self._serve_lock.database} is lost: {why}")
        return self.db.lost  # lost for good: a later look that cannot tell must not turn health SERVING

    async def _report_progress(self, healthy: bool) -> None:
        """The watchdog's verdict: a stalled loop makes the whole server NOT_SERVING, so an
        orchestrator probing health restarts it; SERVING again once every loop makes progress."""
        if not self._shutting_down:
            await self._set_health(
                health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
            )

    async def wait_for_termination(self) -> None:
        """Block until the server stops."""
        if self._server is not None:
            await self._server.wait_for_termination()


def _show_bootstrap_key(server: EvalServer) -> bool:
    """Print the key this start minted, alone on stdout; False when it minted none."""
    if not server.bootstrap_key:
        return False
    log.warning("minted the first API key, for tenant 'default'; it is printed once on stdout")
    print(server.bootstrap_key, flush=True)
    return True


def key_instructions(db_url: str, keys_exist: bool) -> str:
    """How to get a key when this start printed none (only the first start on an empty database does,
    unless --bootstrap-key is off: then there may be no key at all yet)."""
    db = "" if db_url == Settings.db else f" --db '{_safe_url(db_url)}'"
    if not keys_exist:
        return f"there is no API key yet; `evalsvc keys create --tenant default{db}` makes one"
    # Not "the key printed at the first start still works": keys made with `evalsvc keys create` (or under
    # --bootstrap-key false) mean none was ever printed, and a printed one may have been revoked since.
    return (
        "API keys exist (one a first start printed is named 'bootstrap'); "
        f"`evalsvc keys create --tenant default{db}` makes another and `evalsvc keys list{db}` lists them"
    )


def _safe_url(url: str) -> str:
    """A database URL without its password, for logs."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


class ConfigError(ValueError):
    """A setting whose value cannot be used; `evalsvc serve` exits 2 with it, in one line."""


@contextlib.contextmanager
def _setting(field_name: str) -> Iterator[None]:
    """A failure to use setting `field_name` as a ConfigError naming its flag and variable."""
    try:
        yield
    except (OSError, ValueError, ArgumentError) as exc:
        raise ConfigError(f"{named(field_name)}: {exc}") from exc


class StartupError(RuntimeError):
    """The server cannot start for a reason its one-line message names (an address in use, a
    database that cannot be opened or written); `evalsvc serve` exits 1 with it."""


def bind_grpc(server: grpc.aio.Server, addr: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind the gRPC server to addr (without port sharing: `grpc.so_reuseport` is 0); the bound port.

    Start-up has tried the address with a plain socket (`check_bindable`) already: that names the
    cause (in use, not this host's) in Python's words, and spares the log grpc core's own error
    line, which it prints whenever a bind fails."""
    try:
        port = server.add_insecure_port(addr) if credentials is None else server.add_secure_port(addr, credentials)
    except RuntimeError as exc:  # lost a race for the port since the check
        raise StartupError(f"cannot listen for gRPC on {addr}: {exc}") from exc
    if port == 0:
        raise StartupError(f"cannot listen for gRPC on {addr}")
    return port


def check_bindable(addr: str, what: str, flags: str) -> None:
    """StartupError naming addr and its `flags` unless a listener could bind it now: a HOST:PORT of
    this machine, free. Each cause is said as what it is: `nonsense` was "invalid literal for int()",
    and an address of another machine "is another evalsvc running?"."""
    host, colon, port_text = addr.rpartition(":")
    failed = f"cannot listen for {what} on {addr} ({flags})"
    if not colon or not port_text.isdigit():
        raise StartupError(f"{failed}: not HOST:PORT (such as 127.0.0.1:8080; port 0 picks a free one)")
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        # `[::1:50051` was read as host ::1 and passed the check; grpc then failed to bind it, unnamed.
        raise StartupError(f"{failed}: not HOST:PORT (an IPv6 address goes in brackets, such as [::1]:8080)")
    port = int(port_text)
    if port > 65535:
        raise StartupError(f"{failed}: port {port} is not between 0 and 65535")
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise StartupError(f"{failed}: {host!r} is not an address or a name that resolves ({_why(exc)})") from exc
    if port == 0:
        return
    for family, kind, proto, _name, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc does: TIME_WAIT is no conflict
            try:
                probe.bind(address)
            except OSError as exc:
                raise StartupError(f"{failed}: {_bind_problem(exc, addr)}") from exc


def _bind_problem(exc: OSError, addr: str) -> str:
    """Why `addr` cannot be bound, with what to do about it: another evalsvc is the likely holder of an
    address in use, while an address that is not this machine's is a typo or another machine's."""
    if exc.errno == errno.EADDRINUSE:
        return f"{_why(exc)}{ADDRESS_HINT}"
    if exc.errno == errno.EADDRNOTAVAIL:
        host = addr.rpartition(":")[0].strip("[]")
        return f"{_why(exc)}: {host} is not an address of this machine (0.0.0.0 listens on all of them)"
    return _why(exc)


def _link_count(path: Path) -> int:
    """How many hard links the database file has (1 when it does not exist yet)."""
    try:
        return os.stat(path).st_nlink
    except FileNotFoundError:
        return 1


def _why(exc: OSError) -> str:
    """An OSError's cause in the system's words ("Address already in use"), without the call's wording."""
    return exc.strerror or str(exc)  # a resolver's error (socket.gaierror) has its own numbers and words


async def listen(what: str, addr: str, starting: Awaitable[int]) -> int:
    """Await a listener's start; a bind failure (lost a race for the address since `check_bindable`)
    becomes a StartupError naming the address."""
    try:
        return await starting
    except OSError as exc:
        raise StartupError(f"cannot listen for {what} on {addr}: {_bind_problem(exc, addr)}") from exc


def check_database_directory(url: str) -> None:
    """Refuse a SQLite file whose directory is missing or read-only, naming it: SQLite itself says
    only "unable to open database file"."""
    path = sqlite_path(url)
    if path is None:
        return
    directory = path.absolute().parent
    if not directory.is_dir():
        raise StartupError(f"cannot use the database {path}: its directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise StartupError(f"cannot use the database {path}: its directory {directory} is read-only")


def database_where(url: str) -> str:
    """The database named for an operator: its file (with the free space when nearly none is left,
    since SQLite reports a full disk as a mere I/O error when it cannot grow its shared memory), or
    its URL without password."""
    path = sqlite_path(url)
    if path is None:
        return _safe_url(url)
    try:
        free = shutil.disk_usage(path.absolute().parent).free
    except OSError:
        return str(path)
    return f"{path} (its disk is full: {free} bytes free)" if free < LOW_DISK_BYTES else str(path)


def freeze_startup_objects() -> None:
    """Move every object alive after start-up (modules, classes, the libraries' tables: ~450,000) out
    of the cyclic garbage collector's reach. Its full collections stop rescanning them: during a
    large run they were each 90-160 ms with the event loop stopped, 14 per 250,000 evaluations (the
    loop-lag p99); frozen, 15-30 ms. Only for a process that serves one server for its lifetime
    (`serve`): objects frozen are never collected, so a test process starting many servers keeps
    the default."""
    gc.collect()
    gc.freeze()


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    # Handled from before the start: a SIGTERM that came after the start's last line but before the handlers
    # killed the process with no shutdown at all (exit -15). During the start a signal ends the process at
    # once: a start that hangs (a migration lock, a locked SQLite file) ignored SIGTERM and Ctrl-C.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _exit_now, "a signal arrived during the start")
    server = EvalServer(settings)
    log.info("evalsvc starting (version %s, database %s)", package_version(), _safe_url(settings.db))
    try:
        await server.start()
    except BaseException:
        await server.stop(grace=0)  # whatever started before the failure (gRPC server, executor) must not linger
        _show_bootstrap_key(server)  # minted before the failure and valid: the only chance to see it
        raise
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)  # started: from here a signal is a graceful shutdown
    if not _show_bootstrap_key(server):
        log.info("API keys: %s", key_instructions(settings.db, server.has_keys))
    freeze_startup_objects()  # after the handlers: a SIGTERM during its collection still shuts down cleanly
    await stop.wait()
    limit_s = settings.grace_s + SHUTDOWN_MARGIN_S
    log.info("signal received; shutting down (grace %.1f s, at most %.1f s in all)", settings.grace_s, limit_s)
    stopping = asyncio.ensure_future(server.stop())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _second_signal, stopping)
    done, _ = await asyncio.wait({stopping}, timeout=limit_s)
    if not done:
        _exit_now(f"the shutdown took longer than {limit_s:g} s (--grace-s + {SHUTDOWN_MARGIN_S:g} s)")
    await stopping


def _second_signal(stopping: asyncio.Future[None]) -> None:
    """A signal during the shutdown ends the process at once, exit 1; one after it completed (its last
    line, `evalsvc stopped`, written) ends it at once too, exit 0: nothing is left to do."""
    if stopping.done():
        logging.shutdown()
        os._exit(0)
    _exit_now("a second signal arrived")


# What a shutdown may take past --grace-s: the executor records what finished and hands its claims back,
# a few transactions. A database that does not answer (locked, unreachable) held a SIGTERM for minutes
# (for good on PostgreSQL, which has no statement timeout here), while an orchestrator waited.
SHUTDOWN_MARGIN_S = 10.0


def _exit_now(why: str) -> None:
    """End the process without finishing the start or the shutdown. Nothing acknowledged is lost: what was
    recorded is committed, and jobs still leased are claimed again when their leases expire (at the next
    start, on SQLite)."""
    log.warning("%s: exiting now; jobs still leased run again once their leases expire", why)
    logging.shutdown()
    os._exit(1)
