"""Bland's request and response bodies (the wire models), field for field as docs.bland.ai documents them,
plus the evalsvc extensions (calls). Pure pydantic: no evalsvc calls, no translation. (No `from __future__
import annotations`: annotations are evaluated here, not in the namespace a model's `__module__` names.)"""

from typing import Annotated, Any, Generic, Literal, Self, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

T = TypeVar("T")

# The documented limits.
MAX_CALLS_PER_RUN = 5000
MAX_AGENTS_PER_RUN = 50
MAX_NAME = 200
GRADED_LEVELS = (2, 5)  # a graded agent has 2-5 levels; a pass/fail agent has none
# The two levels of a pass/fail agent: key, label, what the judge is told.
PASS_FAIL = (("pass", "Pass", "The call meets the rubric."), ("fail", "Fail", "The call does not meet the rubric."))

RunStatus = Literal["PENDING", "QUEUED", "RUNNING", "COMPLETE", "PARTIAL", "FAILED", "CANCELLED"]
TriggeredBy = Literal["manual", "auto", "backfill"]
RunMode = Literal["text", "audio", "full"]


class ErrorItem(BaseModel):
    """One problem: a Bland-style code (e.g. EVAL_RUN_NOT_FOUND) and a message for people."""

    error: str
    message: str


class ErrorEnvelope(BaseModel):
    """The body of every failed request."""

    # Aymara has an ErrorEnvelope too, so /openapi.json names both by module: this keeps the component
    # name Bland's had before the dialect became a package (`evalsvc__gateway__dialects__bland__ErrorEnvelope`).
    __module__ = "evalsvc.gateway.dialects.bland"

    data: None = None
    errors: list[ErrorItem]


# Every 4xx is the envelope; a request that does not match the schema is a 400 (INVALID_REQUEST). The "4XX"
# entry also keeps FastAPI from documenting its own 422 HTTPValidationError, which Bland never answers.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorEnvelope, "description": description}
    for status, description in (
        (400, "Invalid request (INVALID_REQUEST), incl. a body or query not of the documented shape"),
        (401, "Missing or invalid API key (UNAUTHORIZED)"),
        (404, "Unknown id (EVAL_RUN_NOT_FOUND, EVAL_AGENT_NOT_FOUND, EVAL_AGENT_VERSION_NOT_FOUND)"),
        (409, "Conflict with the resource's state (e.g. EVAL_RUN_NOT_CANCELLABLE)"),
        (429, "Over a quota (RATE_LIMITED)"),
        ("4XX", "Any other client error (e.g. 405 METHOD_NOT_ALLOWED, 413 for a body over the gateway's limits)"),
    )
}


STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)  # an unknown field is an error, never dropped


def _no_nul(value: str) -> str:
    """evalsvc stores no NUL. Refused here for text it would refuse under another name, or twice (a
    prompt is both the judge's criteria and part of its guidelines; a transcript line is a turn and part
    of the rendered transcript; a call id is also in the item's input), so the refusal names the field
    sent once; and for text it would not see to refuse (a new version's name and description, stored
    escaped in the version's JSON)."""
    if "\x00" in value:
        raise PydanticCustomError("string_nul", "must not contain NUL (U+0000) characters")
    return value


Plain = Annotated[str, AfterValidator(_no_nul)]  # text without NUL
Text = Annotated[Plain, Field(max_length=100_000)]


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
    level_key: Plain = Field(min_length=1, max_length=64)
    label: str | None = Field(default=None, max_length=MAX_NAME)
    prompt_md: Text = ""
    color: str | None = Field(default=None, max_length=32)


class LevelSent(Level):
    """A level as a request gives it: its label and color without NUL as well (stored escaped in the
    version's JSON, which the service never sees to refuse). Not on `Level`, which also reads stored
    versions: one stored with a NUL before this check must stay readable."""

    label: Plain | None = Field(default=None, max_length=MAX_NAME)
    color: Plain | None = Field(default=None, max_length=32)


class VersionFields(BaseModel):
    """The judge definition of an agent version (the fields of Bland's version object). Bland edits
    these on a draft (PATCH .../versions/{id}); here they are given when a version is created."""

    model_config = STRICT
    system_prompt_md: Text | None = None
    prompt_md: Text | None = None
    levels: list[LevelSent] | None = None
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

    # Without NUL: a version is stored as JSON inside the grader's definition, where the service never
    # sees (nor refuses) a NUL, which came back in the version; the agent's own are the grader's, refused.
    name: Plain | None = Field(default=None, min_length=1, max_length=MAX_NAME)
    description: Plain | None = None
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


class VersionListItem(BaseModel):
    """An eval agent version in a list (GET /v1/evals/agents/{id}/versions)."""

    id: str
    eval_agent_id: str
    version_number: int
    name: str
    state: Literal["editable", "archived"]
    created_by: str | None
    created_at: str | None
    latest_run: None


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
    user: Plain = Field(min_length=1, max_length=64)
    text: Plain


def _call_id_text(value: Any) -> Any:
    """Bland documents `call_id` as a number in places and shows UUID strings elsewhere: take both."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class CallIn(BaseModel):
    """A recorded call to evaluate, in the shape of Bland's call details (`GET /v1/calls/{call_id}`), so a
    call copied from Bland's API is taken unchanged (evalsvc extension: Bland reads calls from its own
    call store). Fields beyond these are kept in the item's metadata and returned as they came."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    call_id: Annotated[Plain, BeforeValidator(_call_id_text)] = Field(min_length=1, max_length=128)
    transcripts: list[TranscriptLine] = Field(default_factory=list)
    concatenated_transcript: Plain | None = None
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
