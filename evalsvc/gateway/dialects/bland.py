"""Bland AI's Evals API (eval agents and experiments) translated to evalsvc.

Bland scores recorded phone calls with "eval agents" (LLM judges that pick one of a set of levels).
Here an eval agent is a saved grader (GraderService) holding an `LlmJudge` in MODE_LEVELS, each
agent version a grader version; a call is an item of one per-tenant dataset, its transcript the
item's recorded response (graded by the `provided` target); an experiment is a run over some of
those items with one saved-grader reference per attached agent. Vendor fields with no evalsvc
equivalent are kept in run annotations, item metadata, or the agent version's own record (see
`encode_version`). docs/dialects/bland.md maps every field.

Every response is `{"data": ..., "errors": null}`; every error `{"data": null, "errors": [{"error",
"message"}]}` (Bland documents only the success envelope; the error shape is inferred).
"""

import ast
import asyncio
import contextlib
import json
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Generic, Literal, Self, TypeVar, cast

import grpc
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from google.protobuf import field_mask_pb2
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from evalsvc.gateway.dialects.base import RUN_LABEL, Dialect, DialectOptions, error_route_class, iso
from evalsvc.gateway.upstream import TERMINAL, Caller, GatewayError, Upstream
from evalsvc.v1 import dataset_service_pb2 as ds_pb
from evalsvc.v1 import eval_run_service_pb2 as runs_pb
from evalsvc.v1 import grader_pb2, grader_service_pb2, item_pb2, run_pb2, target_pb2

NAME = "bland"
OWN = {RUN_LABEL: NAME}
T = TypeVar("T")
Judge = grader_pb2.LlmJudge

# The documented limits.
MAX_CALLS_PER_RUN = 5000
MAX_AGENTS_PER_RUN = 50
MAX_NAME = 200
GRADED_LEVELS = (2, 5)  # a graded agent has 2-5 levels; a pass/fail agent has none
# Runs and their results are read page by page; a scan stops after this many pages (1000 rows each).
MAX_PAGES = 1000
PAGE = 1000
# evalsvc reads a grader weight of 0 as 1; Bland's 0 means "does not count", so it is stored as this.
ZERO_WEIGHT = 1e-9
# The two levels of a pass/fail agent: key, label, what the judge is told.
PASS_FAIL = (("pass", "Pass", "The call meets the rubric."), ("fail", "Fail", "The call does not meet the rubric."))

# Run annotations holding Bland fields that have no evalsvc equivalent.
A_MODE = "bland.run_mode"
A_AGENTS = "bland.attached_agents"
A_METADATA = "bland.metadata"
A_SETUP = "bland.workbench_setup_id"
A_SETUP_VERSION = "bland.workbench_setup_version_id"
A_CALL_IDS = "bland.submitted_call_ids"
A_SUMMARY = "bland.summary"
ANNOTATION_BYTES = 64 * 1024  # evalsvc's limit on a run's annotations
SUMMARY_RESERVE = 4096  # kept free so the summary can be cached on the run

CALLS_DATASET = ds_pb.Dataset(
    display_name="Bland calls",
    description="Calls uploaded through the Bland dialect (POST /v1/evals/calls); one item per call.",
    labels=OWN,
)
CALLS_REQUEST_ID = "bland-calls-dataset"  # CreateDataset is idempotent by it: find-or-create per tenant

RunStatus = Literal["PENDING", "QUEUED", "RUNNING", "COMPLETE", "PARTIAL", "FAILED", "CANCELLED"]
TriggeredBy = Literal["manual", "auto", "backfill"]
RunMode = Literal["text", "audio", "full"]
TRIGGER_NAMES: dict[run_pb2.Trigger, TriggeredBy] = {
    run_pb2.TRIGGER_MANUAL: "manual",
    run_pb2.TRIGGER_AUTO: "auto",
    run_pb2.TRIGGER_BACKFILL: "backfill",
}
TRIGGERS = {name: value for value, name in TRIGGER_NAMES.items()}
STATUSES: dict[run_pb2.RunStatus, RunStatus] = {
    run_pb2.RUN_STATUS_PENDING: "PENDING",
    run_pb2.RUN_STATUS_RUNNING: "RUNNING",
    run_pb2.RUN_STATUS_SUCCEEDED: "COMPLETE",
    run_pb2.RUN_STATUS_FAILED: "FAILED",
    run_pb2.RUN_STATUS_CANCELLED: "CANCELLED",
}
STATUS_FILTER: dict[RunStatus, list[run_pb2.RunStatus]] = {
    "PENDING": [run_pb2.RUN_STATUS_PENDING],
    "QUEUED": [],  # evalsvc has no queue state: no run is ever QUEUED
    "RUNNING": [run_pb2.RUN_STATUS_RUNNING],
    "COMPLETE": [run_pb2.RUN_STATUS_SUCCEEDED],
    "PARTIAL": [run_pb2.RUN_STATUS_SUCCEEDED],
    "FAILED": [run_pb2.RUN_STATUS_FAILED],
    "CANCELLED": [run_pb2.RUN_STATUS_CANCELLED],
}

# ---------------------------------------------------------------------------------------------- errors

# gRPC code -> (HTTP status, Bland error code); ErrorInfo reasons below name the resource when known.
ERROR_CODES: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.UNAUTHENTICATED: (401, "UNAUTHORIZED"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "FORBIDDEN"),
    grpc.StatusCode.INVALID_ARGUMENT: (400, "INVALID_REQUEST"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "INVALID_REQUEST"),
    grpc.StatusCode.NOT_FOUND: (404, "NOT_FOUND"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "CONFLICT"),
    grpc.StatusCode.ABORTED: (409, "CONFLICT"),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "FAILED_PRECONDITION"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "RATE_LIMITED"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "NOT_IMPLEMENTED"),
    grpc.StatusCode.UNAVAILABLE: (503, "SERVICE_UNAVAILABLE"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "TIMEOUT"),
}
REASON_CODES = {
    "RUN_NOT_FOUND": "EVAL_RUN_NOT_FOUND",
    "GRADER_NOT_FOUND": "EVAL_AGENT_NOT_FOUND",
    "RUN_ALREADY_FINISHED": "EVAL_RUN_NOT_CANCELLABLE",
    "JUDGE_NOT_CONFIGURED": "JUDGE_NOT_CONFIGURED",
}
# evalsvc field paths in violations -> the Bland fields they came from.
FIELD_NAMES = (
    (re.compile(r"^items\[(\d+)\]\.id\b"), r"calls[\1].call_id"),
    (re.compile(r"^item_ids\b"), "call_ids"),
    (re.compile(r"^graders\b"), "attached_agents"),
    (re.compile(r"^pass_threshold\b"), "pass_threshold_pct"),
    (re.compile(r"^annotations\b"), "metadata"),
    (re.compile(r"^grader\.display_name\b"), "name"),
    (re.compile(r"^grader\.description\b"), "description"),
)


class ErrorItem(BaseModel):
    """One problem: a Bland-style code (e.g. EVAL_RUN_NOT_FOUND) and a message for people."""

    error: str
    message: str


