"""The Vogent dialect (docs/dialects/vogent.md) over real HTTP to a real gateway in front of a real gRPC
server. The call agent is a chat target on a fake OpenAI-compatible endpoint (tests/fake_llm.py) and
the server's default judge is a second one, so every verdict is scripted and every run is real."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.dialects.env import DialectEnv, chat_target, check_head, dialect_gateway, no_errors_logged
from tests.fake_llm import FakeEndpoint, chat_reply, judge_reply

AGENT_REPLY = "Your table for two is booked for 7pm."
SNIPPET = "Did the agent confirm the booking time?"
DATE_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
STATUSES = {"PENDING", "RUNNING", "SUCCESS", "FAILED", "CANCELLED"}
PASS = judge_reply({"passed": True, "reason": "the time was confirmed"})
FAIL = judge_reply({"passed": False, "reason": "no time was given"})

# The request examples of docs.vogent.ai/api-reference, as published.
CONFIG_EXAMPLE = {"name": "<string>", "promptSnippet": "<string>"}
RECORD_EXAMPLE = {
    "recordType": "DIAL",
    "dialId": "<string>",
    "name": "<string>",
    "description": "<string>",
    "systemPrompt": "<string>",
    "maxTurns": 123,
    "agentInputs": "<string>",
}
RUN_EXAMPLE = {"versionedPromptId": "<string>", "callAgentId": "<string>", "evalRecordIds": ["<string>"]}

NoneType = type(None)
CONFIG = {"id": str, "name": str, "promptSnippet": (str, NoneType)}
PROMPT = {
    "id": str,
    "systemPrompt": (str, NoneType),
    "maxTurns": (int, NoneType),
    "createdAt": (str, NoneType),
    "name": (str, NoneType),
    "description": (str, NoneType),
    "agentInputs": (str, NoneType),
}
RECORD = {"id": str, "recordType": str, "dialId": (str, NoneType), "prompt": (dict, NoneType)}
RUN = {
    "id": str,
    "status": str,
    "callAgentId": str,
    "versionedPromptId": str,
    "createdAt": str,
    "aggregateResult": dict,
}
RESULT = {
    "id": str,
    "evalRunId": str,
    "record": dict,
    "numAlerts": int,
    "results": list,
    "transcript": list,
    "createdAt": (str, NoneType),
    "simulationMetadata": dict,
}
RESULT_ITEM = {"index": int, "accurate": bool, "modelOutput": (str, NoneType), "reason": (str, NoneType)}
TRANSCRIPT = {
    "text": str,
    "speaker": str,
    "detailType": (str, NoneType),
    "functionCallId": (str, NoneType),
    "startTimeMs": (int, NoneType),
    "endTimeMs": (int, NoneType),
    "functionCalls": list,
    "nodeTransition": (dict, NoneType),
}
SIMULATION = {
    "totalTurns": int,
    "endReason": (str, NoneType),
    "simulationDurationMs": int,
    "numInputTokens": int,
    "numCachedInputTokens": int,
    "numOutputTokens": int,
}


def shaped(body: Any, shape: dict[str, Any]) -> dict[str, Any]:
    """`body` has exactly the documented keys, each of its documented type (bool is not an int here)."""
    assert isinstance(body, dict) and set(body) == set(shape), body
    for key, kind in shape.items():
        kinds = kind if isinstance(kind, tuple) else (kind,)
        assert isinstance(body[key], kinds) and not (isinstance(body[key], bool) and bool not in kinds), (key, body)
    return body


def check_record(record: Any) -> dict[str, Any]:
    shaped(record, RECORD)
    assert record["recordType"] in ("DIAL", "PROMPT")
    if record["prompt"] is not None:
        created = shaped(record["prompt"], PROMPT)["createdAt"]
        assert created is None or DATE_TIME.match(created)  # None: an item added natively has no createdAt
    return dict(record)


def check_run(run: Any) -> dict[str, Any]:
    shaped(run, RUN)
    assert run["status"] in STATUSES and DATE_TIME.match(run["createdAt"])
    shaped(run["aggregateResult"], {"numFailing": int, "numPassing": int})
    return dict(run)


def check_page(response: httpx.Response) -> tuple[list[Any], str | None]:
    assert response.status_code == 200, response.text
    body = shaped(response.json(), {"data": list, "cursor": (str, NoneType)})
    return body["data"], body["cursor"]


def check_error(response: httpx.Response, status: int, code: str) -> dict[str, str]:
    """The dialect's error shape; returns its field violations by field."""
    assert response.status_code == status, response.text
    error = shaped(response.json(), {"error": dict})["error"]
    shaped(error, {"code": str, "message": str, "reason": (str, NoneType), "fieldViolations": list})
    assert error["code"] == code and error["message"]
    return {v["field"]: v["description"] for v in error["fieldViolations"]}


