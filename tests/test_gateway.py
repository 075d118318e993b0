"""The REST gateway over real HTTP (uvicorn on port 0) in front of a real gRPC server."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import jsonschema_rs
import pytest
from google.protobuf import struct_pb2

from evalsvc import config
from evalsvc.cli import build_parser
from evalsvc.gateway.openapi import ITEM_SCHEMA
from evalsvc.gateway.reachability import UpstreamLog
from evalsvc.gateway.routes import SERVICES, routes
from evalsvc.gateway.server import Gateway, remote_channels
from evalsvc.messages import validation
from evalsvc.server import EvalServer
from evalsvc.v1 import dataset_service_pb2, dataset_service_pb2_grpc, item_pb2
from tests.conftest import make_settings
from tests.helpers import create_request, keyed_channel, serving_gateway, watch_to_end

RUN = {
    "items": [
        {"id": "a", "input": "q", "expectedOutput": "x", "response": {"content": "x"}},
        {"id": "b", "input": "q", "expectedOutput": "x", "response": {"content": "y"}},
    ],
    "target": {"provided": {}},
    "graders": [{"name": "exact", "exactMatch": {}}],
    "labels": {"team": "a"},
}
STATUS_REF = "#/components/schemas/google.rpc.Status"
WATCH_CYCLES = 1000  # HTTP watches opened, read to their first event and dropped
WATCH_CONCURRENCY = 10
WATCH_METHOD = "/evalsvc.v1.EvalRunService/WatchRun"


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[tuple[EvalServer, httpx.AsyncClient]]:
    async with serving_gateway(make_settings(tmp_path, http_addr="127.0.0.1:0")) as (srv, client):
        yield srv, client


@pytest.fixture(scope="module")
async def refusing_gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[EvalServer, httpx.AsyncClient]]:
    """One server and gateway for this module's tests that send only requests the gateway refuses, reads,
    or writes to a dataset of their own: none changes what another of them reads, so they share it rather
    than start and migrate one each (a test that reads what the tenant has, as `/v1/runs == []`, takes `gw`)."""
    settings = make_settings(tmp_path_factory.mktemp("refusing-gw"), http_addr="127.0.0.1:0")
    async with serving_gateway(settings) as (srv, client):
        yield srv, client


def validator(spec: dict[str, Any], schema: dict[str, Any]) -> jsonschema_rs.Validator:
    """A JSON Schema validator for a schema of the OpenAPI document, its `$ref`s resolved in the document."""
    return jsonschema_rs.Draft202012Validator({**schema, "components": spec["components"]}, validate_formats=True)


def refs(node: Any) -> Iterator[str]:
    """Every `$ref` in a piece of the OpenAPI document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def sse_data(lines: list[str]) -> list[tuple[int | None, str, dict[str, Any]]]:
    """(id, event, data) of each Server-Sent Event in a stream's lines."""
    events, fields = [], {}
    for line in lines:
        if not line:
            events.append((int(fields["id"]) if "id" in fields else None, fields["event"], json.loads(fields["data"])))
            fields = {}
            continue
        name, _, value = line.partition(": ")
        fields[name] = value
    return events


def violation_of(response: httpx.Response) -> tuple[str, str]:
    """(field, description) of a 400's one google.rpc.BadRequest field violation."""
    assert response.status_code == 400, response.text
    [bad] = [d for d in response.json()["details"] if d["@type"].endswith("google.rpc.BadRequest")]
    [violation] = bad["fieldViolations"]
    return violation["field"], violation["description"]


