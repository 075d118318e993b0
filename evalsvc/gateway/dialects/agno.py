"""The Agno AgentOS dialect: AgentOS's `/eval-runs` routes (agno 3.1.10) in front of evalsvc.

A server-side Agno client (`agno.client.AgentOSClient`, `RemoteDb`) only changes its base URL. The AgentOS
UI (os.agno.com) does not work against the gateway: it calls AgentOS from the browser, which needs CORS
(the gateway answers no preflight and sends no Access-Control-Allow-Origin) and AgentOS's `GET /config`
and `GET /health`, which the gateway does not serve (docs/dialects/agno.md, "Differences").
AgentOS runs an evaluation inside the POST request, so POST /eval-runs creates an evalsvc run and waits
for its end. Agents and teams are evalsvc saved targets (created with the native `POST /v1/targets`);
the eval type picks the graders; the Agno request itself is kept in the run's annotations, so reads
return Agno's stored `eval_input` and the fields evalsvc has no column for. Field names, messages and
error bodies are AgentOS's own. docs/dialects/agno.md has the field mapping.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal, NamedTuple

import grpc
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from google.protobuf import field_mask_pb2, json_format, struct_pb2
from pydantic import AfterValidator, BaseModel, Field, field_validator

from evalsvc.gateway.dialects.base import (
    MAX_COLLECTED,
    Dialect,
    DialectClient,
    DialectOptions,
    Unreadable,
    VendorOptions,
    bearer_key,
    iso,
    judge_reason,
    owner_labels,
    read_stored,
    window,
)
from evalsvc.gateway.upstream import Caller, GatewayError
from evalsvc.v1 import eval_run_service_pb2 as runs_pb
from evalsvc.v1 import grader_pb2, item_pb2, run_pb2, target_pb2
from evalsvc.v1 import target_service_pb2 as targets_pb

NAME = "agno"
PERFORMANCE_MAX_MS = 3_600_000.0  # the performance eval measures and never fails: a latency bound nobody hits
INPUT_KEY = "agno.eval_run_input"  # annotation: the Agno request as JSON
COMPONENT_KEY = "agno.evaluated_component_name"  # annotation: the agent's name when the run was created
PROVIDER_KEY = "agno.model_provider"  # annotation: the model provider reported back
PROVIDER_LABEL = "model_provider"  # a saved target's label that names its provider (evalsvc has no field)
MAX_DELETE_IDS = 1000  # evalsvc's own bound on one bulk delete (AgentOS documents none)
# GET /eval-runs: AgentOS documents `limit` without a maximum, so a larger one is read as MAX_LIMIT (meta.limit
# says so) rather than refused. Each run on a page is shown with every result it has, so a page also reads
# at most MAX_PAGE_RESULTS results: a page of runs holding more is refused, naming a smaller limit.
MAX_LIMIT = 100
MAX_PAGE_RESULTS = MAX_COLLECTED


class EvalType(StrEnum):
    ACCURACY = "accuracy"
    AGENT_AS_JUDGE = "agent_as_judge"
    PERFORMANCE = "performance"
    RELIABILITY = "reliability"


class EvalFilterType(StrEnum):
    AGENT = "agent"
    TEAM = "team"
    WORKFLOW = "workflow"


class SortOrder(StrEnum):
    ASC = "asc"
    DESC = "desc"


class EvalRunInput(BaseModel):
    """POST /eval-runs: AgentOS's `EvalRunInput`, field for field."""

    agent_id: str | None = Field(None, description="Agent ID to evaluate (an evalsvc saved target id)")
    team_id: str | None = Field(None, description="Team ID to evaluate (an evalsvc saved target id)")
    model_id: str | None = Field(None, description="Model ID to use for evaluation")
    model_provider: str | None = Field(None, description="Model provider name")
    eval_type: EvalType = Field(..., description="Type of evaluation to run (accuracy, performance, or reliability)")
    input: str = Field(..., description="Input text/query for the evaluation", min_length=1)
    additional_guidelines: str | None = Field(None, description="Additional guidelines for the evaluation")
    additional_context: str | None = Field(None, description="Additional context for the evaluation")
    num_iterations: int = Field(1, description="Number of times to run the evaluation", ge=1, le=100)
    name: str | None = Field(None, description="Name for this evaluation run")
    expected_output: str | None = Field(None, description="Expected output for accuracy evaluation")
    criteria: str | None = Field(None, description="Evaluation criteria for agent-as-judge evaluation")
    scoring_strategy: Literal["numeric", "binary"] | None = Field(
        "binary", description="Scoring strategy: 'numeric' (1-10 with threshold) or 'binary' (PASS/FAIL)"
    )
    threshold: int | None = Field(
        7, description="Score threshold for pass/fail (1-10), only used with numeric scoring", ge=1, le=10
    )
    warmup_runs: int = Field(0, description="Number of warmup runs before measuring performance", ge=0, le=10)
    expected_tool_calls: list[str] | None = Field(None, description="Expected tool calls for reliability evaluation")
    allow_additional_tool_calls: bool = Field(
        False, description="When True, tool calls not in expected_tool_calls are allowed (subset matching)"
    )
    expected_tool_call_arguments: dict[str, dict[str, Any] | list[dict[str, Any]]] | None = Field(
        None, description='Expected arguments per tool, e.g. {"multiply": {"a": 10}} or a list of such objects'
    )

    @field_validator("expected_tool_call_arguments")
    @classmethod
    def _storable(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """Free-form arguments escape pydantic's string checks, yet evalsvc stores them as protobuf:
        they must be finite numbers and valid UTF-8 (JSON can spell NaN and lone surrogates)."""
        try:
            json.dumps(value, ensure_ascii=False, allow_nan=False).encode()
        except ValueError:  # UnicodeEncodeError is a ValueError
            raise ValueError("must be JSON with finite numbers and valid UTF-8 text") from None
        return value


class EvalSchema(BaseModel):
    """Every eval-run response: AgentOS's `EvalSchema`."""

    id: str = Field(..., description="Unique identifier for the evaluation run")
    agent_id: str | None = Field(None, description="Agent ID that was evaluated")
    model_id: str | None = Field(None, description="Model ID used in evaluation")
    model_provider: str | None = Field(None, description="Model provider name")
    team_id: str | None = Field(None, description="Team ID that was evaluated")
    workflow_id: str | None = Field(None, description="Workflow ID that was evaluated (always null)")
    name: str | None = Field(None, description="Name of the evaluation run")
    evaluated_component_name: str | None = Field(None, description="Name of the evaluated component")
    user_id: str | None = Field(None, description="Owner of the evaluation run (always null)")
    eval_type: EvalType = Field(..., description="Type of evaluation")
    eval_data: dict[str, Any] = Field(..., description="Evaluation results and metrics")
    eval_input: dict[str, Any] | None = Field(None, description="Input parameters used for the evaluation")
    created_at: str | None = Field(
        None, description="When the run was created", json_schema_extra={"format": "date-time"}
    )
    updated_at: str | None = Field(
        None, description="When the run last changed", json_schema_extra={"format": "date-time"}
    )


class PaginationInfo(BaseModel):
    page: int = Field(..., description="Current page number (1-indexed)")
    limit: int = Field(..., description="Number of items per page")
    total_pages: int = Field(..., description="Total number of pages")
    total_count: int = Field(..., description="Total count of items")
    search_time_ms: float = Field(..., description="Search execution time in milliseconds")


class EvalSchemaPage(BaseModel):
    """GET /eval-runs: AgentOS's `PaginatedResponse[EvalSchema]`."""

    data: list[EvalSchema]
    meta: PaginationInfo


class DeleteEvalRunsRequest(BaseModel):
    eval_run_ids: list[str] = Field(
        ..., description="List of evaluation run IDs to delete", min_length=1, max_length=MAX_DELETE_IDS
    )


class UpdateEvalRunRequest(BaseModel):
    name: str = Field(..., description="New name for the evaluation run", min_length=1, max_length=255)


class ModelResponse(BaseModel):
    name: str | None = Field(None, description="The saved target's kind (chat, http, ...)")
    model: str | None = Field(None, description="Model identifier")
    provider: str | None = Field(None, description="Model provider name (the saved target's `model_provider` label)")


class AgentResponse(BaseModel):
    """GET /agents: a saved target as AgentOS describes an agent (fields AgentOS has and evalsvc does not
    are left out, as AgentOS leaves out nulls)."""

    id: str | None = None
    name: str | None = None
    description: str | None = None
    model: ModelResponse | None = None
    metadata: dict[str, str] | None = Field(None, description="The saved target's labels")


class AgnoError(BaseModel):
    """AgentOS's error body (its `ErrorResponse` without the fields only AgnoError exceptions carry)."""

    detail: str


class AgnoValidationError(BaseModel):
    """AgentOS's 422: FastAPI's list for request validation, or a string for a route's own check."""

    detail: list[dict[str, Any]] | str


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Bad Request", "model": AgnoError},
    401: {"description": "Unauthorized", "model": AgnoError},
    404: {"description": "Not Found", "model": AgnoError},
    413: {"description": "Content Too Large (a body over the gateway's limits)", "model": AgnoError},
    422: {"description": "Validation Error", "model": AgnoValidationError},
    431: {"description": "Request Header Fields Too Large", "model": AgnoError},
}


