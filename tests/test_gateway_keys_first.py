"""The REST gateway checks a caller's key before it reads the request's body, and a body has a bounded
time to arrive (docs/security.md, docs/operations.md).

A hostile client without a key sent 14 MB bodies of a million map entries: the gateway parsed each
(12 s of CPU in the translator threads every tenant shares) before the service answered 401, and
another tenant's CreateRun took 53 s. Others sent their headers, then a body byte every 5 s, and held
every HTTP connection. Each case here is a real server and a raw HTTP/1.1 connection, which sends
only part of its body: an answer that comes at all was given before the body was read."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from evalsvc.gateway.server import Gateway, remote_channels
from evalsvc.server import EvalServer
from tests.conftest import make_settings

ANSWER_WITHIN_S = 20.0  # generous on a loaded machine: without the check no answer comes at all
# A CreateRun whose one item has a metadata map of many entries: the body that cost 12 s to parse.
MANY_ENTRIES = 200_000
DECLARED = 16 * 1024 * 1024 - 1  # declared, never sent whole: under --max-message-bytes, so no 413
SENT = 256 * 1024  # the part of the body that is sent


def _body_start() -> bytes:
    entries = b",".join(b'"k%d":"v"' % i for i in range(MANY_ENTRIES))
    return b'{"items":[{"input":"x","metadata":{' + entries


@asynccontextmanager
async def _server(tmp_path: Path, **settings: Any) -> AsyncIterator[EvalServer]:
    srv = EvalServer(make_settings(tmp_path, http_addr="127.0.0.1:0", dialects="all", **settings))
    await srv.start()
    try:
        assert srv.gateway is not None and srv.bootstrap_key
        yield srv
    finally:
        await srv.stop(grace=0.5)


async def _partial_post(
    port: int, path: str, headers: dict[str, str], body: bytes, declared: int, method: str = "POST"
) -> bytes:
    """`method` (POST) `path` declaring a body of `declared` bytes, send `body` (less), and return
    everything the server sends until it closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = (
            f"{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {declared}\r\n"
        )
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        writer.write(head.encode() + b"\r\n" + body)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), ANSWER_WITHIN_S)
    finally:
        writer.close()


