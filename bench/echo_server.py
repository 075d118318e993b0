"""The bare grpc.aio baseline: what this grpcio, this Python and this machine can do with no service logic.

Three methods, registered with a generic handler and no protobuf work on the server, so they
measure gRPC itself:
- `Echo` (unary) returns the request bytes: the unary ceiling CreateRun and GetRun are compared with.
- `Subscribe` (server stream) sends one hello, then whatever `Broadcast` publishes: the bare fan-out
  and the bare idle stream that WatchRun is compared with.
- `Broadcast` (unary) stamps N messages with the publish time and hands them to every subscriber.
- `Stream` (server stream) sends N messages of a given size as fast as the client takes them: the
  ceiling of one stream, which a large run's WatchRun (one message per event) is compared with.

Each subscriber gets a bounded queue, as evalsvc's watchers do, so the baseline has the same shape
of work (a wake-up per stream per burst) rather than an unrealistically cheap one.

Run: `python -m bench.echo_server --addr 127.0.0.1:0`; logs "bench echo listening on HOST:PORT".
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import struct
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

SERVICE = "bench.Bare"
ECHO = f"/{SERVICE}/Echo"
SUBSCRIBE = f"/{SERVICE}/Subscribe"
BROADCAST = f"/{SERVICE}/Broadcast"
STREAM = f"/{SERVICE}/Stream"

# A broadcast request is (count, payload size); each message is (publish time, index) plus padding.
BROADCAST_REQUEST = struct.Struct("<II")
STAMP = struct.Struct("<dI")
HELLO = b"hello"
QUEUE_LIMIT = 2048  # like evalsvc's default watch_buffer


class Bare:
    """The baseline servicer: subscribers are bounded queues keyed by nothing but their identity."""

    def __init__(self) -> None:
        self.subscribers: set[asyncio.Queue[bytes]] = set()

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        """Return the request unchanged."""
        return request

    async def subscribe(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        """Send a hello (so the client knows it is subscribed), then every broadcast message."""
        queue: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_LIMIT)
        self.subscribers.add(queue)
        try:
            yield HELLO
            while True:
                yield await queue.get()
        finally:
            self.subscribers.discard(queue)

    async def stream(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        """Send `count` messages of `size` bytes back to back."""
        count, size = BROADCAST_REQUEST.unpack(request[: BROADCAST_REQUEST.size])
        message = b"x" * size
        for _ in range(count):
            yield message

    async def broadcast(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        """Stamp `count` messages with the publish time and queue them for every subscriber."""
        count, size = BROADCAST_REQUEST.unpack(request[: BROADCAST_REQUEST.size])
        padding = b"x" * max(0, size - STAMP.size)
        messages = [STAMP.pack(time.time(), i) + padding for i in range(count)]
        dropped = 0
        for queue in self.subscribers:
            for message in messages:
                try:
                    queue.put_nowait(message)
                except asyncio.QueueFull:
                    dropped += 1
        return struct.pack("<II", len(self.subscribers), dropped)


def _identity(data: bytes) -> bytes:
    return data


def build_server(options: list[tuple[str, int]]) -> grpc.aio.Server:
    """A grpc.aio server with the baseline methods and the same pending-request limits as evalsvc."""
    bare = Bare()
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(
                bare.echo, request_deserializer=_identity, response_serializer=_identity
            ),
            "Subscribe": grpc.unary_stream_rpc_method_handler(
                bare.subscribe, request_deserializer=_identity, response_serializer=_identity
            ),
            "Stream": grpc.unary_stream_rpc_method_handler(
                bare.stream, request_deserializer=_identity, response_serializer=_identity
            ),
            "Broadcast": grpc.unary_unary_rpc_method_handler(
                bare.broadcast, request_deserializer=_identity, response_serializer=_identity
            ),
        },
    )
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((handler,))
    return server


# The channel options evalsvc's server uses that change stream behaviour; the rest (keepalive, message
# size) do not affect these measurements.
OPTIONS = [
    ("grpc.max_concurrent_streams", 1000),
    ("grpc.server.max_pending_requests", 10_000),
    ("grpc.server.max_pending_requests_hard_limit", 20_000),
]


async def main(addr: str) -> None:
    """Serve until SIGTERM/SIGINT."""
    server = build_server(OPTIONS)
    port = server.add_insecure_port(addr)
    await server.start()
    logging.warning("bench echo listening on %s:%d", addr.rsplit(":", 1)[0], port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default="127.0.0.1:0")
    logging.basicConfig(stream=sys.stderr, format="%(message)s")
    asyncio.run(main(parser.parse_args().addr))