@dataclass(kw_only=True)
class Env(DialectEnv):
    agent: FakeEndpoint
    agent_id: str  # a saved chat target on the agent fake: Vogent's call agent

    async def ok(self, method: str, path: str, body: Any = None) -> Any:
        response = await self.http.request(method, path, json=body)
        assert response.status_code == 200, response.text
        return response.json()

    async def config(self, **fields: Any) -> dict[str, Any]:
        return dict(shaped(await self.ok("POST", "/api/eval_configs", {"name": "Booking", **fields}), CONFIG))

    async def record(self, config_id: str, **fields: Any) -> dict[str, Any]:
        body = {"recordType": "PROMPT", **fields}
        if body["recordType"] == "PROMPT":
            body.setdefault("systemPrompt", "You want a table for two tonight.")
        record = check_record(await self.ok("POST", f"/api/eval_configs/{config_id}/records", body))
        assert record["prompt"] is None or DATE_TIME.match(record["prompt"]["createdAt"])
        return record

    async def run(self, config_id: str, **fields: Any) -> dict[str, Any]:
        body = {"versionedPromptId": "vp_1", "callAgentId": self.agent_id, **fields}
        return check_run(await self.ok("POST", f"/api/eval_configs/{config_id}/runs", body))

    async def finished(self, run_id: str) -> dict[str, Any]:
        """The run once it ended, as Vogent shows it."""
        await self.ended(run_id)
        return check_run(await self.ok("GET", f"/api/eval_runs/{run_id}"))


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    with FakeEndpoint(chat_reply(AGENT_REPLY)) as agent, FakeEndpoint(PASS) as judge:
        async with dialect_gateway(tmp_path, "vogent", judge, judge_api_key="judge-key") as (srv, http):
            env = Env(srv=srv, http=http, judge=judge, key=srv.bootstrap_key or "", agent=agent, agent_id="")
            env.agent_id = await env.save_target("front desk", chat_target(agent.url, "agent-test"))
            yield env


async def test_the_documented_examples_as_sent_get_the_documented_shapes(env: Env) -> None:
    config = await env.config(**CONFIG_EXAMPLE)
    assert config == {"id": config["id"], "name": "<string>", "promptSnippet": "<string>"}
    assert shaped(await env.ok("GET", f"/api/eval_configs/{config['id']}"), CONFIG) == config

    record = await env.record(config["id"], **RECORD_EXAMPLE)
    assert record["recordType"] == "DIAL" and record["dialId"] == "<string>"
    prompt = record["prompt"]
    assert {k: prompt[k] for k in ("name", "description", "systemPrompt", "maxTurns", "agentInputs")} == {
        k: RECORD_EXAMPLE[k] for k in ("name", "description", "systemPrompt", "maxTurns", "agentInputs")
    }  # every field of a DIAL record is kept, none dropped
    assert prompt["id"] == record["id"]

    run = await env.run(config["id"], **{**RUN_EXAMPLE, "callAgentId": env.agent_id, "evalRecordIds": [record["id"]]})
    assert run["status"] in ("PENDING", "RUNNING")
    assert (run["callAgentId"], run["versionedPromptId"]) == (env.agent_id, "<string>")
    assert run["aggregateResult"] == {"numFailing": 0, "numPassing": 0}
    assert (await env.finished(run["id"]))["status"] == "SUCCESS"

    configs, cursor = check_page(await env.http.get("/api/eval_configs"))
    assert [shaped(c, CONFIG) for c in configs] == [config] and cursor is None
    records, cursor = check_page(await env.http.get(f"/api/eval_configs/{config['id']}/records"))
    assert [check_record(r) for r in records] == [record] and cursor is None
    runs, cursor = check_page(await env.http.get(f"/api/eval_configs/{config['id']}/runs"))
    assert [check_run(r)["id"] for r in runs] == [run["id"]] and cursor is None


