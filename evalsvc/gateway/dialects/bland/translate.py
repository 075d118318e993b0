"""Bland's shapes to and from evalsvc's messages: pure functions, no calls (unit-tested without a server).

An eval agent is a saved grader whose versions hold an `LlmJudge` in MODE_LEVELS (`encode_version`); a call
is a dataset item whose recorded response is its transcript (`call_item`); a run's Bland fields are kept in
its annotations (`run_annotations`) and read back with its results (`RunView`); every failure becomes
Bland's error envelope (`render`)."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import grpc
from fastapi.responses import JSONResponse
from pydantic import JsonValue

from evalsvc.gateway.dialects.base import (
    MAX_ANNOTATIONS_BYTES,
    Unreadable,
    annotations_bytes,
    is_owned,
    iso,
    owner_labels,
    read_stored,
)
from evalsvc.gateway.dialects.bland.models import (
    PASS_FAIL,
    AgentListItem,
    AgentOut,
    AgentResult,
    AgentVersion,
    AgentWithVersion,
    Audit,
    CallIn,
    CallOut,
    CallResult,
    ErrorEnvelope,
    ErrorItem,
    RunCreate,
    RunListItem,
    RunMode,
    RunOut,
    RunStatus,
    SubmittedAgent,
    Summary,
    TriggeredBy,
    VersionCreate,
    VersionFields,
    VersionListItem,
    VersionOut,
)
from evalsvc.gateway.dialects.uuids import derived_uuid
from evalsvc.gateway.upstream import TERMINAL, GatewayError
from evalsvc.v1 import dataset_service_pb2 as ds_pb
from evalsvc.v1 import grader_pb2, grader_service_pb2, item_pb2, run_pb2

NAME = "bland"
Judge = grader_pb2.LlmJudge
# evalsvc reads a grader weight of 0 as 1; Bland's 0 means "does not count", so it is stored as this.
ZERO_WEIGHT = 1e-9

# Run annotations holding Bland fields that have no evalsvc equivalent.
A_MODE = "bland.run_mode"
A_AGENTS = "bland.attached_agents"
A_METADATA = "bland.metadata"
A_SETUP = "bland.workbench_setup_id"
A_SETUP_VERSION = "bland.workbench_setup_version_id"
A_CALL_IDS = "bland.submitted_call_ids"
A_SUMMARY = "bland.summary"
SUMMARY_RESERVE = 4096  # kept free so the summary can be cached on the run

CALLS_DATASET = ds_pb.Dataset(
    display_name="Bland calls",
    description="Calls uploaded through the Bland dialect (POST /v1/evals/calls); one item per call.",
    labels=owner_labels(NAME),
)
CALLS_REQUEST_ID = "bland-calls-dataset"  # CreateDataset is idempotent by it: find-or-create per tenant

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
    "METHOD_NOT_ALLOWED": "METHOD_NOT_ALLOWED",  # HTTP 405 (evalsvc.gateway.unrouted), not NOT_IMPLEMENTED
    "BODY_TOO_LARGE": "INVALID_REQUEST",  # HTTP 413 (evalsvc.gateway.request_limits): not RATE_LIMITED, no retry
}
# evalsvc field paths in violations -> the Bland fields they came from (the first that matches). A call is
# an item (`call_item`: its transcript lines the conversation, its other fields the metadata), an agent
# version a grader's LlmJudge (`encode_version`), a run's Bland fields its annotations (`run_annotations`).
# Text that evalsvc refuses and that reaches it in more than one field (a NUL: the judge's guidelines hold
# both prompts, an item's input the call id, its response the rendered transcript) is refused by the
# models first, naming the field sent.
VERSION_TEXT = "system_prompt_md, prompt_md and levels"
_JUDGE = r"^grader(?:\.grader)?\.llm_judge\."
FIELD_NAMES = (
    (re.compile(r"^items\[(\d+)\]\.id\b"), r"calls[\1].call_id"),
    (re.compile(r"^items\[(\d+)\]\.conversation\[(\d+)\]\.content\b"), r"calls[\1].transcripts[\2].text"),
    (re.compile(r"^items\[(\d+)\]\.conversation\[(\d+)\]\.role\b"), r"calls[\1].transcripts[\2].user"),
    (re.compile(r"^items\[(\d+)\]\.conversation\b"), r"calls[\1].transcripts"),
    (re.compile(r"^items\[(\d+)\]\.response\.latency_ms\b"), r"calls[\1].call_length"),
    (re.compile(r"^items\[(\d+)\]\.metadata\[(.*)\]$", re.S), r"calls[\1].\2"),
    (re.compile(r"^items\[(\d+)\]\.metadata\b"), r"calls[\1]"),
    (re.compile(r"^items\b"), "calls"),
    (re.compile(r"^item_ids\b"), "call_ids"),
    (re.compile(r"^graders\b"), "attached_agents"),
    (re.compile(r"^pass_threshold\b"), "pass_threshold_pct"),
    (re.compile(r"^annotations\[bland\.submitted_call_ids\]$"), "call_ids"),
    (re.compile(r"^annotations\[bland\.([a-z_]+)\]$"), r"\1"),  # run_mode, metadata, workbench_setup_id...
    (re.compile(r"^annotations\b"), "metadata"),
    (re.compile(r"^grader\.display_name\b"), "name"),
    (re.compile(r"^grader\.description\b"), "description"),
    (re.compile(_JUDGE + r"criteria\b"), "prompt_md"),
    (re.compile(_JUDGE + r"levels\[(\d+)\]\.key\b"), r"levels[\1].level_key"),
    (re.compile(_JUDGE + r"levels\[(\d+)\]\.description\b"), r"levels[\1].prompt_md"),
    (re.compile(_JUDGE + r"levels\b"), "levels"),
    (re.compile(r"^grader(?:\.grader)?\.weight\b"), "weight"),
    # The whole definition (its size): every version field is in it, the prompts and levels the most.
    (re.compile(r"^grader(?:\.grader)?(?:\.llm_judge(?:\.additional_guidelines)?)?$"), VERSION_TEXT),
)


def bland_field(path: str) -> str:
    """The Bland name of an evalsvc field path (unchanged when it already is one)."""
    for pattern, replacement in FIELD_NAMES:
        renamed = pattern.sub(replacement, path)
        if renamed != path:
            return renamed
    return path


# evalsvc's words in its messages -> Bland's: run status names (`RUN_STATUS_SUCCEEDED` -> `COMPLETE`), the
# service's not-found of a grader or a run (`grader 'grd_x' not found` -> `eval agent 'grd_x' not found`), and
# a call that is not in the calls dataset (the run's item ids are the call ids).
STATUS_WORDS = {run_pb2.RunStatus.Name(status): name for status, name in STATUSES.items()}
QUOTED = r"('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")"  # an id as Python's repr quotes it
WORDS: tuple[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]], ...] = (
    (re.compile(r"\bRUN_STATUS_[A-Z]+\b"), lambda m: STATUS_WORDS.get(m[0], m[0])),
    (re.compile(rf"^grader {QUOTED} not found"), r"eval agent \1 not found"),
    (re.compile(rf"^run {QUOTED} not found"), r"eval run \1 not found"),
    (re.compile(rf"\bno item {QUOTED} in dataset '[^']*'"), r"no call \1 was uploaded"),
    (re.compile(r"\bitem ids must not repeat\b"), "call ids must not repeat"),
    (re.compile(r"\bthe definition is (\d+) bytes"), r"the eval agent version takes \1 bytes"),
)


def bland_words(text: str) -> str:
    """A message of evalsvc's in Bland's vocabulary (see WORDS)."""
    for pattern, replacement in WORDS:
        text = pattern.sub(replacement, text)
    return text


def render(error: GatewayError) -> JSONResponse:
    """A failure in Bland's envelope: one entry per field violation, else one for the error; field names,
    status names and words are Bland's."""
    status, code = ERROR_CODES.get(error.code, (500, "INTERNAL_ERROR"))
    status = 413 if error.http_status == 413 else status  # a body over the gateway's limits
    code = REASON_CODES.get(error.reason) or (error.reason if error.reason.startswith("EVAL_") else code)
    # One entry per message: two evalsvc fields that one Bland field became name it twice.
    messages = dict.fromkeys(
        bland_words(f"{bland_field(f)}: {d}" if f else d.removeprefix("Value error, ")) for f, d in error.violations
    )
    items = [ErrorItem(error=code, message=message) for message in messages]
    body = ErrorEnvelope(errors=items or [ErrorItem(error=code, message=bland_words(error.message))])
    return JSONResponse(status_code=status, content=body.model_dump())