class ErrorEnvelope(BaseModel):
    """The body of every failed request."""

    data: None = None
    errors: list[ErrorItem]


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorEnvelope, "description": description}
    for status, description in (
        (400, "Invalid request (INVALID_REQUEST), incl. values outside a documented limit"),
        (401, "Missing or invalid API key (UNAUTHORIZED)"),
        (404, "Unknown id (EVAL_RUN_NOT_FOUND, EVAL_AGENT_NOT_FOUND, EVAL_AGENT_VERSION_NOT_FOUND)"),
        (409, "Conflict with the resource's state (e.g. EVAL_RUN_NOT_CANCELLABLE)"),
        (429, "Over a quota (RATE_LIMITED)"),
    )
}


def bland_field(path: str) -> str:
    """The Bland name of an evalsvc field path (unchanged when it already is one)."""
    for pattern, replacement in FIELD_NAMES:
        renamed = pattern.sub(replacement, path)
        if renamed != path:
            return renamed
    return path


def render(error: GatewayError) -> JSONResponse:
    """A failure in Bland's envelope: one entry per field violation, else one for the error."""
    status, code = ERROR_CODES.get(error.code, (500, "INTERNAL_ERROR"))
    code = REASON_CODES.get(error.reason) or (error.reason if error.reason.startswith("EVAL_") else code)
    items = [
        ErrorItem(error=code, message=f"{bland_field(f)}: {d}" if f else d.removeprefix("Value error, "))
        for f, d in error.violations
    ]
    body = ErrorEnvelope(errors=items or [ErrorItem(error=code, message=error.message)])
    return JSONResponse(status_code=status, content=body.model_dump())


def not_found(code: str, message: str) -> GatewayError:
    """404 with a Bland code naming the resource (the code is carried as the reason)."""
    return GatewayError(grpc.StatusCode.NOT_FOUND, message, code)


def bland_key(request: Request) -> Caller:
    """Bland's `authorization: <API key>` (the raw key); a `Bearer ` prefix is accepted too."""
    value = request.headers.get("authorization", "").strip()
    scheme, _, rest = value.partition(" ")
    return Caller(rest.strip() if scheme.lower() == "bearer" else value)


CallerDep = Annotated[Caller, Depends(bland_key)]

# ---------------------------------------------------------------------------------------------- models

STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)  # an unknown field is an error, never dropped
Text = Annotated[str, Field(max_length=100_000)]


class Envelope(BaseModel, Generic[T]):
    """Bland's success envelope."""

    data: T
    errors: None = None


class ListOf(BaseModel, Generic[T]):
    """Bland's list envelope (inside `data`): cursors are object ids."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    next_cursor: str | None


class Level(BaseModel):
    """One verdict a graded agent can give."""

    model_config = STRICT
    level_key: str = Field(min_length=1, max_length=64)
    label: str | None = Field(default=None, max_length=MAX_NAME)
    prompt_md: Text = ""
    color: str | None = Field(default=None, max_length=32)


class VersionFields(BaseModel):
    """The judge definition of an agent version (the fields of Bland's version object). Bland edits
    these on a draft (PATCH .../versions/{id}); here they are given when a version is created."""

    model_config = STRICT
    system_prompt_md: Text | None = None
    prompt_md: Text | None = None
    levels: list[Level] | None = None
    target_level_keys: list[str] | None = None
    weight: float | None = Field(default=None, ge=0, le=100)


class AgentCreate(VersionFields):
    """POST /v1/evals/agents: Bland's documented fields plus the version fields."""

    name: str = Field(min_length=1, max_length=MAX_NAME)
    description: str | None = None
    template_key: str | None = None
    user_template_id: str | None = None
    modality: Literal["text", "audio"] | None = None

    @model_validator(mode="after")
    def _no_templates(self) -> Self:
        if self.template_key is not None or self.user_template_id is not None:
            raise ValueError("templates are not available here: give the levels and prompts instead")
        return self


class VersionCreate(VersionFields):
    """POST /v1/evals/agents/{id}/versions: Bland's fork fields plus the version fields to change."""

    name: str | None = Field(default=None, min_length=1, max_length=MAX_NAME)
    description: str | None = None
    from_version_id: str | None = None


class AgentVersion(BaseModel):
    """Everything of a version that Bland shows; stored inside the grader definition (`encode_version`)."""

    name: str
    description: str | None = None
    modality: Literal["text", "audio"] = "text"
    system_prompt_md: str = ""
    prompt_md: str = ""
    levels: list[Level] = Field(default_factory=list)
    target_level_keys: list[str] = Field(default_factory=list)
    weight: float = 100.0
    created_from_version_id: str | None = None

    def level_keys(self) -> list[str]:
        """The keys the judge may answer with (pass/fail agents answer `pass` or `fail`)."""
        return list(self.labels())

    def labels(self) -> dict[str, str]:
        """Each level's label by key (its key when it has none)."""
        return {lv.level_key: lv.label or lv.level_key for lv in self.levels} or {k: lb for k, lb, _ in PASS_FAIL}

    def problems(self) -> list[tuple[str, str]]:
        """Violations of Bland's rules: 0 or 2-5 unique levels; targets among them, at least one."""
        out: list[tuple[str, str]] = []
        keys = [level.level_key for level in self.levels]
        if keys and not GRADED_LEVELS[0] <= len(keys) <= GRADED_LEVELS[1]:
            out.append(("levels", "a graded agent has 2 to 5 levels (a pass/fail agent has none)"))
        if len(set(keys)) != len(keys):
            out.append(("levels", "level keys must be unique"))
        if not keys and self.target_level_keys:
            out.append(("target_level_keys", "pass/fail agents do not set target levels"))
        if keys and not self.target_level_keys:
            out.append(("target_level_keys", "a graded agent needs at least one target level"))
        out += [
            ("target_level_keys", f"{key!r} is not one of the levels")
            for key in self.target_level_keys
            if keys and key not in keys
        ]
        return out


class AgentOut(BaseModel):
    """An eval agent."""

    id: str
    org_id: str
    key: str
    name: str
    description: str | None
    current_version_id: str
    active_version_id: str | None
    metadata: dict[str, str]
    created_at: str | None
    updated_at: str | None
    deleted_at: str | None


class VersionOut(BaseModel):
    """An eval agent version."""

    id: str
    org_id: str
    eval_agent_id: str
    version_number: int
    name: str
    description: str | None
    state: Literal["editable", "archived"]
    modality: Literal["text", "audio"]
    system_prompt_md: str
    prompt_md: str
    levels: list[Level]
    target_level_keys: list[str]
    weight: float
    created_from_version_id: str | None
    created_by: str | None
    created_at: str | None
    updated_at: str | None


class AgentWithVersion(BaseModel):
    """`data` of create and get agent: the agent and its current version."""

    agent: AgentOut
    current_version: VersionOut


class AgentListItem(BaseModel):
    """An eval agent in a list."""

    id: str
    name: str
    description: str | None
    current_version_id: str
    active_version_id: str | None
    active_version_number: int | None
    enabled: bool
    modality: Literal["text", "audio"]
    latest_run: None
    metadata: dict[str, str]
    created_at: str | None
    updated_at: str | None


class TranscriptLine(BaseModel):
    """One utterance, as Bland's call details give it (`user`: user, assistant, robot, agent-action)."""

    model_config = ConfigDict(extra="allow")
    user: str = Field(min_length=1, max_length=64)
    text: str


def _call_id_text(value: Any) -> Any:
    """Bland documents `call_id` as a number in places and shows UUID strings elsewhere: take both."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class CallIn(BaseModel):
    """A recorded call to evaluate, in the shape of Bland's call details (`GET /v1/calls/{call_id}`), so a
    call copied from Bland's API is taken unchanged (evalsvc extension: Bland reads calls from its own
    call store). Fields beyond these are kept in the item's metadata and returned as they came."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    call_id: Annotated[str, BeforeValidator(_call_id_text)] = Field(min_length=1, max_length=128)
    transcripts: list[TranscriptLine] = Field(default_factory=list)
    concatenated_transcript: str | None = None
    call_length: float | None = Field(default=None, ge=0, description="minutes")

    @model_validator(mode="after")
    def _has_transcript(self) -> Self:
        if not self.transcripts and not self.concatenated_transcript:
            raise ValueError("a call needs transcripts or a concatenated_transcript to be graded")
        return self