async def test_a_run_to_completion_judges_each_record_by_the_prompt_snippet(env: Env) -> None:
    env.judge.script = [PASS, FAIL]
    config = await env.config(promptSnippet=SNIPPET)
    first = await env.record(
        config["id"],
        name="Dinner",
        description="two people, tonight",
        maxTurns=5,
        agentInputs='{"restaurant": "Luigi\'s"}',
    )
    second = await env.record(config["id"], systemPrompt="You want to move your booking to 8pm.")
    assert first["prompt"]["maxTurns"] == 5 and second["prompt"]["maxTurns"] == 20  # Vogent's default
    run = await env.run(config["id"], versionedPromptId="vp_42")  # no evalRecordIds: every record

    done = await env.finished(run["id"])
    assert done["status"] == "SUCCESS" and done["aggregateResult"] == {"numFailing": 1, "numPassing": 1}
    assert (done["id"], done["callAgentId"], done["versionedPromptId"]) == (run["id"], env.agent_id, "vp_42")
    assert done["createdAt"] == run["createdAt"]

    results, cursor = check_page(await env.http.get(f"/api/eval_runs/{run['id']}/results"))
    assert cursor is None and len(results) == 2
    verdicts = set()
    for result in results:
        shaped(result, RESULT)
        assert result["evalRunId"] == run["id"] and DATE_TIME.match(result["createdAt"])
        record = {first["id"]: first, second["id"]: second}[check_record(result["record"])["id"]]
        assert result["record"] == record
        (item,) = result["results"]
        shaped(item, RESULT_ITEM)
        assert item["index"] == 0 and item["modelOutput"] == AGENT_REPLY
        assert result["numAlerts"] == (0 if item["accurate"] else 1)
        verdicts.add((item["accurate"], item["reason"]))  # the judge's reason, without "judge says PASS: "
        caller, agent = (shaped(turn, TRANSCRIPT) for turn in result["transcript"])
        assert (caller["text"], agent["text"]) == (record["prompt"]["systemPrompt"], AGENT_REPLY)
        metadata = shaped(result["simulationMetadata"], SIMULATION)
        assert (metadata["totalTurns"], metadata["numInputTokens"], metadata["numOutputTokens"]) == (1, 10, 5)
    assert verdicts == {(True, "the time was confirmed"), (False, "no time was given")}

    asked = [m["content"] for seen in env.agent.seen for m in seen.body["messages"] if m["role"] == "user"]
    assert sorted(asked) == sorted(r["prompt"]["systemPrompt"] for r in (first, second))
    assert all(SNIPPET in json.dumps(seen.body) for seen in env.judge.seen) and len(env.judge.seen) == 2

    page, cursor = check_page(await env.http.get(f"/api/eval_runs/{run['id']}/results", params={"limit": 1}))
    assert [r["id"] for r in page] == [results[0]["id"]] and cursor
    page, cursor = check_page(
        await env.http.get(f"/api/eval_runs/{run['id']}/results", params={"limit": 1, "cursor": cursor})
    )
    assert [r["id"] for r in page] == [results[1]["id"]] and cursor is None

    finished = await env.http.post(f"/api/eval_runs/{run['id']}/cancel")
    assert check_error(finished, 400, "FAILED_PRECONDITION") == {}
    assert finished.json()["error"]["message"] == f"eval run {run['id']!r} already finished as SUCCESS"  # Vogent's name


