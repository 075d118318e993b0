"""The Omni dialect (Omni AI Eval, /api/v1/ai/eval/...) over real HTTP to a real gateway in front of a
real gRPC server. The model a prompt set names is a saved chat target on a real-HTTP fake of an
OpenAI-compatible endpoint, and the server's default judge is another such fake (tests/fake_llm.py)."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from evalsvc.gateway.dialects.uuids import from_uuid, to_uuid
from tests.dialects.env import DialectEnv, chat_target, check_head, dialect_gateway
from tests.fake_llm import FakeEndpoint, Reply, chat_reply, judge_reply

PRICES = {"gpt-test": {"input_per_mtok": 1000.0, "output_per_mtok": 2000.0}, "judge-test": {"input_per_mtok": 100.0}}
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")  # Omni's string<uuid>
RUN_KEYS = {
    "id", "prompt_set_id", "model_id", "branch_id", "branch_name", "description", "run_number", "status",
    "is_archived", "created_at", "completed_at",
}  # fmt: skip
SET_KEYS = {"id", "model_id", "name", "slug", "description", "is_archived", "created_at", "updated_at"}
RESULT_KEYS = {"id", "prompt", "score", "cost", "scoring_cost", "timing_ms", "error_reason", "agentic_job"}

# The documented request examples (docs.omni.co/api/ai-eval, SKILL.md), model and prompt set ids aside.
CREATE_SET_EXAMPLE: dict[str, Any] = {
    "model_id": "880e8400-e29b-41d4-a716-446655440003",
    "name": "Orders regression",
    "slug": "orders-regression",
    "description": "Regression suite for the orders topic",
    "prompts": [],
}
SKILL_SET_EXAMPLE: dict[str, Any] = {
    "model_id": "your-model-id",
    "name": "Core orders",
    "slug": "core-orders",
    "description": "Core revenue + orders coverage",
    "prompts": [
        {"prompt_text": "Show me revenue by month"},
        {
            "prompt_text": "What are the top 5 products by revenue?",
            "expectation": "The top product by revenue should be Aniseed Syrup.",
        },
        {"prompt_text": "How many orders were placed last week?"},
    ],
}
START_RUN_EXAMPLE: dict[str, Any] = {
    "prompt_set_id": "550e8400-e29b-41d4-a716-446655440000",
    "description": "Re-running after switching to gpt-4o for query generation",
    "run_config": {"branch_id": "440e8400-e29b-41d4-a716-446655440006"},
}


@dataclass(kw_only=True)
class Env(DialectEnv):
    model: FakeEndpoint  # answers for the saved chat target (the Omni "model")
    model_id: str

    async def save_model(self) -> str:
        """A saved chat target on the model fake: what Omni calls a model (its evalsvc id)."""
        return await self.save_target("orders model", chat_target(self.model.url, "gpt-test", timeoutS=5))


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps(PRICES))
    answer = chat_reply("Aniseed Syrup", usage=(10, 5))
    with FakeEndpoint(answer) as model, FakeEndpoint(judge_reply({"score": 9, "reason": "right"})) as judge:
        async with dialect_gateway(
            tmp_path, "omni", judge, judge_api_key="judge-key", price_table=str(prices), http_retries=0
        ) as (srv, http):
            env = Env(srv=srv, http=http, judge=judge, key=srv.bootstrap_key or "", model=model, model_id="")
            env.model_id = to_uuid(await env.save_model())
            yield env


def omni_error(response: httpx.Response, status: int) -> str:
    """Assert Omni's error envelope with this status; the detail, for further checks."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail", "status"} and body["status"] == status, body
    assert isinstance(body["detail"], str) and body["detail"]
    return str(body["detail"])