class CallsIn(BaseModel):
    """POST /v1/evals/calls: `{calls: [call details, ...]}`, or one call's details as Bland's
    `GET /v1/calls/{call_id}` returns them."""

    model_config = STRICT
    calls: list[CallIn] = Field(min_length=1, max_length=MAX_CALLS_PER_RUN)

    @model_validator(mode="before")
    @classmethod
    def _one_call(cls, data: Any) -> Any:
        if isinstance(data, dict) and "calls" not in data and "call_id" in data:
            return {"calls": [data]}
        return data


class CallOut(BaseModel):
    """A stored call."""

    model_config = ConfigDict(extra="allow")
    call_id: str
    transcripts: list[dict[str, Any]]
    concatenated_transcript: str
    call_length: float | None


class CallsAdded(BaseModel):
    """`data` of POST /v1/evals/calls."""

    call_ids: list[str]
    total_call_count: int


class AttachedAgent(BaseModel):
    """An agent attached to a run."""

    model_config = STRICT
    eval_agent_id: str = Field(min_length=1, max_length=128)
    eval_agent_version_id: str | None = None
    weight: float | None = Field(default=None, ge=0, le=100)
    target_level_keys: list[str] | None = None


class RunCreate(BaseModel):
    """POST /v1/evals/runs."""

    model_config = STRICT
    call_ids: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        min_length=1, max_length=MAX_CALLS_PER_RUN
    )
    attached_agents: list[AttachedAgent] | None = Field(default=None, max_length=MAX_AGENTS_PER_RUN)
    run_mode: RunMode | None = None
    pass_threshold_pct: float | None = Field(default=None, ge=0, le=100)
    workbench_setup_id: str | None = Field(default=None, max_length=128)
    workbench_setup_version_id: str | None = Field(default=None, max_length=128)
    triggered_by: TriggeredBy | None = None
    metadata: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _roster(self) -> Self:
        if (self.workbench_setup_id is None) != (self.workbench_setup_version_id is None):
            raise ValueError("workbench_setup_id and workbench_setup_version_id must be given together")
        if not self.attached_agents:
            if self.workbench_setup_version_id is not None:
                raise ValueError(
                    "workbench setups are not available here, so their rosters cannot supply the agents: "
                    "give attached_agents"
                )
            raise ValueError("attached_agents must list at least one eval agent")
        agent_ids = [agent.eval_agent_id for agent in self.attached_agents]
        if len(set(agent_ids)) != len(agent_ids):
            raise ValueError("attached_agents must not attach the same eval agent twice")
        return self


class SubmittedAgent(BaseModel):
    """An attached agent as the run uses it (version, weight and targets resolved)."""

    eval_agent_id: str
    eval_agent_version_id: str
    weight: float
    target_level_keys: list[str]


class Summary(BaseModel):
    """A run's scores once it has ended."""

    overall_score_mean: float | None
    text_score_mean: float | None
    audio_score_mean: float | None
    successful_call_count: int
    failed_call_count: int
    insufficient_evidence_count: int
    target_match_count: int
    pass_threshold_pct: float | None
    overall_pass: bool


class RunListItem(BaseModel):
    """A run in a list."""

    id: str
    status: RunStatus
    triggered_by: TriggeredBy
    run_mode: RunMode
    resolved_call_count: int
    resolved_agent_count: int
    resolved_atom_count: int
    completed_atom_count: int
    summary: Summary | None
    billable_cost_usd: float | None
    workbench_setup_id: str | None
    workbench_setup_version_id: str | None
    metadata: dict[str, str]
    created_at: str | None
    started_at: str | None
    completed_at: str | None


class RunOut(RunListItem):
    """A run (create, get, cancel)."""

    org_id: str
    submitted_call_ids: list[str]
    submitted_attached_agents: list[SubmittedAgent]
    error_code: str | None
    error_message: str | None
    workflow_id: str | None


class Evidence(BaseModel):
    """A quoted span backing a verdict."""

    source: str
    speaker: str | None
    start_ms: int | None
    end_ms: int | None
    text: str


class Audit(BaseModel):
    """How a verdict was produced."""

    prompt_version: str | None
    input_tokens: int | None
    output_tokens: int | None
    latency_ms: float | None


class AgentResult(BaseModel):
    """One judge verdict: one call, one agent."""

    id: str
    org_id: str
    eval_run_id: str
    eval_run_call_result_id: str
    eval_run_agent_snapshot_id: str | None
    eval_agent_id: str
    eval_agent_version_id: str | None
    call_id: str
    selected_level_key: str | None
    selected_level_label: str | None
    score_normalized_0_100: float | None
    is_target_match: bool
    is_insufficient_evidence: bool
    confidence: float | None
    reasoning_md: str | None
    evidence: list[Evidence]
    failed: bool
    failure_code: str | None
    failure_message: str | None
    billable_cost_usd: float | None
    audit: Audit
    created_at: str | None


class CallResult(BaseModel):
    """One call's verdicts, summed up."""

    id: str
    org_id: str
    eval_run_id: str
    call_id: str
    call_display_name: str | None
    call_started_at: str | None
    call_duration_seconds: float | None
    call_ended_by: str | None
    transcript_snapshot_ref: str | None
    transcript_snapshot_expires_at: str | None
    status: Literal["COMPLETE", "PARTIAL", "FAILED"]
    started_at: str | None
    completed_at: str | None
    overall_score_normalized_0_100: float | None
    text_score_normalized_0_100: float | None
    audio_score_normalized_0_100: float | None
    failed_agent_count: int
    insufficient_evidence_agent_count: int
    agent_results: list[AgentResult]
    created_at: str | None


class CallResultsEnvelope(Envelope[ListOf[CallResult]]):
    """GET .../call-results adds the run's status and call count beside the list."""

    run_status: RunStatus
    run_resolved_call_count: int


class EvalsStatus(BaseModel):
    """GET /v1/evals/status."""

    enabled: bool
    gate: Literal["evals_enabled"] = "evals_enabled"
    reason: str | None = None


# ---------------------------------------------------------------------------------------------- cursors


