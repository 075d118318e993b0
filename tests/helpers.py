"""Helpers for building requests and reading rich errors in tests."""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from evalsvc.config import Settings
from evalsvc.gateway.server import Gateway
from evalsvc.server import EvalServer
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc, grader_pb2, item_pb2, run_pb2, target_pb2


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


def violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """The BadRequest field violations of an error, by field."""
    status = rpc_status.from_call(error)
    assert status is not None, "the error carries no google.rpc.Status"
    found: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.update({v.field: v.description for v in bad.field_violations})
    return found


def error_reason(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of an error."""
    status = rpc_status.from_call(error)
    assert status is not None, "the error carries no google.rpc.Status"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.domain == "evalsvc"
            return info.reason
    raise AssertionError("no ErrorInfo in the status")


async def watch_all(stub, run_id: str, after_seq: int = 0) -> list[pb.WatchRunResponse]:  # type: ignore[no-untyped-def]
    """Every event (no heartbeats) from after_seq to the terminal event."""
    events = []
    async for event in stub.WatchRun(pb.WatchRunRequest(run_id=run_id, after_seq=after_seq)):
        if event.HasField("heartbeat"):
            continue
        events.append(event)
    return events


class _ApiKey:
    """Adds `authorization: Bearer <key>` to every call, as a client library would."""

    def __init__(self, key: str) -> None:
        self._key = key

    def _with_key(self, details: Any) -> Any:
        metadata = grpc.aio.Metadata(*(details.metadata or grpc.aio.Metadata()))
        metadata.add("authorization", f"Bearer {self._key}")
        return details._replace(metadata=metadata)


# grpc.aio files an interceptor under the first call kind it implements, so one class per kind.
class _UnaryKey(_ApiKey, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_key(details), request)


class _StreamKey(_ApiKey, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_key(details), request)


def keyed_channel(
    port: int, key: str, host: str = "127.0.0.1", options: list[tuple[str, Any]] | None = None
) -> grpc.aio.Channel:
    """An insecure channel to a test server that authenticates every call with `key`."""
    return grpc.aio.insecure_channel(f"{host}:{port}", options=options, interceptors=[_UnaryKey(key), _StreamKey(key)])


@asynccontextmanager
async def serving_gateway(
    settings: Settings, *, key_header: str = "authorization", key_prefix: str = "Bearer "
) -> AsyncIterator[tuple[EvalServer, httpx.AsyncClient]]:
    """A started server with its REST gateway (settings need an http_addr), and an HTTP client to the
    gateway that sends the bootstrap key as `key_header: key_prefix<key>`; the server stops after."""
    srv = EvalServer(settings)
    await srv.start()
    try:
        assert srv.gateway is not None and srv.bootstrap_key
        headers = {key_header: f"{key_prefix}{srv.bootstrap_key}"}
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{srv.gateway.port}", headers=headers, timeout=30
        ) as client:
            yield srv, client
    finally:
        await srv.stop(grace=0.5)


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
    """Write a file into directory until its file system is full; returns the file."""
    filler = directory / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    return filler


def retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    """The RetryInfo delay of an error, in seconds; None when it carries no RetryInfo."""
    status = rpc_status.from_call(error)
    assert status is not None, "the error carries no google.rpc.Status"
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToTimedelta().total_seconds()
    return None


@asynccontextmanager
async def impatient_gateway(
    srv: EvalServer, dialects: str, headers: dict[str, str]
) -> AsyncIterator[httpx.AsyncClient]:
    """A second gateway in front of a started server whose synchronous dialect routes do not wait at
    all (--dialect-sync-wait-s 0), and a client to it sending `headers` (the caller's key)."""
    settings = dataclasses.replace(srv.settings, dialect_sync_wait_s=0.0)
    gateway = Gateway(f"127.0.0.1:{srv.port}", "127.0.0.1:0", dialects=dialects, settings=settings)
    port = await gateway.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30) as client:
            yield client
    finally:
        await gateway.stop()
