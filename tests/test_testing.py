"""evalsvc.testing as the README shows it to users: start, use, stop, clean up."""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import pytest

from evalsvc.testing import EvalServiceTestServer, keyed_channel
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc, run_pb2
from tests import dbs
from tests.helpers import create_request, watch_all


async def test_the_default_server_runs_a_run_and_leaves_nothing_behind() -> None:
    async with EvalServiceTestServer() as server:
        database = Path(server.server.settings.db.removeprefix("sqlite+aiosqlite:///"))
        assert database.exists() and server.http_url is None
        run = (await server.runs.CreateRun(create_request(3))).run
        assert (await watch_all(server.runs, run.id))[-1].run.status == run_pb2.RUN_STATUS_SUCCEEDED
        # What a user's own client gets: an address and a key.
        async with keyed_channel(server.grpc_target, server.api_key) as own:
            stub = eval_run_service_pb2_grpc.EvalRunServiceStub(own)
            assert (await stub.GetRun(pb.GetRunRequest(run_id=run.id))).run.id == run.id
    assert not database.parent.exists()
    with pytest.raises(RuntimeError):
        _ = server.grpc_target


async def test_options_a_database_a_tenant_settings_and_the_gateway(tmp_path: Path) -> None:
    url = dbs.db_url(tmp_path)
    async with EvalServiceTestServer(database_url=url, tenant="acme", http_gateway=True, max_items_per_run=2) as server:
        assert server.server.settings.db == url and server.http_url is not None
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await server.runs.CreateRun(create_request(3))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # the override took effect
        run = (await server.runs.CreateRun(create_request(2))).run
        assert run.id
        headers = {"authorization": f"Bearer {server.api_key}"}
        async with httpx.AsyncClient(base_url=server.http_url, headers=headers) as http:
            listed = (await http.get("/v1/runs")).json()
        assert [r["id"] for r in listed["runs"]] == [run.id]  # acme's key sees acme's run
    # The database given is kept: a second server over it finds the run (and mints a new key for default).
    async with EvalServiceTestServer(database_url=url) as again:
        with pytest.raises(grpc.aio.AioRpcError) as hidden:
            await again.runs.GetRun(pb.GetRunRequest(run_id=run.id))  # another tenant's run
        assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
