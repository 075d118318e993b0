"""Helpers for building requests and reading rich errors in tests."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from evalsvc_client.errors import EvalError, from_rpc_error, status_details

from evalsvc import testing
from evalsvc.config import Settings
from evalsvc.gateway.server import Gateway, remote_channels
from evalsvc.server import EvalServer
from evalsvc.statuses import TERMINAL
from evalsvc.v1 import (
    dataset_service_pb2_grpc,
    eval_run_service_pb2_grpc,
    grader_pb2,
    grader_service_pb2_grpc,
    item_pb2,
    run_pb2,
    target_pb2,
    target_service_pb2_grpc,
)
from evalsvc.v1 import eval_run_service_pb2 as pb

TERMINAL_NAMES = {run_pb2.RunStatus.Name(status) for status in TERMINAL}  # as proto3 JSON writes them


def provided_items(n: int, *, wrong_every: int = 0) -> list[item_pb2.Item]:
    """n items with recorded responses; every `wrong_every`-th response differs from its expected output."""
    items = []
    for i in range(n):
        expected = f"answer {i}"
        wrong = wrong_every and i % wrong_every == 0
        items.append(
            item_pb2.Item(
                id=f"i{i}",
                input=f"question {i}",
                expected_output=expected,
                response=item_pb2.Response(content="nope" if wrong else expected, latency_ms=float(i % 50)),
            )
        )
    return items


async def all_results(stub: eval_run_service_pb2_grpc.EvalRunServiceStub, run_id: str) -> list[run_pb2.Result]:
    """Every result of a run, page by page."""
    results: list[run_pb2.Result] = []
    token = ""
    while True:
        page = await stub.ListRunResults(pb.ListRunResultsRequest(run_id=run_id, page_size=1000, page_token=token))
        results.extend(page.results)
        if not (token := page.next_page_token):
            return results


def exact() -> grader_pb2.Grader:
    """An exact-match grader."""
    return grader_pb2.Grader(name="exact", exact_match=grader_pb2.ExactMatch())


def create_request(n: int = 5, **fields: object) -> pb.CreateRunRequest:
    """A valid CreateRun request over n provided items with one exact-match grader."""
    request = pb.CreateRunRequest(
        items=provided_items(n), target=target_pb2.Target(provided=target_pb2.ProvidedTarget()), graders=[exact()]
    )
    for name, value in fields.items():
        field = getattr(request, name)
        if hasattr(field, "extend") and isinstance(value, list):
            del field[:]
            field.extend(value)
        elif hasattr(field, "update") and isinstance(value, dict):
            field.update(value)
        elif hasattr(field, "CopyFrom"):
            field.CopyFrom(value)
        else:
            setattr(request, name, value)
    return request


def rich_error(error: grpc.aio.AioRpcError) -> EvalError:
    """The error as the Python SDK reads it (clients/python: ErrorInfo, BadRequest, RetryInfo), after checking
    that the server sent a google.rpc.Status at all."""
    assert status_details(error) is not None, "the error carries no google.rpc.Status"
    return from_rpc_error(error)


def violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """The BadRequest field violations of an error, by field (the last one of a field named twice)."""
    return dict(rich_error(error).field_violations)


def error_reason(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of an error."""
    reason = rich_error(error).reason
    assert reason, "no ErrorInfo in the status"
    return reason


async def watch_all(stub, run_id: str, after_seq: int = 0) -> list[pb.WatchRunResponse]:  # type: ignore[no-untyped-def]
    """Every event (no heartbeats) from after_seq to the terminal event."""
    events = []
    async for event in stub.WatchRun(pb.WatchRunRequest(run_id=run_id, after_seq=after_seq)):
        if event.HasField("heartbeat"):
            continue
        events.append(event)
    return events


def keyed_channel(
    port: int, key: str, host: str = "127.0.0.1", options: list[tuple[str, Any]] | None = None
) -> grpc.aio.Channel:
    """An insecure channel to a test server that authenticates every call with `key`."""
    return testing.keyed_channel(f"{host}:{port}", key, options)


