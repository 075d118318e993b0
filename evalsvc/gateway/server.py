"""Running the gateway: inside `evalsvc serve` (--http-addr) or alone (`evalsvc gateway`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import h11
import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from evalsvc.config import Settings
from evalsvc.errors import Reason, ServiceError, to_status
from evalsvc.gateway.app import create_app, routing_errors, to_json, upstream_of
from evalsvc.gateway.dialects.base import DialectOptions
from evalsvc.gateway.keys import KeyCheck, PreflightKeys
from evalsvc.gateway.reachability import UpstreamLog
from evalsvc.gateway.request_limits import MAX_INCOMPLETE_HEAD_BYTES, RequestLimits
from evalsvc.gateway.upstream import ChannelFactory
from evalsvc.tls import read_pem, warn_if_exposed

log = logging.getLogger(__name__)


class _QuietSignals(uvicorn.Server):
    """uvicorn without its own signal handling: the process that embeds it owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bounded_protocol(max_connections: int, header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol with two bounds it lacks, so idle or slow clients cannot hold file
    descriptors: at most `max_connections` open connections (past it a connection gets a 503 with
    Retry-After and is closed at once), and `header_timeout_s` for a request's headers to arrive, on a
    new connection and after each response (uvicorn's own keep-alive timeout only closes connections
    that send nothing at all after a response; a slowloris client sending a byte at a time would
    otherwise stay forever)."""

    # AutoHTTPProtocol is a variable (httptools' protocol, or h11's when httptools is absent), not a class mypy
    # can subclass: the one place the gateway's server is untyped.
    class BoundedHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
        refused = False
        header_timer: asyncio.TimerHandle | None = None
        discarding = False  # answered and closing while the body still arrives: what arrives is dropped
        linger_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:
            # Nagle's algorithm off, as asyncio does itself only for sockets made with proto IPPROTO_TCP:
            # those Gateway.start() accepts on (socket.create_server's) have proto 0, and each small
            # response waited for the client's delayed ACK, 40 ms a request.
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if len(self.server_state.connections) >= max_connections:
                # Answer at once and half-close; what the client sends meanwhile is read and dropped
                # (closing on unread data would reset the connection and lose the answer).
                self.refused = True
                transport.write(TOO_MANY_CONNECTIONS)
                if transport.can_write_eof():
                    transport.write_eof()
                self.header_timer = self.loop.call_later(header_timeout_s, transport.close)
                return
            super().connection_made(_Lingering(transport, self))
            self._await_headers()

        def data_received(self, data: bytes) -> None:
            if not self.refused and not self.discarding:
                super().data_received(data)

        def body_unread(self) -> bool:
            """Whether the request being answered still has body to come (h11 only: httptools' parser
            does not say; its connections close at once)."""
            conn = getattr(self, "conn", None)
            return conn is not None and conn.their_state is h11.SEND_BODY

        def linger(self, transport: asyncio.Transport) -> None:
            """Close once the client has read the answer and closed, or after LINGER_S: the rest of its
            body is read and dropped meanwhile (`_Lingering`)."""
            self.discarding = True
            if transport.can_write_eof():  # not over TLS: there the answer is followed by nothing until the close
                transport.write_eof()
            transport.resume_reading()  # paused, maybe, while the unread body filled uvicorn's buffer
            self.linger_timer = self.loop.call_later(LINGER_S, transport.close)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            if self.linger_timer is not None:
                self.linger_timer.cancel()
            if not self.refused:
                super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._await_headers()

        def _await_headers(self) -> None:
            """Close the connection unless a new request's headers have arrived within the timeout
            (uvicorn starts a new request-response cycle once they have)."""
            if self.header_timer is not None:
                self.header_timer.cancel()
            waiting_since = self.cycle
            self.header_timer = self.loop.call_later(
                header_timeout_s, lambda: self.cycle is waiting_since and self.transport.close()
            )

    return BoundedHTTPProtocol


def _every_body(_declared: int | None) -> bool:
    """In process the key check is the calls' own, cached and no call: every body is checked first."""
    return True


# How long a connection answered before its body arrived whole (a refused key, a body too slow) reads
# and drops the rest before it closes: closed at once, with the body unread, the kernel resets the
# connection, and a client still sending (most send the whole body before reading) got a reset, not its 401.
LINGER_S = 2.0


class _Lingering:
    """The transport as uvicorn's protocol sees it: `close` while the request's body still arrives
    half-closes instead (the answer, then FIN; over TLS, which cannot half-close, the answer alone) and
    lets the protocol drop the rest (`linger`); every other close, and everything else, is the
    transport's own. Over TLS it had closed at once: a client still sending got SSLEOFError, not its 401."""

    def __init__(self, transport: asyncio.Transport, protocol: Any) -> None:
        self._transport = transport
        self._protocol = protocol
        self._closing = False

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if not self._transport.is_closing() and self._protocol.body_unread():
            self._protocol.linger(self._transport)
        else:
            self._transport.close()

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


RETRY_AFTER_S = 1
# The google.rpc.Status every other refusal carries (ErrorInfo, RetryInfo); it had `"details": []`.
_REFUSAL_BODY = json.dumps(
    to_json(
        to_status(
            ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                Reason.GATEWAY_CONNECTIONS_FULL,
                "too many HTTP connections; retry later",
                retry_after_s=RETRY_AFTER_S,
            )
        )
    ),
    separators=(",", ":"),
).encode()
TOO_MANY_CONNECTIONS = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
    + f"retry-after: {RETRY_AFTER_S}\r\ncontent-length: {len(_REFUSAL_BODY)}\r\n\r\n".encode()
    + _REFUSAL_BODY
)