def check_prompt_set(body: dict[str, Any], *, summary: bool = False) -> None:
    """The documented prompt-set object (or list item), field by field."""
    assert set(body) == SET_KEYS | ({"latest_run_at", "prompt_count"} if summary else {"prompts"}), body
    assert all(isinstance(body[k], str) for k in ("id", "model_id", "name", "slug", "created_at", "updated_at"))
    assert UUID.match(body["id"]) and UUID.match(body["model_id"]), body
    assert body["description"] is None or isinstance(body["description"], str)
    assert body["is_archived"] is False
    assert TIMESTAMP.match(body["created_at"]) and TIMESTAMP.match(body["updated_at"])
    if summary:
        assert isinstance(body["prompt_count"], int)
        assert body["latest_run_at"] is None or TIMESTAMP.match(body["latest_run_at"])
        return
    for prompt in body["prompts"]:
        assert set(prompt) == {"id", "prompt_text", "expectation", "created_at", "updated_at"}
        assert UUID.match(prompt["id"]) and isinstance(prompt["prompt_text"], str)
        assert prompt["expectation"] is None or isinstance(prompt["expectation"], str)
        assert TIMESTAMP.match(prompt["created_at"]) and TIMESTAMP.match(prompt["updated_at"])


def check_run(run: dict[str, Any], *, listed: bool = False) -> None:
    """The documented run object (or list item: no results, plus stats), field by field."""
    assert set(run) == RUN_KEYS | ({"stats"} if listed else {"results"}), run
    assert run["status"] in {"RUNNING", "COMPLETE", "CANCELLED"}  # SKILL.md's, COMPLETE and CANCELLED terminal
    assert isinstance(run["run_number"], int) and isinstance(run["is_archived"], bool)
    assert all(UUID.match(run[k]) for k in ("id", "prompt_set_id", "model_id")), run
    assert run["branch_name"] is None and TIMESTAMP.match(run["created_at"])
    assert run["completed_at"] is None or TIMESTAMP.match(run["completed_at"])
    if listed:
        assert set(run["stats"]) == {"terminal", "total"} and 0 <= run["stats"]["terminal"] <= run["stats"]["total"]
        return
    for result in run["results"]:
        assert set(result) == RESULT_KEYS
        assert set(result["agentic_job"]) == {"id", "conversation_id", "state"}
        ids = (result["id"], result["agentic_job"]["id"], result["agentic_job"]["conversation_id"])
        assert all(UUID.match(each) for each in ids) and len(set(ids)) == 3, result  # from creation on
        assert result["agentic_job"]["state"] in {"QUEUED", "EXECUTING", "COMPLETE", "FAILED"}
        assert result["score"] in (0, 1, None)


async def create_set(env: Env, **fields: Any) -> dict[str, Any]:
    created = await env.http.post(
        "/api/v1/ai/eval/prompt-sets", json={**SKILL_SET_EXAMPLE, "model_id": env.model_id, **fields}
    )
    assert created.status_code == 200, created.text
    return dict(created.json()["prompt_set"])


async def start_run(env: Env, set_id: str, **fields: Any) -> dict[str, Any]:
    created = await env.http.post("/api/v1/ai/eval/runs", json={"prompt_set_id": set_id, **fields})
    assert created.status_code == 200, created.text
    return dict(created.json())


async def wait_until_done(env: Env, run_id: str) -> None:
    """Follow the run's native NDJSON watch to its terminal event (the stream ends there)."""
    await env.ended(from_uuid(run_id))  # Omni shows the UUID form of the evalsvc run id