@asynccontextmanager
async def serving_gateway(
    settings: Settings, *, key_header: str = "authorization", key_prefix: str = "Bearer "
) -> AsyncIterator[tuple[EvalServer, httpx.AsyncClient]]:
    """A started server with its REST gateway (settings need an http_addr), and an HTTP client to the
    gateway that sends the bootstrap key as `key_header: key_prefix<key>`; the server stops after."""
    async with testing.EvalServiceTestServer(settings=settings) as started:
        assert started.http_url is not None
        headers = {key_header: f"{key_prefix}{started.api_key}"}
        async with httpx.AsyncClient(base_url=started.http_url, headers=headers, timeout=30) as client:
            yield started.server, client


@asynccontextmanager
async def two_tenants_idle(
    settings: Settings,
) -> AsyncIterator[
    tuple[EvalServer, eval_run_service_pb2_grpc.EvalRunServiceStub, eval_run_service_pb2_grpc.EvalRunServiceStub]
]:
    """A started server whose executor is stopped (runs stay pending, their watches open), with stubs of
    tenant "default" (the bootstrap key) and of tenant "other"; the server stops after."""
    srv = EvalServer(settings)
    await srv.start()
    await srv.executor.stop()
    assert srv.bootstrap_key
    other_key, _ = await srv.keys.create("other")
    try:
        async with keyed_channel(srv.port, srv.bootstrap_key) as a, keyed_channel(srv.port, other_key) as b:
            yield srv, eval_run_service_pb2_grpc.EvalRunServiceStub(a), eval_run_service_pb2_grpc.EvalRunServiceStub(b)
    finally:
        await srv.stop(grace=0.5)


async def watch_to_end(http: httpx.AsyncClient, run_id: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """The run as its terminal event shows it, from the gateway's native NDJSON watch (which ends there), at
    most 30 s. `headers` add to the client's own (the key, for clients that do not send it)."""
    last: dict[str, Any] = {}
    watch_headers = {"accept": "application/x-ndjson", **(headers or {})}
    async with asyncio.timeout(30), http.stream("GET", f"/v1/runs/{run_id}:watch", headers=watch_headers) as stream:
        assert stream.status_code == 200, await stream.aread()
        async for line in stream.aiter_lines():
            if line:
                last = json.loads(line)["result"]
    run: dict[str, Any] = last.get("run", {})
    assert run.get("status") in TERMINAL_NAMES, f"the watch ended before the run did: {last}"
    return run


@contextmanager
def tmpfs(path: Path, *options: str) -> Iterator[Path]:
    """A small tmpfs mounted at path: a real read-only or full file system. Mounting needs root,
    which the test machine and the CI container have; elsewhere the test is skipped, saying so."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def fill(directory: Path) -> Path:
    """Write a file into directory until its file system is full; returns the file. Unbuffered: a buffered
    file still held the bytes the full disk refused, and its close raised ENOSPC again out of the helper."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 65536)
        except OSError:
            pass
    return filler


def retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    """The RetryInfo delay of an error, in seconds; None when it carries no RetryInfo."""
    return rich_error(error).retry_delay


@asynccontextmanager
async def impatient_gateway(
    srv: EvalServer, dialects: str, headers: dict[str, str], *, wait_s: float = 0.0
) -> AsyncIterator[httpx.AsyncClient]:
    """A second gateway in front of a started server whose synchronous dialect routes wait `wait_s`
    (--dialect-sync-wait-s; by default not at all), and a client to it sending `headers` (the caller's key)."""
    settings = dataclasses.replace(srv.settings, dialect_sync_wait_s=wait_s)
    gateway = Gateway(remote_channels(f"127.0.0.1:{srv.port}"), "127.0.0.1:0", dialects=dialects, settings=settings)
    port = await gateway.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30) as client:
            yield client
    finally:
        await gateway.stop()


async def until(check: Callable[[], bool], within_s: float = 15.0) -> None:
    """Until `check` holds (it is looked at every 10 ms): for server state no event marks."""

    async def holds() -> None:
        while not check():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(holds(), within_s)


class Tenant:
    """Stubs of one tenant (the `tenants` fixture gives two)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
        self.datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        self.graders = grader_service_pb2_grpc.GraderServiceStub(channel)
        self.targets = target_service_pb2_grpc.TargetServiceStub(channel)