async def test_record_subsets_search_and_cursors(env: Env) -> None:
    config = await env.config()  # no promptSnippet: null, and the run is judged by a default criteria
    assert config["promptSnippet"] is None
    made = [await env.record(config["id"], name=f"caller {i}", systemPrompt=f"Scenario {i}") for i in range(3)]
    dial = await env.record(config["id"], recordType="DIAL", dialId="dial_77")
    assert dial["prompt"] is None and dial["dialId"] == "dial_77"

    page, cursor = check_page(await env.http.get(f"/api/eval_configs/{config['id']}/records", params={"limit": 3}))
    assert page == made and cursor
    rest, cursor = check_page(
        await env.http.get(f"/api/eval_configs/{config['id']}/records", params={"limit": 3, "cursor": cursor})
    )
    assert rest == [dial] and cursor is None
    found, _ = check_page(
        await env.http.get(f"/api/eval_configs/{config['id']}/records", params={"search": "CALLER 1"})
    )
    assert found == [made[1]]
    found, _ = check_page(await env.http.get(f"/api/eval_configs/{config['id']}/records", params={"search": "dial_7"}))
    assert found == [dial]
    # Vogent: "Optional search filter for record names or IDs"
    found, _ = check_page(
        await env.http.get(f"/api/eval_configs/{config['id']}/records", params={"search": made[1]["id"]})
    )
    assert found == [made[1]]
    found, _ = check_page(
        await env.http.get(f"/api/eval_configs/{config['id']}/records", params={"search": dial["id"].upper()})
    )
    assert found == [dial]

    run = await env.run(config["id"], evalRecordIds=[made[2]["id"]])
    await env.finished(run["id"])
    results, _ = check_page(await env.http.get(f"/api/eval_runs/{run['id']}/results"))
    assert [r["record"] for r in results] == [made[2]]
    assert [m["content"] for m in env.agent.seen[0].body["messages"]] == ["Scenario 2"]
    later = await env.run(config["id"], evalRecordIds=[dial["id"]])
    runs, cursor = check_page(await env.http.get(f"/api/eval_configs/{config['id']}/runs", params={"limit": 1}))
    assert [r["id"] for r in runs] == [later["id"]] and cursor  # newest first
    runs, cursor = check_page(
        await env.http.get(f"/api/eval_configs/{config['id']}/runs", params={"limit": 1, "cursor": cursor})
    )
    assert [r["id"] for r in runs] == [run["id"]] and cursor is None

    native = {"input": "Hi, I need a cab.", "metadata": {"note": "not Vogent's"}}
    await env.ok("POST", f"/v1/datasets/{config['id']}:addItems", {"items": [native]})
    found, _ = check_page(await env.http.get(f"/api/eval_configs/{config['id']}/records", params={"search": "cab"}))
    assert found == []  # search looks at Vogent's fields only
    *_, added = check_page(await env.http.get(f"/api/eval_configs/{config['id']}/records"))[0]
    assert check_record(added)["recordType"] == "PROMPT"  # without Vogent's fields: their defaults
    assert (added["prompt"]["systemPrompt"], added["prompt"]["maxTurns"]) == ("Hi, I need a cab.", None)


