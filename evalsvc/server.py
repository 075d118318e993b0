"""The gRPC server: wiring, lifecycle and graceful shutdown.

`EvalServer` owns the database, the event bus, the executor and the grpc.aio server. Tests and
embedders start it in-process on port 0; `evalsvc serve` runs it until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from evalsvc.api.auth import Authenticator
from evalsvc.api.datasets import DatasetGenerationServicer, DatasetServicer
from evalsvc.api.definitions import GraderServicer, TargetServicer
from evalsvc.api.eval_runs import EvalRunServicer
from evalsvc.api.interceptor import CallInterceptor
from evalsvc.api.observability import Observer
from evalsvc.api.secrets import SecretServicer
from evalsvc.api.webhooks import WebhookServicer
from evalsvc.auth.revocation import StreamRevoker
from evalsvc.auth.service import KeyService
from evalsvc.config import Settings
from evalsvc.datasets.generation import DatasetGenerations, generator_model
from evalsvc.datasets.service import DatasetService
from evalsvc.definitions.service import DefinitionService
from evalsvc.events.bus import EventBus
from evalsvc.events.listener import EventListener
from evalsvc.execution.cache import mode_from_setting
from evalsvc.execution.executor import Executor
from evalsvc.execution.outbound import Outbound
from evalsvc.execution.targets import PriceTable
from evalsvc.gateway.server import Gateway
from evalsvc.graders.judge import JudgeDefaults
from evalsvc.graders.pool import GradingPool
from evalsvc.limits import TenantLimits
from evalsvc.liveness import Watchdog, supervise
from evalsvc.metrics import Metrics
from evalsvc.runs.service import RunService
from evalsvc.secrets.operator import OperatorSecrets
from evalsvc.secrets.service import SecretService
from evalsvc.store import migrate
from evalsvc.store.db import Database
from evalsvc.tls import server_credentials, warn_if_exposed
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
    """Channel arguments: message size, stream limits, keepalive, and room for reconnect bursts."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        # Past it a new connection is closed as soon as it is accepted: file descriptors stay bounded.
        ("grpc.max_allowed_incoming_connections", settings.max_connections),
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
        """Raises SecretsConfigError or SecretsKeyError for unusable secrets settings (nothing is opened yet)."""
        self.settings = settings
        operator_secrets = OperatorSecrets(os.environ, settings.secrets_file)
        self.db = Database(settings.db, sqlite_synchronous=settings.sqlite_synchronous)
        self.secrets = SecretService(self.db, operator_secrets, settings.secrets_key)
        self.bus = EventBus()
        self.metrics = Metrics(self.db)
        self.outbound = Outbound(settings)
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
        # Other replicas' commits reach this process's watchers through PostgreSQL notifications.
        self.listener = None if self.db.is_sqlite else EventListener(settings.db, self.bus, self.db, self.metrics)
        self.limits = TenantLimits(settings)
        self.definitions = DefinitionService(self.db, self.secrets)
        self.runs = RunService(
            self.db,
            self.bus,
            on_created=self.executor.wake,
            on_cancelled=self.executor.cancel_run,
            limits=self.limits,
            definitions=self.definitions,
            outbound=self.outbound,
            judge=judge,
            cache_default=mode_from_setting(settings.cache_default),
            secrets=self.secrets,
        )
        self.datasets = DatasetService(self.db)
        self.generations = DatasetGenerations(
            self.db, self.outbound, generator_model(settings), settings.poll_interval_s
        )
        self.webhooks = WebhookService(self.db, self.outbound.allow)
        self.webhook_sender = WebhookSender(self.db, settings, self.outbound.allow, self.metrics)
        self.keys = KeyService(self.db, cache_s=settings.auth_cache_s)
        self.revoker = StreamRevoker(self.keys, self.bus, settings.auth_cache_s)
        self.bootstrap_key: str | None = None
        self.health = health.aio.HealthServicer()
        # Checks four times per stall limit, but never more often than every 50 ms nor less than every 5 s.
        self.watchdog = Watchdog(self.metrics, self._report_progress, check_s=max(0.05, min(5.0, settings.stall_s / 4)))
        self._watchdog_task: asyncio.Task[None] | None = None
        self._watchdog_stop = asyncio.Event()
        self._shutting_down = False
        self.port = 0
        self.metrics_port = 0
        self.gateway: Gateway | None = None
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        """Migrate (SQLite) or check (PostgreSQL) the schema, start the executor and listen; returns the bound port.

        Raises SchemaError when a shared database is not at this version's schema revision."""
        # Before anything is written: a bad TLS setting must not cost a bootstrap key nobody saw.
        credentials = server_credentials(self.settings)
        try:
            await migrate.prepare(self.db)
            await self.secrets.check_key()
        except BaseException:
            await self.outbound.close()
            await self.db.close()
            raise
        if self.settings.bootstrap_key:
            self.bootstrap_key = await self.keys.bootstrap()
        server = grpc.aio.server(
            options=server_options(self.settings),
            interceptors=[CallInterceptor(Authenticator(self.keys), Observer(self.metrics))],
            maximum_concurrent_rpcs=self.settings.max_concurrent_rpcs,
        )
        eval_run_service_pb2_grpc.add_EvalRunServiceServicer_to_server(
            EvalRunServicer(self.runs, self.db, self.bus, self.settings, self.limits), server
        )
        dataset_service_pb2_grpc.add_DatasetServiceServicer_to_server(DatasetServicer(self.datasets), server)
        dataset_generation_pb2_grpc.add_DatasetGenerationServiceServicer_to_server(
            DatasetGenerationServicer(self.generations), server
        )
        grader_service_pb2_grpc.add_GraderServiceServicer_to_server(GraderServicer(self.definitions), server)
        target_service_pb2_grpc.add_TargetServiceServicer_to_server(TargetServicer(self.definitions), server)
        secret_service_pb2_grpc.add_SecretServiceServicer_to_server(SecretServicer(self.secrets), server)
        webhook_service_pb2_grpc.add_WebhookServiceServicer_to_server(WebhookServicer(self.webhooks), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        warn_if_exposed(self.settings.grpc_addr, credentials)
        try:
            if credentials is None:
                self.port = server.add_insecure_port(self.settings.grpc_addr)
            else:
                self.port = server.add_secure_port(self.settings.grpc_addr, credentials)
        except RuntimeError:  # grpc's "Failed to bind": the address is taken or not this machine's
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {self.settings.grpc_addr}: the address is in use or not available")
        await server.start()
        self._server = server
        self.metrics.start_lag_sampler()
        await self.executor.start()
        await self.generations.start()
        self.revoker.start()
        await self.webhook_sender.start()
        if self.listener is not None:
            self.listener.start()
        if self.settings.http_addr:
            host = self.settings.grpc_addr.rsplit(":", 1)[0]
            if host in ("", "0.0.0.0", "[::]", "::"):
                host = "127.0.0.1" if credentials is None else "localhost"
            self.gateway = Gateway(
                f"{host}:{self.port}",
                self.settings.http_addr,
                root_certificates=self.settings.tls_cert if credentials is not None else "",
                dialects=self.settings.dialects,
                settings=self.settings,
            )
            await self.gateway.start()
        if self.settings.metrics_addr:
            self.metrics_port = await self.metrics.serve(self.settings.metrics_addr)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        for loop in self.executor.watched_loops():
            self.watchdog.watch(loop)
        self._watchdog_task = asyncio.create_task(
            supervise("watchdog", lambda: self.watchdog.run(self._watchdog_stop), self._watchdog_stop, self.metrics),
            name="watchdog",
        )
        host = self.settings.grpc_addr.rsplit(":", 1)[0]
        log.info("evalsvc listening on %s:%d (database %s)", host, self.port, _safe_url(self.settings.db))
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: report NOT_SERVING, end watches with UNAVAILABLE, let unary calls finish
        within the grace period, stop claiming jobs and hand unfinished ones back."""
        grace = self.settings.grace_s if grace is None else grace
        self._shutting_down = True
        self._watchdog_stop.set()
        if self._watchdog_task is not None:
            await self._watchdog_task
        await self.health.enter_graceful_shutdown()
        if self.gateway is not None:
            await self.gateway.stop()
        await self.revoker.stop()
        self.bus.close()
        if self.listener is not None:
            await self.listener.stop()
        if self._server is not None:
            await asyncio.gather(
                self._server.stop(grace), self.executor.stop(), self.generations.stop(), self.webhook_sender.stop()
            )
        await self.grading.close()
        await self.metrics.close()
        await self.outbound.close()
        await self.db.close()
        log.info("evalsvc stopped")

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

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


def key_instructions(db_url: str) -> str:
    """How to get a key when this start printed none (only the first start on an empty database does)."""
    db = "" if db_url == Settings.db else f" --db '{_safe_url(db_url)}'"
    return (
        f"the key printed at the first start still works; `evalsvc keys create --tenant default{db}` makes another"
        f" and `evalsvc keys list{db}` lists them"
    )


def _safe_url(url: str) -> str:
    """A database URL without its password, for logs."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    server = EvalServer(settings)
    try:
        await server.start()
    except BaseException:
        await server.stop(grace=0)  # whatever started before the failure (gRPC server, executor) must not linger
        _show_bootstrap_key(server)  # minted before the failure and valid: the only chance to see it
        raise
    if not _show_bootstrap_key(server):
        log.info("API keys: %s", key_instructions(settings.db))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received; shutting down (grace %.1f s)", settings.grace_s)
    await server.stop()
