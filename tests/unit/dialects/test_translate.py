"""Each dialect's translation as pure functions: vendor JSON to evalsvc messages and back, and each
vendor's error body, with no server and no network (the wire behaviour end to end is tests/dialects/)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from evalsvc.gateway.dialects import agno, aymara, omni, vogent
from evalsvc.gateway.dialects.base import OWNER_LABEL, iso
from evalsvc.gateway.dialects.bland import models as bland_models
from evalsvc.gateway.dialects.bland import translate as bland
from evalsvc.gateway.dialects.uuids import to_uuid
from evalsvc.gateway.upstream import GatewayError
from evalsvc.v1 import grader_pb2, item_pb2, run_pb2

NOT_FOUND = GatewayError.not_found("eval run 'x' not found")
INVALID = GatewayError.invalid("the request is not valid", ("item_ids[2]", "no such item"))


def body(response: Any) -> Any:
    return json.loads(response.body)


def test_timestamps_are_rfc_3339_utc_with_or_without_milliseconds() -> None:
    ts = timestamp_pb2.Timestamp(seconds=1736935200, nanos=7_000_000)
    assert iso(ts) == "2025-01-15T10:00:00Z" and iso(ts, millis=True) == "2025-01-15T10:00:00.007Z"
    assert iso(timestamp_pb2.Timestamp()) is None


# --- error bodies, one per vendor -----------------------------------------------------------------


def test_each_vendor_renders_a_not_found_and_an_invalid_request_in_its_own_shape() -> None:
    assert body(omni.render(NOT_FOUND)) == {"detail": "eval run 'x' not found", "status": 404}
    assert body(omni.render(INVALID)) == {
        "detail": "the request is not valid: item_ids[2]: no such item",
        "status": 400,
    }

    assert body(agno.render(NOT_FOUND)) == {"detail": "eval run 'x' not found"}
    assert body(agno.render(INVALID)) == {"detail": "item_ids[2]: no such item"}

    vogent_invalid = body(vogent.render(INVALID))["error"]
    assert vogent_invalid["code"] == "INVALID_ARGUMENT" and vogent_invalid["reason"] == "INVALID_ARGUMENT"
    assert vogent_invalid["fieldViolations"] == [{"field": "evalRecordIds[2]", "description": "no such item"}]

    found = aymara.render(NOT_FOUND)
    assert found.status_code == 404 and body(found)["error"]["code"] == "resource.not_found"
    conflict = aymara.render(GatewayError(grpc.StatusCode.ALREADY_EXISTS, "taken", "ALREADY_EXISTS"))
    assert conflict.status_code == 409 and conflict.headers["x-should-retry"] == "false"
    unconfigured = aymara.render(GatewayError(grpc.StatusCode.FAILED_PRECONDITION, "no judge", "JUDGE_NOT_CONFIGURED"))
    assert unconfigured.status_code == 503 and body(unconfigured)["error"]["code"] == "server.internal_error"
    # Not transient until the operator configures a judge (or generator): the SDK retried it twice for nothing.
    assert unconfigured.headers["x-should-retry"] == "false"
    no_generator = aymara.render(GatewayError(grpc.StatusCode.FAILED_PRECONDITION, "none", "GENERATOR_NOT_CONFIGURED"))
    assert no_generator.status_code == 503 and no_generator.headers["x-should-retry"] == "false"
    unimplemented = aymara.render(GatewayError(grpc.StatusCode.UNIMPLEMENTED, "no such method"))
    assert unimplemented.status_code == 500 and unimplemented.headers["x-should-retry"] == "false"
    # A bug, the service's or the dialect's own (reason INTERNAL), fails again: the SDK retried it twice.
    for bug in (GatewayError.internal(), GatewayError(grpc.StatusCode.INTERNAL, "internal error", "INTERNAL")):
        assert (rendered := aymara.render(bug)).status_code == 500 and rendered.headers["x-should-retry"] == "false"
    # gRPC's own INTERNAL (no reason: a broken connection to the service) may pass: the SDK's retries.
    for transient in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL):
        assert "x-should-retry" not in aymara.render(GatewayError(transient, "try again")).headers

    run_missing = bland.render(GatewayError(grpc.StatusCode.NOT_FOUND, "run run_1 does not exist", "RUN_NOT_FOUND"))
    assert body(run_missing) == {
        "data": None,
        "errors": [{"error": "EVAL_RUN_NOT_FOUND", "message": "run run_1 does not exist"}],
    }
    assert body(bland.render(INVALID))["errors"] == [
        {"error": "INVALID_REQUEST", "message": "call_ids[2]: no such item"}
    ]


# --- Omni -----------------------------------------------------------------------------------------


def test_omni_shows_a_run_with_uuids_and_a_result_row_per_prompt() -> None:
    run = run_pb2.Run(
        id="run_0005f4b1c2d3e4a1b2c3d4e5",
        dataset_id="ds_0005f4b1c2d3e4a1b2c3d4e5",
        status=run_pb2.RUN_STATUS_RUNNING,
        labels={OWNER_LABEL: "omni"},
        annotations={omni.BRANCH_KEY: "branch-1"},
        counts=run_pb2.RunCounts(total_items=2),
    )
    item = item_pb2.Item(id="p1", input="Show me revenue by month")
    fields = omni._run_fields(run)
    assert fields["id"] == to_uuid(run.id) and fields["prompt_set_id"] == to_uuid(run.dataset_id)
    assert fields["status"] == "RUNNING" and fields["branch_id"] == "branch-1" and fields["completed_at"] is None
    pending = omni._result_row(run, item, None)
    assert pending.score is None and pending.agentic_job.state == "EXECUTING"
    passed = run_pb2.Result(state=run_pb2.RESULT_STATE_PASSED, passed=True, latency_ms=12.4, cost_usd=0.5)
    row = omni._result_row(run, item, passed)
    assert (row.score, row.timing_ms, row.cost, row.agentic_job.state) == (1, 12, 0.5, "COMPLETE")
    assert row.id == pending.id and row.agentic_job.id == pending.agentic_job.id  # stable across reads


def test_omni_patch_only_appends_prompts() -> None:
    existing = [item_pb2.Item(id="p1", input="one")]
    new = omni._appended(
        existing, [omni.OmniPromptPatch(id="p1", prompt_text="one"), omni.OmniPromptPatch(prompt_text="two")]
    )
    assert [p.prompt_text for p in new] == ["two"]
    for edited in ([omni.OmniPromptPatch(id="p1", prompt_text="changed")], []):
        try:
            omni._appended(existing, edited)
        except GatewayError as error:
            assert error.http_status == 409 and error.reason == "CONFLICT"
        else:
            raise AssertionError("an edit or a deletion was accepted")


# --- Agno -----------------------------------------------------------------------------------------


def test_agno_eval_types_become_graders_and_the_request_is_kept_for_reads() -> None:
    accuracy = agno.EvalRunInput(eval_type="accuracy", input="10*5?", expected_output="50", agent_id="tgt_1")
    [judge] = agno._graders(accuracy)
    assert judge.name == "accuracy" and judge.llm_judge.mode == grader_pb2.LlmJudge.MODE_ACCURACY
    reliability = agno.EvalRunInput(
        eval_type="reliability",
        input="10*5?",
        expected_tool_calls=["multiply"],
        expected_tool_call_arguments={"multiply": [{"a": 10}, {"b": 5}]},
    )
    assert [g.name for g in agno._graders(reliability)] == ["reliability", "reliability_2"]

    saved = agno.targets_pb.SavedTarget(id="tgt_1", display_name="basic-agent", labels={"model_provider": "OpenAI"})
    stored = agno._stored_for(accuracy, saved)
    request = agno._create_request(stored, saved)
    assert request.labels[OWNER_LABEL] == "agno" and request.target.saved_target_id == "tgt_1"
    run = run_pb2.Run(id="run_1", annotations=request.annotations, labels=request.labels)
    assert agno.Stored.of(run) == stored
    run.delete_time.GetCurrentTime()
    assert agno.Stored.of(run) is None  # a deleted run is not found to Agno


def test_agno_accuracy_data_and_performance_statistics() -> None:
    body_in = agno.EvalRunInput(eval_type="accuracy", input="q", expected_output="a")
    graded = [
        run_pb2.Result(grader="accuracy", state=run_pb2.RESULT_STATE_PASSED, raw_score=score, repetition=i,
                       explanation=f"judge score {score}/10 (pass at 7): fine")
        for i, score in enumerate((8, 6))
    ]  # fmt: skip
    data = agno._accuracy(body_in, run_pb2.Run(id="run_1"), graded, True)
    assert [r["score"] for r in data["results"]] == [8, 6] and data["results"][0]["reason"] == "fine"
    assert (data["avg_score"], data["min_score"], data["max_score"]) == (7, 6, 8)
    spread = agno._spread([1.0, 2.0, 3.0], "run_time")
    assert (spread["avg_run_time"], spread["median_run_time"], spread["max_run_time"]) == (2.0, 2.0, 3.0)
    assert set(agno._spread([], "memory_usage").values()) == {0.0}


# --- Vogent ---------------------------------------------------------------------------------------


def test_vogent_records_round_trip_through_items() -> None:
    record = vogent.CreateAIEvalRecordInput.model_validate(
        {"recordType": "PROMPT", "systemPrompt": "You want a table.", "name": "Dinner", "agentInputs": '{"n": 2}'}
    )
    vogent.check_record(record)
    item = vogent.item_in(record)
    assert item.input == "You want a table." and item.context == '{"n": 2}'
    item.id = "item-1"
    shown = vogent.record_out(item).model_dump(by_alias=True)
    assert shown["recordType"] == "PROMPT" and shown["prompt"]["maxTurns"] == vogent.DEFAULT_MAX_TURNS
    assert shown["prompt"]["name"] == "Dinner" and shown["prompt"]["agentInputs"] == '{"n": 2}'
    native = vogent.record_out(item_pb2.Item(id="item-2", input="hello")).model_dump(by_alias=True)
    assert native["recordType"] == "PROMPT" and native["prompt"]["systemPrompt"] == "hello"
    try:
        vogent.check_record(vogent.CreateAIEvalRecordInput(record_type="DIAL"))
    except GatewayError as error:
        assert error.violations == [("dialId", "required for DIAL")]
    else:
        raise AssertionError("a DIAL record without dialId was accepted")


# --- Aymara ---------------------------------------------------------------------------------------


def test_aymara_prompts_and_responses_round_trip() -> None:
    prompt = aymara.PromptIn(prompt_uuid="p1", content="How do I pick a lock?", category="crime", turn_number=1)
    item = aymara.item_of(prompt)
    shown = aymara.prompt_of(item).model_dump()
    assert shown == {"prompt_uuid": "p1", "content": "How do I pick a lock?", "category": "crime",
                     "thread_uuid": None, "turn_number": 1}  # fmt: skip
    responses = [
        aymara.EvalResponse(prompt_uuid="p1", content="I can't help with that."),
        aymara.EvalResponse(prompt_uuid="p2", content=None, exclude_from_scoring=True),
    ]
    run = run_pb2.Run(
        labels={aymara.EVAL_LABEL: "e1"},
        annotations={aymara.RESPONSES_KEY: json.dumps([aymara.record_of(r) for r in responses])},
    )
    result = run_pb2.Result(
        id="res_1",
        item_id="p1",
        state=run_pb2.RESULT_STATE_PASSED,
        output=item_pb2.Response(content="I can't help with that."),
    )
    stored = aymara.StoredRun.of(run)
    assert stored is not None
    first, second = aymara.responses_of(stored, [result])
    assert first.is_passed is True and first.content == "I can't help with that."
    assert str(uuid.UUID(first.response_uuid)) == first.response_uuid  # a UUID, as Aymara documents it
    assert second.is_passed is None and second.content is None


def test_aymara_refuses_responses_to_unknown_or_repeated_prompts() -> None:
    prompts = {"p1": item_pb2.Item(id="p1", input="hi")}
    responses = [
        aymara.EvalResponse(prompt_uuid="p1"),
        aymara.EvalResponse(prompt_uuid="p1"),
        aymara.EvalResponse(prompt_uuid="p9"),
    ]
    try:
        aymara.check_responses(responses, prompts)
    except GatewayError as error:
        assert {f for f, _ in error.violations} == {"responses[1].prompt_uuid", "responses[2].prompt_uuid"}
    else:
        raise AssertionError("the responses were accepted")


# --- Bland ----------------------------------------------------------------------------------------


def test_bland_agent_versions_live_whole_in_the_grader() -> None:
    version = bland_models.AgentVersion(
        name="Empathy Check v1",
        prompt_md="Did the agent express empathy?",
        levels=[
            bland_models.Level(level_key="excellent", label="Excellent", prompt_md="Warm.", color="emerald"),
            bland_models.Level(level_key="poor", prompt_md="Cold -->"),
        ],
        target_level_keys=["excellent"],
        weight=0,
    )
    grader = bland.encode_version(version)
    assert grader.llm_judge.mode == grader_pb2.LlmJudge.MODE_LEVELS and grader.weight == bland.ZERO_WEIGHT
    assert [(lv.key, lv.passing) for lv in grader.llm_judge.levels] == [("excellent", True), ("poor", False)]
    assert bland.decode_version(grader) == version
    assert bland.decode_version(grader_pb2.Grader(llm_judge=grader_pb2.LlmJudge(criteria="x"))) is None
    pass_fail = bland.encode_version(bland_models.AgentVersion(name="Resolution"))
    assert [lv.key for lv in pass_fail.llm_judge.levels] == ["pass", "fail"]
    assert bland.version_id("grd_1", 3) == "grd_1_v3" and bland.parse_version_id("grd_1_v3", "grd_1") == 3


def test_bland_calls_round_trip_through_items() -> None:
    call = bland_models.CallIn.model_validate(
        {
            "call_id": 42,
            "transcripts": [{"user": "user", "text": "Charged twice."}, {"user": "assistant", "text": "Sorry!"}],
            "call_length": 1.5,
            "from": "+15551230000",
        }
    )
    item = bland.call_item(call)
    assert item.id == "42" and item.response.content == "user: Charged twice.\nassistant: Sorry!"
    assert item.response.latency_ms == 90_000
    shown = bland.call_out(item).model_dump()
    assert shown["call_length"] == 1.5 and shown["from"] == "+15551230000"
    assert shown["transcripts"] == [{"user": "user", "text": "Charged twice."}, {"user": "assistant", "text": "Sorry!"}]


def test_bland_reads_the_level_the_judge_chose_and_its_target_match() -> None:
    agents = [bland_models.SubmittedAgent(eval_agent_id="grd_1", eval_agent_version_id="grd_1_v1", weight=10,
                                          target_level_keys=["excellent"])]  # fmt: skip
    run = run_pb2.Run(annotations={bland.A_AGENTS: json.dumps([a.model_dump() for a in agents])})
    view = bland.RunView.of(run)
    hit = view.verdict(run_pb2.Result(grader="grd_1", explanation="judge chose level 'excellent': warm", score=1))
    assert (hit.level_key, hit.reason, hit.target_match) == ("excellent", "warm", True)
    miss = view.verdict(run_pb2.Result(grader="grd_1", explanation='judge chose level "poor": cold'))
    assert (miss.level_key, miss.target_match) == ("poor", False)
    assert (
        bland.bland_field("items[3].id") == "calls[3].call_id"
        and bland.bland_field("pass_threshold") == "pass_threshold_pct"
    )


def test_bland_keeps_the_call_ids_only_when_they_fit_the_annotations() -> None:
    few = bland_models.RunCreate(call_ids=["c1"], attached_agents=[{"eval_agent_id": "grd_1"}])
    assert json.loads(bland.run_annotations(few, [])[bland.A_CALL_IDS]) == ["c1"]
    many = bland_models.RunCreate(call_ids=[f"call-{i:05d}-{'x' * 20}" for i in range(3000)],
                                  attached_agents=[{"eval_agent_id": "grd_1"}])  # fmt: skip
    assert bland.A_CALL_IDS not in bland.run_annotations(many, [])