@dataclass(frozen=True)
class Cursor:
    """Bland's list parameters: `limit` 1-100 (default 25), and one of the two cursors (object ids)."""

    limit: int
    starting_after: str | None
    ending_before: str | None


def cursor_query(
    limit: Annotated[int, Query(ge=1, le=100)] = 25,
    starting_after: Annotated[str | None, Query()] = None,
    ending_before: Annotated[str | None, Query()] = None,
) -> Cursor:
    """The list parameters; both cursors at once is INVALID_REQUEST."""
    if starting_after and ending_before:
        raise GatewayError.invalid(
            "starting_after and ending_before cannot be combined",
            ("ending_before", "cannot be combined with starting_after"),
        )
    return Cursor(limit, starting_after or None, ending_before or None)


CursorDep = Annotated[Cursor, Depends(cursor_query)]


@dataclass
class Page(Generic[T]):
    """One page of a list: `has_more` in the paging direction; `next_cursor` continues forward."""

    items: list[T]
    has_more: bool
    next_cursor: str | None


async def paginate(source: AsyncIterator[T], key: Callable[[T], str], cursor: Cursor) -> Page[T]:
    """A page of `source` (in list order) after or before a cursor; an unknown cursor is INVALID_REQUEST.

    evalsvc pages by opaque tokens, so the cursor is found by reading the list from its start."""
    if cursor.ending_before:
        before: deque[T] = deque(maxlen=cursor.limit + 1)
        async for item in source:
            if key(item) == cursor.ending_before:
                page = list(before)[-cursor.limit :]
                return Page(page, len(before) > cursor.limit, key(page[-1]) if page else None)
            before.append(item)
        raise _unknown_cursor("ending_before", cursor.ending_before)
    found = cursor.starting_after is None
    items: list[T] = []
    async for item in source:
        if found:
            items.append(item)
            if len(items) > cursor.limit:
                break
        else:
            found = key(item) == cursor.starting_after
    if not found:
        raise _unknown_cursor("starting_after", cursor.starting_after or "")
    page = items[: cursor.limit]
    more = len(items) > cursor.limit
    return Page(page, more, key(page[-1]) if more else None)


def _unknown_cursor(name: str, value: str) -> GatewayError:
    return GatewayError.invalid(f"{name} {value!r} is not in this list", (name, f"no object {value!r} in this list"))


def listing(page: Page[Any], data: list[T]) -> ListOf[T]:
    """The list envelope of a page whose items became `data`."""
    return ListOf(data=data, has_more=page.has_more, next_cursor=page.next_cursor)


async def token_pages(fetch: Callable[[str], Awaitable[tuple[Sequence[T], str]]]) -> AsyncIterator[T]:
    """Every element of a token-paged evalsvc list, read lazily (at most MAX_PAGES pages)."""
    token = ""
    for _ in range(MAX_PAGES):
        items, token = await fetch(token)
        for item in items:
            yield item
        if not token:
            return


async def filtered(source: AsyncIterator[T], keep: Callable[[T], bool]) -> AsyncIterator[T]:
    """The elements of `source` that `keep` accepts."""
    async for item in source:
        if keep(item):
            yield item


# ---------------------------------------------------------------------------------------------- agents

VERSION_MARK = "\n\n<!-- bland-version "
VERSION_END = " -->"
VERSION_ID = re.compile(r"^(?P<agent>.+)_v(?P<number>[1-9][0-9]{0,8})$")


def version_id(agent_id: str, number: int) -> str:
    """A version's id: the agent (saved grader) id and the version number."""
    return f"{agent_id}_v{number}"


def parse_version_id(value: str, agent_id: str) -> int:
    """The version number of one of `agent_id`'s version ids; EVAL_AGENT_VERSION_NOT_FOUND otherwise."""
    match = VERSION_ID.match(value)
    if match is None or match["agent"] != agent_id:
        raise not_found("EVAL_AGENT_VERSION_NOT_FOUND", f"eval agent {agent_id!r} has no version {value!r}")
    return int(match["number"])


def encode_version(version: AgentVersion) -> grader_pb2.Grader:
    """An agent version as an evalsvc grader: an LlmJudge choosing among the levels (the target levels
    pass; a pass/fail agent chooses `pass` or `fail`). The judge is shown the system prompt and the
    grading prompt as its guidelines, and the prompt is also its `criteria`. Fields the judge does not
    use (names, labels, colours...) follow in a trailing Markdown comment, so the whole version lives
    in the grader's immutable version."""
    levels = [(lv.level_key, lv.prompt_md, lv.level_key in version.target_level_keys) for lv in version.levels]
    if not levels:
        levels = [(key, text, key == "pass") for key, _, text in PASS_FAIL]
    record = version.model_dump_json().replace(">", "\\u003e")  # still JSON, never ends the comment
    guidelines = "\n\n".join(p for p in (version.system_prompt_md, version.prompt_md) if p)
    judge = Judge(
        mode=Judge.MODE_LEVELS,
        criteria=version.prompt_md,
        additional_guidelines=guidelines + VERSION_MARK + record + VERSION_END,
        levels=[grader_pb2.JudgeLevel(key=k, description=d, passing=p) for k, d, p in levels],
    )
    return grader_pb2.Grader(weight=version.weight or ZERO_WEIGHT, llm_judge=judge)


def decode_version(grader: grader_pb2.Grader) -> AgentVersion | None:
    """The version `encode_version` stored, None for a grader it did not make."""
    text = grader.llm_judge.additional_guidelines
    _, mark, record = text.rpartition(VERSION_MARK)
    if not mark or not record.endswith(VERSION_END):
        return None
    return AgentVersion.model_validate_json(record[: -len(VERSION_END)])


def slug(name: str) -> str:
    """Bland's per-organization `key` of an agent, derived from its name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:63] or "agent"


@dataclass(frozen=True)
class Agent:
    """A saved grader of this dialect at one version, with that version decoded."""

    saved: grader_service_pb2.SavedGrader
    version: AgentVersion

    @property
    def current_version_id(self) -> str:
        return version_id(self.saved.id, self.saved.latest_version)

    def out(self, org_id: str) -> AgentOut:
        return AgentOut(
            id=self.saved.id,
            org_id=org_id,
            key=slug(self.saved.display_name),
            name=self.saved.display_name,
            description=self.saved.description or None,
            current_version_id=self.current_version_id,
            active_version_id=self.current_version_id,
            metadata={},
            created_at=iso(self.saved.create_time, millis=True),
            updated_at=iso(self.saved.version_create_time, millis=True),
            deleted_at=None,
        )

    def version_out(self, org_id: str) -> VersionOut:
        number = self.saved.version
        return VersionOut(
            id=version_id(self.saved.id, number),
            org_id=org_id,
            eval_agent_id=self.saved.id,
            version_number=number,
            state="editable" if number == self.saved.latest_version else "archived",
            created_by=None,
            created_at=iso(self.saved.version_create_time, millis=True),
            updated_at=iso(self.saved.version_create_time, millis=True),
            **self.version.model_dump(),
        )

    def list_item(self) -> AgentListItem:
        out = self.out("")
        return AgentListItem(
            active_version_number=self.saved.latest_version,
            enabled=True,
            modality=self.version.modality,
            latest_run=None,
            **out.model_dump(include=set(AgentListItem.model_fields) & set(AgentOut.model_fields)),
        )

    def with_version(self, org_id: str) -> AgentWithVersion:
        return AgentWithVersion(agent=self.out(org_id), current_version=self.version_out(org_id))


def own_agent(saved: grader_service_pb2.SavedGrader) -> Agent | None:
    """The agent of a saved grader this dialect created, else None (it is treated as not found)."""
    version = decode_version(saved.grader) if saved.labels.get(RUN_LABEL) == NAME else None
    return Agent(saved, version) if version is not None else None


def checked(version: AgentVersion) -> AgentVersion:
    """The version when it follows Bland's level rules, else INVALID_REQUEST."""
    if problems := version.problems():
        raise GatewayError.invalid("the eval agent version is not valid", *problems)
    return version