async def test_prompt_sets_as_documented(env: Env) -> None:
    created = await env.http.post("/api/v1/ai/eval/prompt-sets", json={**CREATE_SET_EXAMPLE, "model_id": env.model_id})
    assert created.status_code == 200, created.text
    empty = created.json()["prompt_set"]
    check_prompt_set(empty)
    assert (empty["name"], empty["slug"], empty["model_id"]) == ("Orders regression", "orders-regression", env.model_id)
    assert empty["description"] == "Regression suite for the orders topic" and empty["prompts"] == []

    core = await create_set(env)
    check_prompt_set(core)
    assert [p["prompt_text"] for p in core["prompts"]] == [p["prompt_text"] for p in SKILL_SET_EXAMPLE["prompts"]]
    assert [p["expectation"] for p in core["prompts"]] == [
        None, "The top product by revenue should be Aniseed Syrup.", None,
    ]  # fmt: skip
    assert len({p["id"] for p in core["prompts"]}) == 3
    got = await env.http.get(f"/api/v1/ai/eval/prompt-sets/{core['id']}")
    assert got.status_code == 200 and got.json() == {"prompt_set": core}

    other_model = await env.save_model()
    elsewhere = await create_set(env, model_id=other_model, name="Another", slug="core-orders")  # unique per model
    listed = (await env.http.get("/api/v1/ai/eval/prompt-sets")).json()["prompt_sets"]
    for item in listed:
        check_prompt_set(item, summary=True)
    assert [s["name"] for s in listed] == ["Another", "Core orders", "Orders regression"]  # sorted by name
    assert [s["prompt_count"] for s in listed] == [3, 3, 0] and {s["latest_run_at"] for s in listed} == {None}
    mine = await env.http.get("/api/v1/ai/eval/prompt-sets", params={"model_ids": [env.model_id]})
    assert [s["id"] for s in mine.json()["prompt_sets"]] == [core["id"], empty["id"]]
    both = await env.http.get("/api/v1/ai/eval/prompt-sets", params={"model_ids": [env.model_id, other_model]})
    assert len(both.json()["prompt_sets"]) == 3  # a model by its evalsvc id (other_model) or its UUID form
    comma = await env.http.get("/api/v1/ai/eval/prompt-sets", params={"model_ids": f"{env.model_id}, {other_model}"})
    assert comma.json() == both.json()  # comma-separated, as well as repeated (it matched nothing)
    assert elsewhere["model_id"] == to_uuid(other_model) and from_uuid(elsewhere["model_id"]) == other_model
    archived = await env.http.get("/api/v1/ai/eval/prompt-sets", params={"archived": "true"})
    assert archived.json() == {"prompt_sets": []}
    for flag, count in (("True", 0), ("FALSE", 3)):  # any letter case (it was a 400)
        listed = (await env.http.get("/api/v1/ai/eval/prompt-sets", params={"archived": flag})).json()
        assert len(listed["prompt_sets"]) == count
    omni_error(await env.http.get("/api/v1/ai/eval/prompt-sets", params={"archived": "yes"}), 400)
    restored = await env.http.post(f"/api/v1/ai/eval/prompt-sets/{core['id']}/unarchive")
    assert restored.status_code == 200 and restored.json() == {"prompt_set": core}

    native = await env.http.post("/v1/datasets", json={"dataset": {"displayName": "not omni"}})
    assert native.status_code == 200
    omni_error(await env.http.get(f"/api/v1/ai/eval/prompt-sets/{native.json()['dataset']['id']}"), 404)
    assert len((await env.http.get("/api/v1/ai/eval/prompt-sets")).json()["prompt_sets"]) == 3


async def test_prompt_set_limits_are_refused_before_anything_is_created(env: Env) -> None:
    await create_set(env)
    valid = {**SKILL_SET_EXAMPLE, "model_id": env.model_id, "slug": "fresh"}
    out_of_limits: list[dict[str, Any]] = [
        {"name": ""},
        {"name": "n" * 256},
        {"slug": "Orders"},
        {"slug": "1-orders"},
        {"slug": "orders_x"},
        {"slug": "s" * 256},
        {"description": "d" * 1025},
        {"prompts": [{"prompt_text": f"q{i}"} for i in range(26)]},
        {"prompts": [{"prompt_text": "q" * 8001}]},
        {"prompts": [{"prompt_text": ""}]},
        {"prompts": [{"prompt_text": "q", "expectation": "e" * 16001}]},
        {"prompts": [{"expectation": "no prompt text"}]},
        {"model_id": None},
    ]
    for change in out_of_limits:
        omni_error(await env.http.post("/api/v1/ai/eval/prompt-sets", json={**valid, **change}), 400)
    garbled = await env.http.post(
        "/api/v1/ai/eval/prompt-sets", content=b"{not json", headers={"content-type": "application/json"}
    )
    omni_error(garbled, 400)
    assert "model" in omni_error(
        await env.http.post("/api/v1/ai/eval/prompt-sets", json={**valid, "model_id": "tgt_missing"}), 404
    )
    duplicate = omni_error(
        await env.http.post("/api/v1/ai/eval/prompt-sets", json={**valid, "slug": "core-orders"}), 409
    )
    assert "core-orders" in duplicate
    listed = (await env.http.get("/api/v1/ai/eval/prompt-sets")).json()["prompt_sets"]
    assert [s["slug"] for s in listed] == ["core-orders"]
    edge = {"name": "n" * 255, "slug": "s" * 255, "description": "d" * 1024}
    at_limits = await env.http.post(
        "/api/v1/ai/eval/prompt-sets",
        json={**valid, **edge, "prompts": [{"prompt_text": "q" * 8000, "expectation": "e" * 16000}] * 25},
    )
    assert at_limits.status_code == 200, at_limits.text
    assert len(at_limits.json()["prompt_set"]["prompts"]) == 25