def render(error: GatewayError) -> Response:
    """AgentOS's error bodies: FastAPI's own 422 list for request validation, `{"detail": str}` otherwise."""
    if error.request_errors is not None:
        return JSONResponse(status_code=422, content={"detail": error.request_errors})
    return JSONResponse(status_code=error.http_status, content={"detail": _detail(error)})


def _detail(error: GatewayError) -> str:
    if error.code == grpc.StatusCode.UNAUTHENTICATED:
        return "Authorization header required" if error.reason == "API_KEY_MISSING" else "Invalid authentication token"
    if error.violations:  # the service's message only names the fields; the violations say what is wrong
        return "; ".join(f"{name}: {why}" for name, why in error.violations)
    return error.message


_BEARER = HTTPBearer(auto_error=False, description="`Authorization: Bearer <evalsvc API key>`")


def _caller(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> Caller:
    """The caller's key, read as the key check before the body reads it (`bearer_key`; the HTTPBearer
    dependency documents the scheme). A missing header is refused here, before the body is validated,
    as AgentOS's auth dependency does; a wrong key is refused by the gRPC service on the first call."""
    caller = bearer_key(request)
    if not caller.api_key:
        raise GatewayError(grpc.StatusCode.UNAUTHENTICATED, "Authorization header required", "API_KEY_MISSING")
    return caller


def _agno_storage(
    db_id: Annotated[
        str | None, Query(description="AgentOS database id: accepted, ignored (evalsvc has one store)")
    ] = None,
    table: Annotated[str | None, Query(description="AgentOS table name: accepted and ignored")] = None,
) -> None:
    """AgentOS picks a database and table with these; evalsvc has one store, so they change nothing."""


_STORAGE = [Depends(_agno_storage)]


@dataclass(frozen=True)
class Stored:
    """What a run keeps of its Agno request, in its annotations."""

    input: EvalRunInput
    component: str | None  # the agent's name at creation (evaluated_component_name)
    provider: str | None  # model_provider as reported back

    def annotations(self) -> dict[str, str]:
        values = {INPUT_KEY: self.input.model_dump_json(), COMPONENT_KEY: self.component, PROVIDER_KEY: self.provider}
        return {key: value for key, value in values.items() if value is not None}

    @classmethod
    def of(cls, run: run_pb2.Run) -> Stored | None:
        """The Agno request of a live run of this dialect; None for any other run (not found to Agno)."""
        if run.HasField("delete_time") or INPUT_KEY not in run.annotations:
            return None
        try:
            body = read_stored(EvalRunInput, run.annotations[INPUT_KEY])
        except Unreadable:
            return None  # annotations edited natively into something else: not an Agno run any more
        return cls(body, run.annotations.get(COMPONENT_KEY), run.annotations.get(PROVIDER_KEY))


# --- creating a run ---------------------------------------------------------------------------------------


def _check_eval_fields(body: EvalRunInput) -> None:
    """AgentOS's per-type 400s, checked before anything is created."""
    if body.eval_type is EvalType.ACCURACY and not body.expected_output:
        raise GatewayError.invalid("expected_output is required for accuracy evaluation")
    if body.eval_type is EvalType.AGENT_AS_JUDGE and not body.criteria:
        raise GatewayError.invalid("criteria is required for agent-as-judge evaluation")
    if body.eval_type is EvalType.RELIABILITY:
        if body.expected_tool_calls is None:
            raise GatewayError.invalid("expected_tool_calls is required for reliability evaluations")
        if not body.expected_tool_calls and not body.expected_tool_call_arguments:
            raise GatewayError.invalid(
                "expected_tool_calls must name at least one tool (or give expected_tool_call_arguments)"
            )


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def _tool_call_graders(body: EvalRunInput) -> list[grader_pb2.Grader]:
    """One ToolCalls grader per expected-arguments object: Agno allows a list of them per tool, each of
    which some call must match, and a ToolCalls grader holds one per tool."""
    specs = {
        tool: spec if isinstance(spec, list) else [spec]
        for tool, spec in (body.expected_tool_call_arguments or {}).items()
    }
    rounds = max([1, *(len(each) for each in specs.values())])
    return [
        grader_pb2.Grader(
            name=EvalType.RELIABILITY.value if i == 0 else f"{EvalType.RELIABILITY.value}_{i + 1}",
            tool_calls=grader_pb2.ToolCalls(
                expected=body.expected_tool_calls or [],
                allow_additional=body.allow_additional_tool_calls,
                expected_arguments={tool: _struct(each[i]) for tool, each in specs.items() if i < len(each)},
            ),
        )
        for i in range(rounds)
    ]


def _graders(body: EvalRunInput) -> list[grader_pb2.Grader]:
    """The eval type as evalsvc graders (docs/targets.md); the first is named after the eval type."""
    name = body.eval_type.value
    judge = grader_pb2.LlmJudge
    if body.eval_type is EvalType.ACCURACY:
        spec = judge(mode=judge.MODE_ACCURACY, additional_guidelines=body.additional_guidelines or "")
        return [grader_pb2.Grader(name=name, llm_judge=spec)]
    if body.eval_type is EvalType.AGENT_AS_JUDGE:
        numeric = body.scoring_strategy == "numeric"
        spec = judge(
            mode=judge.MODE_CRITERIA,
            criteria=body.criteria or "",
            scoring=judge.SCORING_NUMERIC if numeric else judge.SCORING_BINARY,
            threshold=(body.threshold or 7) if numeric else 0,
            additional_guidelines=body.additional_guidelines or "",
        )
        return [grader_pb2.Grader(name=name, llm_judge=spec)]
    if body.eval_type is EvalType.PERFORMANCE:
        return [grader_pb2.Grader(name=name, latency=grader_pb2.Latency(max_ms=PERFORMANCE_MAX_MS))]
    return _tool_call_graders(body)


def _overrides_model(body: EvalRunInput) -> bool:
    """AgentOS switches the agent's model only when both model_id and model_provider are given."""
    return bool(body.model_id and body.model_provider)


def _stored_for(body: EvalRunInput, agent: targets_pb.SavedTarget) -> Stored:
    """What the run will keep: the request, the agent's name, and the provider to report."""
    provider = body.model_provider if _overrides_model(body) else agent.labels.get(PROVIDER_LABEL)
    return Stored(body, agent.display_name or None, provider)


def _target(body: EvalRunInput, agent: targets_pb.SavedTarget) -> target_pb2.Target:
    """The agent to call. AgentOS swaps the agent's model for this run when model_id and model_provider
    are both given; a chat agent is called with `model_id` as its model (the run's snapshot then records
    it), while a webhook agent chooses its own model, so an override of it is refused, not ignored."""
    if not _overrides_model(body):
        return target_pb2.Target(saved_target_id=agent.id)
    if agent.target.WhichOneof("kind") != "chat":
        raise GatewayError.invalid(
            "model_id and model_provider can override the model of a chat agent only: "
            f"agent '{agent.id}' is a {agent.target.WhichOneof('kind')} target that chooses its own model"
        )
    target = target_pb2.Target()
    target.CopyFrom(agent.target)
    target.chat.model = body.model_id or ""
    target.model_id = body.model_id or ""
    return target


def _create_request(stored: Stored, agent: targets_pb.SavedTarget) -> runs_pb.CreateRunRequest:
    """The evalsvc run for an Agno request against a saved target."""
    body = stored.input
    item = item_pb2.Item(
        input=body.input,
        expected_output=body.expected_output or "",
        context=body.additional_context or "",
        expected_tool_calls=body.expected_tool_calls or [],
    )
    return runs_pb.CreateRunRequest(
        items=[item],
        target=_target(body, agent),
        graders=_graders(body),
        display_name=body.name or "",
        labels=owner_labels(NAME),
        repetitions=body.num_iterations,
        warmup_runs=body.warmup_runs if body.eval_type is EvalType.PERFORMANCE else 0,
        annotations=stored.annotations(),
    )


# --- eval_data, per eval type ------------------------------------------------------------------------------


def _graded(results: Sequence[run_pb2.Result], grader: str) -> list[run_pb2.Result]:
    """One grader's verdicts (errors left out: Agno has no errored result), in repetition order."""
    kept = [
        r
        for r in results
        if r.grader == grader and r.state in (run_pb2.RESULT_STATE_PASSED, run_pb2.RESULT_STATE_FAILED)
    ]
    return sorted(kept, key=lambda r: r.repetition)


def _score_stats(scores: list[int]) -> dict[str, float | None]:
    """Agno's score statistics; null when there is no score."""
    if not scores:
        return {"avg_score": None, "min_score": None, "max_score": None, "std_dev_score": None}
    return {
        "avg_score": statistics.mean(scores),
        "min_score": min(scores),
        "max_score": max(scores),
        "std_dev_score": statistics.stdev(scores) if len(scores) > 1 else 0.0,
    }


def _accuracy(body: EvalRunInput, run: run_pb2.Run, results: Sequence[run_pb2.Result], posted: bool) -> dict[str, Any]:
    graded = _graded(results, EvalType.ACCURACY.value)
    scores = [int(r.raw_score) for r in graded]  # the judge's 1-10 score
    rows = [
        {
            "input": body.input,
            "output": r.output.content,
            "expected_output": body.expected_output,
            "score": score,
            "reason": judge_reason(r.explanation),  # Agno shows the score apart
        }
        for r, score in zip(graded, scores, strict=True)
    ]
    stats = _score_stats(scores)
    return {"run_id": run.id, "results": rows, "mean_score": stats["avg_score"], **stats}


def _agent_as_judge(
    body: EvalRunInput, run: run_pb2.Run, results: Sequence[run_pb2.Result], posted: bool
) -> dict[str, Any]:
    """Binary scoring has no score (null), as in Agno; pass_rate is in percent."""
    graded = _graded(results, EvalType.AGENT_AS_JUDGE.value)
    numeric = body.scoring_strategy == "numeric"
    scores = [int(r.raw_score) for r in graded] if numeric else []
    verdicts = [r.state == run_pb2.RESULT_STATE_PASSED for r in graded]
    rows = [
        {
            "input": body.input,
            "output": r.output.content,
            "criteria": body.criteria,
            "score": scores[i] if numeric else None,
            "reason": judge_reason(r.explanation),  # Agno shows the score apart
            "passed": verdicts[i],
        }
        for i, r in enumerate(graded)
    ]
    return {
        "run_id": run.id,
        "results": rows,
        **_score_stats(scores),
        "pass_rate": 100.0 * sum(verdicts) / len(verdicts) if verdicts else 0.0,
    }


_SPREAD = ("avg", "min", "max", "std_dev", "median", "p95")


def _spread(data: list[float], unit: str) -> dict[str, float]:
    """Agno's PerformanceResult statistics (p95 inclusive), all 0 when there is no data."""
    if not data:
        return {f"{stat}_{unit}": 0.0 for stat in _SPREAD}
    ordered = sorted(data)
    p95 = statistics.quantiles(ordered, n=100, method="inclusive")[94] if len(ordered) > 1 else ordered[0]
    std = statistics.stdev(ordered) if len(ordered) > 1 else 0.0
    values = (statistics.mean(ordered), ordered[0], ordered[-1], std, statistics.median(ordered), p95)
    return {f"{stat}_{unit}": value for stat, value in zip(_SPREAD, values, strict=True)}


def _performance(
    body: EvalRunInput, run: run_pb2.Run, results: Sequence[run_pb2.Result], posted: bool
) -> dict[str, Any]:
    """Seconds and MiB per measured repetition: AgentOS answers POST with its PerformanceResult and
    stores (and so reads back) `{result, runs}`. Memory is known only when the target reports it."""
    measured = _graded(results, EvalType.PERFORMANCE.value)
    times = [r.latency_ms / 1000.0 for r in measured]
    reported = any(r.output.memory_mib for r in measured)
    memory = [r.output.memory_mib for r in measured] if reported else []
    time_stats, memory_stats = _spread(times, "run_time"), _spread(memory, "memory_usage")
    if posted:
        return {"run_id": run.id, "run_times": times, **time_stats, "memory_usages": memory, **memory_stats}
    runs = [
        {"runtime": t, "memory": r.output.memory_mib if reported else None}
        for t, r in zip(times, measured, strict=True)
    ]
    return {"result": {**time_stats, **memory_stats}, "runs": runs}


_TOOL_LISTS = (
    "failed_tool_calls",
    "passed_tool_calls",
    "additional_tool_calls",
    "missing_tool_calls",
    "failed_argument_checks",
    "passed_argument_checks",
)


def _arguments_match(spec: dict[str, Any], calls: list[dict[str, Any]]) -> bool:
    return any(all(key in call and call[key] == value for key, value in spec.items()) for call in calls)


def _classify_calls(body: EvalRunInput, calls: Sequence[item_pb2.ToolCall], into: dict[str, list[str]]) -> None:
    """Agno's reliability lists for one output: each call passed, failed or additional; expected tools
    never called are missing; each tool's expected arguments matched by some call or not."""
    expected = body.expected_tool_calls or []
    for call in calls:
        if call.name in expected:
            into["passed_tool_calls"].append(call.name)
        else:
            into["additional_tool_calls" if body.allow_additional_tool_calls else "failed_tool_calls"].append(call.name)
    called = {call.name for call in calls}
    missing = [name for name in expected if name not in called]
    into["missing_tool_calls"].extend(missing)
    for tool, spec in (body.expected_tool_call_arguments or {}).items():
        if tool in missing:
            continue
        actual = [json_format.MessageToDict(call.arguments) for call in calls if call.name == tool]
        specs = spec if isinstance(spec, list) else [spec]
        matched = bool(actual) and all(_arguments_match(each, actual) for each in specs)
        into["passed_argument_checks" if matched else "failed_argument_checks"].append(tool)


def _reliability(
    body: EvalRunInput, run: run_pb2.Run, results: Sequence[run_pb2.Result], posted: bool
) -> dict[str, Any]:
    """The lists over every repetition's output; eval_status is evalsvc's verdict: every ToolCalls
    grader passed every repetition."""
    lists: dict[str, list[str]] = {name: [] for name in _TOOL_LISTS}
    for result in _graded(results, EvalType.RELIABILITY.value):
        _classify_calls(body, result.output.tool_calls, lists)
    passed = (
        run.status == run_pb2.RUN_STATUS_SUCCEEDED
        and bool(results)
        and all(r.state == run_pb2.RESULT_STATE_PASSED for r in results)
    )
    return {"run_id": run.id, "eval_status": "PASSED" if passed else "FAILED", **lists}


_EVAL_DATA = {
    EvalType.ACCURACY: _accuracy,
    EvalType.AGENT_AS_JUDGE: _agent_as_judge,
    EvalType.PERFORMANCE: _performance,
    EvalType.RELIABILITY: _reliability,
}

# The `eval_input` AgentOS stores for each eval type (the rest of the request is in the run's annotations).
_EVAL_INPUT = {
    EvalType.ACCURACY: ("additional_guidelines", "additional_context", "num_iterations", "expected_output", "input"),
    EvalType.AGENT_AS_JUDGE: ("criteria", "scoring_strategy", "threshold", "additional_guidelines"),
    EvalType.PERFORMANCE: ("num_iterations", "warmup_runs"),
    EvalType.RELIABILITY: ("expected_tool_calls", "allow_additional_tool_calls", "expected_tool_call_arguments"),
}


def _eval_input(body: EvalRunInput) -> dict[str, Any]:
    stored = body.model_dump(mode="json", include=set(_EVAL_INPUT[body.eval_type]))
    if body.eval_type is EvalType.AGENT_AS_JUDGE:
        numeric = body.scoring_strategy == "numeric"
        stored.update(
            scoring_strategy=body.scoring_strategy or "binary", threshold=(body.threshold or 7) if numeric else None
        )
    return stored


# --- reading runs ------------------------------------------------------------------------------------------


def _summary(run: run_pb2.Run, stored: Stored) -> dict[str, Any]:
    """The EvalSchema fields other than eval_data and eval_input (what lists filter and sort on)."""
    body = stored.input
    return {
        "id": run.id,
        "agent_id": body.agent_id or None,
        "team_id": body.team_id or None,
        "workflow_id": None,
        "model_id": run.target.model_id or run.target.chat.model or None,
        "model_provider": stored.provider,
        "name": run.display_name or None,
        "evaluated_component_name": stored.component,
        "user_id": None,
        "eval_type": body.eval_type,
        "created_at": iso(run.create_time),
        "updated_at": iso(run.update_time),
    }


def _schema(run: run_pb2.Run, stored: Stored, results: Sequence[run_pb2.Result], *, posted: bool) -> EvalSchema:
    """The run as AgentOS shows it. As AgentOS's own POST answer, `posted` leaves eval_input null and
    gives a performance eval its PerformanceResult shape. A run that did not succeed (still running
    when POST stopped waiting, failed, cancelled) says so in `eval_data.run_status` and `eval_data.error`."""
    data = _EVAL_DATA[stored.input.eval_type](stored.input, run, results, posted)
    if run.status != run_pb2.RUN_STATUS_SUCCEEDED:
        data["run_status"] = run_pb2.RunStatus.Name(run.status).removeprefix("RUN_STATUS_")
    if run.error.code:
        data["error"] = {"code": run.error.code, "message": run.error.message}
    return EvalSchema(**_summary(run, stored), eval_data=data, eval_input=None if posted else _eval_input(stored.input))


class _Row(NamedTuple):
    run: run_pb2.Run
    stored: Stored
    summary: dict[str, Any]


_SORTABLE = frozenset(
    {"id", "agent_id", "team_id", "workflow_id", "model_id", "model_provider", "name", "evaluated_component_name"}
    | {"eval_type", "created_at", "updated_at"}
)


def _ordered(rows: list[_Row], sort_by: str, order: SortOrder) -> list[_Row]:
    """Rows sorted as AgentOS sorts its table (nulls first ascending). Ties follow creation order and an
    unknown column sorts by created_at (rows arrive newest first)."""
    column = "id" if sort_by == "run_id" else sort_by
    oldest_first = rows[::-1]
    if column in _SORTABLE and column != "created_at":
        oldest_first.sort(key=lambda row: (row.summary[column] is not None, row.summary[column] or ""))
    return oldest_first[::-1] if order is SortOrder.DESC else oldest_first


def _eval_types(raw: str | None) -> set[EvalType] | None:
    """`eval_types=accuracy,reliability`; an unknown type is a 422 with AgentOS's message."""
    if not raw:
        return None
    try:
        return {EvalType(part.strip()) for part in raw.split(",")}
    except ValueError as error:
        valid = ", ".join(t.value for t in EvalType)
        raise GatewayError.invalid(f"Invalid eval_type: {error}. Valid types: {valid}", http_status=422) from None


@dataclass(frozen=True)
class _Filter:
    """GET /eval-runs filters: equal fields, eval types, and `type` (which id must be set)."""

    equal: dict[str, str]
    types: set[EvalType] | None
    present: str | None

    def __call__(self, summary: dict[str, Any]) -> bool:
        return (
            all(summary[name] == value for name, value in self.equal.items())
            and (self.types is None or summary["eval_type"] in self.types)
            and (self.present is None or summary[self.present] is not None)
        )


def _check_page_results(shown: Sequence[_Row]) -> None:
    """A page shows every result of each of its runs, so it reads them all: up to MAX_PAGE_RESULTS in
    all (a page of 100 runs of 100 repetitions by 100 graders was a million results in one request). A
    page of one run is always read, as GET /eval-runs/{id} reads it (at most MAX_COLLECTED results)."""
    held = sum(min(row.run.counts.total_evaluations, MAX_COLLECTED) for row in shown)
    if len(shown) > 1 and held > MAX_PAGE_RESULTS:
        raise GatewayError.invalid(
            f"the {len(shown)} eval runs of this page hold {held} results, more than one page reads "
            f"({MAX_PAGE_RESULTS}): ask for fewer runs per page (a smaller `limit`)"
        )


# --- routes ------------------------------------------------------------------------------------------------


class Agno(DialectClient):
    """The evalsvc calls behind AgentOS's routes, made as one caller."""

    async def results_of(self, run_id: str) -> list[run_pb2.Result]:
        request = runs_pb.ListRunResultsRequest(run_id=run_id)
        return await self.collect(self.upstream.runs.ListRunResults, request, "results")

    async def own_run(self, run_id: str) -> tuple[run_pb2.Run, Stored]:
        """A live run this dialect created, else AgentOS's 404."""
        missing = GatewayError.not_found(f"Eval run with id '{run_id}' not found")
        request = runs_pb.GetRunRequest(run_id=run_id)
        run: run_pb2.Run = await self.owned(self.upstream.runs.GetRun, request, "run", missing)
        stored = Stored.of(run)
        if stored is None:
            raise missing
        return run, stored

    async def agent_of(self, body: EvalRunInput) -> targets_pb.SavedTarget | None:
        """The saved target named by agent_id or team_id (None when neither is given)."""
        kind, target_id = ("Agent", body.agent_id) if body.agent_id else ("Team", body.team_id)
        if not target_id:
            return None
        return await self.agent(target_id, GatewayError.not_found(f"{kind} with id '{target_id}' not found"))

    async def agent(self, target_id: str, missing: GatewayError) -> targets_pb.SavedTarget:
        request = targets_pb.GetTargetRequest(target_id=target_id)
        return (await self.get(self.upstream.targets.GetTarget, request, missing)).target


def routes(api: APIRouter, client: Any, options: DialectOptions) -> None:
    """AgentOS's eval routes and its agent listing."""

    @api.post(
        "/eval-runs",
        response_model=EvalSchema,
        operation_id="run_eval",
        summary="Execute Evaluation",
        description="Runs the evaluation and answers when it has ended (or after "
        f"{options.sync_wait_s:.0f} s, with eval_data.run_status). Requires either agent_id or team_id, but not both.",
        dependencies=_STORAGE,
    )
    async def run_eval(body: EvalRunInput, agno: Agno = client) -> EvalSchema:
        if body.agent_id and body.team_id:
            raise GatewayError.invalid("Only one of agent_id or team_id must be provided")
        agent = await agno.agent_of(body)
        if agent is None:
            raise GatewayError.invalid("One of agent_id or team_id must be provided")
        _check_eval_fields(body)
        stored = _stored_for(body, agent)
        created = await agno.call(agno.upstream.runs.CreateRun, _create_request(stored, agent))
        run = await agno.wait_until_done(created.run.id, options.sync_wait_s)
        return _schema(run, stored, await agno.results_of(run.id), posted=True)

    @api.get(
        "/eval-runs",
        response_model=EvalSchemaPage,
        operation_id="get_eval_runs",
        summary="List Evaluation Runs",
        dependencies=_STORAGE,
    )
    async def get_eval_runs(
        agno: Agno = client,
        agent_id: Annotated[str | None, Query(description="Agent ID")] = None,
        team_id: Annotated[str | None, Query(description="Team ID")] = None,
        workflow_id: Annotated[str | None, Query(description="Workflow ID (evalsvc has none: matches nothing)")] = None,
        model_id: Annotated[str | None, Query(description="Model ID")] = None,
        filter_type: Annotated[EvalFilterType | None, Query(alias="type", description="Filter type")] = None,
        eval_types: Annotated[
            str | None, Query(description="Comma-separated eval types", examples=["accuracy,reliability"])
        ] = None,
        limit: Annotated[
            int,
            Query(ge=1, description=f"Number of eval runs to return (more than {MAX_LIMIT} returns {MAX_LIMIT})"),
            AfterValidator(lambda limit: min(limit, MAX_LIMIT)),
        ] = 20,
        page: Annotated[int, Query(ge=0, description="Page number (1-indexed)")] = 1,
        sort_by: Annotated[str, Query(description="Field to sort by")] = "created_at",
        sort_order: Annotated[SortOrder, Query(description="Sort order (asc or desc)")] = SortOrder.DESC,
    ) -> EvalSchemaPage:
        started = time.monotonic()
        if page < 1:  # AgentOS's query allows 0, then its database refuses it with a 500
            raise GatewayError.invalid(f"`page` must be >= 1 (pages are 1-indexed); got {page}.", http_status=422)
        equal = {"agent_id": agent_id, "team_id": team_id, "workflow_id": workflow_id, "model_id": model_id}
        keep = _Filter(
            {k: v for k, v in equal.items() if v is not None},
            _eval_types(eval_types),
            f"{filter_type.value}_id" if filter_type else None,
        )
        listing = runs_pb.ListRunsRequest(labels=agno.labels)
        rows = [
            _Row(run, stored, summary)
            for run in await agno.collect(agno.upstream.runs.ListRuns, listing, "runs")
            if (stored := Stored.of(run)) is not None and keep(summary := _summary(run, stored))
        ]
        shown = window(_ordered(rows, sort_by, sort_order), (page - 1) * limit, limit)
        _check_page_results(shown)
        data = [_schema(row.run, row.stored, await agno.results_of(row.run.id), posted=False) for row in shown]
        meta = PaginationInfo(
            page=page,
            limit=limit,
            total_pages=(len(rows) + limit - 1) // limit,
            total_count=len(rows),
            search_time_ms=round((time.monotonic() - started) * 1000, 2),
        )
        return EvalSchemaPage(data=data, meta=meta)

    @api.get(
        "/eval-runs/{eval_run_id}",
        response_model=EvalSchema,
        operation_id="get_eval_run",
        summary="Get Evaluation Run",
        dependencies=_STORAGE,
    )
    async def get_eval_run(eval_run_id: str, agno: Agno = client) -> EvalSchema:
        run, stored = await agno.own_run(eval_run_id)
        return _schema(run, stored, await agno.results_of(run.id), posted=False)

    @api.delete(
        "/eval-runs",
        status_code=204,
        response_class=Response,
        operation_id="delete_eval_runs",
        summary="Delete Evaluation Runs",
        description="Soft-deletes each run (evalsvc DeleteRun; an unfinished run is cancelled). Ids that are "
        "unknown, already deleted or not Agno runs are skipped, as AgentOS skips unknown ids.",
        dependencies=_STORAGE,
    )
    async def delete_eval_runs(body: DeleteEvalRunsRequest, agno: Agno = client) -> Response:
        for run_id in dict.fromkeys(body.eval_run_ids):
            try:
                await agno.own_run(run_id)
            except GatewayError as error:
                if error.code != grpc.StatusCode.NOT_FOUND:
                    raise
                continue
            await agno.call(agno.upstream.runs.DeleteRun, runs_pb.DeleteRunRequest(run_id=run_id))
        return Response(status_code=204)

    @api.patch(
        "/eval-runs/{eval_run_id}",
        response_model=EvalSchema,
        operation_id="update_eval_run",
        summary="Update Evaluation Run",
        dependencies=_STORAGE,
    )
    async def update_eval_run(eval_run_id: str, body: UpdateEvalRunRequest, agno: Agno = client) -> EvalSchema:
        _, stored = await agno.own_run(eval_run_id)
        request = runs_pb.UpdateRunRequest(
            run_id=eval_run_id,
            run=run_pb2.Run(display_name=body.name),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        )
        updated = await agno.call(agno.upstream.runs.UpdateRun, request)
        return _schema(updated.run, stored, await agno.results_of(eval_run_id), posted=False)

    @api.get(
        "/agents",
        response_model=list[AgentResponse],
        response_model_exclude_none=True,
        operation_id="get_agents",
        summary="List All Agents (the caller's saved targets)",
    )
    async def get_agents(agno: Agno = client) -> list[AgentResponse]:
        listing = targets_pb.ListTargetsRequest()
        return [_agent(t) for t in await agno.collect(agno.upstream.targets.ListTargets, listing, "targets")]

    @api.get(
        "/agents/{agent_id}",
        response_model=AgentResponse,
        response_model_exclude_none=True,
        operation_id="get_agent",
        summary="Get Agent Details (a saved target)",
    )
    async def get_agent(agent_id: str, agno: Agno = client) -> AgentResponse:
        return _agent(await agno.agent(agent_id, GatewayError.not_found("Agent not found")))


def _agent(saved: targets_pb.SavedTarget) -> AgentResponse:
    target = saved.target
    model = ModelResponse(
        name=target.WhichOneof("kind"),
        model=target.model_id or target.chat.model or None,
        provider=saved.labels.get(PROVIDER_LABEL),
    )
    return AgentResponse(
        id=saved.id,
        name=saved.display_name or None,
        description=saved.description or None,
        model=model,
        metadata=dict(saved.labels) or None,
    )


DIALECT = Dialect(
    name=NAME,
    title="Agno AgentOS",
    prefix="",
    client=Agno,
    routes=routes,
    vendor=VendorOptions(error_handler=render, caller=_caller, error_responses=_ERRORS),
)