def forked(source: Agent, body: VersionCreate, number: int) -> AgentVersion:
    """A new version from `source`, with the fields the request gives changed."""
    changes = body.model_dump(include=set(VersionFields.model_fields), exclude_none=True)
    fork = {
        "name": body.name or f"{source.saved.display_name} v{number}",
        "description": body.description,
        "created_from_version_id": version_id(source.saved.id, source.saved.version),
    }
    return checked(AgentVersion.model_validate(source.version.model_dump() | changes | fork))


# ---------------------------------------------------------------------------------------------- calls


def call_item(call: CallIn) -> item_pb2.Item:
    """A call as a dataset item: the transcript as the conversation and, rendered as text, as the
    recorded response the `provided` target hands to the judges; the call's length as the response's
    latency; every other field in the metadata (JSON values)."""
    lines = call.transcripts
    content = call.concatenated_transcript or "\n".join(f"{line.user}: {line.text}" for line in lines)
    metadata = {name: json.dumps(value) for name, value in (call.model_extra or {}).items()}
    if any(line.model_extra for line in lines):
        metadata["transcripts"] = json.dumps([line.model_dump() for line in lines])
    return item_pb2.Item(
        id=call.call_id,
        input=f"The transcript of call {call.call_id}.",
        conversation=[item_pb2.Message(role=line.user, content=line.text) for line in lines],
        response=item_pb2.Response(content=content, latency_ms=(call.call_length or 0) * 60_000),
        metadata=metadata,
    )


def call_out(item: item_pb2.Item) -> CallOut:
    """A stored call as it was given (the concatenated transcript is rendered when none was)."""
    extra = {name: json.loads(value) for name, value in item.metadata.items()}
    lines = extra.pop("transcripts", None) or [{"user": m.role, "text": m.content} for m in item.conversation]
    return CallOut(
        call_id=item.id,
        transcripts=lines,
        concatenated_transcript=item.response.content,
        call_length=item.response.latency_ms / 60_000 if item.response.latency_ms else None,
        **extra,
    )


# ---------------------------------------------------------------------------------------------- runs


def annotation(run: run_pb2.Run, key: str, default: Any) -> Any:
    """A JSON annotation of the run, or `default`."""
    value = run.annotations.get(key)
    return json.loads(value) if value is not None else default


def run_annotations(body: RunCreate, agents: Sequence[SubmittedAgent]) -> dict[str, str]:
    """The Bland fields a run keeps as annotations. The submitted call ids are kept when they fit
    (evalsvc limits annotations to 64 KiB); otherwise reads recover them from the results."""
    values = {
        A_MODE: body.run_mode or "text",
        A_AGENTS: json.dumps([agent.model_dump() for agent in agents]),
        A_METADATA: json.dumps(body.metadata),
    }
    if body.workbench_setup_id is not None and body.workbench_setup_version_id is not None:
        values[A_SETUP], values[A_SETUP_VERSION] = body.workbench_setup_id, body.workbench_setup_version_id
    call_ids = json.dumps(body.call_ids, separators=(",", ":"))
    used = sum(len(k.encode()) + len(v.encode()) for k, v in values.items())
    if used + len(A_CALL_IDS) + len(call_ids.encode()) + SUMMARY_RESERVE <= ANNOTATION_BYTES:
        values[A_CALL_IDS] = call_ids
    return values


def bland_status(run: run_pb2.Run) -> RunStatus:
    """SUCCEEDED is COMPLETE, or PARTIAL when some evaluations errored; the others keep their names."""
    if run.status == run_pb2.RUN_STATUS_SUCCEEDED and run.counts.errored:
        return "PARTIAL"
    return STATUSES.get(run.status, "PENDING")


@dataclass(frozen=True)
class Verdict:
    """One result read the Bland way."""

    result: run_pb2.Result
    level_key: str | None
    reason: str
    target_match: bool

    @property
    def failed(self) -> bool:
        return self.result.state == run_pb2.RESULT_STATE_ERROR


@dataclass
class CallGroup:
    """One call's results (a job records all its graders' results together, so they are adjacent)."""

    call_id: str
    id: str  # the first result's id: the call result's id
    verdicts: list[Verdict] = field(default_factory=list)


CHOSE = re.compile(r"^judge chose level (?P<key>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"): (?P<reason>.*)$", re.S)