async def test_a_record_whose_vogent_fields_cannot_be_read_is_not_a_vogent_record(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """Items added natively to a config whose Vogent fields are something else (a recordType that is not
    DIAL or PROMPT, a maxTurns that is not a number or not a 32-bit one) were listed as PROMPT records with those fields
    ignored, where every other dialect leaves such a record out (docs/dialects.md). They are not Vogent's
    records now: the list leaves them out and its pages stay full; a run over every item of the config
    shows each one's result with its record by id alone, as a record deleted from the config."""
    config = await env.config()
    first = await env.record(config["id"], systemPrompt="Scenario 0")
    unreadable = [
        {"id": "cab", "input": "Hi, I need a cab.", "metadata": {"recordType": "CALL"}},
        {"id": "many", "input": "x", "metadata": {"recordType": "PROMPT", "maxTurns": "many"}},
        {"id": "digit", "input": "x", "metadata": {"maxTurns": "²"}},  # a digit to isdigit(), not to int()
        # Past a 32-bit int: echoed back, it failed Go's and Java's decoding of every list holding it.
        {"id": "huge", "input": "x", "metadata": {"maxTurns": str(10**20)}},
    ]
    records = f"/api/eval_configs/{config['id']}/records"
    with no_errors_logged(caplog):
        await env.ok("POST", f"/v1/datasets/{config['id']}:addItems", {"items": unreadable})
        last = await env.record(config["id"], recordType="DIAL", dialId="dial_1")
        listed, cursor = check_page(await env.http.get(records))
        assert [check_record(r) for r in listed] == [first, last] and cursor is None
        page, cursor = check_page(await env.http.get(records, params={"limit": 1}))
        assert page == [first] and cursor
        page, cursor = check_page(await env.http.get(records, params={"limit": 1, "cursor": cursor}))
        assert page == [last] and cursor is None  # the four between skipped, the page still full
        assert check_page(await env.http.get(records, params={"search": "cab"}))[0] == []

        run = await env.run(config["id"])  # every item of the config
        await env.finished(run["id"])
        results, _ = check_page(await env.http.get(f"/api/eval_runs/{run['id']}/results"))
        shown = {r["record"]["id"]: check_record(r["record"]) for r in results}
        assert (shown[first["id"]], shown[last["id"]]) == (first, last)
        for bare in ("cab", "many", "digit", "huge"):
            assert shown[bare]["recordType"] == "PROMPT" and shown[bare]["prompt"]["maxTurns"] is None
            assert shown[bare]["prompt"]["systemPrompt"] == ""  # its id alone, as a record deleted from the config


async def test_a_limit_over_the_largest_page_reads_the_largest_page(env: Env) -> None:
    """Vogent documents no maximum `limit`: one over evalsvc's 1000 gets 1000 and a cursor, not a 422."""
    config = await env.config()
    items = [{"input": f"Scenario {i}"} for i in range(1001)]
    await env.ok("POST", f"/v1/datasets/{config['id']}:addItems", {"items": items})
    records = f"/api/eval_configs/{config['id']}/records"
    page, cursor = check_page(await env.http.get(records, params={"limit": 5000}))
    assert len(page) == 1000 and cursor
    rest, cursor = check_page(await env.http.get(records, params={"limit": 5000, "cursor": cursor}))
    assert [r["prompt"]["systemPrompt"] for r in rest] == ["Scenario 1000"] and cursor is None
    configs, _ = check_page(await env.http.get("/api/eval_configs", params={"limit": 10**9}))
    assert [c["id"] for c in configs] == [config["id"]]
    assert check_page(await env.http.get(f"/api/eval_configs/{config['id']}/runs", params={"limit": 1001})) == (
        [],
        None,
    )


async def test_only_what_this_dialect_created_is_visible(env: Env) -> None:
    config = await env.config()
    await env.record(config["id"])
    native_dataset = (await env.ok("POST", "/v1/datasets", {"dataset": {"displayName": "native"}}))["dataset"]
    native_run = await env.ok(
        "POST",
        "/v1/runs",
        {
            "datasetId": config["id"],
            "target": {"savedTargetId": env.agent_id},
            "graders": [{"contains": {"values": ["booked"]}}],
        },
    )
    configs, _ = check_page(await env.http.get("/api/eval_configs", params={"limit": 1}))
    assert [c["id"] for c in configs] == [config["id"]]  # the newer native dataset is skipped, the page still full
    check_error(await env.http.get(f"/api/eval_configs/{native_dataset['id']}"), 404, "NOT_FOUND")
    check_error(await env.http.get(f"/api/eval_runs/{native_run['run']['id']}"), 404, "NOT_FOUND")
    check_error(await env.http.post(f"/api/eval_runs/{native_run['run']['id']}/cancel"), 404, "NOT_FOUND")
    runs, _ = check_page(await env.http.get(f"/api/eval_configs/{config['id']}/runs"))
    assert runs == []  # the native run over the config is not Vogent's

    deleted = await env.run(config["id"])
    await env.ok("DELETE", f"/v1/runs/{deleted['id']}")  # Vogent cannot delete; evalsvc can
    check_error(await env.http.get(f"/api/eval_runs/{deleted['id']}"), 404, "NOT_FOUND")
    check_error(await env.http.get(f"/api/eval_runs/{deleted['id']}/results"), 404, "NOT_FOUND")
    assert check_page(await env.http.get(f"/api/eval_configs/{config['id']}/runs"))[0] == []


async def test_cancel_a_pending_run(env: Env) -> None:
    config = await env.config()
    await env.record(config["id"])
    await env.srv.executor.stop()  # nothing starts: the run stays PENDING until it is cancelled
    run = await env.run(config["id"])
    assert run["status"] == "PENDING"
    cancelled = check_run(await env.ok("POST", f"/api/eval_runs/{run['id']}/cancel"))
    assert cancelled["status"] == "CANCELLED" and cancelled["aggregateResult"] == {"numFailing": 0, "numPassing": 0}
    assert check_run(await env.ok("POST", f"/api/eval_runs/{run['id']}/cancel"))["status"] == "CANCELLED"
    assert (await env.ok("GET", f"/api/eval_runs/{run['id']}"))["status"] == "CANCELLED"
    assert env.agent.seen == [] and env.judge.seen == []


async def test_missing_or_wrong_keys_get_401(env: Env) -> None:
    config = await env.config()
    for key in ("", "Bearer nope", f"Basic {env.srv.bootstrap_key}"):
        for method, path, body in (
            ("GET", "/api/eval_configs", None),
            ("POST", "/api/eval_configs", {"name": "x"}),
            ("GET", f"/api/eval_configs/{config['id']}/records", None),
            ("POST", f"/api/eval_configs/{config['id']}/runs", {"versionedPromptId": "v", "callAgentId": env.agent_id}),
        ):
            response = await env.http.request(method, path, json=body, headers={"authorization": key})
            check_error(response, 401, "UNAUTHENTICATED")
            if not key:  # the header to send, not the gRPC metadata a gRPC client sends
                expected = "an API key is required: send it as 'Authorization: Bearer <key>'"
                assert response.json()["error"]["message"] == expected
    configs, _ = check_page(await env.http.get("/api/eval_configs"))
    assert [c["id"] for c in configs] == [config["id"]]


async def test_bad_input_is_rejected_in_the_error_shape_and_changes_nothing(env: Env) -> None:
    config = await env.config()
    record = await env.record(config["id"])
    records = f"/api/eval_configs/{config['id']}/records"
    runs = f"/api/eval_configs/{config['id']}/runs"
    shape_errors = [  # 422: the body or query does not match the documented schema
        ("POST", "/api/eval_configs", {"promptSnippet": "no name"}, "name"),
        ("POST", "/api/eval_configs", {"name": ""}, "name"),
        ("POST", records, {"recordType": "CALL", "systemPrompt": "x"}, "recordType"),
        ("POST", records, {"systemPrompt": "x"}, "recordType"),
        ("POST", records, {"recordType": "PROMPT", "systemPrompt": "x", "maxTurns": 0}, "maxTurns"),
        ("POST", records, {"recordType": "PROMPT", "systemPrompt": "x", "maxTurns": "many"}, "maxTurns"),
        ("POST", records, {"recordType": "PROMPT", "systemPrompt": "x", "maxTurns": 2**31}, "maxTurns"),  # int32
        ("POST", runs, {"callAgentId": env.agent_id}, "versionedPromptId"),
        ("POST", runs, {"versionedPromptId": "v"}, "callAgentId"),
        (
            "POST",
            runs,
            {"versionedPromptId": "v", "callAgentId": env.agent_id, "evalRecordIds": "all"},
            "evalRecordIds",
        ),
        ("GET", "/api/eval_configs?limit=0", None, "limit"),
        ("GET", f"{runs}?limit=-1", None, "limit"),
    ]
    for method, path, body, field in shape_errors:
        violations = check_error(await env.http.request(method, path, json=body), 422, "INVALID_ARGUMENT")
        assert field in violations, (path, body, violations)
    garbled = await env.http.post(runs, content=b"{not json", headers={"content-type": "application/json"})
    not_json = "not valid JSON: Expecting property name enclosed in double quotes (character 1)"
    assert check_error(garbled, 422, "INVALID_ARGUMENT") == {"body": not_json}  # was the offset as field "1"

    invalid = [  # 400: well-formed, but not valid input
        ("POST", records, {"recordType": "DIAL", "name": "no dial"}, "dialId"),
        ("POST", records, {"recordType": "PROMPT", "name": "no prompt"}, "systemPrompt"),
        ("POST", records, {"recordType": "PROMPT", "systemPrompt": "x", "agentInputs": "[1, 2]"}, "agentInputs"),
        ("POST", records, {"recordType": "PROMPT", "systemPrompt": "x", "agentInputs": "{oops"}, "agentInputs"),
        ("POST", "/api/eval_configs", {"name": "n" * 257}, "name"),
        (
            "POST",
            runs,
            {"versionedPromptId": "v", "callAgentId": env.agent_id, "evalRecordIds": ["item-404"]},
            "evalRecordIds[0]",
        ),
        (
            "POST",
            runs,
            {"versionedPromptId": "v", "callAgentId": env.agent_id, "evalRecordIds": [record["id"], record["id"]]},
            "evalRecordIds",
        ),
        ("GET", f"{records}?cursor=not-a-cursor", None, None),
    ]
    for method, path, body, field in invalid:
        response = await env.http.request(method, path, json=body)
        violations = check_error(response, 400, "INVALID_ARGUMENT")
        assert field is None or field in violations, (path, body, violations)
        message = response.json()["error"]["message"]  # names fields as the violations do, in Vogent's words
        assert not re.search(r"\b(item_ids|dataset_id|display_name|page_token)\b", message), message
    several = {"versionedPromptId": "v", "callAgentId": env.agent_id, "evalRecordIds": ["no", record["id"], "x", "x"]}
    refused = (await env.http.post(runs, json=several)).json()["error"]["message"]
    assert refused == "invalid request: evalRecordIds[0], evalRecordIds[2], evalRecordIds[3], evalRecordIds"

    empty = await env.config()
    no_records = await env.http.post(
        f"/api/eval_configs/{empty['id']}/runs", json={"versionedPromptId": "v", "callAgentId": env.agent_id}
    )
    check_error(no_records, 400, "INVALID_ARGUMENT")
    unknown_agent = await env.http.post(runs, json={"versionedPromptId": "v", "callAgentId": "tgt_missing"})
    check_error(unknown_agent, 404, "NOT_FOUND")
    said = unknown_agent.json()["error"]  # in Vogent's noun, not the service's "target ... TARGET_NOT_FOUND"
    assert (said["message"], said["reason"]) == ("call agent 'tgt_missing' not found", "NOT_FOUND")

    configs, _ = check_page(await env.http.get("/api/eval_configs"))
    assert {c["id"] for c in configs} == {config["id"], empty["id"]}
    assert check_page(await env.http.get(records))[0] == [record]
    assert check_page(await env.http.get(runs))[0] == []


async def test_unknown_ids_are_404(env: Env) -> None:
    run = {"versionedPromptId": "v", "callAgentId": env.agent_id}
    for method, path, body in (
        ("GET", "/api/eval_configs/ds_missing", None),
        ("POST", "/api/eval_configs/ds_missing/records", {"recordType": "DIAL", "dialId": "d"}),
        ("GET", "/api/eval_configs/ds_missing/records", None),
        ("POST", "/api/eval_configs/ds_missing/runs", run),
        ("GET", "/api/eval_configs/ds_missing/runs", None),
        ("GET", "/api/eval_runs/run_missing", None),
        ("POST", "/api/eval_runs/run_missing/cancel", None),
        ("GET", "/api/eval_runs/run_missing/results", None),
    ):
        check_error(await env.http.request(method, path, json=body), 404, "NOT_FOUND")


async def test_openapi_documents_the_routes_models_and_errors(env: Env) -> None:
    spec = (await env.http.get("/openapi.json")).json()
    operations = {
        ("post", "/api/eval_configs"): "CreateAIEvalConfigInput",
        ("get", "/api/eval_configs"): None,
        ("get", "/api/eval_configs/{id}"): None,
        ("post", "/api/eval_configs/{id}/records"): "CreateAIEvalRecordInput",
        ("get", "/api/eval_configs/{id}/records"): None,
        ("post", "/api/eval_configs/{id}/runs"): "RunEvalInput",
        ("get", "/api/eval_configs/{id}/runs"): None,
        ("get", "/api/eval_runs/{id}"): None,
        ("post", "/api/eval_runs/{id}/cancel"): None,
        ("get", "/api/eval_runs/{id}/results"): None,
    }
    for (verb, path), body in operations.items():
        operation = spec["paths"][path][verb]
        assert "$ref" in json.dumps(operation["responses"]["200"])
        for status in ("400", "401", "404", "422"):
            assert operation["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith(
                "/AIEvalError"
            )
        if body:
            assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(body)
    schemas = spec["components"]["schemas"]
    assert set(schemas["AIEvalRun"]["required"]) == set(RUN)
    assert set(schemas["AIEvalRunStatus"]["enum"]) == STATUSES
    assert set(schemas["AIEvalRecordType"]["enum"]) == {"DIAL", "PROMPT"}
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


async def test_get_eval_result_is_answered_in_vogents_envelope_beside_omni(tmp_path: Path) -> None:
    """Vogent's getEvalResult (`GET /api/eval_results/{id}`) is not served (docs/dialects/vogent.md says
    why); with Omni also at `/api` its path matched both dialects only as far as `/api`, and the 404 came as
    the native google.rpc.Status. It is Vogent's 404 ROUTE_NOT_FOUND, naming where results are read."""
    with FakeEndpoint(PASS) as judge:
        async with dialect_gateway(tmp_path, "omni,vogent", judge) as (_, http):
            for result_id in ("74752", "res_1"):
                response = await http.get(f"/api/eval_results/{result_id}")
                check_error(response, 404, "NOT_FOUND")
                error = response.json()["error"]
                assert error["reason"] == "ROUTE_NOT_FOUND"
                assert "getEvalResult is not served" in error["message"], error
                assert "GET /api/eval_runs/{evalRunId}/results" in error["message"], error
            wrong_method = await http.delete("/api/eval_results/74752")
            check_error(wrong_method, 405, "UNIMPLEMENTED")
            assert wrong_method.headers["allow"] == "GET, HEAD"
            await check_head(http, "/api/eval_results/74752", "/api/eval_configs", "/api/eval_runs/run_x")
            assert "/api/eval_results/{id}" not in (await http.get("/openapi.json")).json()["paths"]
            # a path the two dialects match only as far as `/api` stays native (docs/dialects.md says why)
            native = await http.get("/api/nope")
            assert native.status_code == 404 and native.json()["code"] == 5
            check_error(await http.get("/api/eval_runs/run_x/nope"), 404, "NOT_FOUND")
            omni = await http.get("/api/v1/nope")
            assert omni.status_code == 404 and set(omni.json()) == {"detail", "status"}
