"""Running the gateway: inside `evalsvc serve` (--http-addr) or alone (`evalsvc gateway`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import uvicorn

from evalsvc.gateway.app import create_app

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

    def __init__(self, grpc_target: str, http_addr: str, *, root_certificates: str = "", dialects: str = "all") -> None:
        host, _, port = http_addr.rpartition(":")
        app = create_app(lambda: channel_to(grpc_target, root_certificates=root_certificates), dialects)
        self._server = _QuietSignals(uvicorn.Config(app, host=host or "127.0.0.1", port=int(port), log_level="warning"))
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> int:
        """Listen; returns the bound port (useful with port 0). OSError when the address cannot be bound."""
        config = self._server.config
        try:
            # Bound here rather than by uvicorn, which answers a taken port with sys.exit inside its task.
            listener = socket.create_server(
                (config.host, config.port), family=socket.AF_INET6 if ":" in config.host else socket.AF_INET
            )
        except OSError as exc:
            raise OSError(f"cannot listen on {config.host}:{config.port} (HTTP gateway): {exc.strerror}") from exc
        self._task = asyncio.create_task(self._server.serve(sockets=[listener]))
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
