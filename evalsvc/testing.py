"""A real evalsvc in your own tests: the server in process, on free ports, over a throwaway database.

    from evalsvc.testing import EvalServiceTestServer

    async def test_my_pipeline() -> None:
        async with EvalServiceTestServer() as server:
            created = await server.runs.CreateRun(request)       # grpc.aio stub, the key already attached
            ...                                                  # or your own client at server.grpc_target
                                                                 # with server.api_key

It starts the same `EvalServer` as `evalsvc serve` (the executor, graders and event bus included), so what
passes here passes against a deployed server; only the defaults differ: port 0, a temporary SQLite file
(deleted on exit) unless `database_url` is given, quick polling, and no caching of API key checks. As
Temporal's `temporalio.testing` environments do, it is an async context manager that owns everything it
started and stops it on exit, in reverse order.

Replicas: several of them may share one PostgreSQL `database_url` for runs, keys and limits, but their
watchers hear of each other's events only across processes: a replica ignores the notifications its own
process sent (its own bus delivered those events already), and two servers in one process are one process.
To watch on one replica what another executes, start them as separate processes (`evalsvc serve`).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from types import TracebackType
from typing import Any, Self

import grpc

from evalsvc.auth.service import DEFAULT_TENANT
from evalsvc.config import Settings
from evalsvc.server import EvalServer
from evalsvc.v1 import dataset_service_pb2_grpc, eval_run_service_pb2_grpc

HOST = "127.0.0.1"

# What differs from `evalsvc serve`'s defaults: free ports, quick polling and shutdown, and API key checks
# that see a revoked key at once (the server caches them for a few seconds by default).
TEST_DEFAULTS: dict[str, Any] = {
    "grpc_addr": f"{HOST}:0",
    "poll_interval_s": 0.2,
    "grace_s": 1.0,
    "auth_cache_s": 0.0,
}


def settings_for_tests(database_url: str, **overrides: Any) -> Settings:
    """Settings for a test server over `database_url`: `TEST_DEFAULTS`, then `overrides` (Settings' field names).

    The process environment is not read (an `EVALSVC_*` variable of the machine must not change a test)."""
    return Settings.from_env({}, **{**TEST_DEFAULTS, "db": database_url, **overrides})


class _ApiKey:
    """Adds `authorization: Bearer <key>` to every call, as a client library would."""

    def __init__(self, key: str) -> None:
        self._key = key

    def _with_key(self, details: Any) -> Any:
        metadata = grpc.aio.Metadata(*(details.metadata or grpc.aio.Metadata()))
        metadata.add("authorization", f"Bearer {self._key}")
        return details._replace(metadata=metadata)


# grpc.aio files an interceptor under the first call kind it implements, so one class per kind (evalsvc has
# unary and server-streaming methods only).
class _UnaryKey(_ApiKey, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_key(details), request)


class _StreamKey(_ApiKey, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_key(details), request)


def keyed_channel(target: str, key: str, options: list[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
    """An insecure channel to `target` (host:port) that authenticates every call with `key`."""
    return grpc.aio.insecure_channel(target, options=options, interceptors=[_UnaryKey(key), _StreamKey(key)])


class EvalServiceTestServer:
    """An in-process evalsvc for a test: `async with EvalServiceTestServer() as server: ...`.

    - `database_url`: the database to use (SQLAlchemy URL); by default a SQLite file in a temporary
      directory that is deleted on exit.
    - `http_gateway`: also serve the REST gateway (and run pages) on a free port: `server.http_url`.
    - `tenant`: the tenant of `server.api_key`, minted at start (tenant `default` by default).
    - `settings`: a complete `Settings` to start from instead of `settings_for_tests(database_url)`.
    - keyword overrides: any `Settings` field, e.g. `max_items_per_run=10` or `dialects="agno"`.

    Inside the block: `server.grpc_target` (host:port), `server.api_key`, `server.channel` (a grpc.aio
    channel that presents the key on every call), the `server.runs` and `server.datasets` stubs on it,
    `server.http_url` (None without the gateway) and `server.server`, the `EvalServer` itself.
    """

    def __init__(
        self,
        *,
        database_url: str | None = None,
        http_gateway: bool = False,
        tenant: str = DEFAULT_TENANT,
        settings: Settings | None = None,
        **overrides: Any,
    ) -> None:
        if http_gateway:
            overrides.setdefault("http_addr", f"{HOST}:0")
        self._database_url = database_url
        self._base = settings
        self._overrides = overrides
        self._tenant = tenant
        self._tmp_dir: str | None = None
        self._server: EvalServer | None = None
        self._channel: grpc.aio.Channel | None = None
        self._api_key = ""

    async def __aenter__(self) -> Self:
        try:
            srv = EvalServer(self._settings())
            await srv.start()
            self._server = srv
            self._api_key = await self._mint_key(srv)
            self._channel = keyed_channel(self.grpc_target, self._api_key)
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close()

    def _settings(self) -> Settings:
        if self._base is not None:
            return dataclasses.replace(self._base, **self._overrides)
        url = self._database_url
        if url is None:
            self._tmp_dir = tempfile.mkdtemp(prefix="evalsvc-test-")
            url = f"sqlite+aiosqlite:///{self._tmp_dir}/evalsvc.db"
        return settings_for_tests(url, **self._overrides)

    async def _mint_key(self, srv: EvalServer) -> str:
        """The key the server minted for tenant `default` on its empty database, else a new one for `tenant`."""
        if self._tenant == DEFAULT_TENANT and srv.bootstrap_key:
            return srv.bootstrap_key
        key, _ = await srv.keys.create(self._tenant, name="evalsvc.testing")
        return key

    async def _close(self) -> None:
        """Undo whatever was started, last first; safe after a start that failed part-way."""
        channel, self._channel = self._channel, None
        srv, self._server = self._server, None
        self._api_key = ""
        try:
            if channel is not None:
                await channel.close()
            if srv is not None:
                await srv.stop()
        finally:
            if self._tmp_dir is not None:
                shutil.rmtree(self._tmp_dir, ignore_errors=True)
                self._tmp_dir = None

    @property
    def server(self) -> EvalServer:
        """The running `EvalServer` (its settings, database, executor...)."""
        if self._server is None:
            raise RuntimeError("the test server is not running: use it inside `async with`")
        return self._server

    @property
    def grpc_target(self) -> str:
        """host:port of the gRPC API."""
        return f"{HOST}:{self.server.port}"

    @property
    def http_url(self) -> str | None:
        """Base URL of the REST gateway (`http_gateway=True` or an http_addr override), else None."""
        gateway = self.server.gateway
        return None if gateway is None else f"{gateway.scheme}://{HOST}:{gateway.port}"

    @property
    def api_key(self) -> str:
        """An API key of `tenant`, minted at start."""
        if not self._api_key:
            raise RuntimeError("the test server is not running: use it inside `async with`")
        return self._api_key

    @property
    def channel(self) -> grpc.aio.Channel:
        """A channel to the server that presents `api_key` on every call."""
        if self._channel is None:
            raise RuntimeError("the test server is not running: use it inside `async with`")
        return self._channel

    @property
    def runs(self) -> eval_run_service_pb2_grpc.EvalRunServiceAsyncStub:
        """EvalRunService on `channel`."""
        return eval_run_service_pb2_grpc.EvalRunServiceStub(self.channel)

    @property
    def datasets(self) -> dataset_service_pb2_grpc.DatasetServiceAsyncStub:
        """DatasetService on `channel`."""
        return dataset_service_pb2_grpc.DatasetServiceStub(self.channel)