def _status_and_json(answer: bytes) -> tuple[int, Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, _comparable(json.loads(body))


def _comparable(value: Any) -> Any:
    """The error body without what differs each time (Aymara's request_id)."""
    if isinstance(value, dict):
        return {key: _comparable(inner) for key, inner in value.items() if key != "request_id"}
    return value


# (POST route with a body, GET route of the same API): each API's keyless answer, from the route itself.
APIS = {
    "native": ("/v1/runs", "/v1/runs"),
    "omni": ("/api/v1/ai/eval/prompt-sets", "/api/v1/ai/eval/prompt-sets"),
    "agno": ("/eval-runs", "/eval-runs"),
    "bland": ("/v1/evals/runs", "/v1/evals/runs"),
    "vogent": ("/api/eval_configs", "/api/eval_configs"),
    "aymara": ("/v2/evals", "/v2/evals"),
}
# How each API takes a key (a wrong one here).
WRONG_KEY = {
    "native": {"authorization": "Bearer evk_not_a_key"},
    "omni": {"authorization": "Bearer evk_not_a_key"},
    "agno": {"authorization": "Bearer evk_not_a_key"},
    "bland": {"authorization": "evk_not_a_key"},
    "vogent": {"authorization": "Bearer evk_not_a_key"},
    "aymara": {"x-api-key": "evk_not_a_key"},
}


async def _get(port: int, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        writer.write(head.encode() + b"\r\n")
        return _status_and_json(await asyncio.wait_for(reader.read(), ANSWER_WITHIN_S))
    finally:
        writer.close()


async def test_a_body_without_a_valid_key_is_refused_before_it_is_read_in_each_apis_shape(tmp_path: Path) -> None:
    """Without a key, or with a wrong one, a POST is answered 401 after its headers, though most of its
    body was never sent, in the API's own shape: what the same API answers a keyless GET, its route's.
    With a valid key a large body is read and parsed as before."""
    body = _body_start()[:SENT]
    async with _server(tmp_path) as srv:
        assert srv.gateway is not None
        port = srv.gateway.port
        for api, (post, get) in APIS.items():
            for headers in ({}, WRONG_KEY[api]):
                answer = await _partial_post(port, post, headers, body, DECLARED)
                assert answer, f"{api}: no answer before the body was sent whole"
                assert b"\r\nconnection: close\r\n" in answer.partition(b"\r\n\r\n")[0].lower() + b"\r\n"
                refused = _status_and_json(answer)
                assert refused[0] == 401, (api, headers, answer[:500])
                assert refused == await _get(port, get, headers), (api, headers)
        # With a valid key, the same body is read whole and parsed, as before (the service refuses it: 400).
        whole = _body_start() + b'}}],"target":{"echo":{}}}'
        keyed = {"authorization": f"Bearer {srv.bootstrap_key}", "connection": "close"}
        status, answer = _status_and_json(await _partial_post(port, "/v1/runs", keyed, whole, len(whole)))
        assert status == 400 and answer["details"][0]["reason"] == "INVALID_ARGUMENT", answer


async def test_a_slow_body_is_answered_408_and_its_connection_freed(tmp_path: Path) -> None:
    """With a valid key, a body sent a byte at a time is answered 408 once --http-body-timeout-s has
    passed since its headers, though bytes keep coming (the time is the body's, not reset per byte),
    and its connection is closed: past the connection cap, the next client is served."""
    async with _server(tmp_path, http_body_timeout_s=1.0, max_http_connections=3) as srv:
        assert srv.gateway is not None and srv.bootstrap_key
        port = srv.gateway.port
        head = "POST /v1/runs HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n"
        head += f"authorization: Bearer {srv.bootstrap_key}\r\n\r\n{{"
        slow = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        for _, writer in slow:
            writer.write(head.encode())
        answers = [asyncio.ensure_future(asyncio.wait_for(reader.read(), ANSWER_WITHIN_S)) for reader, _ in slow]

        async def drip() -> None:
            while True:
                for _, writer in slow:
                    if not writer.is_closing():
                        writer.write(b" ")
                await asyncio.sleep(0.2)  # the client's pace, not a wait for the server

        dripping = asyncio.ensure_future(drip())
        try:
            for answer in await asyncio.gather(*answers):
                status, body = _status_and_json(answer)
                assert status == 408, answer
                assert body["details"][0]["reason"] == "BODY_TIMEOUT", body
            dripping.cancel()
            # The slow clients keep their connections open; the server closes them (after reading what
            # is still sent, LINGER_S at most), noticed asynchronously: meanwhile a new one may get 503.
            for _ in range(200):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /openapi.json HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                served = await asyncio.wait_for(reader.read(), ANSWER_WITHIN_S)
                writer.close()
                if not served.startswith(b"HTTP/1.1 503 "):
                    break
                await asyncio.sleep(0.1)
            assert served.startswith(b"HTTP/1.1 200 "), served[:200]
        finally:
            dripping.cancel()
            for _, writer in slow:
                writer.close()


async def test_the_standalone_gateway_checks_the_key_of_a_large_body_first(tmp_path: Path) -> None:
    """`evalsvc gateway --grpc-target` has no key check of its own: for a large body it makes one
    pre-flight call. Keyless, the body is refused before it is sent whole; with a valid key it is read."""
    async with _server(tmp_path) as srv:
        assert srv.bootstrap_key
        gateway = Gateway(
            remote_channels(f"127.0.0.1:{srv.port}"), "127.0.0.1:0", dialects="none", settings=srv.settings
        )
        port = await gateway.start()
        try:
            answer = await _partial_post(port, "/v1/runs", {}, _body_start()[:SENT], DECLARED)
            status, body = _status_and_json(answer)
            assert status == 401 and body["details"][0]["reason"] == "API_KEY_MISSING", answer[:500]
            wrong = await _partial_post(port, "/v1/runs", WRONG_KEY["native"], _body_start()[:SENT], DECLARED)
            status, body = _status_and_json(wrong)
            assert status == 401 and body["details"][0]["reason"] == "API_KEY_INVALID", wrong[:500]
            whole = _body_start() + b'}}],"target":{"echo":{}}}'
            keyed = {"authorization": f"Bearer {srv.bootstrap_key}", "connection": "close"}
            status, body = _status_and_json(await _partial_post(port, "/v1/runs", keyed, whole, len(whole)))
            assert status == 400 and body["details"][0]["reason"] == "INVALID_ARGUMENT", body
        finally:
            await gateway.stop()


async def test_a_body_no_keyed_route_would_read_is_answered_before_it_is_read(tmp_path: Path) -> None:
    """The review: a path no route takes, or a route that needs no key and reads no body (/openapi.json,
    the UI's pages, a dialect's keyless route), had its body read whole (up to 16 MB each, keyless) until
    --http-body-timeout-s, and only then its 404 or 405. Each is answered at once now, in its API's shape,
    the body unread."""
    async with _server(tmp_path) as srv:
        port = srv.gateway.port  # type: ignore[union-attr]
        cases = {
            ("POST", "/v1/runz"): (404, "ROUTE_NOT_FOUND"),
            ("PUT", "/v1/runs/run_x"): (405, "METHOD_NOT_ALLOWED"),
            ("GET", "/openapi.json"): (400, "INVALID_ARGUMENT"),
            ("GET", "/ui/runs"): (400, "INVALID_ARGUMENT"),
        }
        for (method, path), (status, reason) in cases.items():
            answer = await _partial_post(port, path, {}, b"{" + b" " * SENT, DECLARED, method)
            got, body = _status_and_json(answer)
            assert (got, body["details"][0]["reason"]) == (status, reason), (method, path, answer[:300])
        # A dialect's route that needs no key (Aymara's health check, for monitors without one) reads no
        # body either: 400 in Aymara's shape, not the 401 of the key its other routes take.
        answer = await _partial_post(port, "/health/", {}, b"{" + b" " * SENT, DECLARED, "GET")
        got, body = _status_and_json(answer)
        assert got == 400 and "takes no request body" in json.dumps(body), answer[:300]
