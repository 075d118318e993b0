"""The REST gateway over real HTTP (uvicorn on port 0) in front of a real gRPC server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from evalsvc.gateway.routes import SERVICES, routes
from evalsvc.server import EvalServer
from tests.conftest import make_settings
from tests.helpers import create_request

RUN = {
    "items": [
        {"id": "a", "input": "q", "expectedOutput": "x", "response": {"content": "x"}},
        {"id": "b", "input": "q", "expectedOutput": "x", "response": {"content": "y"}},
    ],
    "target": {"provided": {}},
    "graders": [{"name": "exact", "exactMatch": {}}],
    "labels": {"team": "a"},
}


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[tuple[EvalServer, httpx.AsyncClient]]:
    srv = EvalServer(make_settings(tmp_path, http_addr="127.0.0.1:0"))
    await srv.start()
    assert srv.gateway is not None and srv.bootstrap_key
    headers = {"authorization": f"Bearer {srv.bootstrap_key}"}
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{srv.gateway.port}", headers=headers, timeout=30
        ) as client:
            yield srv, client
    finally:
        await srv.stop(grace=0.5)


def test_every_rpc_has_an_http_rule() -> None:
    annotated = {r.method.full_name for r in routes()}
    assert annotated == {m.full_name for s in SERVICES for m in s.methods}


async def test_create_get_list_results_cancel_as_proto3_json(gw) -> None:
    _, client = gw
    created = await client.post("/v1/runs", json=RUN)
    assert created.status_code == 200, created.text
    run = created.json()["run"]
    assert created.json()["jobCount"] == 2 and run["status"] == "RUN_STATUS_PENDING" and run["lastSeq"] == "1"
    events = []
    async with client.stream(
        "GET", f"/v1/runs/{run['id']}:watch", headers={"accept": "application/x-ndjson"}
    ) as stream:
        assert stream.headers["content-type"].startswith("application/x-ndjson")
        async for line in stream.aiter_lines():
            if line:
                events.append(json.loads(line)["result"])
    assert [int(e["seq"]) for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["run"]["status"] == "RUN_STATUS_SUCCEEDED"
    got = (await client.get(f"/v1/runs/{run['id']}")).json()["run"]
    assert got["counts"]["passed"] == 1 and got["counts"]["failed"] == 1 and got["labels"] == {"team": "a"}
    listed = (await client.get("/v1/runs", params={"statuses": "RUN_STATUS_SUCCEEDED", "labels.team": "a"})).json()
    assert [r["id"] for r in listed["runs"]] == [run["id"]]
    failed = (await client.get(f"/v1/runs/{run['id']}/results", params={"state": "RESULT_STATE_FAILED"})).json()
    assert [r["itemId"] for r in failed["results"]] == ["b"]
    cancel = await client.post(f"/v1/runs/{run['id']}:cancel", json={})
    assert cancel.status_code == 400 and cancel.json()["details"][0]["reason"] == "RUN_ALREADY_FINISHED"


async def test_errors_map_to_http_statuses_with_the_rpc_status_body(gw) -> None:
    _, client = gw
    missing = await client.get("/v1/runs/run_nope")
    assert missing.status_code == 404 and missing.json()["code"] == 5
    bad = await client.post("/v1/runs", json={**RUN, "description": "d" * 1025})
    assert bad.status_code == 400
    violations = [d for d in bad.json()["details"] if d["@type"].endswith("BadRequest")]
    assert violations[0]["fieldViolations"][0]["field"] == "description"
    anonymous = await client.get("/v1/runs", headers={"authorization": ""})
    assert anonymous.status_code == 401
    garbled = await client.post("/v1/runs", content=b"{not json", headers={"content-type": "application/json"})
    assert garbled.status_code == 400
    assert (await client.get("/v1/runs")).status_code == 200


async def test_sse_watch_resumes_with_last_event_id(gw) -> None:
    srv, client = gw
    await srv.executor.stop()
    run_id = (await client.post("/v1/runs", json=RUN)).json()["run"]["id"]
    await srv.executor.start()
    ids = []
    async with client.stream("GET", f"/v1/runs/{run_id}:watch") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        async for line in stream.aiter_lines():
            if line.startswith("id: "):
                ids.append(int(line[4:]))
    assert ids == list(range(1, len(ids) + 1))
    resumed = []
    async with client.stream("GET", f"/v1/runs/{run_id}:watch", headers={"last-event-id": str(ids[1])}) as stream:
        async for line in stream.aiter_lines():
            if line.startswith("id: "):
                resumed.append(int(line[4:]))
    assert resumed == ids[2:]
    also = []
    async with client.stream("GET", f"/v1/runs/{run_id}:watch", params={"after_seq": ids[-2]}) as stream:
        async for line in stream.aiter_lines():
            if line.startswith("id: "):
                also.append(int(line[4:]))
    assert also == ids[-1:]


async def test_a_disconnecting_http_client_cancels_its_grpc_stream(gw) -> None:
    srv, client = gw
    await srv.executor.stop()  # the run stays pending: the watch would stay open forever
    run_id = (await client.post("/v1/runs", json=RUN)).json()["run"]["id"]
    for _ in range(20):
        async with client.stream("GET", f"/v1/runs/{run_id}:watch") as stream:
            async for line in stream.aiter_lines():
                if line.startswith("data: "):
                    break  # the first event arrived; leave
    watchers = srv.bus.watcher_count()
    for _ in range(200):  # the server notices the HTTP disconnect asynchronously
        if watchers == 0:
            break
        await asyncio.sleep(0.01)  # no event marks the server's end of an HTTP stream
        watchers = srv.bus.watcher_count()
    assert watchers == 0


async def test_openapi_lists_every_native_route(gw) -> None:
    _, client = gw
    spec = (await client.get("/openapi.json")).json()
    for route in routes():
        assert route.verb in spec["paths"][route.path], route.path


async def test_grpc_and_http_see_the_same_run(gw) -> None:
    srv, client = gw
    from evalsvc.v1 import eval_run_service_pb2 as pb
    from evalsvc.v1 import eval_run_service_pb2_grpc
    from tests.helpers import keyed_channel

    async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
        run = (await eval_run_service_pb2_grpc.EvalRunServiceStub(channel).CreateRun(create_request(1))).run
    assert (await client.get(f"/v1/runs/{run.id}")).json()["run"]["id"] == run.id
    assert pb.GetRunRequest(run_id=run.id).run_id == run.id