async def test_patch_appends_prompts_and_refuses_what_datasets_cannot_do(env: Env) -> None:
    core = await create_set(env)
    path = f"/api/v1/ai/eval/prompt-sets/{core['id']}"
    keep = [{"id": p["id"], "prompt_text": p["prompt_text"]} for p in core["prompts"]]
    added = await env.http.patch(path, json={"prompts": [*keep, {"prompt_text": "Revenue by month, last 12 months"}]})
    assert added.status_code == 200, added.text
    prompts = added.json()["prompt_set"]["prompts"]
    check_prompt_set(added.json()["prompt_set"])
    assert [p["id"] for p in prompts[:3]] == [p["id"] for p in core["prompts"]] and len(prompts) == 4
    assert prompts[3]["prompt_text"] == "Revenue by month, last 12 months" and prompts[3]["expectation"] is None

    keep = [{"id": p["id"], "prompt_text": p["prompt_text"]} for p in prompts]
    edited = [{**keep[0], "prompt_text": "changed"}, *keep[1:]]
    omni_error(await env.http.patch(path, json={"prompts": edited}), 409)
    omni_error(await env.http.patch(path, json={"prompts": keep[1:]}), 409)  # deleting a prompt
    omni_error(await env.http.patch(path, json={"prompts": [*keep, keep[0]]}), 409)  # one prompt twice
    omni_error(await env.http.patch(path, json={"name": "Renamed"}), 409)
    omni_error(await env.http.patch(path, json={"prompts": [*keep, {"id": "nope", "prompt_text": "q"}]}), 404)
    many = [*keep, *({"prompt_text": f"q{i}"} for i in range(22))]
    omni_error(await env.http.patch(path, json={"prompts": many}), 400)
    omni_error(await env.http.patch("/api/v1/ai/eval/prompt-sets/ds_missing", json={}), 404)
    same = await env.http.patch(path, json={"name": core["name"], "prompts": keep})
    assert same.status_code == 200 and len(same.json()["prompt_set"]["prompts"]) == 4
    assert (await env.http.get(path)).json() == same.json()


