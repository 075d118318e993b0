"""Size limits on HTTP requests, enforced before any route runs: 431 for oversized headers, 413 for
oversized bodies (docs/errors.md).

Without them an oversized API key header reached the gRPC server as metadata over its limit, and an
oversized body as a message over `--max-message-bytes`; both came back RESOURCE_EXHAUSTED and left
the gateway as 429, which every client retries, forever. These are not "try later": the request
itself must change. The body is read here, up to the limit, so the process never holds more than
that for one request, whichever route (native or dialect) would have read it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import grpc
from google.protobuf import json_format

from evalsvc.errors import Reason, ServiceError, to_status

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The headers the gateway forwards as gRPC metadata (API keys). gRPC servers refuse metadata over
# 8 KiB (soft) and 16 KiB (hard) in total; a real key is under 100 bytes.
FORWARDED_HEADERS = (b"authorization", b"x-api-key")
MAX_FORWARDED_HEADER_BYTES = 4096
# Every header together: generous for cookies and proxies' additions, small enough to bound memory.
MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024


class RequestLimits:
    """ASGI middleware: refuse requests whose headers or body are over the limits, with the
    google.rpc.Status JSON the native routes use.

    The rest of a refused body is read and discarded before answering: a client that is still
    sending when the server answers and closes gets a connection reset instead of the answer."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self._app = app
        self._max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if problem := _header_problem(headers):
            if await _drained(receive):
                await _refuse(send, 431, grpc.StatusCode.INVALID_ARGUMENT, Reason.HEADERS_TOO_LARGE, problem)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body_bytes:
                if not more or await _drained(receive):
                    await self._body_too_large(send)
                return
            chunks.append(chunk)
            more = bool(message.get("more_body"))
        body_sent = False

        async def replay() -> Message:
            nonlocal body_sent
            if body_sent:
                return await receive()  # after the body: disconnects, for streaming responses
            body_sent = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self._app(scope, replay, send)

    async def _body_too_large(self, send: Send) -> None:
        await _refuse(
            send,
            413,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            Reason.BODY_TOO_LARGE,
            f"the request body is larger than {self._max_body_bytes} bytes",
        )


async def _drained(receive: Receive) -> bool:
    """Read the rest of a request body, discarding it; False when the client left meanwhile."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return False
        if not message.get("more_body"):
            return True


def _header_problem(headers: list[tuple[bytes, bytes]]) -> str | None:
    forwarded = sum(len(name) + len(value) for name, value in headers if name in FORWARDED_HEADERS)
    if forwarded > MAX_FORWARDED_HEADER_BYTES:
        return f"the API key headers are larger than {MAX_FORWARDED_HEADER_BYTES} bytes"
    if sum(len(name) + len(value) for name, value in headers) > MAX_HEADER_BYTES:
        return f"the request headers are larger than {MAX_HEADER_BYTES} bytes"
    return None


async def _refuse(send: Send, http_status: int, code: grpc.StatusCode, reason: Reason, message: str) -> None:
    """Answer with the error's google.rpc.Status as JSON (no RetryInfo: waiting does not help)."""
    status = to_status(ServiceError(code, reason, message))
    body = json.dumps(json_format.MessageToDict(status, always_print_fields_with_no_presence=True)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": http_status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
