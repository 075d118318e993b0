"""The Agno AgentOS dialect (/eval-runs) over real HTTP to a real gateway in front of a real gRPC server,
with httpx and with Agno's own client (agno.client.AgentOSClient, base URL changed only). Agents are
saved targets on real-HTTP fakes of an OpenAI-compatible endpoint and of an agent webhook, and the
server's default judge is another such fake (tests/fake_llm.py)."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from agno.client import AgentOSClient
from agno.db.schemas.evals import EvalType
from agno.os.routers.evals.schemas import EvalSchema
from google.protobuf import json_format

from evalsvc.gateway.dialects import agno, base
from evalsvc.gateway.dialects.agno import INPUT_KEY
from evalsvc.server import EvalServer
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc, run_pb2
from tests.dialects.env import DialectEnv, check_head, dialect_gateway, no_errors_logged
from tests.fake_llm import FakeEndpoint, Reply, chat_reply, judge_reply
from tests.helpers import create_request, impatient_gateway, keyed_channel

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
SCHEMA_KEYS = {
    "id", "agent_id", "model_id", "model_provider", "team_id", "workflow_id", "name", "evaluated_component_name",
    "user_id", "eval_type", "eval_data", "eval_input", "created_at", "updated_at",
}  # fmt: skip
RELIABILITY_DATA_KEYS = {
    "run_id", "eval_status", "failed_tool_calls", "passed_tool_calls", "additional_tool_calls", "missing_tool_calls",
    "failed_argument_checks", "passed_argument_checks",
}  # fmt: skip
STATS = ("avg", "min", "max", "std_dev", "median", "p95")
VERDICT = {"score": 8, "passed": True, "reason": "The answer matches."}  # serves every judge mode

# The seed document's request example (docs: POST /eval-runs "Execute Evaluation"), sent as is.
SEED_EXAMPLE: dict[str, Any] = {
    "eval_type": "accuracy",
    "input": "<string>",
    "agent_id": "<string>",
    "team_id": "<string>",
    "model_id": "<string>",
    "model_provider": "<string>",
    "additional_guidelines": "<string>",
    "additional_context": "<string>",
    "num_iterations": 1,
    "name": "<string>",
    "expected_output": "<string>",
    "criteria": "<string>",
    "scoring_strategy": "binary",
    "threshold": 7,
    "warmup_runs": 0,
    "expected_tool_calls": ["<string>"],
}
# What AgentOSClient.run_eval sends (vendor-apis.md, captured by a stub), the agent id aside.
CLIENT_EXAMPLE: dict[str, Any] = {
    "agent_id": "basic-agent",
    "eval_type": "reliability",
    "input": "10*5?",
    "num_iterations": 1,
    "scoring_strategy": "binary",
    "threshold": 7,
    "warmup_runs": 0,
    "expected_tool_calls": ["multiply"],
    "allow_additional_tool_calls": False,
}


@dataclass(kw_only=True)
class Env(DialectEnv):
    """`key` is the test's own (its own tenant); the judge is shared by the module's tests."""

    auth: dict[str, str]
    client: AgentOSClient
    model: FakeEndpoint  # the chat agent's model: answers "50" after calling multiply(a=10, b=5)
    agent_id: str = ""  # a saved chat target: what Agno calls an agent

    async def save_agent(self, name: str, target: dict[str, Any], **labels: str) -> str:
        """A saved target (how Agno agents are made)."""
        return await self.save_target(name, target, **labels)

    async def run(self, **fields: Any) -> dict[str, Any]:
        """POST /eval-runs, expecting success."""
        posted = await self.http.post("/eval-runs", json=fields)
        assert posted.status_code == 200, posted.text
        return dict(posted.json())


def chat(url: str) -> dict[str, Any]:
    return {"chat": {"endpoint": {"baseUrl": url + "/v1", "timeoutS": 5}, "model": "gpt-4o"}}


@pytest.fixture(scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[EvalServer, FakeEndpoint]]:
    """One server for the module (tests keep apart by tenant), its default judge the judge fake. Its
    database is SQLite even under EVALSVC_TEST_DB=postgres: conftest drops a test's PostgreSQL database
    after each test, and the dialect never touches the database anyway."""
    with FakeEndpoint(judge_reply(VERDICT)) as judge:
        folder = tmp_path_factory.mktemp("agno")
        sqlite = f"sqlite+aiosqlite:///{folder / 'agno.db'}"
        async with dialect_gateway(folder, "agno", judge, db=sqlite, judge_api_key="judge-key") as (srv, _):
            yield srv, judge


@pytest.fixture
async def env(served: tuple[EvalServer, FakeEndpoint]) -> AsyncIterator[Env]:
    """A tenant of its own (so only this test's runs and agents are visible) with an agent on a fresh fake."""
    srv, judge = served
    assert srv.gateway is not None
    key, _ = await srv.keys.create(f"agno-{uuid.uuid4().hex[:12]}")
    base = f"http://127.0.0.1:{srv.gateway.port}"
    auth = {"Authorization": f"Bearer {key}"}
    answer = chat_reply("50", tool_calls=[{"name": "multiply", "args": {"a": 10, "b": 5}}])
    with FakeEndpoint(answer) as model:
        async with httpx.AsyncClient(base_url=base, headers=auth, timeout=30) as http:
            client = AgentOSClient(base_url=base)
            env = Env(srv=srv, http=http, judge=judge, key=key, auth=auth, client=client, model=model)
            env.agent_id = await env.save_agent("basic-agent", chat(model.url), model_provider="OpenAI")
            yield env


def check_schema(body: dict[str, Any], eval_type: str) -> EvalSchema:
    """A response has exactly EvalSchema's fields, its timestamps as documented, and validates in Agno."""
    assert set(body) == SCHEMA_KEYS
    assert isinstance(body["id"], str) and body["eval_type"] == eval_type and isinstance(body["eval_data"], dict)
    assert body["workflow_id"] is None and body["user_id"] is None
    for stamp in (body["created_at"], body["updated_at"]):
        assert TIMESTAMP.match(stamp), stamp
    return EvalSchema.model_validate(body)


async def test_the_seed_example_as_is_then_with_an_agent_that_exists(env: Env) -> None:
    as_is = await env.http.post("/eval-runs", json=SEED_EXAMPLE)
    assert as_is.status_code == 400
    assert as_is.json() == {"detail": "Only one of agent_id or team_id must be provided"}

    example = {k: v for k, v in SEED_EXAMPLE.items() if k != "team_id"} | {"agent_id": env.agent_id}
    posted = await env.run(**example)
    check_schema(posted, "accuracy")
    assert posted["agent_id"] == env.agent_id and posted["team_id"] is None and posted["name"] == "<string>"
    # model_id and model_provider both given: AgentOS reports the override
    assert posted["model_id"] == "<string>" and posted["model_provider"] == "<string>"
    assert posted["evaluated_component_name"] == "basic-agent"
    assert posted["eval_input"] is None  # as AgentOS's POST answer
    data = posted["eval_data"]
    assert data["run_id"] == posted["id"]
    assert data["results"] == [
        {
            "input": "<string>",
            "output": "50",
            "expected_output": "<string>",
            "score": 8,
            "reason": "The answer matches.",
        }
    ]
    assert (data["avg_score"], data["mean_score"], data["min_score"], data["max_score"]) == (8, 8, 8, 8)
    assert data["std_dev_score"] == 0.0 and "run_status" not in data
    asked = [seen.body["messages"] for seen in env.judge.seen]  # the judge is shared: find this test's question
    [judged] = [messages for messages in asked if "Input:\n<string>\n" in messages[1]["content"]]
    assert (
        "Additional guidelines: <string>" in judged[0]["content"]
        and "Expected output:\n<string>" in judged[1]["content"]
        and "Context:\n<string>" in judged[1]["content"]  # additional_context reaches the judge
    )
    # As AgentOS does, model_id + model_provider run the agent with that model; the context goes along
    [called] = env.model.seen
    assert called.body["model"] == "<string>"
    assert called.body["messages"] == [
        {"role": "system", "content": "Context:\n<string>"},
        {"role": "user", "content": "<string>"},
    ]
    snapshot = (await env.http.get(f"/v1/runs/{posted['id']}")).json()["run"]["target"]
    assert snapshot["chat"]["model"] == "<string>" and snapshot["modelId"] == "<string>"

    got = (await env.http.get(f"/eval-runs/{posted['id']}", params={"db_id": "any", "table": "any"})).json()
    check_schema(got, "accuracy")
    assert got["eval_data"] == data and got["name"] == "<string>" and got["model_provider"] == "<string>"
    assert got["eval_input"] == {
        "additional_guidelines": "<string>",
        "additional_context": "<string>",
        "num_iterations": 1,
        "expected_output": "<string>",
        "input": "<string>",
    }


async def test_agentos_client_runs_lists_gets_renames_and_deletes(env: Env) -> None:
    client, auth = env.client, env.auth
    run = await client.run_eval(
        eval_type=EvalType.RELIABILITY,
        input_text="What is 10*5?",
        agent_id=env.agent_id,
        expected_tool_calls=["multiply"],
        expected_tool_call_arguments={"multiply": {"a": 10}},
        headers=auth,
    )
    assert run is not None and run.eval_type is EvalType.RELIABILITY
    assert run.model_id == "gpt-4o" and run.model_provider == "OpenAI"  # the agent's model, its provider label
    assert set(run.eval_data) == RELIABILITY_DATA_KEYS
    assert run.eval_data["eval_status"] == "PASSED" and run.eval_data["passed_tool_calls"] == ["multiply"]
    assert run.eval_data["passed_argument_checks"] == ["multiply"] and run.eval_data["failed_tool_calls"] == []
    assert env.model.seen[0].body["messages"][-1] == {"role": "user", "content": "What is 10*5?"}

    page = await client.list_eval_runs(eval_types=[EvalType.RELIABILITY], headers=auth)
    assert [r.id for r in page.data] == [run.id]
    assert (page.meta.page, page.meta.limit, page.meta.total_pages, page.meta.total_count) == (1, 20, 1, 1)

    one = await client.get_eval_run(run.id, headers=auth)
    assert one.eval_data == run.eval_data and one.created_at is not None
    assert one.eval_input == {
        "expected_tool_calls": ["multiply"],
        "allow_additional_tool_calls": False,
        "expected_tool_call_arguments": {"multiply": {"a": 10}},
    }
    renamed = await client.update_eval_run(run.id, name="renamed", headers=auth)
    assert renamed.name == "renamed" and renamed.eval_data == run.eval_data

    await client.delete_eval_runs([run.id, "unknown-id"], headers=auth)
    with pytest.raises(httpx.HTTPStatusError) as gone:
        await client.get_eval_run(run.id, headers=auth)
    assert gone.value.response.status_code == 404
    assert gone.value.response.json() == {"detail": f"Eval run with id '{run.id}' not found"}
    assert (await client.list_eval_runs(headers=auth)).meta.total_count == 0


async def test_reliability_failures_name_the_missing_and_unexpected_calls(env: Env) -> None:
    body = CLIENT_EXAMPLE | {"agent_id": env.agent_id, "expected_tool_calls": ["divide"]}
    failed = await env.run(**body)
    check_schema(failed, "reliability")
    data = failed["eval_data"]
    assert data["eval_status"] == "FAILED"
    assert data["missing_tool_calls"] == ["divide"] and data["failed_tool_calls"] == ["multiply"]

    lenient = await env.run(**body | {"expected_tool_calls": ["multiply"], "allow_additional_tool_calls": True})
    assert lenient["eval_data"]["eval_status"] == "PASSED" and lenient["eval_data"]["additional_tool_calls"] == []

    # A list of expected arguments per tool: each must be matched by some call.
    two_specs = {"multiply": [{"a": 10}, {"b": 7}]}
    mismatched = await env.run(**CLIENT_EXAMPLE | {"agent_id": env.agent_id, "expected_tool_call_arguments": two_specs})
    assert mismatched["eval_data"]["eval_status"] == "FAILED"
    assert mismatched["eval_data"]["failed_argument_checks"] == ["multiply"]


async def test_agent_as_judge_binary_and_numeric(env: Env) -> None:
    common = {"agent_id": env.agent_id, "eval_type": "agent_as_judge", "input": "What is 10*5?", "criteria": "Is 50"}
    binary = await env.run(**common, num_iterations=2)
    check_schema(binary, "agent_as_judge")
    data = binary["eval_data"]
    assert [r["passed"] for r in data["results"]] == [True, True] and data["pass_rate"] == 100.0
    assert {r["score"] for r in data["results"]} == {None} and data["avg_score"] is None
    assert data["results"][0] | {"reason": ""} == {
        "input": "What is 10*5?", "output": "50", "criteria": "Is 50", "score": None, "reason": "", "passed": True,
    }  # fmt: skip

    strict = await env.run(**common, scoring_strategy="numeric", threshold=9, additional_guidelines="Be strict")
    data = strict["eval_data"]
    assert [(r["score"], r["passed"]) for r in data["results"]] == [(8, False)] and data["pass_rate"] == 0.0
    assert data["avg_score"] == 8 and data["std_dev_score"] == 0.0
    got = (await env.http.get(f"/eval-runs/{strict['id']}")).json()
    assert got["eval_input"] == {
        "criteria": "Is 50",
        "scoring_strategy": "numeric",
        "threshold": 9,
        "additional_guidelines": "Be strict",
    }


async def test_performance_measures_time_and_reported_memory_after_warmups(env: Env) -> None:
    with FakeEndpoint(Reply({"content": "done", "memory_mib": 12.5})) as webhook:
        agent = await env.save_agent("webhook-agent", {"http": {"endpoint": {"baseUrl": webhook.url + "/run"}}})
        posted = await env.run(agent_id=agent, eval_type="performance", input="go", num_iterations=3, warmup_runs=2)
        assert len(webhook.seen) == 5  # 2 warmups, then 3 measured calls
    check_schema(posted, "performance")
    data = posted["eval_data"]
    assert set(data) == {"run_id", "run_times", "memory_usages"} | {
        f"{stat}_{unit}" for stat in STATS for unit in ("run_time", "memory_usage")
    }
    assert len(data["run_times"]) == 3 and all(t > 0 for t in data["run_times"])
    assert data["min_run_time"] <= data["median_run_time"] <= data["p95_run_time"] <= data["max_run_time"]
    assert data["memory_usages"] == [12.5] * 3 and data["avg_memory_usage"] == 12.5

    got = (await env.http.get(f"/eval-runs/{posted['id']}")).json()
    check_schema(got, "performance")
    assert got["eval_data"]["runs"] == [{"runtime": t, "memory": 12.5} for t in data["run_times"]]
    assert got["eval_data"]["result"] == {k: v for k, v in data.items() if k.endswith(("_run_time", "_usage"))}
    assert got["eval_input"] == {"num_iterations": 3, "warmup_runs": 2}
    assert got["evaluated_component_name"] == "webhook-agent" and got["model_id"] is None
    # a webhook agent picks its own model: an override is refused, not silently ignored
    override = {"model_id": "gpt-5", "model_provider": "openai"}
    body = {"agent_id": agent, "eval_type": "performance", "input": "go", **override}
    refused = await env.http.post("/eval-runs", json=body)
    assert refused.status_code == 400 and "chat agent" in refused.json()["detail"], refused.text


async def test_agentos_client_run_eval_for_each_eval_type(env: Env) -> None:
    """`AgentOSClient.run_eval` for the eval types it can send. It has no `criteria` parameter, so an
    agent_as_judge eval through it gets AgentOS's own 400 (docs/dialects/agno.md, Differences)."""
    client, auth, agent = env.client, env.auth, env.agent_id
    accuracy = await client.run_eval(
        eval_type=EvalType.ACCURACY, input_text="What is 10*5?", agent_id=agent, expected_output="50", headers=auth
    )
    assert accuracy is not None and accuracy.eval_type is EvalType.ACCURACY
    assert accuracy.eval_data["results"][0]["output"] == "50" and accuracy.eval_data["avg_score"] is not None
    performance = await client.run_eval(
        eval_type=EvalType.PERFORMANCE, input_text="What is 10*5?", agent_id=agent, num_iterations=2, headers=auth
    )
    assert performance is not None and performance.eval_type is EvalType.PERFORMANCE
    assert len(performance.eval_data["run_times"]) == 2
    reliability = await client.run_eval(
        eval_type=EvalType.RELIABILITY,
        input_text="What is 10*5?",
        agent_id=agent,
        expected_tool_calls=["multiply"],
        headers=auth,
    )
    assert reliability is not None and reliability.eval_data["eval_status"] == "PASSED"
    with pytest.raises(httpx.HTTPStatusError) as no_criteria:
        await client.run_eval(eval_type=EvalType.AGENT_AS_JUDGE, input_text="Hi", agent_id=agent, headers=auth)
    assert no_criteria.value.response.status_code == 400
    assert no_criteria.value.response.json() == {"detail": "criteria is required for agent-as-judge evaluation"}
    listed = await client.list_eval_runs(headers=auth)
    assert {r.id for r in listed.data} == {accuracy.id, performance.id, reliability.id}


async def test_a_run_that_fails_or_outlasts_the_wait_says_so(env: Env) -> None:
    with FakeEndpoint(Reply({"error": "no"}, status=400)) as broken:
        agent = await env.save_agent("broken-agent", chat(broken.url))
        failed = await env.run(**CLIENT_EXAMPLE | {"agent_id": agent})
    data = failed["eval_data"]
    assert data["run_status"] == "FAILED" and data["eval_status"] == "FAILED"
    assert data["error"]["code"] == "ALL_EVALUATIONS_ERRORED" and data["passed_tool_calls"] == []

    with FakeEndpoint(Reply(chat_reply("late").body, delay_s=2)) as slow:
        agent = await env.save_agent("slow-agent", chat(slow.url))
        async with impatient_gateway(env.srv, "agno", env.auth) as impatient:
            base = str(impatient.base_url).rstrip("/")
            early = await AgentOSClient(base_url=base).run_eval(
                eval_type=EvalType.RELIABILITY,
                input_text="What is 10*5?",
                agent_id=agent,
                expected_tool_calls=["multiply"],
                headers=env.auth,
            )
    # AgentOSClient accepts the unfinished answer: an EvalSchema whose eval_data says where the run is
    assert early is not None and early.eval_data["run_status"] in ("PENDING", "RUNNING")
    assert early.eval_data["eval_status"] == "FAILED"


async def test_list_pages_filters_and_sorts_only_agno_runs(env: Env) -> None:
    ids = [(await env.run(**CLIENT_EXAMPLE | {"agent_id": env.agent_id, "name": f"r{i}"}))["id"] for i in (1, 2, 3)]
    accuracy = await env.run(
        agent_id=env.agent_id, eval_type="accuracy", input="What is 10*5?", expected_output="50", name="a"
    )
    async with keyed_channel(env.srv.port, env.key) as channel:
        native = (await eval_run_service_pb2_grpc.EvalRunServiceStub(channel).CreateRun(create_request(1))).run.id

    async def listed(**params: Any) -> tuple[list[str], dict[str, Any]]:
        got = await env.http.get("/eval-runs", params=params)
        assert got.status_code == 200, got.text
        assert set(got.json()) == {"data", "meta"}
        return [r["id"] for r in got.json()["data"]], got.json()["meta"]

    found, meta = await listed()
    assert found == [accuracy["id"], *ids[::-1]] and native not in found
    assert set(meta) == {"page", "limit", "total_pages", "total_count", "search_time_ms"}
    found, meta = await listed(eval_types="reliability", limit=2, page=2)
    assert found == [ids[0]]
    assert (meta["page"], meta["limit"], meta["total_pages"], meta["total_count"]) == (2, 2, 2, 3)
    assert (await listed(eval_types="reliability", sort_order="asc"))[0] == ids
    assert (await listed(sort_by="name", sort_order="asc"))[0] == [accuracy["id"], *ids]
    assert (await listed(eval_types="accuracy,reliability", agent_id=env.agent_id, model_id="gpt-4o"))[1][
        "total_count"
    ] == 4
    assert (await listed(type="agent"))[1]["total_count"] == 4
    assert (await listed(type="team"))[0] == [] and (await listed(agent_id="other"))[0] == []
    assert (await listed(page=9))[0] == []

    not_agno = await env.http.get(f"/eval-runs/{native}")
    assert not_agno.status_code == 404 and not_agno.json() == {"detail": f"Eval run with id '{native}' not found"}
    assert (await env.http.request("DELETE", "/eval-runs", json={"eval_run_ids": [native]})).status_code == 204
    # Unknown ids are skipped, as AgentOS skips them; an empty one is unknown too (not a 400 in evalsvc's words).
    assert (await env.http.request("DELETE", "/eval-runs", json={"eval_run_ids": ["", "x"]})).status_code == 204
    still = await env.http.get(f"/v1/runs/{native}")
    assert still.status_code == 200 and "deleteTime" not in still.json()["run"]


async def test_a_list_page_is_bounded_in_runs_and_in_the_results_it_reads(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`limit` has no documented maximum: a larger one is read as MAX_LIMIT, which meta.limit reports. Each
    run on a page is shown with all its results, so a page whose runs hold more than MAX_PAGE_RESULTS
    results is refused (here made 5: two runs of 3 repetitions), naming a smaller limit; a page of one
    run is always read."""
    monkeypatch.setattr(agno, "MAX_PAGE_RESULTS", 5)
    accuracy = {"agent_id": env.agent_id, "eval_type": "accuracy", "input": "10*5?", "expected_output": "50"}
    ids = [(await env.run(**accuracy, num_iterations=3))["id"] for _ in range(2)]

    huge = await env.http.get("/eval-runs", params={"limit": 10**9})
    assert huge.status_code == 400, huge.text
    assert huge.json() == {
        "detail": "the 2 eval runs of this page hold 6 results, more than one page reads (5): "
        "ask for fewer runs per page (a smaller `limit`)"
    }
    for page, run_id in enumerate(ids[::-1], start=1):
        one = await env.http.get("/eval-runs", params={"limit": 1, "page": page})
        assert one.status_code == 200, one.text
        assert [r["id"] for r in one.json()["data"]] == [run_id]
        assert len(one.json()["data"][0]["eval_data"]["results"]) == 3

    monkeypatch.setattr(agno, "MAX_PAGE_RESULTS", 6)
    whole = await env.http.get("/eval-runs", params={"limit": 10**9})
    assert whole.status_code == 200, whole.text
    meta = whole.json()["meta"]
    assert (meta["limit"], meta["total_pages"], meta["total_count"]) == (agno.MAX_LIMIT, 1, 2)
    assert [r["id"] for r in whole.json()["data"]] == ids[::-1]


async def test_a_list_holds_at_most_its_bytes_of_runs(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The list reads the tenant's Agno runs whole (filters and sorting run in the gateway): 10,000 runs of
    large definitions were gigabytes held by one GET. It holds the newest that fit MAX_COLLECTED_BYTES (here
    about two and a half runs' worth), and at least one."""
    accuracy = {"agent_id": env.agent_id, "eval_type": "accuracy", "input": "10*5?", "expected_output": "50"}
    ids = [(await env.run(**accuracy))["id"] for _ in range(4)]
    sizes = []  # as the list reads them, newest first (ListRuns' whole runs)
    for run_id in ids[::-1]:
        await env.ended(run_id)
        stored = await env.http.get(f"/v1/runs/{run_id}", headers=env.native_auth)
        sizes.append(json_format.ParseDict(stored.json()["run"], run_pb2.Run()).ByteSize())
    monkeypatch.setattr(base, "MAX_COLLECTED_BYTES", sizes[0] + sizes[1] + sizes[2] // 2)
    page = await env.http.get("/eval-runs", params={"limit": 10})
    assert page.status_code == 200, page.text
    assert [r["id"] for r in page.json()["data"]] == ids[::-1][:2]
    monkeypatch.setattr(base, "MAX_COLLECTED_BYTES", 1)
    assert [r["id"] for r in (await env.http.get("/eval-runs")).json()["data"]] == ids[-1:]


async def test_get_routes_answer_head_and_allow_lists_it(env: Env) -> None:
    run = await env.run(agent_id=env.agent_id, eval_type="accuracy", input="10*5?", expected_output="50")
    await check_head(env.http, f"/eval-runs/{run['id']}", "/eval-runs/run_missing", "/agents", "/agents/tgt_x")
    refused = await env.http.put("/eval-runs")
    assert refused.status_code == 405 and refused.headers["allow"] == "DELETE, GET, HEAD, POST"


async def test_auth_errors_are_agentos_401s(env: Env) -> None:
    requests = [
        ("POST", "/eval-runs", {"eval_type": "nope"}),  # a bad body too: auth is checked first
        ("GET", "/eval-runs", None),
        ("GET", "/eval-runs/x", None),
        ("PATCH", "/eval-runs/x", {"name": "n"}),
        ("DELETE", "/eval-runs", {"eval_run_ids": ["x"]}),
        ("GET", "/agents", None),
    ]
    for method, path, body in requests:
        missing = await env.http.request(method, path, json=body, headers={"Authorization": ""})
        assert missing.status_code == 401 and missing.json() == {"detail": "Authorization header required"}, path
    wrong = {"Authorization": "Bearer not-a-key"}
    for method, path, body in [("GET", "/eval-runs", None), ("POST", "/eval-runs", CLIENT_EXAMPLE)]:
        refused = await env.http.request(method, path, json=body, headers=wrong)
        assert refused.status_code == 401 and refused.json() == {"detail": "Invalid authentication token"}
    with pytest.raises(httpx.HTTPStatusError) as caught:
        await env.client.list_eval_runs(headers=wrong)
    assert caught.value.response.status_code == 401


async def test_bad_input_gets_agentos_errors_and_creates_nothing(env: Env) -> None:
    valid = CLIENT_EXAMPLE | {"agent_id": env.agent_id}
    limits: list[tuple[dict[str, Any], str, list[str]]] = [
        ({"input": ""}, "string_too_short", ["body", "input"]),
        ({"num_iterations": 0}, "greater_than_equal", ["body", "num_iterations"]),
        ({"num_iterations": 101}, "less_than_equal", ["body", "num_iterations"]),
        ({"threshold": 0}, "greater_than_equal", ["body", "threshold"]),
        ({"threshold": 11}, "less_than_equal", ["body", "threshold"]),
        ({"warmup_runs": -1}, "greater_than_equal", ["body", "warmup_runs"]),
        ({"warmup_runs": 11}, "less_than_equal", ["body", "warmup_runs"]),
        ({"eval_type": "bogus"}, "enum", ["body", "eval_type"]),
        ({"scoring_strategy": "fuzzy"}, "literal_error", ["body", "scoring_strategy"]),
    ]
    for change, kind, loc in limits:
        refused = await env.http.post("/eval-runs", json=valid | change)
        assert refused.status_code == 422, change
        [error] = refused.json()["detail"]
        assert error["type"] == kind and error["loc"] == loc and {"msg", "input"} <= set(error), error
    # JSON can spell NaN and lone surrogates, which nothing can store: still a 422, never a 5xx.
    for raw in ('"input": "\\ud800"', '"num_iterations": NaN', '"expected_tool_call_arguments": {"m": {"a": NaN}}'):
        unstorable = json.dumps(valid)[:-1] + ", " + raw + "}"
        refused = await env.http.post("/eval-runs", content=unstorable, headers={"content-type": "application/json"})
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"][0] == "body", raw
    missing_input = await env.http.post("/eval-runs", json={k: v for k, v in valid.items() if k != "input"})
    assert missing_input.json()["detail"][0]["type"] == "missing"

    messages: list[tuple[dict[str, Any], int, str]] = [
        ({"agent_id": None}, 400, "One of agent_id or team_id must be provided"),
        ({"team_id": "t"}, 400, "Only one of agent_id or team_id must be provided"),
        ({"eval_type": "accuracy"}, 400, "expected_output is required for accuracy evaluation"),
        ({"eval_type": "agent_as_judge"}, 400, "criteria is required for agent-as-judge evaluation"),
        ({"expected_tool_calls": None}, 400, "expected_tool_calls is required for reliability evaluations"),
        ({"agent_id": "nope"}, 404, "Agent with id 'nope' not found"),
        ({"agent_id": None, "team_id": "nope"}, 404, "Team with id 'nope' not found"),
    ]
    for change, status, detail in messages:
        refused = await env.http.post("/eval-runs", json=valid | change)
        assert (refused.status_code, refused.json()) == (status, {"detail": detail}), change

    for name in ("", "n" * 256):
        renamed = await env.http.patch("/eval-runs/x", json={"name": name})
        assert renamed.status_code == 422 and renamed.json()["detail"][0]["loc"] == ["body", "name"]
    empty = await env.http.request("DELETE", "/eval-runs", json={"eval_run_ids": []})
    assert empty.status_code == 422 and empty.json()["detail"][0]["type"] == "too_short"
    assert (await env.http.get("/eval-runs", params={"limit": 0})).json()["detail"][0]["type"] == "greater_than_equal"
    page_zero = await env.http.get("/eval-runs", params={"page": 0})
    assert page_zero.status_code == 422 and page_zero.json() == {
        "detail": "`page` must be >= 1 (pages are 1-indexed); got 0."
    }
    bad_type = await env.http.get("/eval-runs", params={"eval_types": "accuracy,bogus"})
    assert bad_type.status_code == 422 and bad_type.json() == {
        "detail": "Invalid eval_type: 'bogus' is not a valid EvalType. "
        "Valid types: accuracy, agent_as_judge, performance, reliability"
    }
    for method in ("GET", "PATCH"):
        unknown = await env.http.request(method, "/eval-runs/nope", json={"name": "n"})
        assert (unknown.status_code, unknown.json()) == (404, {"detail": "Eval run with id 'nope' not found"})

    assert env.model.seen == []  # nothing ran
    everything = pb.ListRunsRequest(show_deleted=True)
    async with keyed_channel(env.srv.port, env.key) as channel:
        assert not (await eval_run_service_pb2_grpc.EvalRunServiceStub(channel).ListRuns(everything)).runs


async def test_agents_are_the_callers_saved_targets(env: Env) -> None:
    agents = await env.client.list_agents(headers=env.auth)
    assert [(a.id, a.name) for a in agents] == [(env.agent_id, "basic-agent")]
    got = await env.http.get(f"/agents/{env.agent_id}")
    assert got.json() == {
        "id": env.agent_id,
        "name": "basic-agent",
        "model": {"name": "chat", "model": "gpt-4o", "provider": "OpenAI"},
        "metadata": {"model_provider": "OpenAI"},
    }
    missing = await env.http.get("/agents/nope")
    assert (missing.status_code, missing.json()) == (404, {"detail": "Agent not found"})


async def test_openapi_documents_the_agentos_routes_and_models(env: Env) -> None:
    spec = (await env.http.get("/openapi.json")).json()
    operations = {
        op["operationId"] for path in ("/eval-runs", "/eval-runs/{eval_run_id}") for op in spec["paths"][path].values()
    }
    assert operations == {"run_eval", "get_eval_runs", "get_eval_run", "delete_eval_runs", "update_eval_run"}
    post = spec["paths"]["/eval-runs"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("EvalRunInput")
    assert {"200", "400", "401", "404", "422"} <= set(post["responses"])
    assert spec["paths"]["/eval-runs"]["delete"]["responses"]["204"]


async def test_a_create_whose_watch_has_no_room_answers_the_run_as_it_stands(tmp_path: Path) -> None:
    """The review: the tenant's watch memory full, the synchronous create's own watch was refused and
    the create answered 429 for a run it had created, so the client's retry created a second run. A watch
    refused for want of room is a run returned as it stands, as for the gateway's own stream share."""
    answer = chat_reply("50", tool_calls=[{"name": "multiply", "args": {"a": 10, "b": 5}}])
    with FakeEndpoint(judge_reply(VERDICT)) as judge, FakeEndpoint(answer) as model:
        settings = {"max_watch_bytes_per_tenant": 1, "max_watch_bytes": 1 << 30}
        async with dialect_gateway(tmp_path, "agno", judge, **settings) as (srv, http):
            target = {"displayName": "basic-agent", "target": chat(model.url)}
            agent = (await http.post("/v1/targets", json={"target": target})).json()["target"]["id"]
            async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
                runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
                await srv.executor.stop()  # the watched run stays open, its watch holding the tenant's bytes
                held = runs.WatchRun(pb.WatchRunRequest(run_id=(await runs.CreateRun(create_request(1))).run.id))
                assert (await held.read()).seq == 1
                posted = await http.post("/eval-runs", json=CLIENT_EXAMPLE | {"agent_id": agent})
                assert posted.status_code == 200, posted.text
                assert posted.json()["eval_data"]["run_status"] == "PENDING"
                assert len((await runs.ListRuns(pb.ListRunsRequest())).runs) == 2  # the held one and this one
                held.cancel()


async def test_a_run_whose_agno_request_cannot_be_read_is_not_an_agno_run(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """The rule every dialect follows (docs/dialects.md), as Agno always did: a run labelled dialect=agno
    whose `agno.eval_run_input` a tenant wrote natively as something else is left out of the list and
    not found by id, and nothing is logged at ERROR."""
    good = (await env.run(**CLIENT_EXAMPLE | {"agent_id": env.agent_id}))["id"]
    with no_errors_logged(caplog):
        native = {
            "items": [{"id": "a", "input": "q", "response": {"content": "x"}}],
            "target": {"provided": {}},
            "graders": [{"name": "exact", "exactMatch": {}}],
            "labels": {"dialect": "agno"},
        }
        bad = [
            (await env.native("/v1/runs", {**native, "annotations": {INPUT_KEY: value}}))["run"]["id"]
            for value in ("{", '{"eval_type": "nope"}')
        ]
        listed = await env.http.get("/eval-runs")
        assert listed.status_code == 200 and [r["id"] for r in listed.json()["data"]] == [good], listed.text
        for run_id in bad:
            missing = await env.http.get(f"/eval-runs/{run_id}")
            assert missing.status_code == 404 and missing.json() == {"detail": f"Eval run with id '{run_id}' not found"}