@dataclass(frozen=True)
class RunView:
    """A run's Bland fields: its annotations and its agents' version snapshots."""

    run: run_pb2.Run
    agents: dict[str, SubmittedAgent]
    versions: dict[str, AgentVersion]

    @classmethod
    def of(cls, run: run_pb2.Run) -> Self:
        agents = [SubmittedAgent.model_validate(a) for a in annotation(run, A_AGENTS, [])]
        versions = {g.name: v for g in run.graders if (v := decode_version(g)) is not None}
        return cls(run, {a.eval_agent_id: a for a in agents}, versions)

    @property
    def status(self) -> RunStatus:
        return bland_status(self.run)

    def verdict(self, result: run_pb2.Result) -> Verdict:
        """The level the judge chose (from its explanation), and whether it is a target level of the
        run's attachment (the agent's target levels unless the run gave others; for a pass/fail agent,
        whether it passed)."""
        match = CHOSE.match(result.explanation)
        key = str(ast.literal_eval(match["key"])) if match else None
        reason = match["reason"] if match else result.explanation
        agent = self.agents.get(result.grader)
        targets = agent.target_level_keys if agent else []
        hit = key in targets if targets else result.state == run_pb2.RESULT_STATE_PASSED
        return Verdict(result, key, reason, hit and result.state != run_pb2.RESULT_STATE_ERROR)

    def call_score(self, group: CallGroup) -> float | None:
        """The weighted mean of the call's verdict scores (0-100) over the verdicts that did not fail."""
        scored = [(v.result.score * 100, self.weight(v.result.grader)) for v in group.verdicts if not v.failed]
        if not scored:
            return None
        total = sum(w for _, w in scored)
        if not total:
            return sum(s for s, _ in scored) / len(scored)
        return sum(s * w for s, w in scored) / total

    def weight(self, agent_id: str) -> float:
        agent = self.agents.get(agent_id)
        return agent.weight if agent else 1.0

    def summary(self, groups: Sequence[CallGroup]) -> Summary:
        """Bland's summary from every call's verdicts: the mean call score, calls without (successful)
        and with (failed) a failed verdict, verdicts on a target level, and the verdict: target matches
        as a percentage of the verdicts that did not fail, at least the threshold (100 when none)."""
        scores = [s for g in groups if (s := self.call_score(g)) is not None]
        mean = sum(scores) / len(scores) if scores else None
        verdicts = [v for g in groups for v in g.verdicts]
        graded = [v for v in verdicts if not v.failed]
        matches = sum(v.target_match for v in verdicts)
        threshold = self.run.pass_threshold if self.run.HasField("pass_threshold") else None
        failed_calls = sum(any(v.failed for v in g.verdicts) for g in groups)
        return Summary(
            overall_score_mean=mean,
            text_score_mean=mean,
            audio_score_mean=None,
            successful_call_count=len(groups) - failed_calls,
            failed_call_count=failed_calls,
            insufficient_evidence_count=0,
            target_match_count=matches,
            pass_threshold_pct=threshold,
            overall_pass=bool(graded) and matches * 100 >= (100 if threshold is None else threshold) * len(graded),
        )

    def list_item(self, summary: Summary | None) -> RunListItem:
        run = self.run
        done = run.status in TERMINAL
        return RunListItem(
            id=run.id,
            status=self.status,
            triggered_by=TRIGGER_NAMES.get(run.trigger, "manual"),
            run_mode=cast(RunMode, run.annotations.get(A_MODE, "text")),
            resolved_call_count=run.counts.total_items,
            resolved_agent_count=len(run.graders),
            resolved_atom_count=run.counts.total_evaluations,
            completed_atom_count=run.counts.completed_evaluations,
            summary=summary,
            billable_cost_usd=run.cost_usd if done else None,
            workbench_setup_id=run.annotations.get(A_SETUP),
            workbench_setup_version_id=run.annotations.get(A_SETUP_VERSION),
            metadata=annotation(run, A_METADATA, {}),
            created_at=iso(run.create_time, millis=True),
            started_at=iso(run.start_time, millis=True),
            completed_at=iso(run.end_time, millis=True),
        )

    def out(self, summary: Summary | None, call_ids: list[str]) -> RunOut:
        run = self.run
        return RunOut(
            org_id=run.dataset_id,
            submitted_call_ids=call_ids,
            submitted_attached_agents=list(self.agents.values()),
            error_code=run.error.code or None,
            error_message=run.error.message or None,
            workflow_id=None,
            **self.list_item(summary).model_dump(),
        )

    def agent_result(self, group: CallGroup, verdict: Verdict) -> AgentResult:
        result = verdict.result
        agent = self.agents.get(result.grader)
        version = self.versions.get(result.grader)
        labels = version.labels() if version else {}
        return AgentResult(
            id=result.id,
            org_id=self.run.dataset_id,
            eval_run_id=self.run.id,
            eval_run_call_result_id=group.id,
            eval_run_agent_snapshot_id=agent.eval_agent_version_id if agent else None,
            eval_agent_id=result.grader,
            eval_agent_version_id=agent.eval_agent_version_id if agent else None,
            call_id=result.item_id,
            selected_level_key=verdict.level_key,
            selected_level_label=labels.get(verdict.level_key or "", verdict.level_key),
            score_normalized_0_100=None if verdict.failed else result.score * 100,
            is_target_match=verdict.target_match,
            is_insufficient_evidence=False,
            confidence=result.confidence if result.HasField("confidence") else None,
            reasoning_md=verdict.reason or None,
            evidence=[],
            failed=verdict.failed,
            failure_code="EVALUATION_ERROR" if verdict.failed else None,
            failure_message=(result.error_reason or None) if verdict.failed else None,
            billable_cost_usd=result.scoring_cost_usd,
            audit=Audit(
                prompt_version=agent.eval_agent_version_id if agent else None,
                input_tokens=None,
                output_tokens=None,
                latency_ms=None,
            ),
            created_at=iso(result.complete_time, millis=True),
        )

    def call_result(self, group: CallGroup, with_agents: bool) -> CallResult:
        failed = sum(v.failed for v in group.verdicts)
        score = self.call_score(group)
        times = [v.result.complete_time for v in group.verdicts]
        latency = group.verdicts[0].result.output.latency_ms
        return CallResult(
            id=group.id,
            org_id=self.run.dataset_id,
            eval_run_id=self.run.id,
            call_id=group.call_id,
            call_display_name=None,
            call_started_at=None,
            call_duration_seconds=latency / 1000 if latency else None,
            call_ended_by=None,
            transcript_snapshot_ref=None,
            transcript_snapshot_expires_at=None,
            status="COMPLETE" if not failed else "FAILED" if failed == len(group.verdicts) else "PARTIAL",
            started_at=None,
            completed_at=iso(max(times, key=lambda t: (t.seconds, t.nanos)), millis=True),
            overall_score_normalized_0_100=score,
            text_score_normalized_0_100=score,
            audio_score_normalized_0_100=None,
            failed_agent_count=failed,
            insufficient_evidence_agent_count=0,
            agent_results=[self.agent_result(group, v) for v in group.verdicts] if with_agents else [],
            created_at=iso(min(times, key=lambda t: (t.seconds, t.nanos)), millis=True),
        )


# ---------------------------------------------------------------------------------------------- routes