def not_found(code: str, message: str) -> GatewayError:
    """404 with a Bland code naming the resource (the code is carried as the reason)."""
    return GatewayError(grpc.StatusCode.NOT_FOUND, message, code)


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
    """The version `encode_version` stored, None for a grader it did not make (no version record, or one
    that cannot be read: written natively)."""
    text = grader.llm_judge.additional_guidelines
    _, mark, record = text.rpartition(VERSION_MARK)
    if not mark or not record.endswith(VERSION_END):
        return None
    try:
        return read_stored(AgentVersion, record[: -len(VERSION_END)])
    except Unreadable:
        return None


MAX_KEY = 63  # characters of an agent's `key`


def agent_key(saved: grader_service_pb2.SavedGrader) -> str:
    """Bland's `key` of an agent, unique within the organization: its name's slug (lower-case, `-`
    between words; `agent` for a name without ASCII letters or digits), then `-` and the unique part of
    its id. The name alone gave "Empathy", "empathy!" and "EMPATHY" one key; the id, which every agent
    has from its creation on, makes it unique without reading the other agents, so a key never changes
    when another agent is created or deleted (a suffix only "when needed" would)."""
    unique = saved.id.partition("_")[2] or saved.id
    words = re.sub(r"[^a-z0-9]+", "-", saved.display_name.lower()).strip("-")
    return f"{words[: MAX_KEY - len(unique) - 1].rstrip('-') or 'agent'}-{unique}"


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
            key=agent_key(self.saved),
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

    def version_list_item(self) -> VersionListItem:
        return VersionListItem(
            **self.version_out("").model_dump(include=set(VersionListItem.model_fields)), latest_run=None
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
    version = decode_version(saved.grader) if is_owned(saved.labels, NAME) else None
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


def role_of(speaker: str) -> str:
    """The conversation role of a transcript line's `user`: the caller is the user; Bland's agent
    (`assistant`, `robot`, `agent-action`) and any other speaker are the assistant. evalsvc's roles are
    system, user, assistant and tool (a line's own `user` was stored as the role, and refused since)."""
    return speaker if speaker in ("user", "system", "tool") else "assistant"


def call_item(call: CallIn) -> item_pb2.Item:
    """A call as a dataset item: the transcript as the conversation and, rendered as text, as the
    recorded response the `provided` target hands to the judges; the call's length as the response's
    latency; every other field in the metadata (JSON values). What the item's own fields cannot say is
    kept as given in the metadata too, for `call_out` to give back: lines with fields of their own or
    speakers that are no role, and a call_length of 0 (a latency of 0 is also a latency not given)."""
    lines = call.transcripts
    content = call.concatenated_transcript or "\n".join(f"{line.user}: {line.text}" for line in lines)
    metadata = {name: json.dumps(value) for name, value in (call.model_extra or {}).items()}
    if any(line.model_extra or role_of(line.user) != line.user for line in lines):
        metadata["transcripts"] = json.dumps([line.model_dump() for line in lines])
    if call.call_length == 0:
        metadata["call_length"] = json.dumps(call.call_length)
    return item_pb2.Item(
        id=call.call_id,
        input=f"The transcript of call {call.call_id}.",
        conversation=[item_pb2.Message(role=role_of(line.user), content=line.text) for line in lines],
        response=item_pb2.Response(content=content, latency_ms=(call.call_length or 0) * 60_000),
        metadata=metadata,
    )


# The fields of a call that `call_item` keeps in the metadata when the item cannot say them.
KEPT_FIELDS = frozenset({"transcripts", "call_length"})
# The fields of a call that `call_item` keeps outside the metadata: metadata naming one was written natively.
CALL_FIELDS = frozenset(CallOut.model_fields) - KEPT_FIELDS


def call_out(item: item_pb2.Item) -> CallOut | None:
    """A stored call as it was given (the concatenated transcript is rendered when none was); None for an
    item whose metadata `call_item` did not write (a value that is not JSON, transcripts that are not
    lines, a field of the call's own): added natively, not a call."""
    if CALL_FIELDS & item.metadata.keys():
        return None
    try:
        extra: dict[str, Any] = {
            name: read_stored(JsonValue, value) for name, value in item.metadata.items() if name not in KEPT_FIELDS
        }
        given = item.metadata.get("transcripts")
        stored = read_stored(list[dict[str, JsonValue]], given) if given is not None else None
        length = item.metadata.get("call_length")
        kept_length = read_stored(float, length) if length is not None else None
    except Unreadable:
        return None
    lines = stored or [{"user": m.role, "text": m.content} for m in item.conversation]
    return CallOut(
        call_id=item.id,
        transcripts=lines,
        concatenated_transcript=item.response.content,
        call_length=item.response.latency_ms / 60_000 if item.response.latency_ms else kept_length,
        **extra,
    )


# ---------------------------------------------------------------------------------------------- runs


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
    stored = annotations_bytes(values | {A_CALL_IDS: call_ids})
    if stored + SUMMARY_RESERVE <= MAX_ANNOTATIONS_BYTES:
        values[A_CALL_IDS] = call_ids
    return values


def bland_status(run: run_pb2.Run) -> RunStatus:
    """SUCCEEDED is COMPLETE, or PARTIAL when some evaluations errored; the others keep their names."""
    if run.status == run_pb2.RUN_STATUS_SUCCEEDED and run.counts.errored:
        return "PARTIAL"
    return STATUSES.get(run.status, "PENDING")


def call_result_id(first: run_pb2.Result) -> str:
    """A call result's id: a UUID, as Bland's are, derived from its first result (evalsvc has no call
    result of its own). A list finds its cursor by reading from the start, so the id need not be read
    back into an evalsvc id."""
    return derived_uuid("bland.call_result", first.run_id, first.id)


@dataclass(frozen=True)
class Verdict:
    """One result read the Bland way."""

    result: run_pb2.Result
    level_key: str | None
    reason: str
    target_match: bool

    @property
    def id(self) -> str:
        """The agent result's id: a UUID derived from the result's, as for call results."""
        return derived_uuid("bland.agent_result", self.result.run_id, self.result.id)

    @property
    def failed(self) -> bool:
        return self.result.state == run_pb2.RESULT_STATE_ERROR


@dataclass
class CallGroup:
    """One call's results (a job records all its graders' results together, so they are adjacent)."""

    call_id: str
    id: str  # the call result's id (`call_result_id` of its first result)
    verdicts: list[Verdict] = field(default_factory=list)


CHOSE = re.compile(r"^judge chose level (?P<key>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"): (?P<reason>.*)$", re.S)


@dataclass(frozen=True)
class RunView:
    """A run's Bland fields: its annotations (`run_annotations`, and the summary `Bland.summary` keeps)
    read back, and its agents' version snapshots."""

    run: run_pb2.Run
    agents: dict[str, SubmittedAgent]
    versions: dict[str, AgentVersion]
    mode: RunMode = "text"
    metadata: dict[str, str] = field(default_factory=dict)
    call_ids: list[str] | None = None  # None when the run could not keep them (`run_annotations`)
    kept_summary: Summary | None = None  # kept once the run has ended (`Bland.summary`)

    @classmethod
    def of(cls, run: run_pb2.Run) -> Self | None:
        """The Bland run a run of this dialect stands for; None when one of its Bland fields cannot be read
        (written natively into something else): not a Bland run, as a run without the label is not. An
        absent field has its default (a run labelled natively, without them, reads as one)."""
        values = run.annotations
        try:
            agents = read_stored(list[SubmittedAgent], values.get(A_AGENTS, "[]"))
            mode: RunMode = read_stored(RunMode, values.get(A_MODE, "text"), as_json=False)
            metadata = read_stored(dict[str, str], values.get(A_METADATA, "{}"))
            call_ids = read_stored(list[str], values[A_CALL_IDS]) if A_CALL_IDS in values else None
            summary = read_stored(Summary, values[A_SUMMARY]) if A_SUMMARY in values else None
        except Unreadable:
            return None
        versions = {g.name: v for g in run.graders if (v := decode_version(g)) is not None}
        return cls(run, {a.eval_agent_id: a for a in agents}, versions, mode, metadata, call_ids, summary)

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
            run_mode=self.mode,
            resolved_call_count=run.counts.total_items,
            resolved_agent_count=len(run.graders),
            resolved_atom_count=run.counts.total_evaluations,
            completed_atom_count=run.counts.completed_evaluations,
            summary=summary,
            billable_cost_usd=run.cost_usd if done else None,
            workbench_setup_id=run.annotations.get(A_SETUP),
            workbench_setup_version_id=run.annotations.get(A_SETUP_VERSION),
            metadata=self.metadata,
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
            id=verdict.id,
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
