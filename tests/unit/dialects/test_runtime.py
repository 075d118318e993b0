"""The dialect runtime (evalsvc/gateway/dialects/base.py) over a fake upstream: ownership, the vendor's
not-found, and the three ways of token paging, with no server and no network."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import pytest
from fastapi.responses import JSONResponse
from pydantic import JsonValue

from evalsvc.gateway.dialects.base import (
    Dialect,
    DialectClient,
    Unreadable,
    VendorOptions,
    is_owned,
    owner_labels,
    read_stored,
    window,
)
from evalsvc.gateway.upstream import Caller, GatewayError
from evalsvc.v1 import eval_run_service_pb2 as runs_pb
from evalsvc.v1 import run_pb2


def render(error: GatewayError) -> JSONResponse:
    return JSONResponse({"message": error.message}, status_code=error.http_status)


def dialect(service_not_found: bool = False) -> Dialect:
    return Dialect(
        name="acme",
        title="Acme",
        prefix="",
        client=DialectClient,
        routes=lambda api, client, options: None,
        vendor=VendorOptions(error_handler=render, service_not_found=service_not_found),
    )


class FakeUpstream:
    """`Upstream.call` without a channel: the method is called with the request, as the caller."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    async def call(self, method: Any, request: Any, caller: Caller) -> Any:
        self.calls.append(type(request).FromString(request.SerializeToString()))
        assert caller.api_key == "evk_test"
        return await method(request)


def runs_service(runs: Sequence[run_pb2.Run]) -> Any:
    """ListRuns over `runs`, page tokens being offsets; GetRun by id (NOT_FOUND otherwise)."""

    async def list_runs(request: runs_pb.ListRunsRequest) -> runs_pb.ListRunsResponse:
        start = int(request.page_token or 0)
        end = start + request.page_size
        return runs_pb.ListRunsResponse(runs=runs[start:end], next_page_token=str(end) if end < len(runs) else "")

    async def get_run(request: runs_pb.GetRunRequest) -> runs_pb.GetRunResponse:
        for run in runs:
            if run.id == request.run_id:
                return runs_pb.GetRunResponse(run=run)
        raise GatewayError(grpc.StatusCode.NOT_FOUND, f"run {request.run_id} does not exist", "RUN_NOT_FOUND")

    return list_runs, get_run


RUNS = [run_pb2.Run(id=f"run_{i}", labels=owner_labels("acme") if i % 2 else {}) for i in range(7)]


def client(upstream: FakeUpstream, service_not_found: bool = False) -> DialectClient:
    return DialectClient(upstream, Caller("evk_test"), dialect(service_not_found))  # type: ignore[arg-type]


def test_one_owner_label() -> None:
    acme = client(FakeUpstream())
    assert acme.labels == owner_labels("acme") == {"dialect": "acme"}
    assert acme.owns({"dialect": "acme", "x": "y"}) and is_owned({"dialect": "acme"}, "acme")
    assert not acme.owns({"dialect": "other"}) and not acme.owns({})


async def test_owned_is_the_callers_own_resource_or_the_vendors_not_found() -> None:
    _, get_run = runs_service(RUNS)
    missing = GatewayError.not_found("no such acme run")
    acme = client(FakeUpstream())
    found = await acme.owned(get_run, runs_pb.GetRunRequest(run_id="run_1"), "run", missing)
    assert found.id == "run_1"
    for run_id in ("run_2", "run_404"):  # another dialect's (unlabelled) run, then none at all
        with pytest.raises(GatewayError) as raised:
            await acme.owned(get_run, runs_pb.GetRunRequest(run_id=run_id), "run", missing)
        assert raised.value is missing
    with pytest.raises(GatewayError) as raised:  # refused by the dialect's own test
        await acme.owned(get_run, runs_pb.GetRunRequest(run_id="run_3"), "run", missing, accept=lambda r: False)
    assert raised.value is missing


async def test_a_vendor_that_shows_the_services_not_found_gets_it_as_is() -> None:
    _, get_run = runs_service(RUNS)
    missing = GatewayError.not_found("no such acme run")
    acme = client(FakeUpstream(), service_not_found=True)
    with pytest.raises(GatewayError) as raised:
        await acme.owned(get_run, runs_pb.GetRunRequest(run_id="run_404"), "run", missing)
    assert raised.value.reason == "RUN_NOT_FOUND" and raised.value.message == "run run_404 does not exist"
    with pytest.raises(GatewayError) as raised:  # not its own: the vendor's not-found all the same
        await acme.owned(get_run, runs_pb.GetRunRequest(run_id="run_2"), "run", missing)
    assert raised.value is missing


async def test_get_turns_only_not_found_into_the_vendors_error() -> None:
    missing = GatewayError.not_found("no such thing")

    async def unavailable(request: Any) -> Any:
        raise GatewayError(grpc.StatusCode.UNAVAILABLE, "down")

    with pytest.raises(GatewayError) as raised:
        await client(FakeUpstream()).get(unavailable, runs_pb.GetRunRequest(run_id="x"), missing)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE


async def test_pages_collect_and_page_read_a_token_paged_list() -> None:
    list_runs, _ = runs_service(RUNS)
    upstream = FakeUpstream()
    acme = client(upstream)
    lazily = [run.id async for run in acme.pages(list_runs, runs_pb.ListRunsRequest(), "runs", page_size=3)]
    assert lazily == [run.id for run in RUNS] and len(upstream.calls) == 3

    upstream.calls.clear()
    first = await acme.collect(list_runs, runs_pb.ListRunsRequest(), "runs", limit=2)
    assert [run.id for run in first] == ["run_0", "run_1"] and len(upstream.calls) == 1

    upstream.calls.clear()  # a cursor page of owned runs: each call asks for what is still missing
    kept, cursor = await acme.page(list_runs, runs_pb.ListRunsRequest(), "runs", 2, None, lambda r: acme.owns(r.labels))
    assert [run.id for run in kept] == ["run_1", "run_3"] and cursor == "4"
    assert [call.page_size for call in upstream.calls] == [2, 1, 1]
    rest, cursor = await acme.page(
        list_runs, runs_pb.ListRunsRequest(), "runs", 5, cursor, lambda r: acme.owns(r.labels)
    )
    assert [run.id for run in rest] == ["run_5"] and cursor is None


def test_window_is_offset_paging_over_a_collected_list() -> None:
    assert window(list(range(10)), 8, 5) == [8, 9] and window([1, 2], 5, 1) == []


def test_a_stored_value_nested_deeper_than_pydantics_parser_reads_as_json_or_as_unreadable() -> None:
    """Review: pydantic's own JSON parser stops at ~200 levels, so a value nested deeper (written natively,
    or before bodies' depth was bounded) made its record vanish. It is read as JSON; one too deep for
    any parser is Unreadable (its record not the dialect's), never an error of the request."""
    deep = "[" * 220 + "]" * 220
    assert read_stored(JsonValue, deep) is not None
    with pytest.raises(Unreadable):
        read_stored(JsonValue, "[" * 100_000 + "]" * 100_000)
    with pytest.raises(Unreadable):
        read_stored(list[str], "not json")
