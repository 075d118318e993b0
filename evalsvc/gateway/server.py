"""Running the gateway: inside `evalsvc serve` (--http-addr) or alone (`evalsvc gateway`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import uvicorn

from evalsvc.gateway.app import create_app
from evalsvc.gateway.dialects.base import DialectOptions

log = logging.getLogger(__name__)


class _QuietSignals(uvicorn.Server):
    """uvicorn without its own signal handling: the process that embeds it owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def channel_to(target: str, *, root_certificates: str = "") -> grpc.aio.Channel:
    """A channel to the gRPC service (TLS when a CA or server certificate file is given)."""
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.keepalive_time_ms", 30_000)]
    if root_certificates:
        credentials = grpc.ssl_channel_credentials(Path(root_certificates).read_bytes())
        return grpc.aio.secure_channel(target, credentials, options=options)
    return grpc.aio.insecure_channel(target, options=options)


class Gateway:
    """The gateway's HTTP server on the running event loop."""

    def __init__(
        self,
        grpc_target: str,
        http_addr: str,
        *,
        root_certificates: str = "",
        dialects: str = "all",
        dialect_options: DialectOptions | None = None,
    ) -> None:
        host, _, port = http_addr.rpartition(":")
        channel = functools.partial(channel_to, grpc_target, root_certificates=root_certificates)
        app = create_app(channel, dialects, dialect_options)
        self._server = _QuietSignals(uvicorn.Config(app, host=host or "127.0.0.1", port=int(port), log_level="warning"))
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises why it could not start
                raise OSError("the HTTP gateway did not start")
            await asyncio.sleep(0.01)  # uvicorn offers no start event to await
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        log.info("evalsvc REST gateway listening on %s:%d", self._server.config.host, self.port)
        return self.port

    async def stop(self) -> None:
        """Stop accepting, let open responses end, close the channel."""
        self._server.should_exit = True
        if self._task is not None:
            await self._task
