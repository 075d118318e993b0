"""A gRPC request over 1 MiB is parsed on the event loop only after the checking process found no map of
more than 65,536 entries in it (evalsvc.api.decoding, docs/security.md): a huge map is refused naming
its field and never parsed on the loop, whatever else the loop is serving meanwhile; an ordinary large
request is served; an undecodable one is MALFORMED_REQUEST; the process leaves with the server."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from evalsvc.api import decoding, interceptor
from evalsvc.server import EvalServer
from evalsvc.v1 import dataset_service_pb2, item_pb2
from tests.conftest import make_settings
from tests.helpers import Tenant, error_reason, retry_delay, rich_error, until, violations

CHECKED = decoding.CHECKED_BYTES


@pytest.fixture
def loop_parses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the requests over CHECKED_BYTES the event loop parsed (the interceptor's parse of each
    method, wrapped before the server's first call of it)."""
    parsed: list[int] = []
    tolerant = interceptor._tolerant

    def counted(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
        parse = tolerant(deserializer)
        if parse is None:
            return None
        inner = parse

        def counting(data: bytes) -> Any:
            if len(data) > CHECKED:
                parsed.append(len(data))
            return inner(data)

        return counting

    monkeypatch.setattr(interceptor, "_tolerant", counted)
    return parsed


def labelled(entries: int) -> dataset_service_pb2.CreateDatasetRequest:
    """A CreateDataset whose labels are one map of `entries` distinct keys (a few MB at 200,000)."""
    request = dataset_service_pb2.CreateDatasetRequest(dataset=dataset_service_pb2.Dataset(display_name="big"))
    request.dataset.labels.update({f"k{i}": "v" for i in range(entries)})
    return request


def checkers() -> list[int]:
    """The ids of this process's checking processes, running or not yet reaped (from /proc: psutil is
    not among the test dependencies)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            # The parent's id is the fourth field of `stat`, after the name in parentheses.
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):  # not a process, or one gone meanwhile
            continue
        if parent == os.getpid() and decoding.WORKER_MODULE.encode() in command:
            found.append(int(entry.name))
    return found


async def test_a_map_over_the_bound_is_refused_naming_it_never_parsed_on_the_loop_while_others_are_served(
    server: EvalServer, tenants: tuple[Tenant, Tenant], loop_parses: list[int]
) -> None:
    mine, theirs = tenants
    request = labelled(200_000)
    assert request.ByteSize() > CHECKED
    refused = asyncio.ensure_future(mine.datasets.CreateDataset(request, timeout=60))
    served = 0  # the other tenant's small calls answered while the big one was being checked
    while not refused.done():
        await theirs.datasets.ListDatasets(dataset_service_pb2.ListDatasetsRequest(), timeout=10)
        served += not refused.done()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await refused
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(err.value) == {"dataset.labels": "a map of 200000 entries: at most 65536 in one request"}
    assert served > 0
    # The same within a repeated message: its path names the item.
    items = [item_pb2.Item(input=f"q{i}") for i in range(5)]
    items[3].metadata.update({f"m{i}": "" for i in range(200_000)})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mine.datasets.AddDatasetItems(
            dataset_service_pb2.AddDatasetItemsRequest(dataset_id="ds_any", items=items), timeout=60
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(err.value) == {"items[3].metadata": "a map of 200000 entries: at most 65536 in one request"}
    assert loop_parses == []  # neither request was parsed in the server's event loop


async def test_a_large_ordinary_request_is_checked_then_parsed_and_served(
    server: EvalServer, tenants: tuple[Tenant, Tenant], loop_parses: list[int]
) -> None:
    mine, _ = tenants
    created = await mine.datasets.CreateDataset(
        dataset_service_pb2.CreateDatasetRequest(dataset=dataset_service_pb2.Dataset(display_name="d")), timeout=10
    )
    items = [item_pb2.Item(input="x" * 1_500, metadata={"a": str(i), "b": "c"}) for i in range(2_000)]
    request = dataset_service_pb2.AddDatasetItemsRequest(dataset_id=created.dataset.id, items=items)
    assert request.ByteSize() > 2 * CHECKED
    added = await mine.datasets.AddDatasetItems(request, timeout=60)
    assert len(added.item_ids) == 2_000
    page = await mine.datasets.ListDatasetItems(
        dataset_service_pb2.ListDatasetItemsRequest(dataset_id=created.dataset.id, page_size=10), timeout=10
    )
    assert page.items[0].metadata["b"] == "c"
    assert loop_parses == [request.ByteSize()]  # parsed on the loop once, after the check
    assert len(checkers()) == 1  # the check was made in the checking process


async def test_a_large_undecodable_request_is_malformed_and_not_parsed_on_the_loop(
    server: EvalServer, loop_parses: list[int]
) -> None:
    assert server.bootstrap_key
    # A valid 2 MB string field, then field 15 with a length that runs past the end.
    data = b"\x12\x80\x80\x80\x01" + b"x" * (1 << 21) + b"\x7a\xff\xff\xff\xff\x0f\x01"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/evalsvc.v1.DatasetService/CreateDataset"
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(data, metadata=(("authorization", f"Bearer {server.bootstrap_key}"),), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(err.value) == "MALFORMED_REQUEST"
    assert loop_parses == []


async def test_a_tenant_has_at_most_four_large_requests_waiting_for_the_checker(
    server: EvalServer, tenants: tuple[Tenant, Tenant], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each large request waiting for the one checker holds a place of --max-concurrent-rpcs: one tenant's
    hundred at once would fill them. A fifth of one tenant's is refused at once (a quota with RetryInfo);
    another tenant's still waits its turn."""
    gate = asyncio.Event()
    exchange = server.checker._exchange

    async def held(payload: bytes) -> tuple[str | None, str, int]:
        await gate.wait()
        return await exchange(payload)

    monkeypatch.setattr(server.checker, "_exchange", held)
    mine, theirs = tenants
    large = [item_pb2.Item(input="x" * 1_500) for _ in range(800)]

    def add(tenant: Tenant) -> Any:
        request = dataset_service_pb2.AddDatasetItemsRequest(dataset_id="ds_none", items=large)
        assert request.ByteSize() > CHECKED
        return asyncio.ensure_future(tenant.datasets.AddDatasetItems(request, timeout=60))

    waiting = [add(mine) for _ in range(decoding.MAX_CHECKS_PER_TENANT)]
    await until(lambda: sum(server.checker._checks.values()) == decoding.MAX_CHECKS_PER_TENANT)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mine.datasets.AddDatasetItems(
            dataset_service_pb2.AddDatasetItemsRequest(dataset_id="ds_none", items=large), timeout=60
        )
    assert (err.value.code(), error_reason(err.value)) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TENANT_QUOTA_EXCEEDED")
    assert rich_error(err.value).metadata == {"quota": "large_requests_in_flight"} and retry_delay(err.value) == 1.0
    other = add(theirs)
    await until(lambda: sum(server.checker._checks.values()) == decoding.MAX_CHECKS_PER_TENANT + 1)
    gate.set()
    for call in [*waiting, other]:  # checked, parsed and answered by the service (no such dataset)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert not server.checker._checks


async def test_a_check_over_its_time_limit_or_without_a_process_ends_the_call_not_the_server(
    server: EvalServer, tenants: tuple[Tenant, Tenant], monkeypatch: pytest.MonkeyPatch
) -> None:
    mine, _ = tenants
    monkeypatch.setattr(decoding, "CHECK_TIMEOUT_S", 0.001)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mine.datasets.CreateDataset(labelled(100_000), timeout=60)
    assert (err.value.code(), error_reason(err.value)) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_TOO_COSTLY")
    assert checkers() == []  # killed (and reaped)
    monkeypatch.setattr(server.checker._worker, "_module", "evalsvc.no_such_module")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mine.datasets.CreateDataset(labelled(100_000), timeout=60)
    assert (err.value.code(), error_reason(err.value)) == (grpc.StatusCode.UNAVAILABLE, "CHECKER_UNAVAILABLE")
    assert retry_delay(err.value) == 1.0


async def test_the_checking_process_ends_with_the_server_and_so_does_a_call_it_is_checking(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    srv = EvalServer(make_settings(tmp_path, sqlite_synchronous="NORMAL"))
    await srv.start()
    assert srv.bootstrap_key
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = Tenant(channel).datasets
            key = (("authorization", f"Bearer {srv.bootstrap_key}"),)
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.CreateDataset(labelled(100_000), metadata=key, timeout=60)
            (checker,) = checkers()
            caplog.set_level(logging.WARNING)
            waiting = asyncio.ensure_future(stub.CreateDataset(labelled(1_000_000), metadata=key, timeout=60))
            while not srv.checker._slots.held:  # the call is being checked
                await asyncio.sleep(0.01)
            await srv.stop(grace=0.1)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await waiting
            assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    finally:
        await srv.stop(grace=0.1)
    assert checkers() == []  # killed and reaped
    assert not Path(f"/proc/{checker}").exists()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