class GatewayConfigError(ValueError):
    """A flag of the standalone gateway's own (`--grpc-target`) cannot be used; `evalsvc gateway` exits 2
    with it, in one line."""


def remote_channels(target: str, *, root_certificates: str = "") -> ChannelFactory:
    """Channels to the gRPC service at `target`, for the standalone gateway (`evalsvc gateway`); over TLS
    verified with the CA file `root_certificates` when one is given.

    Both are checked here, before the gateway starts: a CA file that cannot be read was a traceback from
    the app's start (TlsConfigError now), and a target grpc cannot connect to started a gateway whose
    every call failed (GatewayConfigError)."""
    check_target(target)
    roots = read_pem(root_certificates, "--grpc-ca", "CERTIFICATE") if root_certificates else None
    upstream_log = UpstreamLog(target)  # the log's word on whether the target can be reached
    return lambda index: upstream_log.channel(channel_to(target, roots, index))


# What `--grpc-target` takes, of the target strings grpc knows: HOST:PORT (a name, an IPv4 address or a
# bracketed IPv6 one) alone or after `dns:` (and an authority), or a Unix socket. Whatever else grpc
# would take as a host name to resolve, with port 443 when none is given: `nonsense` was one.
_HOST_PORT = re.compile(r"(?:dns:(?://[^/]*/)?)?(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})")
_SOCKET_SCHEMES = ("unix:", "unix-abstract:")
MAX_RECONNECT_BACKOFF_MS = 5_000


def check_target(target: str) -> None:
    """GatewayConfigError unless `target` is a gRPC target the gateway can connect to (`_HOST_PORT`)."""
    if target.startswith(_SOCKET_SCHEMES) and target.partition(":")[2]:
        return
    address = _HOST_PORT.fullmatch(target)
    if address is None or not 0 < int(address[1]) < 65536:
        raise GatewayConfigError(
            f"--grpc-target {target!r} is not HOST:PORT (nor dns:///HOST:PORT, unix:PATH or unix-abstract:NAME)"
        )


def channel_to(target: str, root_certificates: bytes | None = None, index: int = 0) -> grpc.aio.Channel:
    """A channel to the gRPC service (TLS when CA certificates are given): each `index` its own HTTP/2
    connection (a local subchannel pool), for the gateway's pool of channels."""
    options = [
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.use_local_subchannel_pool", 1),
        # A restarted server is reached again within seconds (grpc's default backoff grows to 120 s, every
        # call and GET /healthz answering 503 UNREACHABLE meanwhile, the gateways of a rolling restart together).
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        ("evalsvc.gateway.channel", index),
    ]
    if root_certificates is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates)
        return grpc.aio.secure_channel(target, credentials, options=options)
    return grpc.aio.insecure_channel(target, options=options)