class Bland:
    """The routes' calls to evalsvc, as one caller."""

    def __init__(self, upstream: Upstream, caller: Caller) -> None:
        self.up = upstream
        self.caller = caller

    async def calls_dataset(self) -> ds_pb.Dataset:
        """The tenant's calls dataset, created on first use (CreateDataset is idempotent by request id).
        Its id also stands for the organization (`org_id`): evalsvc does not expose tenant names."""
        request = ds_pb.CreateDatasetRequest(dataset=CALLS_DATASET, request_id=CALLS_REQUEST_ID)
        return (await self.up.call(self.up.datasets.CreateDataset, request, self.caller)).dataset

    async def agent(self, agent_id: str, version: int = 0) -> Agent:
        """One of this dialect's agents at a version (0 = latest); EVAL_AGENT_NOT_FOUND otherwise."""
        request = grader_service_pb2.GetGraderRequest(grader_id=agent_id, version=version)
        try:
            saved = (await self.up.call(self.up.graders.GetGrader, request, self.caller)).grader
        except GatewayError as error:
            if error.code == grpc.StatusCode.NOT_FOUND and version:
                raise not_found(
                    "EVAL_AGENT_VERSION_NOT_FOUND", f"eval agent {agent_id!r} has no such version"
                ) from None
            raise
        found = own_agent(saved)
        if found is None:
            raise not_found("EVAL_AGENT_NOT_FOUND", f"eval agent {agent_id!r} not found")
        return found

    def agents(self) -> AsyncIterator[Agent]:
        """This dialect's agents, newest first."""

        async def fetch(token: str) -> tuple[Sequence[grader_service_pb2.SavedGrader], str]:
            request = grader_service_pb2.ListGradersRequest(page_size=PAGE, page_token=token)
            page = await self.up.call(self.up.graders.ListGraders, request, self.caller)
            return page.graders, page.next_page_token

        async def mine() -> AsyncIterator[Agent]:
            async for saved in token_pages(fetch):
                if (agent := own_agent(saved)) is not None:
                    yield agent

        return mine()

    async def run(self, run_id: str) -> run_pb2.Run:
        """One of this dialect's runs; EVAL_RUN_NOT_FOUND for any other, and for a soft-deleted one (lists
        leave those out too)."""
        run = (await self.up.call(self.up.runs.GetRun, runs_pb.GetRunRequest(run_id=run_id), self.caller)).run
        if run.labels.get(RUN_LABEL) != NAME or run.HasField("delete_time"):
            raise not_found("EVAL_RUN_NOT_FOUND", f"eval run {run_id!r} not found")
        return run

    def runs(self, statuses: Sequence[run_pb2.RunStatus]) -> AsyncIterator[run_pb2.Run]:
        """This dialect's runs, newest first (the label filter is applied by evalsvc)."""

        async def fetch(token: str) -> tuple[Sequence[run_pb2.Run], str]:
            request = runs_pb.ListRunsRequest(page_size=PAGE, page_token=token, labels=OWN, statuses=statuses)
            page = await self.up.call(self.up.runs.ListRuns, request, self.caller)
            return page.runs, page.next_page_token

        return token_pages(fetch)

    def groups(self, view: RunView) -> AsyncIterator[CallGroup]:
        """The run's results grouped by call, in the order they were recorded."""

        async def fetch(token: str) -> tuple[Sequence[run_pb2.Result], str]:
            request = runs_pb.ListRunResultsRequest(run_id=view.run.id, page_size=PAGE, page_token=token)
            page = await self.up.call(self.up.runs.ListRunResults, request, self.caller)
            return page.results, page.next_page_token

        async def grouped() -> AsyncIterator[CallGroup]:
            group: CallGroup | None = None
            async for result in token_pages(fetch):
                if group is None or result.item_id != group.call_id:
                    if group is not None:
                        yield group
                    group = CallGroup(result.item_id, result.id)
                group.verdicts.append(view.verdict(result))
            if group is not None:
                yield group

        return grouped()

    async def summary(self, view: RunView, groups: list[CallGroup] | None = None) -> Summary | None:
        """The summary of an ended run with results, computed from its results once and then kept in the
        run's annotations (an ended run's results never change); None before."""
        run = view.run
        if run.status not in TERMINAL or not run.counts.completed_evaluations:
            return None
        if A_SUMMARY in run.annotations:
            return Summary.model_validate_json(run.annotations[A_SUMMARY])
        if groups is None:
            groups = [g async for g in self.groups(view)]
        summary = view.summary(groups)
        # Only its own key (a map-key mask): rewriting the whole map read above would undo any
        # annotation a client changed since.
        keep = run_pb2.Run(annotations={A_SUMMARY: summary.model_dump_json()})
        request = runs_pb.UpdateRunRequest(
            run_id=run.id, run=keep, update_mask=field_mask_pb2.FieldMask(paths=[f"annotations.`{A_SUMMARY}`"])
        )
        with contextlib.suppress(GatewayError):  # only a cache: without it the summary is computed again
            await self.up.call(self.up.runs.UpdateRun, request, self.caller)
        return summary

    async def run_out(self, run: run_pb2.Run) -> RunOut:
        """The full run object; the call ids come from the results when the run could not keep them."""
        view = RunView.of(run)
        stored = annotation(run, A_CALL_IDS, None)
        groups = None if stored is not None else [g async for g in self.groups(view)]
        call_ids = stored if stored is not None else [g.call_id for g in groups or []]
        return view.out(await self.summary(view, groups), call_ids)

    async def resolve(self, at: int, attached: AttachedAgent) -> tuple[Agent, SubmittedAgent]:
        """An attachment's agent at its version (the latest when none is given), with its weight and
        target levels (the agent version's unless the attachment gives them)."""
        number = 0
        if attached.eval_agent_version_id is not None:
            number = parse_version_id(attached.eval_agent_version_id, attached.eval_agent_id)
        agent = await self.agent(attached.eval_agent_id, number)
        version = agent.version
        targets = version.target_level_keys if attached.target_level_keys is None else attached.target_level_keys
        unknown = [key for key in targets if key not in version.level_keys()]
        if unknown:
            raise GatewayError.invalid(
                "target_level_keys name levels the agent does not have",
                (f"attached_agents[{at}].target_level_keys", f"{', '.join(map(repr, unknown))} are not its levels"),
            )
        weight = version.weight if attached.weight is None else attached.weight
        submitted = SubmittedAgent(
            eval_agent_id=agent.saved.id,
            eval_agent_version_id=version_id(agent.saved.id, agent.saved.version),
            weight=weight,
            target_level_keys=targets,
        )
        return agent, submitted