async def test_a_run_to_completion_with_the_documented_example(env: Env) -> None:
    core = await create_set(env)
    # The model answers every prompt; the judge passes the first answer it sees and fails the others.
    env.judge.script = [judge_reply({"score": 9, "reason": "right"}), judge_reply({"score": 2, "reason": "wrong"})]
    started = await start_run(env, core["id"], **{k: v for k, v in START_RUN_EXAMPLE.items() if k != "prompt_set_id"})
    assert set(started) == {"job_count", "run"} and started["job_count"] == 3
    run = started["run"]
    check_run(run)
    assert run["status"] == "RUNNING" and run["is_archived"] is False and run["completed_at"] is None
    assert (run["prompt_set_id"], run["model_id"], run["run_number"]) == (core["id"], env.model_id, 1)
    assert run["branch_id"] == "440e8400-e29b-41d4-a716-446655440006"
    assert run["description"] == START_RUN_EXAMPLE["description"]
    assert [r["prompt"] for r in run["results"]] == [p["prompt_text"] for p in core["prompts"]]

    await wait_until_done(env, run["id"])
    done = (await env.http.get(f"/api/v1/ai/eval/runs/{run['id']}")).json()
    assert set(done) == {"run"}
    check_run(done["run"])
    assert done["run"]["status"] == "COMPLETE" and TIMESTAMP.match(done["run"]["completed_at"])
    assert done["run"]["branch_id"] == run["branch_id"] and done["run"]["description"] == run["description"]
    results = done["run"]["results"]
    assert [r["prompt"] for r in results] == [p["prompt_text"] for p in core["prompts"]]
    assert sorted(r["score"] for r in results) == [0, 0, 1]
    assert {r["agentic_job"]["state"] for r in results} == {"COMPLETE"}
    for result in results:
        assert result["error_reason"] is None and isinstance(result["agentic_job"]["id"], str)
        assert result["cost"] == pytest.approx((10 * 1000 + 5 * 2000) / 1e6)  # the price table's gpt-test
        assert result["scoring_cost"] == pytest.approx(100 * 100 / 1e6)  # the judge's 100 prompt tokens
        assert isinstance(result["timing_ms"], int) and result["timing_ms"] >= 0
    native = (await env.http.get(f"/v1/runs/{from_uuid(run['id'])}/results")).json()["results"]
    passed = {r["itemId"]: r["passed"] for r in native}
    for result, prompt in zip(results, core["prompts"], strict=True):
        assert result["score"] == int(passed[prompt["id"]])  # 1 exactly when it passed
    jobs = [(r["id"], r["agentic_job"]["id"], r["agentic_job"]["conversation_id"]) for r in run["results"]]
    assert jobs == [(r["id"], r["agentic_job"]["id"], r["agentic_job"]["conversation_id"]) for r in results]
    expectation = "The top product by revenue should be Aniseed Syrup."
    assert any(expectation in json.dumps(seen.body) for seen in env.judge.seen)  # the judge saw the expectation

    env.model.script = [Reply({"error": "down"}, status=500)]  # every prompt errors (no retries): the run FAILED
    second = (await start_run(env, core["id"]))["run"]
    assert (await env.ended(from_uuid(second["id"])))["status"] == "RUN_STATUS_FAILED"
    broken = (await env.http.get(f"/api/v1/ai/eval/runs/{second['id']}")).json()["run"]
    check_run(broken)
    # COMPLETE, a status SKILL.md calls terminal (it was FAILED, which a poller following SKILL.md never
    # stops on); the errors are in the rows
    assert broken["status"] == "COMPLETE" and TIMESTAMP.match(broken["completed_at"])
    assert broken["branch_id"] is None and broken["description"] is None
    for result in broken["results"]:
        assert result["agentic_job"]["state"] == "FAILED" and result["score"] is None
        assert "500" in result["error_reason"] and isinstance(result["agentic_job"]["id"], str)
    listed = (await env.http.get("/api/v1/ai/eval/runs", params={"prompt_set_id": core["id"]})).json()
    assert set(listed) == {"runs"}
    for item in listed["runs"]:
        check_run(item, listed=True)
    assert [(r["id"], r["run_number"]) for r in listed["runs"]] == [(second["id"], 2), (run["id"], 1)]
    assert listed["runs"][1]["stats"] == {"terminal": 3, "total": 3} and listed["runs"][1]["status"] == "COMPLETE"
    sets = (await env.http.get("/api/v1/ai/eval/prompt-sets")).json()["prompt_sets"]
    assert TIMESTAMP.match(sets[0]["latest_run_at"])