async def first_event(client: httpx.AsyncClient, run_id: str, ndjson: bool) -> dict[str, Any]:
    """Open a watch, read its first event, and hang up."""
    headers = {"accept": "application/x-ndjson"} if ndjson else {}
    async with client.stream("GET", f"/v1/runs/{run_id}:watch", headers=headers) as stream:
        async for line in stream.aiter_lines():
            if line.startswith("{"):
                return json.loads(line)["result"]
            if line.startswith("data: "):
                return json.loads(line[len("data: ") :])
    raise AssertionError("the watch ended without an event")


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether `condition` holds within `timeout` seconds: for server-side cleanup that no event marks
    (the server learns of an HTTP client's disconnect on its own schedule)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


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


async def test_results_of_any_of_several_states_by_repeating_states(gw) -> None:
    """`?states=RESULT_STATE_FAILED&states=RESULT_STATE_ERROR` lists what needs triage in one call (the
    probe's `?states=` was "unknown query parameter; did you mean 'state'?"); its page token reads on
    only with the same states, and a bad one names its index."""
    _, client = gw
    items = [
        {"id": "pass", "input": "q", "expectedOutput": "x", "response": {"content": "x"}},
        {"id": "fail", "input": "q", "expectedOutput": "x", "response": {"content": "y"}},
        {"id": "error", "input": "q", "expectedOutput": "x"},  # nothing recorded to return
    ]
    run_id = (await client.post("/v1/runs", json={**RUN, "items": items})).json()["run"]["id"]
    await watch_to_end(client, run_id)
    triage = [("states", "RESULT_STATE_FAILED"), ("states", "RESULT_STATE_ERROR")]
    listed = await client.get(f"/v1/runs/{run_id}/results", params=triage)
    assert listed.status_code == 200, listed.text
    assert {r["itemId"]: r["state"] for r in listed.json()["results"]} == {
        "fail": "RESULT_STATE_FAILED",
        "error": "RESULT_STATE_ERROR",
    }
    first = (await client.get(f"/v1/runs/{run_id}/results", params=[*triage, ("pageSize", "1")])).json()
    token = first["nextPageToken"]
    rest = await client.get(f"/v1/runs/{run_id}/results", params=[*triage, ("pageToken", token)])
    assert [r["itemId"] for r in [*first["results"], *rest.json()["results"]]] == ["fail", "error"]
    other = await client.get(
        f"/v1/runs/{run_id}/results", params=[("states", "RESULT_STATE_FAILED"), ("pageToken", token)]
    )
    assert other.status_code == 400 and other.json()["details"][0]["reason"] == "INVALID_PAGE_TOKEN", other.text
    unspecified = await client.get(
        f"/v1/runs/{run_id}/results", params=[("states", "RESULT_STATE_FAILED"), ("states", "RESULT_STATE_UNSPECIFIED")]
    )
    assert violation_of(unspecified) == ("states[1]", "RESULT_STATE_UNSPECIFIED is no state")
    lower = await client.get(f"/v1/runs/{run_id}/results", params=[("states", "failed")])
    assert violation_of(lower) == (  # it said "unknown value failed", naming no value it takes
        "states[0]",
        "unknown value failed; expected one of RESULT_STATE_PASSED, RESULT_STATE_FAILED, RESULT_STATE_ERROR,"
        " RESULT_STATE_SKIPPED",
    )
    assert violation_of(await client.get("/v1/runs", params={"statuses": "succeeded"})) == (
        "statuses[0]",
        "unknown value succeeded; expected one of RUN_STATUS_PENDING, RUN_STATUS_RUNNING, RUN_STATUS_SUCCEEDED,"
        " RUN_STATUS_FAILED, RUN_STATUS_CANCELLED",
    )
    both = await client.get(
        f"/v1/runs/{run_id}/results", params=[("state", "RESULT_STATE_FAILED"), ("states", "RESULT_STATE_ERROR")]
    )
    assert both.status_code == 400 and {
        v["field"] for d in both.json()["details"] for v in d.get("fieldViolations", [])
    } == {"state", "states"}


async def test_update_delete_undelete_take_a_body_field_a_field_mask_and_a_boolean_query(gw) -> None:
    _, client = gw
    run_id = (await client.post("/v1/runs", json=RUN)).json()["run"]["id"]
    renamed = await client.patch(
        f"/v1/runs/{run_id}",
        params={"updateMask": "displayName,annotations"},
        json={"displayName": "renamed", "annotations": {"vendor.field": "kept"}, "description": "not in the mask"},
    )
    assert renamed.status_code == 200, renamed.text
    run = renamed.json()["run"]
    assert (run["displayName"], run["annotations"], run["description"]) == ("renamed", {"vendor.field": "kept"}, "")
    stale = (await client.get(f"/v1/runs/{run_id}")).json()["run"]["etag"]
    await client.patch(f"/v1/runs/{run_id}", json={"displayName": "again"})
    stale_patch = await client.patch(f"/v1/runs/{run_id}", json={"displayName": "lost", "etag": stale})
    assert stale_patch.status_code == 409 and stale_patch.json()["details"][0]["reason"] == "ETAG_MISMATCH"
    refused = await client.delete(f"/v1/runs/{run_id}", params={"etag": stale})
    assert refused.status_code == 409 and refused.json()["details"][0]["reason"] == "ETAG_MISMATCH"
    current = (await client.get(f"/v1/runs/{run_id}")).json()["run"]["etag"]
    deleted = (await client.delete(f"/v1/runs/{run_id}", params={"etag": current})).json()["run"]
    assert deleted["deleteTime"]
    assert (await client.get("/v1/runs")).json()["runs"] == []
    shown = (await client.get("/v1/runs", params={"showDeleted": "true"})).json()["runs"]
    assert [r["id"] for r in shown] == [run_id]
    restored = await client.post(f"/v1/runs/{run_id}:undelete")
    assert restored.status_code == 200 and "deleteTime" not in restored.json()["run"]
    assert [r["id"] for r in (await client.get("/v1/runs")).json()["runs"]] == [run_id]


async def test_etag_and_if_match_headers_are_the_runs_etag(gw) -> None:
    """HTTP's own optimistic concurrency: a stale `If-Match` was ignored (PATCH and DELETE succeeded)
    and GET sent no `ETag`. Now a run's responses carry its etag as `ETag`, and `If-Match` is the
    request's etag: a stale one changes nothing (ETAG_MISMATCH, answered 412 Precondition Failed as RFC
    9110 says a condition that does not hold is; it was 409, the status of a stale etag in the body),
    `*` checks nothing."""
    _, client = gw
    run_id = (await client.post("/v1/runs", json=RUN)).json()["run"]["id"]
    async with client.stream("GET", f"/v1/runs/{run_id}:watch", headers={"accept": "application/x-ndjson"}) as ended:
        _ = [line async for line in ended.aiter_lines()]  # to its end: executing changes the run's etag
    got = await client.get(f"/v1/runs/{run_id}")
    assert got.headers["etag"] == f'"{got.json()["run"]["etag"]}"'
    stale = got.headers["etag"]
    renamed = await client.patch(f"/v1/runs/{run_id}", json={"displayName": "a"}, headers={"if-match": stale})
    assert renamed.status_code == 200 and renamed.headers["etag"] != stale
    lost = await client.patch(f"/v1/runs/{run_id}", json={"displayName": "lost"}, headers={"if-match": stale})
    assert lost.status_code == 412 and lost.json()["details"][0]["reason"] == "ETAG_MISMATCH"
    refused = await client.delete(f"/v1/runs/{run_id}", headers={"if-match": stale})
    assert refused.status_code == 412 and refused.json()["details"][0]["reason"] == "ETAG_MISMATCH"
    in_query = await client.delete(f"/v1/runs/{run_id}", params={"etag": stale.strip('"')})
    assert in_query.status_code == 409 and in_query.json()["details"][0]["reason"] == "ETAG_MISMATCH"
    for never in (f"W/{renamed.headers['etag']}", '""'):  # weak: never matches (RFC 9110); empty: no check
        unclear = await client.delete(f"/v1/runs/{run_id}", headers={"if-match": never})
        assert unclear.status_code == 400, (never, unclear.text)
    assert (await client.get(f"/v1/runs/{run_id}")).json()["run"]["displayName"] == "a"
    both = await client.delete(f"/v1/runs/{run_id}", params={"etag": "1"}, headers={"if-match": '"2"'})
    assert both.status_code == 400 and both.json()["details"][1]["fieldViolations"][0]["field"] == "If-Match"
    anyway = await client.patch(f"/v1/runs/{run_id}", json={"displayName": "b"}, headers={"if-match": "*"})
    assert anyway.status_code == 200
    current = anyway.headers["etag"]
    # A read with If-Match is answered when the run is at that etag (it was refused: 400 "no etag").
    for method in ("GET", "HEAD"):
        read = await client.request(method, f"/v1/runs/{run_id}", headers={"if-match": current})
        assert read.status_code == 200 and read.headers["etag"] == current, (method, read.text)
    moved = await client.get(f"/v1/runs/{run_id}", headers={"if-match": stale})
    assert moved.status_code == 412 and moved.json()["details"][0]["reason"] == "ETAG_MISMATCH", moved.text
    deleted = await client.delete(f"/v1/runs/{run_id}", headers={"if-match": current})
    assert deleted.status_code == 200 and deleted.json()["run"]["deleteTime"]


async def test_if_none_match_star_on_a_write_fails_on_an_existing_run_and_changes_nothing(gw) -> None:
    """Probe: a PATCH of an existing run with `If-None-Match: *` answered 200 and changed it. RFC 9110 13.1.2:
    `*` fails when the resource exists, so a run's PATCH or DELETE with it is 412 and writes nothing; a run
    that does not exist is the 404 it would be. Tags in it, or the header on a write of a resource with no
    etag, are refused (400) as If-Match's are; a read ignores it."""
    _, client = gw
    run_id = (await client.post("/v1/runs", json=RUN)).json()["run"]["id"]
    async with client.stream("GET", f"/v1/runs/{run_id}:watch", headers={"accept": "application/x-ndjson"}) as ended:
        _ = [line async for line in ended.aiter_lines()]  # to its end: executing changes the run's etag
    before = await client.get(f"/v1/runs/{run_id}")
    for method, kwargs in [("PATCH", {"json": {"displayName": "x"}}), ("DELETE", {})]:
        for if_match in ({}, {"if-match": before.headers["etag"]}):  # whatever If-Match holds
            failed = await client.request(
                method, f"/v1/runs/{run_id}", headers={"if-none-match": "*", **if_match}, **kwargs
            )
            assert failed.status_code == 412, (method, failed.text)
            assert failed.json()["details"][0]["reason"] == "ETAG_MISMATCH"
            # It said "changed since etag '0' was read", an etag the client never sent.
            assert failed.json()["message"] == (
                f"run {run_id!r} exists, and If-None-Match: * lets the write run only if it does not; "
                "nothing was written"
            ), failed.text
            assert int(failed.headers["content-length"]) == len(failed.content)
    after = await client.get(f"/v1/runs/{run_id}")
    assert after.headers["etag"] == before.headers["etag"] and after.json()["run"] == before.json()["run"]
    missing = await client.patch("/v1/runs/run-missing", json={"displayName": "x"}, headers={"if-none-match": "*"})
    assert missing.status_code == 404, missing.text

    grader = {"grader": {"name": "exact", "exactMatch": {}}}
    grader_id = (await client.post("/v1/graders", json={"grader": grader})).json()["grader"]["id"]
    for method, url, value in [
        ("PATCH", f"/v1/runs/{run_id}", before.headers["etag"]),  # only * on a write
        ("DELETE", f"/v1/graders/{grader_id}", "*"),  # no etag to hold it to
    ]:
        refused = await client.request(method, url, headers={"if-none-match": value}, json={"displayName": "x"})
        assert refused.status_code == 400, (method, url, refused.text)
        [bad] = [d for d in refused.json()["details"] if d["@type"].endswith("google.rpc.BadRequest")]
        assert bad["fieldViolations"][0]["field"] == "If-None-Match", bad
    assert (await client.get(f"/v1/graders/{grader_id}")).status_code == 200
    assert (await client.get(f"/v1/runs/{run_id}")).json()["run"] == before.json()["run"]
    read = await client.get(f"/v1/runs/{run_id}", headers={"if-none-match": "*"})
    assert read.status_code == 200


async def test_if_match_on_a_resource_without_an_etag_is_refused_and_runs_nothing(gw) -> None:
    """A grader, target, webhook, dataset or secret has no etag, so no tag can match: a conditional DELETE
    or PATCH of one ran as if unconditional (RFC 9110: it must not run). `*` still passes."""
    _, client = gw
    grader = {"grader": {"name": "exact", "exactMatch": {}}}
    grader_id = (await client.post("/v1/graders", json={"grader": grader})).json()["grader"]["id"]
    hook = {"url": "https://ci.example.com/hook", "eventTypes": ["run.failed"]}
    hook_id = (await client.post("/v1/webhooks", json={"webhook": hook})).json()["webhook"]["id"]
    for method, url, kwargs in [
        ("DELETE", f"/v1/graders/{grader_id}", {}),
        ("PATCH", f"/v1/webhooks/{hook_id}", {"json": {"description": "changed"}}),
        ("GET", f"/v1/graders/{grader_id}", {}),
    ]:
        refused = await client.request(method, url, headers={"if-match": '"nope"'}, **kwargs)
        assert refused.status_code == 400, (method, url, refused.text)
        [bad] = [d for d in refused.json()["details"] if d["@type"].endswith("google.rpc.BadRequest")]
        assert bad["fieldViolations"][0]["field"] == "If-Match", bad
    assert (await client.get(f"/v1/graders/{grader_id}")).status_code == 200
    assert (await client.get(f"/v1/webhooks/{hook_id}")).json()["webhook"]["description"] == ""
    deleted = await client.delete(f"/v1/graders/{grader_id}", headers={"if-match": "*"})
    assert deleted.status_code == 200, deleted.text
    assert (await client.get(f"/v1/graders/{grader_id}")).status_code == 404


async def test_a_field_mask_names_a_map_key_verbatim_and_takes_field_names_in_either_form(gw) -> None:
    """proto3 JSON's FieldMask reads every capital letter as `_` and a small one: `annotations.myKey`
    became `annotations.my_key`, so a PATCH answered 200, set nothing and removed `my_key`."""
    _, client = gw
    run_id = (await client.post("/v1/runs", json=RUN)).json()["run"]["id"]
    keys = {"my_key": "a", "myKey": "b", "foo": "bar"}
    whole = await client.patch(f"/v1/runs/{run_id}", params={"updateMask": "annotations"}, json={"annotations": keys})
    assert whole.status_code == 200 and whole.json()["run"]["annotations"] == keys, whole.text
    one = await client.patch(
        f"/v1/runs/{run_id}", params={"updateMask": "annotations.myKey"}, json={"annotations": {"myKey": "rest"}}
    )
    assert one.status_code == 200 and one.json()["run"]["annotations"] == {**keys, "myKey": "rest"}, one.text
    snake = await client.patch(
        f"/v1/runs/{run_id}",
        params=[("update_mask", "display_name"), ("update_mask", "annotations.`my_key`")],
        json={"displayName": "renamed"},
    )
    assert snake.status_code == 200, snake.text
    run = snake.json()["run"]
    assert run["displayName"] == "renamed" and run["annotations"] == {"myKey": "rest", "foo": "bar"}
    # A quoted key may hold a comma; blank elements of the list are nothing.
    comma = await client.patch(
        f"/v1/runs/{run_id}", params={"updateMask": "annotations.`a,b`, ,"}, json={"annotations": {"a,b": "new"}}
    )
    assert comma.status_code == 200 and comma.json()["run"]["annotations"]["a,b"] == "new", comma.text
    unknown = await client.patch(f"/v1/runs/{run_id}", params={"updateMask": "createTime"}, json={})
    assert unknown.status_code == 400 and "create_time" in unknown.text


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
    assert anonymous.json()["message"].startswith(  # it said "metadata", which REST has not: headers
        "an API key is required: 'authorization: Bearer <key>' or 'x-api-key: <key>' (gRPC metadata; HTTP headers"
        " over REST)"
    ), anonymous.text
    assert (await client.get("/v1/runs")).status_code == 200


BAD_INPUT: list[tuple[int, str, str, dict[str, Any]]] = [
    (400, "POST", "/v1/runs", {"content": b"{not json"}),
    (400, "POST", "/v1/runs", {"content": b'{"displayName": "\xff\xfe"}'}),  # not UTF-8
    (400, "POST", "/v1/runs", {"json": [RUN]}),  # not an object
    (400, "POST", "/v1/runs", {"json": {**RUN, "repetitions": "twice"}}),
    (400, "POST", "/v1/runs", {"json": {**RUN, "repetitions": 2**40}}),
    (400, "POST", "/v1/runs", {"json": {**RUN, "trigger": "TRIGGER_SOMETIMES"}}),
    (400, "POST", "/v1/runs", {"json": {**RUN, "displayNmae": "a typo is not dropped silently"}}),
    (400, "POST", "/v1/runs", {"json": {**RUN, "target": {"provided": {}, "echo": {}}}}),  # two of a oneof
    (400, "POST", "/v1/runs", {"content": b"[" * 100_000 + b"]" * 100_000}),
    (400, "GET", "/v1/runs", {"params": {"statuses": "RUN_STATUS_NAPPING"}}),
    (400, "GET", "/v1/runs", {"params": {"pageSize": "99999999999"}}),
    (400, "GET", "/v1/runs", {"params": {"showDeleted": "maybe"}}),
    (400, "GET", "/v1/runs", {"params": {"labels": "team"}}),
    (400, "GET", "/v1/runs/run_x:watch", {"params": {"afterSeq": "99999999999999999999"}}),
    (400, "GET", "/v1/runs/run_x:watch", {"headers": {"last-event-id": "99999999999999999999"}}),
    (400, "GET", "/v1/runs/%00%FF%E2%80%AE..%5C", {}),  # a NUL in any string is refused (docs/errors.md)
    (401, "GET", "/v1/runs", {"headers": {"authorization": b"Bearer \xe9t\xe9"}}),  # not gRPC metadata
    (401, "GET", "/v1/runs", {"headers": {"x-api-key": b"evk\x01", "authorization": ""}}),
]


async def test_bad_input_is_a_4xx_with_the_status_body_and_changes_nothing(gw) -> None:
    _, client = gw
    for expected, method, url, kwargs in BAD_INPUT:
        response = await client.request(method, url, **kwargs)
        assert response.status_code == expected, (method, url, kwargs, response.text)
        body = response.json()
        assert set(body) == {"code", "message", "details"} and body["code"] in (3, 5, 16), body
        assert body["details"][0]["@type"].endswith("google.rpc.ErrorInfo"), body
    assert (await client.get("/v1/runs")).json()["runs"] == []


@pytest.mark.parametrize(
    ("method", "url", "kwargs", "field", "description"),
    [
        ("POST", "/v1/runs", {"json": {**RUN, "repetitions": "twice"}}, "repetitions", "must be a whole number"),
        ("POST", "/v1/runs", {"json": {**RUN, "labels": {"team": 1}}}, "labels[team]", "must be a string"),
        ("POST", "/v1/runs", {"json": {**RUN, "displayNmae": "x"}}, "displayNmae", "unknown field"),
        ("POST", "/v1/runs", {"json": {**RUN, "trigger": "TRIGGER_SOMETIMES"}}, "trigger", "TRIGGER_SOMETIMES"),
        ("POST", "/v1/runs", {"json": {**RUN, "target": {"provided": 3}}}, "target.provided", "JSON object"),
        ("GET", "/v1/runs", {"params": {"pageSize": "abc"}}, "page_size", "must be a whole number"),
        ("GET", "/v1/runs", {"params": {"page_size": "abc"}}, "page_size", "must be a whole number"),
        ("GET", "/v1/runs/run_x:watch", {"headers": {"last-event-id": "abc"}}, "Last-Event-ID", "whole number"),
        (
            "POST",
            "/v1/runs",
            {"json": {**RUN, "items": [{"input": "q", "response": {"latencyMs": "slow"}}]}},
            "items[0].response.latency_ms",
            "must be a number",
        ),
        (
            "POST",
            "/v1/runs",
            {"json": {**RUN, "items": [RUN["items"][0], {"input": "q", "response": {"promptTokens": "0x10"}}]}},
            "items[1].response.prompt_tokens",  # was items.response.prompt_tokens: json_format's message has no path
            "must be a whole number",
        ),
        ("PATCH", "/v1/runs/run_x", {"json": {"displayName": 5}}, "run.display_name", "must be a string"),
        ("PATCH", "/v1/runs/run_x", {"json": {"nope": 5}}, "run.nope", "unknown field"),
        (
            "POST",
            "/v1/runs",
            {"json": {**RUN, "displayName": "a", "display_name": "b"}},
            "display_name",
            "given twice, as displayName and display_name",
        ),
        (
            "POST",
            "/v1/runs",
            {"json": {**RUN, "items": [{"input": "q", "expectedOutput": "a", "expected_output": "b"}]}},
            "items[0].expected_output",
            "given twice",
        ),
    ],
)
async def test_a_value_json_cannot_hold_names_its_field_in_a_violation(
    refusing_gw: Any, method: str, url: str, kwargs: dict[str, Any], field: str, description: str
) -> None:
    """A wrong value was a 400 with ErrorInfo only, in Python's words ("cannot read a
    evalsvc.v1.CreateRunRequest ... invalid literal for int() with base 10"): now the field violation
    a client reads for any other bad field, and a message without Python in it."""
    _, client = refusing_gw
    response = await client.request(method, url, **kwargs)
    got_field, got_description = violation_of(response)
    assert got_field == field and description in got_description, response.text
    for python in ("invalid literal", "bytes-like", "evalsvc.v1.", "iterable", "Traceback"):
        assert python not in response.json()["message"] and python not in got_description, response.text


async def test_conversations_over_their_bounds_are_refused_before_the_body_is_read(gw: Any) -> None:
    """Probe: one POST of 1,000,000 empty turns (3 MB) took 5 s of proto3 JSON reading before the
    service refused it. The gateway counts the turns in the parsed JSON, under either name, before
    json_format reads it (a wrong value elsewhere in the body is never reached), and answers as the
    service would: 400 naming the field."""
    _, client = gw
    dataset_id = (await client.post("/v1/datasets", json={"dataset": {"displayName": "d"}})).json()["dataset"]["id"]
    over = [{}] * (validation.MAX_CONVERSATION_TURNS + 1)
    per_item = f"at most {validation.MAX_CONVERSATION_TURNS} turns (got {validation.MAX_CONVERSATION_TURNS + 1})"
    for url, body in [
        ("/v1/runs", {**RUN, "repetitions": "twice", "items": [{"input": "q", "conversation": over}]}),
        (f"/v1/datasets/{dataset_id}:addItems", {"items": [{"input": 5, "conversation": over}]}),
    ]:
        response = await client.post(url, json=body)
        assert violation_of(response) == ("items[0].conversation", per_item)
        assert response.json()["details"][0]["reason"] == "INVALID_ARGUMENT"
    full = [{"role": "user"}] * validation.MAX_CONVERSATION_TURNS
    fill = validation.MAX_REQUEST_TURNS // validation.MAX_CONVERSATION_TURNS
    items = [{"id": f"i{k}", "conversation": full} for k in range(fill)] + [{"id": "x", "conversation": full[:1]}]
    response = await client.post(f"/v1/datasets/{dataset_id}:addItems", json={"items": items})
    assert violation_of(response)[0] == "items"
    assert (await client.get(f"/v1/datasets/{dataset_id}/items")).json()["items"] == []


@pytest.mark.parametrize(
    ("method", "url", "params", "field", "description"),
    [
        ("GET", "/v1/runs", {"status": "RUN_STATUS_FAILED"}, "status", "did you mean 'statuses'?"),
        ("GET", "/v1/runs", {"label.suite": "x"}, "label.suite", "did you mean 'labels.suite'?"),
        ("GET", "/v1/runs", {"label": "x"}, "label", "did you mean 'labels.<key>'?"),
        ("GET", "/v1/runs", {"pageSise": "1"}, "pageSise", "did you mean 'pageSize'?"),
        ("GET", "/v1/runs", {"zzz": "1"}, "zzz", "unknown query parameter"),
        ("GET", "/v1/runs", {"__": "1"}, "__", "unknown query parameter"),
        ("GET", "/v1/runs/run_x:watch", {"after": "3"}, "after", "unknown query parameter"),
        ("POST", "/v1/runs", {"dry_run": "true"}, "dry_run", "unknown query parameter"),  # body "*": takes none
    ],
)
async def test_an_unknown_query_parameter_is_refused_naming_it(
    gw: Any, method: str, url: str, params: dict[str, str], field: str, description: str
) -> None:
    """A query parameter that named no field was ignored: `?status=RUN_STATUS_FAILED` (the field is
    `statuses`) or `?label.suite=x` (the map is `labels`) listed every run, and a cleanup script with the
    typo acted on all of them. Now a 400 whose violation names the parameter, with the likely one."""
    _, client = gw
    kwargs: dict[str, Any] = {"json": RUN} if method == "POST" else {}
    response = await client.request(method, url, params=params, **kwargs)
    got_field, got_description = violation_of(response)
    assert got_field == field and description in got_description, response.text
    assert response.json()["code"] == 3
    assert (await client.get("/v1/runs")).json()["runs"] == []


@pytest.mark.parametrize(
    ("url", "params", "field", "description"),
    [
        ("/v1/runs/run_x:watch", [("after_seq", "1"), ("after_seq", "5")], "after_seq", "as after_seq and after_seq"),
        ("/v1/runs", [("pageSize", "1"), ("page_size", "9")], "page_size", "given twice, as pageSize and page_size"),
        ("/v1/runs", [("labels.team", "a"), ("labels.team", "b")], "labels[team]", "given twice"),
    ],
)
async def test_a_singular_query_parameter_given_twice_is_refused(
    refusing_gw: Any, url: str, params: list[tuple[str, str]], field: str, description: str
) -> None:
    """`?after_seq=1&after_seq=5` resumed after 5, the last one, silently, as did a field under both its
    names or a map key twice; a body refuses all three. A repeated field still repeats."""
    _, client = refusing_gw
    got_field, got_description = violation_of(await client.get(url, params=params))
    assert got_field == field and description in got_description, got_description
    both = await client.get("/v1/runs", params=[("statuses", "RUN_STATUS_FAILED"), ("statuses", "RUN_STATUS_RUNNING")])
    assert both.status_code == 200, both.text


async def test_the_cache_buster_underscore_is_the_one_query_parameter_ignored(gw) -> None:
    """jQuery's `_=<timestamp>` names no field and is still served, on a GET and on a body route alike."""
    _, client = gw
    created = await client.post("/v1/runs", params={"_": "1700000000000"}, json=RUN)
    assert created.status_code == 200, created.text
    listed = await client.get("/v1/runs", params={"_": "1700000000001", "statuses": "RUN_STATUS_CANCELLED"})
    assert listed.status_code == 200 and listed.json()["runs"] == [], listed.text


async def test_a_body_that_is_not_a_json_object_is_refused_and_does_nothing(gw) -> None:
    """`[]` was read as an empty message (a `:cancel` with it cancelled the run), `"str"` as field names
    (violation `s`), and `5` or `null` leaked Python's TypeError into the message. Where the body is one
    field of the request (PATCH's run), the refusal names that field in a violation."""
    _, client = gw
    run_id = (
        await client.post("/v1/runs", json={**RUN, "items": [{"input": "q"}] * 3000, "target": {"echo": {}}})
    ).json()["run"]["id"]
    for body in (b"[]", b'"str"', b"[1,2]", b"5", b"null", b"true"):
        for method, url in [
            ("POST", f"/v1/runs/{run_id}:cancel"),
            ("POST", "/v1/runs"),
            ("PATCH", f"/v1/runs/{run_id}"),
        ]:
            refused = await client.request(method, url, content=body)
            assert refused.status_code == 400, (body, url, refused.text)
            if method != "PATCH":
                assert refused.json()["message"] == "the body must be a JSON object", refused.text
                continue
            # the body is the run (`body: "run"`): a field, named as any other bad field is
            assert violation_of(refused) == ("run", "must be a JSON object"), refused.text
    assert (await client.get(f"/v1/runs/{run_id}")).json()["run"]["status"] != "RUN_STATUS_CANCELLED"
    assert len((await client.get("/v1/runs")).json()["runs"]) == 1


async def test_a_message_field_given_a_string_or_list_is_named_as_not_an_object(gw) -> None:
    """json_format read a string's characters (a list's items) as field names: `{"webhook": "x"}` got
    `webhook.x: unknown field`; a repeated field given no list named its message (`webhook`)."""
    _, client = gw
    for body, expected in [
        ({"webhook": "x"}, ("webhook", "must be a JSON object")),
        ({"webhook": ["url"]}, ("webhook", "must be a JSON object")),
        ({"target": "echo"}, ("target", "must be a JSON object")),
        ({"webhook": {"url": "https://ci.example.com/h", "eventTypes": "run.failed"}}, None),
    ]:
        url = "/v1/webhooks" if "webhook" in body else "/v1/runs"
        refused = await client.post(url, json=body)
        assert refused.status_code == 400, (body, refused.text)
        assert violation_of(refused) == (expected or ("webhook.event_types", "must be a JSON list")), refused.text
    assert (await client.get("/v1/webhooks")).json().get("webhooks", []) == []


async def test_head_is_answered_on_every_get_route_as_get_without_the_body(gw) -> None:
    """RFC 9110 9.1: HEAD wherever GET; it was a 405 whose Allow left HEAD out."""
    _, client = gw
    run_id = (await client.post("/v1/runs", json=RUN)).json()["run"]["id"]
    await watch_to_end(client, run_id)  # ended: its etag no longer moves between the GET and the HEAD
    for url in (f"/v1/runs/{run_id}", "/v1/runs", f"/v1/runs/{run_id}/results", "/v1/graders"):
        got, head = await client.get(url), await client.head(url)
        assert head.status_code == got.status_code == 200, (url, head.status_code)
        assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"], url
        assert head.headers.get("etag") == got.headers.get("etag"), url
    missing = await client.head("/v1/runs/run_missing")
    assert missing.status_code == 404 and missing.content == b""
    watched = await asyncio.wait_for(client.head(f"/v1/runs/{run_id}:watch"), 10)  # no stream held open
    assert watched.status_code == 200 and watched.content == b""
    assert watched.headers["content-type"].startswith("text/event-stream")
    assert (await client.head(f"/v1/runs/{run_id}:watch", headers={"authorization": "Bearer evk_x"})).status_code == 401


def routing_status(response: httpx.Response, status: int, code: int, reason: str) -> str:
    """A routing error in the native shape: the google.rpc.Status with its ErrorInfo; its message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "message", "details"} and body["code"] == code, body
    assert [(d["@type"].rsplit("/", 1)[-1], d["reason"]) for d in body["details"]] == [("google.rpc.ErrorInfo", reason)]
    return str(body["message"])


async def test_an_unknown_path_or_method_answers_in_the_native_status_shape(gw) -> None:
    _, client = gw
    for method, path in (
        ("GET", "/v1/runz"),
        ("GET", "/v1/runs/run_x/nope"),
        ("POST", "/v1/nope"),  # /v1 is Bland's too (/v1/evals), but no further than native's
        ("GET", "/nope"),
        ("GET", "/api/nope"),  # Omni's and Vogent's prefix alike: neither's
        ("GET", "/ui/nope"),
    ):
        message = routing_status(await client.request(method, path), 404, 5, "ROUTE_NOT_FOUND")
        assert message == f"no route for {method} {path}"
    for method, path, allowed in (
        ("DELETE", "/v1/runs", "GET, HEAD, POST"),  # every route of the path, not only the first Starlette tried
        ("PUT", "/v1/runs/run_x", "DELETE, GET, HEAD, PATCH"),
        ("GET", "/v1/runs/run_x:cancel", "POST"),  # was GetRun of the id "run_x:cancel": 404 RUN_NOT_FOUND
        ("POST", "/openapi.json", "GET, HEAD"),
        ("POST", "/ui/runs", "GET, HEAD"),  # HEAD wherever GET: the UI pages too
    ):
        response = await client.request(method, path)
        message = routing_status(response, 405, 12, "METHOD_NOT_ALLOWED")
        assert response.headers["allow"] == allowed
        assert message == f"method {method} is not allowed on {path} (allowed: {allowed})"
    long = "/v1/" + "x" * 8000
    message = routing_status(await client.get(long), 404, 5, "ROUTE_NOT_FOUND")
    assert message.startswith("no route for GET /v1/xxx") and len(message) < 300
    # The routes themselves are untouched.
    assert (await client.get("/v1/runs")).status_code == 200
    assert (await client.get("/openapi.json")).json()["info"]["title"] == "evalsvc"
    page = await client.get("/ui/runs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


async def test_a_custom_method_a_resource_lacks_is_no_route_not_a_missing_resource(gw) -> None:
    """Probe: `GET /v1/runs/<id>:wacth` (a typo of :watch) was GetRun of the run `<id>:wacth`, 404
    RUN_NOT_FOUND for a run that exists. No id has a `:`: such a path is no route's, its message naming the
    custom method and the ones the resource has."""
    _, client = gw
    run_id = (await client.post("/v1/runs", json=RUN)).json()["run"]["id"]
    for method, verb in (("GET", "wacth"), ("POST", "cancle"), ("PATCH", "x"), ("DELETE", "")):
        path = f"/v1/runs/{run_id}:{verb}"
        message = routing_status(await client.request(method, path), 404, 5, "ROUTE_NOT_FOUND")
        assert message.startswith(f"no route for {method} {path}: /v1/runs/{{run_id}} has no custom method ':{verb}'")
        assert "(it has :cancel (POST), :compare (GET)," in message and ":watch (GET)" in message, message
    message = routing_status(await client.get("/v1/graders/grd_x:nope"), 404, 5, "ROUTE_NOT_FOUND")
    assert message.endswith("/v1/graders/{grader_id} has no custom method ':nope' (it has none)")
    assert (await client.get(f"/v1/runs/{run_id}")).status_code == 200  # the routes themselves are untouched
    cancel = await client.post(f"/v1/runs/{run_id}:cancel")  # CancelRun: 200, or refused once the run has ended
    assert cancel.status_code == 200 or "RUN_ALREADY_FINISHED" in cancel.text, cancel.text


async def test_a_trailing_slash_is_an_unrouted_404_in_its_apis_shape_never_a_redirect(gw) -> None:
    """Probe: `/v1/datasets/` answered Starlette's 307 to `http://<Host header>/v1/datasets`
    (`Host: evil.example` made it an open redirect), `/ui/runs/` too, and `DELETE /v1/secrets/` a 307 then
    405. No route path ends in a slash, so each such path is the unrouted 404 of the API it belongs to."""
    _, client = gw
    evil = {"host": "evil.example"}
    for method, path in (
        ("GET", "/v1/datasets/"),
        ("GET", "/v1/runs/"),
        ("DELETE", "/v1/secrets/"),
        ("GET", "/ui/runs/"),
        ("GET", "/openapi.json/"),
    ):
        response = await client.request(method, path, headers=evil, follow_redirects=False)
        assert "location" not in response.headers, (path, response.headers)
        assert routing_status(response, 404, 5, "ROUTE_NOT_FOUND") == f"no route for {method} {path}"
    bland = await client.get("/v1/evals/", headers=evil, follow_redirects=False)
    assert bland.status_code == 404 and "location" not in bland.headers
    assert bland.json() == {"data": None, "errors": [{"error": "NOT_FOUND", "message": "no route for GET /v1/evals/"}]}
    omni = await client.get("/api/v1/ai/eval/runs/", headers=evil, follow_redirects=False)
    assert omni.status_code == 404 and "location" not in omni.headers
    assert omni.json() == {"detail": "no route for GET /api/v1/ai/eval/runs/", "status": 404}


async def test_a_body_that_is_not_json_is_a_violation_on_body_in_every_dialect(refusing_gw) -> None:
    """FastAPI puts a JSON decode error's character offset where the field goes (`loc: ["body", 9]`):
    the dialects reported a field named "9" (Vogent, Aymara), "9: JSON decode error" (Bland) or "...
    shape: 9: JSON decode error" (Omni). It is a violation on `body`, the offset in its description.
    Agno shows FastAPI's own list, as AgentOS does."""
    _, client = refusing_gw
    why = "not valid JSON: Expecting value (character 9)"

    async def post(path: str) -> Any:
        answer = await client.post(path, content=b'{"name": ', headers={"content-type": "application/json"})
        assert answer.status_code in (400, 422), answer.text
        return answer.json()

    vogent = (await post("/api/eval_configs"))["error"]
    assert [(v["field"], v["description"]) for v in vogent["fieldViolations"]] == [("body", why)], vogent
    aymara = (await post("/v2/evals"))["error"]["details"]["field_violations"]
    assert aymara == [{"field": "body", "description": why}]
    assert (await post("/v1/evals/agents"))["errors"][0]["message"] == f"body: {why}"
    assert (await post("/api/v1/ai/eval/prompt-sets"))["detail"].endswith(f"shape: body: {why}")
    assert (await post("/eval-runs"))["detail"][0]["loc"] == ["body", 9]
    # JSON of the wrong type is a violation on `body` too, not on a field named "".
    for body in (b"[1, 2]", b"null", b'"text"'):
        answer = await client.post("/api/eval_configs", content=body, headers={"content-type": "application/json"})
        assert [v["field"] for v in answer.json()["error"]["fieldViolations"]] == ["body"], answer.text
        answer = await client.post("/v2/evals", content=body, headers={"content-type": "application/json"})
        assert [v["field"] for v in answer.json()["error"]["details"]["field_violations"]] == ["body"], answer.text


async def test_an_unknown_path_or_method_under_a_dialects_routes_answers_in_its_envelope(gw) -> None:
    """Every dialect mounted at once: a path is the API's whose routes match the most of its segments."""
    _, client = gw
    bland = await client.get("/v1/evals/nope")  # under /v1, but Bland's /v1/evals
    assert bland.status_code == 404
    assert bland.json() == {
        "data": None,
        "errors": [{"error": "NOT_FOUND", "message": "no route for GET /v1/evals/nope"}],
    }
    omni = await client.put("/api/v1/ai/eval/runs")
    assert omni.status_code == 405 and omni.headers["allow"] == "GET, HEAD, POST"
    assert omni.json() == {
        "detail": "method PUT is not allowed on /api/v1/ai/eval/runs (allowed: GET, HEAD, POST)",
        "status": 405,
    }
    vogent = await client.get("/api/eval_runs/r/nope")
    assert vogent.status_code == 404 and vogent.json()["error"]["code"] == "NOT_FOUND"
    assert vogent.json()["error"]["message"] == "no route for GET /api/eval_runs/r/nope"
    agno = await client.patch("/eval-runs")
    assert agno.status_code == 405 and agno.headers["allow"] == "DELETE, GET, HEAD, POST"
    assert agno.json() == {"detail": "method PATCH is not allowed on /eval-runs (allowed: DELETE, GET, HEAD, POST)"}
    aymara = await client.get("/v2/nope")
    assert aymara.status_code == 404 and set(aymara.json()) == {"error", "request_id"}
    assert aymara.json()["error"]["code"] == "resource.not_found"


LONE = "\\ud800"  # JSON's escape of a lone surrogate: text Python takes and no UTF-8 can hold
SURROGATE_BODIES = [
    ("/v1/evals/calls", {"calls": [{"call_id": "c1", "concatenated_transcript": LONE}]}),  # Bland
    ("/api/eval_configs", {"name": "ok", "promptSnippet": LONE}),  # Vogent
    ("/v2/eval-runs", {"eval_uuid": LONE, "responses": [{"prompt_uuid": "p", "content": "x"}]}),  # Aymara
    ("/eval-runs", {"agent_id": LONE, "eval_type": "accuracy", "input": "x", "expected_output": "y"}),  # Agno
]


@pytest.mark.parametrize(("path", "body"), SURROGATE_BODIES, ids=["bland", "vogent", "aymara", "agno"])
async def test_a_lone_surrogate_in_a_dialect_body_is_the_vendors_400_not_a_500(
    refusing_gw, path: str, body: dict[str, Any]
) -> None:
    """Four dialects answered a lone surrogate in a string with a plain-text 500 and a traceback at
    error level: their models take it, and building the service's request finds it is not Unicode."""
    _, client = refusing_gw
    raw = json.dumps(body).replace("\\\\ud800", "\\ud800")  # json.dumps escapes the backslash: undo it
    response = await client.post(path, content=raw.encode(), headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert "lone surrogate" in response.text and response.json()  # the vendor's JSON error shape


# A create route of each dialect, and its body (the `n`th sent: Bland refuses a call id twice).
CREATE_BODIES: dict[str, tuple[str, Callable[[int], dict[str, Any]]]] = {
    "omni": ("/api/v1/ai/eval/runs", lambda n: {"prompt_set_id": "nope"}),
    "bland": ("/v1/evals/calls", lambda n: {"calls": [{"call_id": f"c{n}", "concatenated_transcript": "hi"}]}),
    "vogent": ("/api/eval_configs", lambda n: {"name": "ok", "promptSnippet": "x"}),
    "aymara": ("/v2/eval-runs", lambda n: {"eval_uuid": "nope", "responses": [{"prompt_uuid": "p", "content": "x"}]}),
    "agno": ("/eval-runs", lambda n: {"agent_id": "a", "eval_type": "accuracy", "input": "x", "expected_output": "y"}),
}


@pytest.mark.parametrize("dialect", sorted(CREATE_BODIES))
async def test_a_dialects_json_body_is_read_as_json_whatever_its_content_type(gw, dialect: str) -> None:
    """Every dialect answered a JSON body sent as curl -d sends it (form-encoded), or with no Content-Type,
    with "Input should be a valid dictionary or object to extract fields from"; the native routes read it."""
    _, client = gw
    path, body = CREATE_BODIES[dialect]
    as_json = await client.post(path, json=body(0))
    for n, content_type in enumerate(["application/x-www-form-urlencoded", "text/plain", None], start=1):
        headers = {"content-type": content_type} if content_type else {}
        answer = await client.post(path, content=json.dumps(body(n)).encode(), headers=headers)
        assert answer.status_code == as_json.status_code, (content_type, answer.text, as_json.text)
        assert "valid dictionary" not in answer.text


async def test_an_unreachable_service_is_503_with_an_error_info_and_retry_after() -> None:
    """grpc's own UNAVAILABLE reached callers as `"details": []`, no ErrorInfo to branch on."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        nowhere = f"127.0.0.1:{listener.getsockname()[1]}"  # closed below: nothing listens there
    gateway = Gateway(remote_channels(nowhere), "127.0.0.1:0", dialects="omni")
    await gateway.start()
    try:
        headers = {"authorization": "Bearer evk_x"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.port}", headers=headers) as client:
            for path in ("/v1/runs", "/v1/runs/r:watch"):
                answer = await client.get(path)
                assert answer.status_code == 503 and answer.headers["retry-after"] == "1", answer.text
                info = next(d for d in answer.json()["details"] if d["@type"].endswith("ErrorInfo"))
                assert info["reason"] == "UPSTREAM_UNAVAILABLE" and info["domain"] == "evalsvc"
                assert nowhere not in answer.text  # the operator's address is not the caller's business
            omni = await client.get("/api/v1/ai/eval/runs", params={"prompt_set_id": "s"})
            assert omni.status_code == 503 and omni.headers["retry-after"] == "1", omni.text
    finally:
        await gateway.stop()


async def test_an_unreachable_service_is_told_to_the_operator_once_and_its_return_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A standalone gateway that could not reach its --grpc-target logged nothing: every call 503 and only
    the "listening" line on stderr. One WARNING names the target and grpc's cause; an INFO line follows once
    the service can be reached."""
    caplog.set_level(logging.INFO, logger="evalsvc.gateway.reachability")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        nowhere = f"127.0.0.1:{listener.getsockname()[1]}"  # closed below: nothing listens there
    back = asyncio.Event()

    class Reached(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno == logging.INFO:
                back.set()

    reached = Reached()
    logging.getLogger("evalsvc.gateway.reachability").addHandler(reached)
    gateway = Gateway(remote_channels(nowhere), "127.0.0.1:0", dialects="omni")
    await gateway.start()
    server = None
    try:
        headers = {"authorization": "Bearer evk_x"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.port}", headers=headers) as client:
            for path in ("/v1/runs", "/v1/runs/r", "/api/v1/ai/eval/runs?prompt_set_id=s"):
                assert (await client.get(path)).status_code == 503
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1, warnings
            assert nowhere in warnings[0] and "Connection refused" in warnings[0], warnings
            server = grpc.aio.server()
            server.add_insecure_port(nowhere)
            await server.start()
            await asyncio.wait_for(back.wait(), 30)  # grpc reconnects by itself
            infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
            assert any(nowhere in line and "again" in line for line in infos), infos
    finally:
        logging.getLogger("evalsvc.gateway.reachability").removeHandler(reached)
        await gateway.stop()
        if server is not None:
            await server.stop(None)


def test_an_unreachable_service_is_logged_at_most_once_per_interval_with_the_calls_that_failed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every failed call logged would flood the log under load; the later lines say how many failed."""
    caplog.set_level(logging.INFO, logger="evalsvc.gateway.reachability")
    now = [100.0]
    upstream = UpstreamLog("svc:50051", every_s=30, clock=lambda: now[0])
    for _ in range(5):
        upstream.failed("Connection refused")
        now[0] += 10  # 100 (logged), 110, 120, 130 (logged: 30 s on), 140
    upstream.reached()
    upstream.reached()  # said once
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == ["WARNING", "WARNING", "INFO"], lines
    assert "svc:50051" in lines[0][1] and "Connection refused" in lines[0][1]
    assert "3 calls" in lines[1][1] and "for 30 s" in lines[1][1], lines[1]
    assert "1 calls" in lines[2][1] and "after 50 s" in lines[2][1], lines[2]


async def test_openapi_documents_every_native_route_with_its_messages(gw) -> None:
    _, client = gw
    spec = (await client.get("/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    unresolved = {ref for ref in refs(spec) if ref.removeprefix("#/components/schemas/") not in schemas}
    assert not unresolved
    for route in routes():
        operation = spec["paths"][route.path][route.verb]
        where = {p["name"]: p["in"] for p in operation["parameters"]}
        assert all(where[name] == "path" for name in route.path_params), route.path
        assert ("requestBody" in operation) == bool(route.body), route.path
        ok = operation["responses"]["200"]["content"]
        if route.method.server_streaming:
            assert set(ok) == {"text/event-stream", "application/x-ndjson"}
            assert ok["application/x-ndjson"][ITEM_SCHEMA]["properties"]["error"] == {"$ref": STATUS_REF}
        else:
            assert ok["application/json"]["schema"] == {
                "$ref": f"#/components/schemas/{route.method.output_type.full_name}"
            }
        for status in ("4XX", "5XX"):
            assert operation["responses"][status]["content"]["application/json"]["schema"] == {"$ref": STATUS_REF}
    run = schemas["evalsvc.v1.Run"]["properties"]
    assert run["lastSeq"]["type"] == "string" and run["lastSeq"]["format"] == "int64"  # int64 as a string
    assert run["status"]["enum"][0] == "RUN_STATUS_UNSPECIFIED" and run["status"]["readOnly"]
    assert run["createTime"]["format"] == "date-time"
    assert run["labels"] == {"type": "object", "additionalProperties": {"type": "string"}}
    assert schemas["evalsvc.v1.ToolCall"]["properties"]["arguments"]["type"] == "object"  # Struct
    assert "required" not in schemas["evalsvc.v1.Target"]  # a oneof's members are optional properties
    assert schemas["evalsvc.v1.CreateRunRequest"]["required"] == ["target"]  # field_behavior REQUIRED
    cancel_body = spec["paths"]["/v1/runs/{run_id}:cancel"]["post"]["requestBody"]["content"]["application/json"]
    assert "runId" not in cancel_body["schema"]["properties"]  # in the path, not the body
    update = spec["paths"]["/v1/runs/{run_id}"]["patch"]
    assert update["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(".Run")  # body: "run"
    assert {p["name"] for p in update["parameters"]} == {"run_id", "updateMask"}


async def test_real_requests_and_responses_match_the_documented_schemas(gw) -> None:
    _, client = gw
    spec = (await client.get("/openapi.json")).json()

    def documented(path: str, verb: str) -> jsonschema_rs.Validator:
        return validator(spec, spec["paths"][path][verb]["responses"]["200"]["content"]["application/json"]["schema"])

    create = spec["paths"]["/v1/runs"]["post"]
    validator(spec, create["requestBody"]["content"]["application/json"]["schema"]).validate(RUN)
    created = (await client.post("/v1/runs", json=RUN)).json()
    documented("/v1/runs", "post").validate(created)
    run_id = created["run"]["id"]
    stream = spec["paths"]["/v1/runs/{run_id}:watch"]["get"]["responses"]["200"]["content"]
    line_schema = validator(spec, stream["application/x-ndjson"][ITEM_SCHEMA])
    async with client.stream("GET", f"/v1/runs/{run_id}:watch", headers={"accept": "application/x-ndjson"}) as lines:
        async for line in lines.aiter_lines():
            if line:
                line_schema.validate(json.loads(line))
    async with client.stream("GET", f"/v1/runs/{run_id}:watch") as sse:
        events = sse_data([line async for line in sse.aiter_lines()])
    sse_schema = stream["text/event-stream"][ITEM_SCHEMA]
    data_schema = validator(spec, sse_schema["properties"]["data"]["contentSchema"])
    for _, kind, data in events:
        assert kind in sse_schema["properties"]["event"]["enum"]
        data_schema.validate(data)
    documented("/v1/runs/{run_id}", "get").validate((await client.get(f"/v1/runs/{run_id}")).json())
    documented("/v1/runs", "get").validate((await client.get("/v1/runs")).json())
    documented("/v1/runs/{run_id}/results", "get").validate((await client.get(f"/v1/runs/{run_id}/results")).json())
    documented("/v1/runs/{run_id}", "delete").validate((await client.delete(f"/v1/runs/{run_id}")).json())
    dataset_id = (await client.post("/v1/datasets", json={"dataset": {"displayName": "d"}})).json()["dataset"]["id"]
    add_items = spec["paths"]["/v1/datasets/{dataset_id}:addItems"]["post"]
    add_schema = validator(spec, add_items["requestBody"]["content"]["application/json"]["schema"])
    # proto3 JSON spells what JSON has no number for as a string, and the schema says so; the service
    # then refuses a recorded cost or latency that is not a finite number, in the documented error shape.
    not_finite = {"input": "q", "response": {"content": "x", "costUsd": "NaN", "latencyMs": "Infinity"}}
    add_schema.validate({"items": [not_finite]})
    refused = await client.post(f"/v1/datasets/{dataset_id}:addItems", json={"items": [not_finite]})
    assert refused.status_code == 400, refused.text
    validator(spec, {"$ref": STATUS_REF}).validate(refused.json())
    finite = {"input": "q", "response": {"content": "x", "costUsd": 0.25, "latencyMs": 12.5}}
    added = await client.post(f"/v1/datasets/{dataset_id}:addItems", json={"items": [finite]})
    assert added.status_code == 200, added.text
    items = (await client.get(f"/v1/datasets/{dataset_id}/items")).json()
    assert items["items"][0]["response"]["costUsd"] == 0.25
    documented("/v1/datasets/{dataset_id}/items", "get").validate(items)
    missing = await client.get("/v1/targets/tgt_nope")
    assert missing.status_code == 404
    validator(spec, {"$ref": STATUS_REF}).validate(missing.json())


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


async def test_last_event_id_is_read_only_as_a_plain_decimal_seq(gw) -> None:
    """Last-Event-ID was read as proto3 JSON: `1e3` was seq 1000, `3.0`, `+3` and `1e0` a seq too, so a
    mangled id resumed somewhere else. Only the decimal digits the gateway writes in `id:` are a seq."""
    _, client = gw
    run_id = (await client.post("/v1/runs", json=RUN)).json()["run"]["id"]
    await watch_to_end(client, run_id)  # ended: a watch read as some seq answers at once
    for value in ("3.0", "+3", "1e0", "1e3", "-1", "0x3", "3 3", "1_0", "0" * 21):
        response = await client.get(f"/v1/runs/{run_id}:watch", headers={"last-event-id": value})
        field, description = violation_of(response)
        assert field == "Last-Event-ID" and "whole number" in description, (value, response.text)
    async with client.stream("GET", f"/v1/runs/{run_id}:watch", headers={"last-event-id": "0001"}) as stream:
        resumed = [event_id for event_id, _, _ in sse_data([line async for line in stream.aiter_lines()])]
    assert resumed and resumed[0] == 2, resumed


async def test_batched_sse_events_carry_their_last_seq_as_id_and_resume_after_it(gw) -> None:
    _, client = gw
    run_id = (await client.post("/v1/runs", json=RUN)).json()["run"]["id"]
    async with client.stream("GET", f"/v1/runs/{run_id}:watchBatched") as stream:
        batches = sse_data([line async for line in stream.aiter_lines()])
    seqs = [int(e["seq"]) for _, _, data in batches for e in data["events"]]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 4
    assert all(event_id == int(data["events"][-1]["seq"]) for event_id, _, data in batches)
    headers = {"last-event-id": "2"}
    async with client.stream("GET", f"/v1/runs/{run_id}:watchBatched", headers=headers) as stream:
        rest = sse_data([line async for line in stream.aiter_lines()])
    assert [int(e["seq"]) for _, _, data in rest for e in data["events"]] == seqs[2:]


async def test_a_disconnecting_http_client_cancels_its_grpc_stream_1000_times(gw) -> None:
    srv, client = gw
    await srv.executor.stop()  # the run stays pending: each watch would stay open forever
    run_id = (await client.post("/v1/runs", json=RUN)).json()["run"]["id"]

    def open_streams() -> tuple[int, float | None]:
        gauge = srv.metrics.registry.get_sample_value("evalsvc_open_streams", {"method": WATCH_METHOD})
        return srv.bus.watcher_count(), gauge

    # Warm up at full concurrency, so the gauge exists and the pools (database readers) hold what the cycles
    # use before anything is counted.
    await asyncio.gather(*(first_event(client, run_id, ndjson=False) for _ in range(WATCH_CONCURRENCY)))
    assert await eventually(lambda: open_streams() == (0, 0.0))
    start, fds, tasks = open_streams(), len(os.listdir("/proc/self/fd")), len(asyncio.all_tasks())
    cycles = iter(range(WATCH_CYCLES))

    async def watcher() -> None:
        for cycle in cycles:  # shared: WATCH_CYCLES in all, spread over the watchers
            event = await first_event(client, run_id, ndjson=cycle % 2 == 1)
            assert event["seq"] == "1" and event["run"]["id"] == run_id

    await asyncio.wait_for(asyncio.gather(*(watcher() for _ in range(WATCH_CONCURRENCY))), timeout=120)
    assert await eventually(lambda: open_streams() == start), open_streams()
    assert len(os.listdir("/proc/self/fd")) <= fds + WATCH_CONCURRENCY
    assert len(asyncio.all_tasks()) <= tasks + WATCH_CONCURRENCY


async def test_grpc_and_http_see_the_same_run(gw) -> None:
    srv, client = gw
    from evalsvc.v1 import eval_run_service_pb2_grpc

    async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
        run = (await eval_run_service_pb2_grpc.EvalRunServiceStub(channel).CreateRun(create_request(1))).run
    assert (await client.get(f"/v1/runs/{run.id}")).json()["run"]["id"] == run.id


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
async def test_a_body_with_a_nan_or_infinity_literal_is_not_json(refusing_gw, literal: str) -> None:
    """Python's json reads the bare literals NaN and Infinity, which JSON has not: a tool call's arguments
    of `{"x": NaN}` were stored through addItems, and every read of the dataset's items then failed."""
    _, client = refusing_gw
    dataset_id = (await client.post("/v1/datasets", json={"dataset": {"displayName": "d"}})).json()["dataset"]["id"]
    item = {"input": "q", "response": {"toolCalls": [{"name": "t", "arguments": {"x": "LITERAL"}}]}}
    body = json.dumps({"items": [item]}).replace('"LITERAL"', literal)
    response = await client.post(
        f"/v1/datasets/{dataset_id}:addItems", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    status = response.json()
    assert status["code"] == 3 and literal in status["message"], status
    assert status["details"][0]["reason"] == "INVALID_ARGUMENT", status
    assert (await client.get(f"/v1/datasets/{dataset_id}/items")).json()["items"] == []


async def test_a_response_that_cannot_be_written_as_json_is_an_internal_status(
    gw, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A response proto3 JSON cannot write (a NaN in a Struct, as stored before the service refused it)
    was Starlette's plain-text 500 "Internal Server Error": it is a google.rpc.Status (INTERNAL), logged once."""
    monkeypatch.setattr(validation, "check_tool_calls", lambda *_: None)  # as an item stored before the check
    srv, client = gw
    dataset_id = (await client.post("/v1/datasets", json={"dataset": {"displayName": "d"}})).json()["dataset"]["id"]
    nan = struct_pb2.Struct(fields={"x": struct_pb2.Value(number_value=math.nan)})
    item = item_pb2.Item(
        id="a", input="q", response=item_pb2.Response(tool_calls=[item_pb2.ToolCall(name="t", arguments=nan)])
    )
    async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
        datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        await datasets.AddDatasetItems(dataset_service_pb2.AddDatasetItemsRequest(dataset_id=dataset_id, items=[item]))
    caplog.set_level(logging.ERROR, logger="evalsvc.gateway.app")
    response = await client.get(f"/v1/datasets/{dataset_id}/items")
    assert response.status_code == 500 and response.headers["content-type"] == "application/json", response.text
    status = response.json()
    assert status["code"] == 13 and status["details"][0]["reason"] == "INTERNAL", status
    assert "NaN" not in status["message"]
    logged = [r for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info, [r.getMessage() for r in caplog.records]


async def test_integer_query_parameters_are_plain_decimal_integers(gw) -> None:
    """Query values were read as proto3 JSON: `pageSize=1e3` was 1000, `5.0` and `1E1` numbers too, and
    `afterSeq=1e0` seq 1, while `+5` was refused (and Last-Event-ID `1e0`). Only decimal digits, with an
    optional `-`, are an integer, as grpc-gateway reads them."""
    _, client = gw
    run_id = (await client.post("/v1/runs", json=RUN)).json()["run"]["id"]
    await watch_to_end(client, run_id)
    for value in ("1e3", "5.0", "1E1", "2e0", "+5", "0x10", " 5", "5 ", "1_0", ""):
        for name in ("pageSize", "page_size"):
            response = await client.get("/v1/runs", params={name: value})
            assert violation_of(response) == ("page_size", "must be a whole number"), (value, response.text)
    for value in ("1e0", "2.0"):
        response = await client.get(f"/v1/runs/{run_id}:watch", params={"afterSeq": value})
        assert violation_of(response) == ("after_seq", "must be a whole number"), (value, response.text)
    for value in ("5", "0005", "-0"):
        response = await client.get("/v1/runs", params={"pageSize": value})
        assert response.status_code == 200 and len(response.json()["runs"]) == 1, (value, response.text)
    field, _ = violation_of(await client.get("/v1/runs", params={"pageSize": "-1"}))  # the service's refusal
    assert field == "page_size"


async def test_the_standalone_gateway_takes_the_dialect_wait_and_the_body_limit_as_flags(gw) -> None:
    """`evalsvc gateway` refused --dialect-sync-wait-s and --max-message-bytes (only their EVALSVC_*
    variables worked), though docs/dialects.md names them as settings of either deployment: a standalone
    gateway in front of a server with a larger --max-message-bytes kept refusing bodies over 16 MiB."""
    srv, _ = gw
    limit = 300_000
    flags = ["--dialect-sync-wait-s", "3.5", "--max-message-bytes", str(limit)]
    args = build_parser().parse_args(["gateway", "--grpc-target", f"127.0.0.1:{srv.port}", *flags])
    settings = config.from_args(args, {})
    assert (settings.dialect_sync_wait_s, settings.max_message_bytes) == (3.5, limit)
    gateway = Gateway(remote_channels(args.grpc_target), "127.0.0.1:0", dialects=settings.dialects, settings=settings)
    port = await gateway.start()
    try:
        headers = {"authorization": f"Bearer {srv.bootstrap_key}", "content-type": "application/json"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers) as client:
            over = json.dumps({"name": "x" * limit}).encode()
            refused = await client.post("/api/eval_configs", content=over)  # Vogent's envelope
            assert refused.status_code == 413, refused.text
            assert refused.json()["error"]["reason"] == "BODY_TOO_LARGE"
            assert f"larger than {limit} bytes" in refused.json()["error"]["message"]
            native = await client.post("/v1/datasets", content=over)
            assert native.status_code == 413 and native.json()["code"] == 8, native.text
            under = await client.post("/api/eval_configs", content=json.dumps({"name": "fits"}).encode())
            assert under.status_code == 200, under.text
    finally:
        await gateway.stop()


async def test_listing_runs_takes_filter_order_by_and_view_as_query_parameters(
    gw: tuple[EvalServer, httpx.AsyncClient],
) -> None:
    """GET /v1/runs?filter=...&orderBy=...&view=...: the query parameters, by JSON or proto name, reach
    ListRuns; a filter it cannot take is a 400 naming `filter` and where the mistake is."""
    _, client = gw
    made = []
    for name in ("nightly-1", "adhoc", "Nightly-2"):
        created = await client.post("/v1/runs", json={**RUN, "displayName": name})
        assert created.status_code == 200, created.text
        made.append(created.json()["run"]["id"])
    query = {
        "filter": 'display_name:"nightly" AND labels.team = "a"',
        "orderBy": "create_time",
        "view": "RUN_VIEW_BASIC",
    }
    listed = await client.get("/v1/runs", params=query)
    assert listed.status_code == 200, listed.text
    runs = listed.json()["runs"]
    assert [run["id"] for run in runs] == [made[0], made[2]]
    # Proto3 JSON as the gateway writes it: what BASIC leaves out is absent (target) or empty (graders).
    assert all("target" not in run and run["graders"] == [] and run["labels"] == {"team": "a"} for run in runs)
    newest = await client.get("/v1/runs", params={"order_by": "create_time desc", "view": "RUN_VIEW_FULL"})
    assert [run["id"] for run in newest.json()["runs"]] == made[::-1] and "target" in newest.json()["runs"][0]

    assert violation_of(await client.get("/v1/runs", params={"filter": "display_name = a OR status = x"})) == (
        "filter",
        "at character 18: OR is not supported; only terms joined by AND",
    )
    field, _ = violation_of(await client.get("/v1/runs", params={"orderBy": "display_name"}))
    assert field == "order_by"
    assert (await client.get("/v1/runs", params={"view": "RUN_VIEW_HUGE"})).status_code == 400