class Gateway:
    """The gateway's HTTP server on the running event loop."""

    def __init__(
        self,
        channels: ChannelFactory,
        http_addr: str,
        *,
        dialects: str = "all",
        settings: Settings | None = None,
        tls: ssl.SSLContext | None = None,
        key_check: KeyCheck | None = None,
    ) -> None:
        """`channels` makes the channels the gateway calls the service over: `remote_channels(target)`
        alone, an `evalsvc.api.local.LocalChannel` inside `evalsvc serve`. With `tls`
        (`evalsvc.tls.http_ssl_context`) it serves HTTPS, else plain HTTP.

        `key_check` checks a caller's key before the request's body is read (evalsvc.gateway.keys): in
        process, `LocalChannel.key_refusal`, for every request with a body; without it (the standalone
        gateway), a pre-flight call for the bodies `PreflightKeys.worth_checking`."""
        settings = settings or Settings()
        dialect_options = DialectOptions(sync_wait_s=settings.dialect_sync_wait_s)
        host, _, port = http_addr.rpartition(":")
        api = create_app(
            channels,
            dialects,
            dialect_options,
            streams_per_channel=settings.gateway_streams_per_channel,
            streams_per_tenant=settings.http_streams_per_tenant,
            streams_in_all=settings.http_streams_in_all,
            max_json_bytes=settings.max_message_bytes,
        )
        # Its refusals in the shape of the API the path belongs to, as the app's own routing errors are.
        checks: Callable[[int | None], bool] = _every_body
        if key_check is None:
            preflight = PreflightKeys(upstream_of(api), settings.auth_cache_s)
            key_check, checks = preflight, preflight.worth_checking
        app = RequestLimits(
            api,
            routing_errors(api),
            max_body_bytes=settings.max_message_bytes,
            keys=key_check,
            checks=checks,
            body_timeout_s=settings.http_body_timeout_s,
        )
        config = uvicorn.Config(
            app,
            host=host or "127.0.0.1",
            port=int(port),
            log_level="warning",
            http=bounded_protocol(settings.max_http_connections, settings.http_header_timeout_s),
            timeout_keep_alive=max(1, round(settings.http_keepalive_timeout_s)),
            h11_max_incomplete_event_size=MAX_INCOMPLETE_HEAD_BYTES,
            # uvicorn's documented hook for a context of one's own: this one is made, and its files
            # checked, before the gateway starts.
            ssl_context_factory=None if tls is None else lambda _config, _default: tls,
        )
        self._server = _QuietSignals(config)
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> int:
        """Listen; returns the bound port (useful with port 0). OSError when the address cannot be bound.

        The socket is bound here rather than by uvicorn, which answers a bind failure with
        `sys.exit(1)` inside its task: a SystemExit escaping the event loop, which left the server
        neither serving nor exiting."""
        config = self._server.config
        warn_if_exposed("the REST gateway", f"{config.host}:{config.port}", config.is_ssl)
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        listening = socket.create_server((config.host.strip("[]"), config.port), family=family)
        self._task = asyncio.create_task(self._server.serve(sockets=[listening]))
        while not self._server.started:
            if self._task.done():
                listening.close()
                self._task.result()  # raises why it could not start
                raise OSError("the HTTP gateway did not start")
            await asyncio.sleep(0.01)  # uvicorn offers no start event to await
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        log.info("evalsvc REST gateway listening on %s://%s:%d", self.scheme, config.host, self.port)
        return self.port

    @property
    def scheme(self) -> str:
        """`https` when the gateway serves TLS, else `http`."""
        return "https" if self._server.config.is_ssl else "http"

    def stop_accepting(self) -> None:
        """Take no new request from now on; open responses go on (the first step of a shutdown)."""
        self._server.should_exit = True

    async def stop(self) -> None:
        """Stop accepting, let open responses end, close the channel."""
        self.stop_accepting()
        if self._task is not None:
            await self._task