async def test_cancel_archive_and_unarchive(env: Env) -> None:
    core = await create_set(env)
    await env.srv.executor.stop()  # the run stays queued until it is cancelled
    try:
        run = (await start_run(env, core["id"]))["run"]
        assert {r["agentic_job"]["state"] for r in run["results"]} == {"QUEUED"}
        cancelled = await env.http.post(f"/api/v1/ai/eval/runs/{run['id']}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        body = cancelled.json()
        assert set(body) == {"cancelled", "run", "total"} and (body["cancelled"], body["total"]) == (3, 3)
        check_run(body["run"])
        assert body["run"]["status"] == "CANCELLED" and body["run"]["is_archived"] is True
        assert {r["agentic_job"]["state"] for r in body["run"]["results"]} == {"FAILED"}
        again = (await env.http.post(f"/api/v1/ai/eval/runs/{run['id']}/cancel")).json()
        assert (again["cancelled"], again["total"]) == (0, 3)

        runs = "/api/v1/ai/eval/runs"
        active = await env.http.get(runs, params={"prompt_set_id": core["id"]})
        assert active.json() == {"runs": []}
        archived = await env.http.get(runs, params={"prompt_set_id": core["id"], "archived": "true"})
        assert [r["id"] for r in archived.json()["runs"]] == [run["id"]] and archived.json()["runs"][0]["is_archived"]
        got = await env.http.get(f"{runs}/{run['id']}")
        assert got.status_code == 200 and got.json()["run"]["is_archived"] is True

        restored = await env.http.post(f"{runs}/{run['id']}/unarchive")
        # docs.omni.co restore-an-archived-eval-run: `{"is_archived": false}`, like the archive route's `true`
        assert restored.status_code == 200 and restored.json() == {"is_archived": False}, restored.text
        again_restored = await env.http.post(f"{runs}/{run['id']}/unarchive")  # idempotent
        assert again_restored.status_code == 200 and again_restored.json() == {"is_archived": False}
        got = (await env.http.get(f"{runs}/{run['id']}")).json()["run"]
        check_run(got)
        assert got["is_archived"] is False and got["status"] == "CANCELLED"
        assert [r["id"] for r in (await env.http.get(runs, params={"prompt_set_id": core["id"]})).json()["runs"]] == [
            run["id"]
        ]
        for _ in range(2):  # archiving is idempotent
            archived_again = await env.http.delete(f"{runs}/{run['id']}")
            assert archived_again.status_code == 200 and archived_again.json() == {"is_archived": True}
        assert (await env.http.get(f"{runs}/{run['id']}")).json()["run"]["is_archived"] is True
    finally:
        await env.srv.executor.start()


async def test_at_most_two_runs_in_flight(env: Env) -> None:
    core = await create_set(env)
    await env.srv.executor.stop()  # runs stay in flight
    try:
        first = (await start_run(env, core["id"]))["run"]
        await start_run(env, core["id"])
        refused = await env.http.post("/api/v1/ai/eval/runs", json={"prompt_set_id": core["id"]})
        assert "2" in omni_error(refused, 429)
        assert refused.headers["retry-after"] == "5"  # as every 429 of the gateway (docs/dialects.md)
        listed = (await env.http.get("/api/v1/ai/eval/runs", params={"prompt_set_id": core["id"]})).json()["runs"]
        assert len(listed) == 2  # the refused run was not created
        assert (await env.http.post(f"/api/v1/ai/eval/runs/{first['id']}/cancel")).status_code == 200
        await start_run(env, core["id"])
    finally:
        await env.srv.executor.start()


async def test_auth_bad_input_and_unknown_ids_in_omnis_error_shape(env: Env) -> None:
    core = await create_set(env)
    run = (await start_run(env, core["id"]))["run"]
    calls = [
        ("GET", "/api/v1/ai/eval/prompt-sets", None),
        ("POST", "/api/v1/ai/eval/prompt-sets", {**SKILL_SET_EXAMPLE, "model_id": env.model_id, "slug": "x"}),
        ("GET", f"/api/v1/ai/eval/prompt-sets/{core['id']}", None),
        ("PATCH", f"/api/v1/ai/eval/prompt-sets/{core['id']}", {}),
        ("POST", f"/api/v1/ai/eval/prompt-sets/{core['id']}/unarchive", None),
        ("POST", "/api/v1/ai/eval/runs", {"prompt_set_id": core["id"]}),
        ("GET", f"/api/v1/ai/eval/runs?prompt_set_id={core['id']}", None),
        ("GET", f"/api/v1/ai/eval/runs/{run['id']}", None),
        ("POST", f"/api/v1/ai/eval/runs/{run['id']}/cancel", None),
        ("DELETE", f"/api/v1/ai/eval/runs/{run['id']}", None),
        ("POST", f"/api/v1/ai/eval/runs/{run['id']}/unarchive", None),
    ]
    for method, path, body in calls:
        for auth in ("", "Bearer not-a-key"):
            response = await env.http.request(method, path, json=body, headers={"authorization": auth})
            detail = omni_error(response, 401)
            if not auth:  # the header to send, not the gRPC metadata a gRPC client sends
                assert detail == "an API key is required: send it as 'Authorization: Bearer <key>'"
    assert (await env.http.get(f"/api/v1/ai/eval/runs/{run['id']}")).json()["run"]["is_archived"] is False

    for method in ("GET", "DELETE"):
        omni_error(await env.http.request(method, "/api/v1/ai/eval/runs/run_missing"), 404)
    for action in ("cancel", "unarchive"):
        omni_error(await env.http.post(f"/api/v1/ai/eval/runs/run_missing/{action}"), 404)
    omni_error(await env.http.get("/api/v1/ai/eval/prompt-sets/ds_missing"), 404)
    omni_error(await env.http.post("/api/v1/ai/eval/prompt-sets/ds_missing/unarchive"), 404)
    omni_error(await env.http.get("/api/v1/ai/eval/runs", params={"prompt_set_id": "ds_missing"}), 404)
    omni_error(await env.http.get("/api/v1/ai/eval/runs", params={"prompt_set_id": ""}), 404)  # an empty id too
    omni_error(await env.http.post("/api/v1/ai/eval/runs", json={"prompt_set_id": "ds_missing"}), 404)
    inline = {"items": [{"input": "q"}], "target": {"echo": {}}, "graders": [{"exactMatch": {}}]}
    native = (await env.http.post("/v1/runs", json=inline)).json()["run"]["id"]
    omni_error(await env.http.get(f"/api/v1/ai/eval/runs/{native}"), 404)  # not an Omni run

    runs_before = [r["id"] for r in (await env.http.get("/v1/runs")).json()["runs"]]
    omni_error(await env.http.get("/api/v1/ai/eval/runs"), 400)  # prompt_set_id is required
    omni_error(await env.http.get("/api/v1/ai/eval/runs", params={"prompt_set_id": core["id"], "archived": "x"}), 400)
    for bad in (
        {"prompt_set_id": core["id"], "description": "d" * 1025},
        {"prompt_set_id": core["id"], "run_config": "main"},
        {"description": "no prompt set"},
    ):
        omni_error(await env.http.post("/api/v1/ai/eval/runs", json=bad), 400)
    empty = await create_set(env, slug="empty", prompts=[])
    assert "prompts" in omni_error(
        await env.http.post("/api/v1/ai/eval/runs", json={"prompt_set_id": empty["id"]}), 400
    )
    assert [r["id"] for r in (await env.http.get("/v1/runs")).json()["runs"]] == runs_before  # nothing created


async def test_unknown_paths_and_methods_in_omnis_error_shape(env: Env) -> None:
    for path in ("/api/v1/ai/eval/nope", "/api/v1/ai/eval/runs/r/nope", "/api/nope"):  # Omni alone owns /api here
        assert omni_error(await env.http.get(path), 404) == f"no route for GET {path}"
    for method, path, allowed in (
        ("PUT", "/api/v1/ai/eval/runs", "GET, HEAD, POST"),
        ("POST", "/api/v1/ai/eval/runs/r", "DELETE, GET, HEAD"),
        ("DELETE", "/api/v1/ai/eval/prompt-sets/p", "GET, HEAD, PATCH"),
    ):
        response = await env.http.request(method, path)
        assert omni_error(response, 405) == f"method {method} is not allowed on {path} (allowed: {allowed})"
        assert response.headers["allow"] == allowed
    native = await env.http.get("/v1/runz")  # outside Omni's routes: the native shape
    assert native.status_code == 404 and native.json()["code"] == 5
    assert (await env.http.get("/api/v1/ai/eval/prompt-sets")).status_code == 200
    await check_head(env.http, "/api/v1/ai/eval/prompt-sets", "/api/v1/ai/eval/runs/r", "/api/v1/ai/eval/runs")


async def test_openapi_documents_omnis_bodies(env: Env) -> None:
    spec = (await env.http.get("/openapi.json")).json()
    runs = spec["paths"]["/api/v1/ai/eval/runs"]
    assert set(runs) == {"get", "post"}
    responses = runs["post"]["responses"]
    schema_of = {status: r["content"]["application/json"]["schema"]["$ref"] for status, r in responses.items()}
    assert schema_of == {"200": "#/components/schemas/OmniRunCreated", "4XX": "#/components/schemas/OmniErrorBody"}
    for path in ("/api/v1/ai/eval/runs/{runId}/cancel", "/api/v1/ai/eval/prompt-sets/{promptSetId}/unarchive"):
        assert "post" in spec["paths"][path]
    schemas = spec["components"]["schemas"]
    assert {"OmniRunResult", "OmniAgenticJob", "OmniPromptSet", "OmniPromptSetSummary"} <= set(schemas)
    assert schemas["OmniPromptSetCreate"]["properties"]["slug"]["pattern"] == "^[a-z][a-z0-9-]*$"


async def test_a_prompt_set_whose_prompts_are_refused_is_not_created(env: Env) -> None:
    """CreateDataset, then AddDatasetItems: prompts the service refused (here a NUL, which no database
    stores) left an empty prompt set behind, and the client's retry with its slug got 409."""
    bad = [{"prompt_text": "fine"}, {"prompt_text": "bad \u0000 byte"}]
    refused = await env.http.post(
        "/api/v1/ai/eval/prompt-sets", json={**SKILL_SET_EXAMPLE, "model_id": env.model_id, "prompts": bad}
    )
    assert refused.status_code in (400, 422), refused.text
    listed = (await env.http.get("/api/v1/ai/eval/prompt-sets")).json()["prompt_sets"]
    assert [s for s in listed if s["slug"] == SKILL_SET_EXAMPLE["slug"]] == []
    assert (await create_set(env))["slug"] == SKILL_SET_EXAMPLE["slug"]  # the retry, corrected, succeeds


async def test_field_problems_name_omnis_fields_once(env: Env) -> None:
    """The service's INVALID_ARGUMENT names evalsvc's fields (`items[0].input`), and its message already
    listed them: the detail said `items[0].input: items[0].input: must not ...`. It names the field the
    client sent, once."""
    nul = "must not contain NUL (U+0000) characters"
    prompts = [{"prompt_text": "fine"}, {"prompt_text": "bad \u0000 byte"}]
    refused = await env.http.post(
        "/api/v1/ai/eval/prompt-sets", json={**SKILL_SET_EXAMPLE, "model_id": env.model_id, "prompts": prompts}
    )
    assert omni_error(refused, 400) == f"invalid request: prompts[1].prompt_text: {nul}"
    expectation = [{"prompt_text": "fine", "expectation": "\u0000"}]
    refused = await env.http.post(
        "/api/v1/ai/eval/prompt-sets", json={**SKILL_SET_EXAMPLE, "model_id": env.model_id, "prompts": expectation}
    )
    assert omni_error(refused, 400) == f"invalid request: prompts[0].expectation: {nul}"
    named = await env.http.post(
        "/api/v1/ai/eval/prompt-sets", json={**SKILL_SET_EXAMPLE, "model_id": env.model_id, "name": "n\u0000"}
    )
    assert omni_error(named, 400) == f"invalid request: name: {nul}"

    core = await create_set(env)  # three prompts
    keep = [{"id": p["id"], "prompt_text": p["prompt_text"]} for p in core["prompts"]]
    path = f"/api/v1/ai/eval/prompt-sets/{core['id']}"
    patched = await env.http.patch(path, json={"prompts": [*keep, {"prompt_text": "ok"}, {"prompt_text": "\u0000"}]})
    assert omni_error(patched, 400) == f"invalid request: prompts[4].prompt_text: {nul}"  # its place in the PATCH
    assert len((await env.http.get(path)).json()["prompt_set"]["prompts"]) == 3
