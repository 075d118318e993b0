"""Oversized requests are 431 / 413 at the gateway (docs/errors.md), on native and dialect routes,
never 429 (which clients retry); over gRPC, oversized metadata carries no RetryInfo."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from fastapi._compat.v2 import ModelField
from google.protobuf import json_format
from grpc_status import rpc_status

from evalsvc.gateway.translators import MAX_JSON_VALUES
from evalsvc.server import EvalServer
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc, item_pb2, target_pb2
from tests import dbs
from tests.conftest import make_settings
from tests.helpers import create_request, exact, keyed_channel, serving_gateway, watch_to_end
from tests.procs import start_server

MAX_BODY = 1 << 20  # --max-message-bytes for these tests: 1 MiB


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[tuple[EvalServer, httpx.AsyncClient]]:
    settings = make_settings(tmp_path, http_addr="127.0.0.1:0", max_message_bytes=MAX_BODY)
    async with serving_gateway(settings) as (srv, client):
        yield srv, client


async def test_the_gateways_connections_send_small_responses_at_once(gw) -> None:
    """Regression: the gateway's connections kept Nagle's algorithm on (asyncio turns it off only on sockets
    made with proto IPPROTO_TCP, and the gateway binds its own with proto 0), so a small response, written
    in two parts, waited for the client's delayed ACK: 40 ms more on every REST call. Checked on the
    socket, not by timing, which the machine's load would blur."""
    srv, client = gw
    assert (await client.get("/v1/runs")).status_code == 200
    assert srv.gateway is not None
    connections = srv.gateway._server.server_state.connections  # the keep-alive connection just used
    assert connections
    for connection in connections:
        assert connection.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def run_body(size: int) -> bytes:
    """A CreateRun body of about `size` bytes."""
    items = [{"input": "x" * 1000, "expectedOutput": "x"} for _ in range(max(1, size // 1040))]
    return json.dumps({"items": items, "target": {"echo": {}}, "graders": [{"exactMatch": {}}]}).encode()


def assert_refused(response: httpx.Response, status: int, reason: str) -> None:
    assert response.status_code == status, response.text
    assert "retry-after" not in response.headers
    details = response.json()["details"]
    assert [d["reason"] for d in details if d["@type"].endswith("ErrorInfo")] == [reason]
    assert not [d for d in details if d["@type"].endswith("RetryInfo")]


async def test_an_oversized_key_header_is_431_on_native_routes_and_paths_no_api_owns(gw) -> None:
    _, client = gw
    huge = {"authorization": "Bearer " + "k" * 20_000}
    for path in ("/v1/runs", "/nope", "/api/nope"):
        assert_refused(await client.get(path, headers=huge), 431, "HEADERS_TOO_LARGE")
    assert_refused(await client.get("/v1/runs", headers={"x-api-key": "k" * 5000}), 431, "HEADERS_TOO_LARGE")
    assert (await client.get("/v1/runs")).status_code == 200  # the same connection goes on


BODY_TOO_LARGE = f"the request body is larger than {MAX_BODY} bytes"
KEY_TOO_LARGE = "the API key headers are larger than 4096 bytes"


def dialect_error(dialect: str, message: str, status: int, code: str, reason: str) -> dict[str, Any]:
    """The error body a dialect answers for a refusal of the gateway's (gRPC `code`, ErrorInfo `reason`),
    as its vendor writes errors; Aymara's request_id (random) is left out."""
    match dialect:
        case "omni":
            return {"detail": message, "status": status}
        case "agno":
            return {"detail": message}
        case "bland":
            return {"data": None, "errors": [{"error": "INVALID_REQUEST", "message": message}]}
        case "vogent":
            return {"error": {"code": code, "message": message, "reason": reason, "fieldViolations": []}}
        case "aymara":
            return {"error": {"code": "validation.invalid_request", "message": message, "details": {"reason": reason}}}
    raise AssertionError(dialect)


# A POST route of each dialect (all of them are mounted at their documented prefixes).
DIALECT_POSTS = {
    "omni": "/api/v1/ai/eval/prompt-sets",
    "agno": "/eval-runs",
    "bland": "/v1/evals/runs",
    "vogent": "/api/eval_configs",
    "aymara": "/v2/evals",
}


def dialect_body(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()
    if "request_id" in body:  # Aymara's, a new one each time
        assert isinstance(body.pop("request_id"), str) and body["error"]
    return body


@pytest.mark.parametrize("dialect", sorted(DIALECT_POSTS))
async def test_an_oversized_body_on_a_dialects_route_is_413_in_its_error_shape(gw, dialect: str) -> None:
    """Regression: the body limit answered every path with the native google.rpc.Status (`{"code": 8, ...}`),
    which no vendor's client reads (Bland's, Aymara's SDK); and Bland's code map made it RATE_LIMITED, which
    clients retry. Now it is the dialect's own error, as the path no route takes is, still HTTP 413."""
    _, client = gw
    response = await client.post(DIALECT_POSTS[dialect], content=b"x" * (3 * MAX_BODY))
    assert response.status_code == 413, response.text
    assert "retry-after" not in response.headers
    assert response.headers["content-type"] == "application/json"
    # Vogent's code is INVALID_ARGUMENT, as for its other 413 (too many JSON values): not a retryable quota.
    assert dialect_body(response) == dialect_error(dialect, BODY_TOO_LARGE, 413, "INVALID_ARGUMENT", "BODY_TOO_LARGE")


@pytest.mark.parametrize("dialect", sorted(DIALECT_POSTS))
async def test_an_oversized_key_header_on_a_dialects_path_is_431_in_its_error_shape(gw, dialect: str) -> None:
    """Regression: as the body limit, the header limit answered a dialect's path in the native shape. Its
    HTTP status stays 431 whatever the vendor's code map says of INVALID_ARGUMENT (400 for most)."""
    _, client = gw
    huge = {"authorization": "Bearer " + "k" * 20_000}
    response = await client.get(DIALECT_POSTS[dialect], headers=huge)
    assert response.status_code == 431, response.text
    assert "retry-after" not in response.headers
    assert dialect_body(response) == dialect_error(dialect, KEY_TOO_LARGE, 431, "INVALID_ARGUMENT", "HEADERS_TOO_LARGE")


async def test_the_openapi_document_lists_413_and_431_on_every_operation(gw) -> None:
    """Regression: Aymara's, Vogent's and AgentOS's operations listed their error statuses one by one,
    without the 413 and 431 every route can answer (a generated client had no type for them). Each
    operation names both, or a 4XX range in its error shape."""
    _, client = gw
    spec = (await client.get("/openapi.json")).json()
    missing = [
        f"{method.upper()} {path}"
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
        if "4XX" not in operation["responses"] and not {"413", "431"} <= set(operation["responses"])
    ]
    assert missing == []
    assert {prefix for prefix in DIALECT_POSTS.values() if prefix in spec["paths"]} == set(DIALECT_POSTS.values())


async def test_an_oversized_body_is_413_whether_declared_or_chunked_and_the_connection_goes_on(gw) -> None:
    _, client = gw
    body = run_body(3 * MAX_BODY)

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    assert_refused(await client.post("/v1/runs", content=body), 413, "BODY_TOO_LARGE")
    assert_refused(await client.post("/v1/runs", content=chunked()), 413, "BODY_TOO_LARGE")
    # A path no route takes is answered as such before its body is read, however large it says it is.
    assert_refused(await client.post("/nope", content=body), 404, "ROUTE_NOT_FOUND")
    fits = await client.post("/v1/runs", content=run_body(MAX_BODY // 2))
    assert fits.status_code == 200, fits.text
    assert len(fits.json()["run"]["id"]) > 0


async def test_an_oversized_body_on_a_native_route_is_the_google_rpc_status_it_always_was(gw) -> None:
    """The native refusal, now written by the native routes' own error handler, is the google.rpc.Status
    it was: the same fields, values and headers (only the JSON's spacing is now every other native
    error's, without blanks)."""
    _, client = gw
    response = await client.post("/v1/runs", content=b"x" * (3 * MAX_BODY))
    assert response.status_code == 413
    assert response.json() == {
        "code": grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
        "message": BODY_TOO_LARGE,
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "BODY_TOO_LARGE",
                "domain": "evalsvc",
                "metadata": {},
            }
        ],
    }
    assert {name for name in response.headers if name not in ("date", "server")} == {"content-type", "content-length"}
    assert response.headers["content-type"] == "application/json"


async def test_a_body_over_the_limit_by_its_last_bytes_is_answered_at_once(gw) -> None:
    """Regression: a body that went over the limit only with its last part was then "drained", waiting for
    more that never came: the client got no answer until it gave up (the check read the previous part's
    `more_body`)."""
    _, client = gw
    for path in ("/v1/runs", DIALECT_POSTS["bland"]):
        response = await client.post(path, content=b"x" * (MAX_BODY + 1), timeout=10)
        assert response.status_code == 413, response.text
        assert BODY_TOO_LARGE in response.text


async def test_grpc_metadata_over_the_limit_is_not_a_retryable_quota_error(gw) -> None:
    srv, _ = gw
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await runs.GetRun(pb.GetRunRequest(run_id="r"), metadata=(("authorization", "k" * 20_000),), timeout=10)
    # grpc's own status, before any handler: no details at all, so no RetryInfo to make clients retry.
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rpc_status.from_call(err.value) is None


def _native_run_body() -> tuple[str, bytes]:
    """A ~6 MiB proto3 JSON CreateRun: reading it takes json_format the better part of a second; a field
    no CreateRunRequest has, last, makes it INVALID_ARGUMENT once read (no run of 50,000 items made)."""
    request = json_format.MessageToJson(create_request(50_000), indent=None).encode()
    return "/v1/runs", request[:-1] + b',"notAField":1}'


def _dialect_body_of_tiny_objects() -> tuple[str, bytes]:
    """An Omni prompt set with 500,000 prompts where 25 are allowed: FastAPI's error echoed the whole
    list, and encoding it back took seconds."""
    prompts = ",".join(['{"a":1}'] * 500_000)
    return "/api/v1/ai/eval/prompt-sets", f'{{"model_id":"m","name":"n","slug":"s","prompts":[{prompts}]}}'.encode()


@pytest.mark.parametrize("request_of", [_native_run_body, _dialect_body_of_tiny_objects], ids=["native", "dialect"])
async def test_a_large_body_is_read_while_other_calls_go_on(tmp_path: Path, request_of) -> None:  # type: ignore[no-untyped-def]
    """A large body was read on the event loop, and every other call waited for it. A valid key's body
    (one without is refused before it is read: tests/test_gateway_keys_first.py) is read in a translator
    thread, its errors echoed within bounds: another tenant's GetRun answers meanwhile."""
    settings = make_settings(tmp_path, http_addr="127.0.0.1:0")
    path, body = request_of()
    assert len(body) > 3 << 20
    async with serving_gateway(settings) as (srv, client):
        assert srv.bootstrap_key
        async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
            runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            run = (await runs.CreateRun(create_request(1))).run
            post = asyncio.create_task(
                client.post(
                    path,
                    content=body,
                    headers={"authorization": f"Bearer {srv.bootstrap_key}", "content-type": "application/json"},
                )
            )
            slowest, calls = 0.0, 0
            while not post.done():
                started = time.perf_counter()
                assert (await runs.GetRun(pb.GetRunRequest(run_id=run.id))).run.id == run.id
                slowest = max(slowest, time.perf_counter() - started)
                calls += 1
            response = await post
    assert response.status_code in (400, 413, 422), response.text  # read, then refused for what it holds
    assert len(response.content) < 64 * 1024, "the error does not echo the body"
    assert calls >= 2
    assert slowest < 0.75, f"another tenant's GetRun waited {slowest:.2f} s while the body was read"


async def test_a_dialect_body_of_too_many_json_values_is_413_before_it_is_validated(gw) -> None:
    """FastAPI validates a dialect's body on the event loop, one error per wrong value: a million
    numbers where strings belong took 8 s to report, before the key was looked at. Past
    MAX_JSON_VALUES the body is refused, in the vendor's error shape, without validating it."""
    _, client = gw
    numbers = ",".join(["1"] * (MAX_JSON_VALUES + 1))
    body = f'{{"eval_type":"accuracy","input":"x","expected_tool_calls":[{numbers}]}}'.encode()
    body_is_json = {"content-type": "application/json"}
    response = await client.post("/eval-runs", content=body, headers=body_is_json)
    assert response.status_code == 413, response.text
    assert response.json() == {"detail": f"the body holds more than {MAX_JSON_VALUES} JSON values"}
    small = await client.post("/eval-runs", json={"eval_type": "accuracy", "input": "x", "expected_tool_calls": [1]})
    assert small.status_code == 422 and small.json()["detail"][0]["input"] == 1, "small errors echo their input"
    for path, field in (("/v1/evals/calls", "calls"), ("/v2/evals", "prompts")):  # Bland's and Aymara's shapes
        other = await client.post(path, content=f'{{"{field}":[{numbers}]}}'.encode(), headers=body_is_json)
        assert other.status_code == 413 and f"more than {MAX_JSON_VALUES} JSON values" in other.text, other.text


async def test_a_large_invalid_dialect_body_is_answered_with_its_first_errors_as_fastapi_reports_them(
    gw, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large body is validated in a translator thread, beside its parse, and answered with its first
    100 errors - the ones FastAPI itself reports for a small body - not validated again on the loop."""
    _, client = gw
    on_the_loop: list[bool] = []
    validate = ModelField.validate

    def watched(field: ModelField, *args: Any, **kwargs: Any) -> Any:
        on_the_loop.append(threading.current_thread() is threading.main_thread())
        return validate(field, *args, **kwargs)

    monkeypatch.setattr(ModelField, "validate", watched)
    numbers = ",".join(["1"] * 50_000)
    large = await client.post(
        "/eval-runs",
        content=f'{{"eval_type":"accuracy","input":"x","expected_tool_calls":[{numbers}]}}'.encode(),
        headers={"content-type": "application/json"},
    )
    assert on_the_loop == [False], "validated once, in a translator thread"
    small = await client.post("/eval-runs", json={"eval_type": "accuracy", "input": "x", "expected_tool_calls": [1, 1]})
    assert large.status_code == small.status_code == 422, large.text
    assert len(large.json()["detail"]) == 100
    assert large.json()["detail"][:2] == small.json()["detail"]


async def _stalled_watch(port: int, key: str, run_id: str) -> asyncio.StreamWriter:
    """An SSE watch whose client reads the status line and never again (a small receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET /v1/runs/{run_id}:watch HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n\r\n".encode())
    await writer.drain()
    assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
    return writer


async def test_one_tenants_rest_watches_catching_up_leave_the_loop_to_others(tmp_path: Path) -> None:
    """400 SSE watches of a finished 3,000-item run, never read, on a server of its own: each catch-up is
    ~3,000 proto3 JSON conversions (pure Python), which ran on the event loop back to back (a probe with
    400: a full core, another tenant's gRPC GetRun 12 s, CreateRun 7 s, REST GetRun 5.9 s). Translated in
    threads in the tenants' turns, the other tenant's calls are answered meanwhile (the probe: 1-11 ms,
    47 ms, 3 ms)."""
    db = dbs.db_url(tmp_path)
    server = await start_server(db, tmp_path / "server.log", "--http-addr", "127.0.0.1:0", "--workers", "4")
    try:
        key = server.bootstrap_key()
        assert key
        made = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "evalsvc", "keys", "create", "--tenant", "other", "--db", db],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        other_key = made.stdout.split()[0]
        http = f"http://127.0.0.1:{server.http_port()}"
        async with (
            keyed_channel(server.port, key) as mine,
            keyed_channel(server.port, other_key) as theirs,
            httpx.AsyncClient(base_url=http, headers={"authorization": f"Bearer {other_key}"}, timeout=60) as client,
        ):
            big = (await eval_run_service_pb2_grpc.EvalRunServiceStub(mine).CreateRun(create_request(3000))).run
            their_runs = eval_run_service_pb2_grpc.EvalRunServiceStub(theirs)
            small = (await their_runs.CreateRun(create_request(1))).run
            await watch_to_end(client, big.id, {"authorization": f"Bearer {key}"})
            stalled = [await _stalled_watch(server.http_port(), key, big.id) for _ in range(400)]
            try:
                slowest = 0.0
                for _ in range(5):
                    started = time.perf_counter()
                    assert (await their_runs.GetRun(pb.GetRunRequest(run_id=small.id))).run.id == small.id
                    got = await client.get(f"/v1/runs/{small.id}")
                    assert got.status_code == 200, got.text
                    slowest = max(slowest, time.perf_counter() - started)
            finally:
                for writer in stalled:
                    writer.transport.abort()
    finally:
        server.kill()
    assert slowest < 1.0, f"another tenant's GetRun (gRPC, then REST) took {slowest:.2f} s"


async def test_a_rest_page_of_results_is_at_most_about_max_message_bytes_of_json(gw) -> None:
    """The service bounds a page by its protobuf size (half of --max-message-bytes); its JSON may be far
    larger (a control character is 6 bytes of JSON, 1 of protobuf): 6 outputs of 100 KB of them were one
    REST page of ~3.6 MB of JSON on a server of 1 MiB messages (a page of 16.7 MB of results: 100 MB of
    JSON, 0.6 s and ~300 MiB to write). The gateway now answers the leading results whose JSON fits, with
    the service's token for them: every result once, in order, every page within --max-message-bytes
    (one result alone may be more)."""
    srv, client = gw
    content = "\x01" * 100_000
    items = [item_pb2.Item(id=f"i{n}", input="q", response=item_pb2.Response(content=content)) for n in range(6)]
    assert srv.bootstrap_key
    async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
        runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
        created = await runs.CreateRun(
            pb.CreateRunRequest(
                items=items,
                target=target_pb2.Target(provided=target_pb2.ProvidedTarget()),
                graders=[exact()],
            )
        )
    await watch_to_end(client, created.run.id)
    listed, sizes, token = [], [], ""
    for _ in range(20):
        response = await client.get(f"/v1/runs/{created.run.id}/results", params={"pageToken": token} if token else {})
        assert response.status_code == 200, response.text[:300]
        sizes.append(len(response.content))
        page = response.json()
        listed += [(r["itemId"], r["output"]["content"] == content) for r in page["results"]]
        if not (token := page.get("nextPageToken", "")):
            break
    assert listed == [(f"i{n}", True) for n in range(6)]
    assert max(sizes) <= MAX_BODY, sizes


async def head_in_pieces(port: int, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """Send a GET's head 1 KiB at a time (as a slow link delivers it) and read the whole answer: its status
    and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"GET {path} HTTP/1.1", "host: 127.0.0.1", "connection: close"]
    head = ("\r\n".join(lines + [f"{name}: {value}" for name, value in headers.items()]) + "\r\n\r\n").encode()
    try:
        for start in range(0, len(head), 1024):
            writer.write(head[start : start + 1024])
            await writer.drain()
            await asyncio.sleep(0.002)  # no event says a piece was read on its own: let each arrive alone
        answer = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


async def test_a_request_head_sent_in_pieces_is_judged_by_the_gateways_own_limits(gw) -> None:
    """Review: uvicorn's h11 parser buffered at most 16 KiB of a head still arriving and answered more with a
    plain-text 400 ("Invalid HTTP request received."), so whether a head between 16 KiB and the gateway's
    64 KiB was served, or refused with the 431 in the API's shape, depended on how TCP cut it. Sent in
    pieces, a 30 KB head is served, and a 70 KB one (its path counted with its headers) is the 431 in
    Bland's shape."""
    srv, _ = gw
    assert srv.gateway is not None and srv.bootstrap_key
    key = {"authorization": f"Bearer {srv.bootstrap_key}"}
    status, _ = await head_in_pieces(srv.gateway.port, "/v1/runs", {**key, "x-filler": "f" * 30_000})
    assert status == 200
    status, body = await head_in_pieces(srv.gateway.port, "/v1/evals/runs?" + "q" * 40_000, {"x-filler": "f" * 30_000})
    assert status == 431, body
    assert json.loads(body) == {
        "data": None,
        "errors": [
            {"error": "INVALID_REQUEST", "message": "the request's path, query and headers are larger than 65536 bytes"}
        ],
    }