def router(upstream: Upstream, options: DialectOptions) -> APIRouter:
    """The Bland routes, at Bland's paths (`/v1/evals/...`)."""
    api = APIRouter(route_class=error_route_class(render), responses=ERROR_RESPONSES)

    def bland(caller: CallerDep) -> Bland:
        return Bland(upstream, caller)

    Client = Annotated[Bland, Depends(bland)]

    @api.get("/v1/evals/status", response_model=Envelope[EvalsStatus])
    async def evals_status(client: Client) -> Envelope[EvalsStatus]:
        """Evals are always enabled; a one-row ListRuns still checks the API key."""
        await upstream.call(upstream.runs.ListRuns, runs_pb.ListRunsRequest(page_size=1, labels=OWN), client.caller)
        return Envelope(data=EvalsStatus(enabled=True))

    @api.post("/v1/evals/agents", response_model=Envelope[AgentWithVersion])
    async def create_agent(body: AgentCreate, client: Client) -> Envelope[AgentWithVersion]:
        """A saved grader (version 1) judging by the agent's levels."""
        version = checked(
            AgentVersion(
                name=f"{body.name} v1",
                modality=body.modality or "text",
                **body.model_dump(include=set(VersionFields.model_fields), exclude_none=True),
            )
        )
        spec = grader_service_pb2.SavedGrader(
            display_name=body.name, description=body.description or "", labels=OWN, grader=encode_version(version)
        )
        request = grader_service_pb2.CreateGraderRequest(grader=spec)
        saved = (await upstream.call(upstream.graders.CreateGrader, request, client.caller)).grader
        org = (await client.calls_dataset()).id
        return Envelope(data=Agent(saved, version).with_version(org))

    @api.get("/v1/evals/agents", response_model=Envelope[ListOf[AgentListItem]])
    async def list_agents(client: Client, cursor: CursorDep) -> Envelope[ListOf[AgentListItem]]:
        """This dialect's agents, newest first."""
        page = await paginate(client.agents(), lambda a: a.saved.id, cursor)
        return Envelope(data=listing(page, [agent.list_item() for agent in page.items]))

    @api.get("/v1/evals/agents/{eval_agent_id}", response_model=Envelope[AgentWithVersion])
    async def get_agent(eval_agent_id: str, client: Client) -> Envelope[AgentWithVersion]:
        """The agent and its latest version."""
        agent = await client.agent(eval_agent_id)
        return Envelope(data=agent.with_version((await client.calls_dataset()).id))

    @api.post("/v1/evals/agents/{eval_agent_id}/versions", response_model=Envelope[VersionOut])
    async def create_version(eval_agent_id: str, body: VersionCreate, client: Client) -> Envelope[VersionOut]:
        """A new grader version forked from `from_version_id` (default: the latest), with the given changes."""
        number = parse_version_id(body.from_version_id, eval_agent_id) if body.from_version_id else 0
        source = await client.agent(eval_agent_id, number)
        version = forked(source, body, source.saved.latest_version + 1)
        request = grader_service_pb2.UpdateGraderRequest(grader_id=eval_agent_id, grader=encode_version(version))
        saved = (await upstream.call(upstream.graders.UpdateGrader, request, client.caller)).grader
        return Envelope(data=Agent(saved, version).version_out((await client.calls_dataset()).id))

    @api.post("/v1/evals/calls", response_model=Envelope[CallsAdded])
    async def add_calls(body: CallsIn, client: Client) -> Envelope[CallsAdded]:
        """evalsvc extension: store calls (transcripts) for runs to evaluate, one dataset item each."""
        dataset = await client.calls_dataset()
        request = ds_pb.AddDatasetItemsRequest(dataset_id=dataset.id, items=[call_item(c) for c in body.calls])
        added = await upstream.call(upstream.datasets.AddDatasetItems, request, client.caller)
        return Envelope(data=CallsAdded(call_ids=list(added.item_ids), total_call_count=added.dataset.item_count))

    @api.get("/v1/evals/calls", response_model=Envelope[ListOf[CallOut]])
    async def list_calls(client: Client, cursor: CursorDep) -> Envelope[ListOf[CallOut]]:
        """evalsvc extension: the stored calls, in the order they were added."""
        dataset_id = (await client.calls_dataset()).id

        async def fetch(token: str) -> tuple[Sequence[item_pb2.Item], str]:
            request = ds_pb.ListDatasetItemsRequest(dataset_id=dataset_id, page_size=PAGE, page_token=token)
            page = await upstream.call(upstream.datasets.ListDatasetItems, request, client.caller)
            return page.items, page.next_page_token

        page = await paginate(token_pages(fetch), lambda item: item.id, cursor)
        return Envelope(data=listing(page, [call_out(item) for item in page.items]))

    @api.post("/v1/evals/runs", response_model=Envelope[RunOut])
    async def create_run(body: RunCreate, client: Client) -> Envelope[RunOut]:
        """A run over the calls (items of the calls dataset) with one saved-grader reference per agent."""
        dataset = await client.calls_dataset()
        resolved = await asyncio.gather(*(client.resolve(i, a) for i, a in enumerate(body.attached_agents or ())))
        graders = [
            grader_pb2.Grader(
                name=agent.saved.id,
                weight=submitted.weight or ZERO_WEIGHT,
                saved=grader_pb2.SavedGraderRef(grader_id=agent.saved.id, version=agent.saved.version),
            )
            for agent, submitted in resolved
        ]
        request = runs_pb.CreateRunRequest(
            dataset_id=dataset.id,
            item_ids=body.call_ids,
            target=target_pb2.Target(provided=target_pb2.ProvidedTarget()),
            graders=graders,
            labels=OWN,
            annotations=run_annotations(body, [submitted for _, submitted in resolved]),
            trigger=TRIGGERS[body.triggered_by or "manual"],
        )
        if body.pass_threshold_pct is not None:
            request.pass_threshold = body.pass_threshold_pct
        created = await upstream.call(upstream.runs.CreateRun, request, client.caller)
        return Envelope(data=RunView.of(created.run).out(None, body.call_ids))

    @api.get("/v1/evals/runs", response_model=Envelope[ListOf[RunListItem]])
    async def list_runs(
        client: Client,
        cursor: CursorDep,
        eval_agent_id: str | None = None,
        workbench_setup_id: str | None = None,
        status: RunStatus | None = None,
        triggered_by: TriggeredBy | None = None,
    ) -> Envelope[ListOf[RunListItem]]:
        """This dialect's runs, newest first, filtered."""

        def keep(run: run_pb2.Run) -> bool:
            return (
                (status is None or bland_status(run) == status)
                and (eval_agent_id is None or any(g.name == eval_agent_id for g in run.graders))
                and (triggered_by is None or TRIGGER_NAMES.get(run.trigger) == triggered_by)
                and (workbench_setup_id is None or run.annotations.get(A_SETUP) == workbench_setup_id)
            )

        if status is not None and not STATUS_FILTER[status]:
            page: Page[run_pb2.Run] = Page([], False, None)
        else:
            runs = client.runs(STATUS_FILTER[status] if status else ())
            page = await paginate(filtered(runs, keep), lambda run: run.id, cursor)
        views = [RunView.of(run) for run in page.items]
        summaries = await asyncio.gather(*(client.summary(view) for view in views))
        return Envelope(data=listing(page, [v.list_item(s) for v, s in zip(views, summaries, strict=True)]))

    @api.get("/v1/evals/runs/{run_id}", response_model=Envelope[RunOut])
    async def get_run(run_id: str, client: Client) -> Envelope[RunOut]:
        """The run with its status and, once it has ended, its summary."""
        return Envelope(data=await client.run_out(await client.run(run_id)))

    @api.post("/v1/evals/runs/{run_id}/cancellations", response_model=Envelope[RunOut])
    async def cancel_run(run_id: str, client: Client) -> Envelope[RunOut]:
        """Cancel a pending or running run (EVAL_RUN_NOT_CANCELLABLE once it has ended)."""
        await client.run(run_id)
        request = runs_pb.CancelRunRequest(run_id=run_id)
        cancelled = (await upstream.call(upstream.runs.CancelRun, request, client.caller)).run
        return Envelope(data=await client.run_out(cancelled))

    @api.get("/v1/evals/runs/{run_id}/call-results", response_model=CallResultsEnvelope)
    async def call_results(
        run_id: str, client: Client, cursor: CursorDep, include_agent_results: bool = False
    ) -> CallResultsEnvelope:
        """One row per evaluated call, in the order they were evaluated."""
        view = RunView.of(await client.run(run_id))
        page = await paginate(client.groups(view), lambda g: g.id, cursor)
        rows = [view.call_result(g, include_agent_results) for g in page.items]
        return CallResultsEnvelope(
            data=listing(page, rows), run_status=view.status, run_resolved_call_count=view.run.counts.total_items
        )

    @api.get("/v1/evals/runs/{run_id}/agent-results", response_model=Envelope[ListOf[AgentResult]])
    async def agent_results(run_id: str, client: Client, cursor: CursorDep) -> Envelope[ListOf[AgentResult]]:
        """Every judge verdict of the run, in the order they were recorded."""
        view = RunView.of(await client.run(run_id))

        async def verdicts() -> AsyncIterator[tuple[CallGroup, Verdict]]:
            async for group in client.groups(view):
                for verdict in group.verdicts:
                    yield group, verdict

        page = await paginate(verdicts(), lambda pair: pair[1].result.id, cursor)
        return Envelope(data=listing(page, [view.agent_result(g, v) for g, v in page.items]))

    return api


DIALECT = Dialect(name=NAME, title="Bland AI Evals", prefix="", router=router)
