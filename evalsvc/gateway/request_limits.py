"""Size limits on HTTP requests, enforced before any route runs: 431 for oversized headers, 413 for
oversized bodies (docs/errors.md).

Without them an oversized API key header reached the gRPC server as metadata over its limit, and an
oversized body as a message over `--max-message-bytes`; both came back RESOURCE_EXHAUSTED and left
the gateway as 429, which every client retries, forever. These are not "try later": the request
itself must change. The body is read here, up to the limit, so the process never holds more than
that for one request, whichever route (native or dialect) would have read it.

The refusals come in the error shape of the API the path belongs to, as a path no route takes does
(`RoutingErrors.answer`, evalsvc.gateway.unrouted): the native google.rpc.Status on the native routes
(and on a path no API owns), a dialect's own envelope on its paths (`POST /v1/evals/runs` over the limit
is Bland's `{"errors": [...]}`), always with HTTP status 413 or 431.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import grpc
from starlette.requests import Request
from starlette.responses import Response

from evalsvc.errors import Reason
from evalsvc.gateway.keys import KeyCheck
from evalsvc.gateway.unrouted import RoutingErrors
from evalsvc.gateway.upstream import GatewayError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The headers the gateway forwards as gRPC metadata (API keys). gRPC servers refuse metadata over
# 8 KiB (soft) and 16 KiB (hard) in total; a real key is under 100 bytes.
FORWARDED_HEADERS = (b"authorization", b"x-api-key")
MAX_FORWARDED_HEADER_BYTES = 4096
# The request head - its target (path and query) and every header together: generous for cookies and
# proxies' additions, small enough to bound memory.
MAX_HEADER_BYTES = 64 * 1024
# What the HTTP server (uvicorn's h11) buffers of a head still arriving: the bound above, and room for the
# request line's method and version and the separators. Left at h11's 16 KiB, a head between 16 and 64 KiB
# was served or refused with a plain-text 400 ("Invalid HTTP request received.") by how TCP cut it.
MAX_INCOMPLETE_HEAD_BYTES = MAX_HEADER_BYTES + 8 * 1024
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 30.0  # --http-body-timeout-s


class RequestLimits:
    """ASGI middleware: refuse requests whose headers or body are over the limits, in the error shape
    of the API the path belongs to, as `errors`
    answers (the app's own RoutingErrors: evalsvc.gateway.app.routing_errors).

    A body over the limit is read and discarded before the 413: a client that is still sending when the
    server answers and closes gets a connection reset instead of the answer. Refusals before the body
    (below) leave it unread: the HTTP server reads and drops what still comes for a moment
    (evalsvc.gateway.server `_Lingering`).

    With `keys`, a request with a body that a route taking a key will serve presents a valid key before
    any of its body is read (evalsvc.gateway.keys): refused, it is answered at once, as its route would
    answer the service's refusal, and its connection closed, its body unread (`_refuse_unread`). And a
    body has `body_timeout_s` to arrive whole, from its headers' arrival (not from its last byte): past
    it the request is answered 408 and its connection closed. A body sent a byte every few seconds held
    its connection, unread, for as long as its client liked; 2,100 of them, keyless, held every
    connection of --max-http-connections, and every tenant's REST calls got 503."""

    def __init__(
        self,
        app: ASGIApp,
        errors: RoutingErrors,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        keys: KeyCheck | None = None,
        checks: Callable[[int | None], bool] = lambda _declared: True,
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    ) -> None:
        self._app = app
        self._errors = errors
        self._max_body_bytes = max_body_bytes
        self._keys = keys
        self._checks = checks
        self._body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if problem := _header_problem(scope, headers):
            if await self._drained_in_time(scope, receive, send):
                error = GatewayError(
                    grpc.StatusCode.INVALID_ARGUMENT, problem, Reason.HEADERS_TOO_LARGE, http_status=431
                )
                await self._refuse(scope, receive, send, error)
            return
        if await self._key_refused(scope, send, headers):
            return
        try:
            async with asyncio.timeout(self._body_timeout_s):
                body = await self._body(scope, receive, send)
        except TimeoutError:
            await self._refuse_unread(scope, send, self._errors.answer(scope["path"], self._too_slow()))
            return
        if body is None:
            return
        body_sent = False

        async def replay() -> Message:
            nonlocal body_sent
            if body_sent:
                return await receive()  # after the body: disconnects, for streaming responses
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self._app(scope, replay, send)

    async def _body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body; None when the request has been answered (413) or its client left."""
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None  # the client left before sending its body: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            more = bool(message.get("more_body"))
            if size > self._max_body_bytes:
                # This message's `more_body`: a body whose last part went over had nothing left to drain,
                # and waited for the client to leave (`more` was still the previous message's, True).
                if not more or await _drained(receive):
                    await self._body_too_large(scope, receive, send)
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def _drained_in_time(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """`_drained` within the body's time; a body still arriving then is answered 408 (False)."""
        try:
            async with asyncio.timeout(self._body_timeout_s):
                return await _drained(receive)
        except TimeoutError:
            await self._refuse_unread(scope, send, self._errors.answer(scope["path"], self._too_slow()))
            return False

    def _too_slow(self) -> GatewayError:
        return GatewayError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"the request body did not arrive within {self._body_timeout_s:g} s",
            Reason.BODY_TIMEOUT,
            http_status=408,
        )

    async def _key_refused(self, scope: Scope, send: Send, headers: list[tuple[bytes, bytes]]) -> bool:
        """Whether the request was answered before its body is read: a request with a body (a declared
        length over 0, or a chunked one) that no route taking a key serves (`RoutingErrors.unread`), or
        for such a route, whose key is not valid, or when the keys cannot be checked (the service
        unreachable: its 503)."""
        if self._keys is None:
            return False
        declared = _declared_length(headers)
        if declared == 0 or not self._checks(declared):
            return False
        keyed = self._errors.keyed(scope["method"], scope["path"])
        if keyed is None:  # no route that takes a key serves it: answered without its body, whoever sends it
            unread = self._errors.unread(Request(scope))
            if unread is None:
                return False
            await self._refuse_unread(scope, send, unread)
            return True
        try:
            failed = await self._keys(keyed.read(Request(scope)))
            error = None if failed is None else GatewayError.from_rpc(failed)
        except GatewayError as malformed:  # a key gRPC metadata cannot carry
            error = malformed
        if error is None:
            return False
        await self._refuse_unread(scope, send, keyed.refuse(error))
        return True

    async def _refuse_unread(self, scope: Scope, send: Send, response: Response) -> None:
        """Answer `response` without reading (the rest of) the body, and close the connection: what
        would follow the body on it cannot be told from the body."""
        response.headers["connection"] = "close"

        async def nothing() -> Message:  # a Response reads nothing but a disconnect, and there is none to wait for
            return {"type": "http.disconnect"}

        await response(scope, nothing, send)

    async def _body_too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = GatewayError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the request body is larger than {self._max_body_bytes} bytes",
            Reason.BODY_TOO_LARGE,
            http_status=413,
        )
        await self._refuse(scope, receive, send, error)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, error: GatewayError) -> None:
        """Answer with `error` in the shape of the path's API (no RetryInfo nor Retry-After: waiting
        does not help; the request itself must change)."""
        await self._errors.answer(scope["path"], error)(scope, receive, send)


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The body's declared length: Content-Length, 0 when there is none and no Transfer-Encoding (no
    body), None for a body of undeclared length (chunked). The HTTP server has refused a malformed one."""
    length = 0
    for name, value in headers:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length" and value.strip().isdigit():
            length = int(value)
    return length


async def _drained(receive: Receive) -> bool:
    """Read the rest of a request body, discarding it; False when the client left meanwhile."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return False
        if not message.get("more_body"):
            return True


def _header_problem(scope: Scope, headers: list[tuple[bytes, bytes]]) -> str | None:
    forwarded = sum(len(name) + len(value) for name, value in headers if name in FORWARDED_HEADERS)
    if forwarded > MAX_FORWARDED_HEADER_BYTES:
        return f"the API key headers are larger than {MAX_FORWARDED_HEADER_BYTES} bytes"
    target = len(scope.get("raw_path") or scope["path"]) + len(scope.get("query_string") or b"")
    if target + sum(len(name) + len(value) for name, value in headers) > MAX_HEADER_BYTES:
        return f"the request's path, query and headers are larger than {MAX_HEADER_BYTES} bytes"
    return None
