"""Vogent's AI eval API (https://docs.vogent.ai/api-reference, base `https://api.vogent.ai/api`) on evalsvc.

Vogent evaluates a call agent against an *eval config*: a set of *records* (a linked dial, or a
prompt that drives a simulated caller), judged against the config's prompt snippet. Here an eval
config is an evalsvc dataset, a record is one of its items (every record field kept in the item's
metadata), a call agent is a saved target (created natively with `POST /v1/targets`), and a run is an
evalsvc run over the dataset with one binary criteria judge whose criteria is the prompt snippet,
graded by the server's default judge. Vendor fields with no evalsvc field (promptSnippet,
versionedPromptId, callAgentId) are kept in dataset and run annotations.

Everything the dialect creates carries the label `dialect=vogent`; what does not is not found here.
Vogent documents no error body, so errors are evalsvc's choice: `{"error": {code, message, reason,
fieldViolations}}` with 400 for invalid input, 401, 404 and 422 for a request that does not match the
documented shape. See docs/dialects/vogent.md.
"""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Generic, TypeVar

import grpc
from fastapi import Depends, Query, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRouter
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from evalsvc.errors import Reason
from evalsvc.gateway.dialects.base import (
    MAX_INT32,
    MAX_PAGE_SIZE,
    Dialect,
    DialectClient,
    DialectOptions,
    Int32,
    Unreadable,
    VendorOptions,
    bearer_key,
    iso,
    judge_reason,
    read_stored,
)
from evalsvc.gateway.upstream import Caller, GatewayError
from evalsvc.v1 import (
    dataset_service_pb2,
    eval_run_service_pb2,
    grader_pb2,
    item_pb2,
    run_pb2,
    target_pb2,
)

NAME = "vogent"
DEFAULT_LIMIT = 100  # Vogent's documented default page size
MAX_LIMIT = MAX_PAGE_SIZE
DEFAULT_MAX_TURNS = 20  # Vogent's documented default for PROMPT records
GRADER = "promptSnippet"
DEFAULT_CRITERIA = "The call agent handles the caller's request correctly, helpfully and politely."

# Vendor fields kept in annotations (dataset: the config's snippet; run: what the run was asked for).
SNIPPET = "promptSnippet"
VERSIONED_PROMPT = "versionedPromptId"
CALL_AGENT = "callAgentId"
CREATED_AT = "createdAt"  # item metadata: when the record was created (items have no timestamp)

# evalsvc field names in violations -> the Vogent fields they came from.
VENDOR_FIELDS = {
    "dataset.display_name": "name",
    "dataset.annotations": SNIPPET,
    "display_name": "name",
    "item_ids": "evalRecordIds",
    "dataset_id": "id",
    "target": CALL_AGENT,
    "page_token": "cursor",
    "page_size": "limit",
}

T = TypeVar("T")


class Model(BaseModel):
    """Vogent's JSON is camelCase; Python attributes stay snake_case."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


DateTime = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


class AIEvalRecordType(StrEnum):
    DIAL = "DIAL"
    PROMPT = "PROMPT"


class AIEvalRunStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


STATUS = {
    run_pb2.RUN_STATUS_PENDING: AIEvalRunStatus.PENDING,
    run_pb2.RUN_STATUS_RUNNING: AIEvalRunStatus.RUNNING,
    run_pb2.RUN_STATUS_SUCCEEDED: AIEvalRunStatus.SUCCESS,
    run_pb2.RUN_STATUS_FAILED: AIEvalRunStatus.FAILED,
    run_pb2.RUN_STATUS_CANCELLED: AIEvalRunStatus.CANCELLED,
}


# --- requests ---


class CreateAIEvalConfigInput(Model):
    name: str = Field(min_length=1)
    prompt_snippet: str | None = None


class CreateAIEvalRecordInput(Model):
    record_type: AIEvalRecordType
    dial_id: str | None = None
    name: str | None = None
    description: str | None = None
    system_prompt: str | None = None
    max_turns: int | None = Field(default=None, ge=1, le=MAX_INT32)
    agent_inputs: str | None = Field(default=None, description="JSON object of agent variables")


class RunEvalInput(Model):
    versioned_prompt_id: str = Field(min_length=1)
    call_agent_id: str = Field(min_length=1, description="A saved target's id (POST /v1/targets)")
    eval_record_ids: list[str] = Field(default_factory=list)


# --- responses ---


class AIEvalConfig(Model):
    id: str
    name: str
    prompt_snippet: str | None


class AIEvalPrompt(Model):
    id: str
    system_prompt: str | None
    max_turns: int | None
    created_at: DateTime | None
    name: str | None
    description: str | None
    agent_inputs: str | None


class AIEvalRecord(Model):
    id: str
    record_type: AIEvalRecordType
    dial_id: str | None
    prompt: AIEvalPrompt | None


class AIEvalAggregateResult(Model):
    num_failing: int
    num_passing: int


class AIEvalRun(Model):
    id: str
    status: AIEvalRunStatus
    call_agent_id: str
    versioned_prompt_id: str
    created_at: DateTime
    aggregate_result: AIEvalAggregateResult


class AIEvalResultItem(Model):
    index: int
    accurate: bool
    model_output: str | None
    reason: str | None


class AIEvalFunctionCall(Model):
    name: str
    args: str
    function_call_id: str | None


class AIEvalNodeTransition(Model):
    to_node_id: str | None
    transition_data: dict[str, Any]


class AIEvalTranscriptEntry(Model):
    text: str
    speaker: str
    detail_type: str | None
    function_call_id: str | None
    start_time_ms: int | None
    end_time_ms: int | None
    function_calls: list[AIEvalFunctionCall]
    node_transition: AIEvalNodeTransition | None


class AIEvalSimulationMetadata(Model):
    total_turns: int
    end_reason: str | None
    simulation_duration_ms: int
    num_input_tokens: int
    num_cached_input_tokens: int
    num_output_tokens: int


class AIEvalRunResult(Model):
    id: str
    eval_run_id: str
    record: AIEvalRecord
    num_alerts: int
    results: list[AIEvalResultItem]
    transcript: list[AIEvalTranscriptEntry]
    created_at: DateTime | None
    simulation_metadata: AIEvalSimulationMetadata


class AIEvalPage(Model, Generic[T]):
    """Vogent's list envelope: `cursor` is null on the last page."""

    data: list[T]
    cursor: str | None


class AIEvalFieldViolation(Model):
    field: str
    description: str


class AIEvalErrorDetail(Model):
    code: str = Field(description="The gRPC status code's name, e.g. NOT_FOUND")
    message: str
    reason: str | None = Field(description="evalsvc's machine-readable reason, e.g. TARGET_NOT_FOUND")
    field_violations: list[AIEvalFieldViolation]


class AIEvalError(Model):
    error: AIEvalErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": AIEvalError, "description": "Invalid input"},
    401: {"model": AIEvalError, "description": "Missing or unknown API key"},
    404: {"model": AIEvalError, "description": "No such eval config, record or run"},
    413: {"model": AIEvalError, "description": "The request body is over the gateway's limits"},
    422: {"model": AIEvalError, "description": "Validation exception (the request does not match the schema)"},
    431: {"model": AIEvalError, "description": "The request's headers are over the gateway's limit"},
}


# --- errors and auth ---


def vendor_field(field: str) -> str:
    """The Vogent name of a field a violation names (`item_ids[2]` -> `evalRecordIds[2]`)."""
    for ours, theirs in VENDOR_FIELDS.items():
        if field == ours or field.startswith((ours + "[", ours + ".")):
            return theirs + field[len(ours) :]
    return field


def vendor_message(message: str, violations: list[tuple[str, str]]) -> str:
    """The message with the fields it names in Vogent's words, as in the violations: evalsvc's message of
    an INVALID_ARGUMENT names its bad fields (`invalid request: item_ids[0]`). Only the violations'
    fields are renamed, and only where they stand as a whole path, so prose is left as it is."""
    for field in sorted({f for f, _ in violations}, key=len, reverse=True):
        renamed = vendor_field(field)
        if renamed != field:
            literal = renamed.replace("\\", "\\\\")  # a replacement template: its backslashes are escapes
            message = re.sub(rf"(?<![\w.]){re.escape(field)}(?![\w\[.])", literal, message)
    return message


def render(error: GatewayError) -> JSONResponse:
    """Every failure as `{"error": {...}}` with the HTTP status of its gRPC code (422 for shape errors).
    A body over the gateway's limit is the request's own fault, INVALID_ARGUMENT as the dialect's other 413
    (too many JSON values) says, not the retryable quota its gRPC code (RESOURCE_EXHAUSTED) reads as."""
    code = grpc.StatusCode.INVALID_ARGUMENT if error.reason == Reason.BODY_TOO_LARGE else error.code
    body = AIEvalError(
        error=AIEvalErrorDetail(
            code=code.name,
            message=vendor_message(error.message, error.violations),
            reason=error.reason or None,
            field_violations=[AIEvalFieldViolation(field=vendor_field(f), description=d) for f, d in error.violations],
        )
    )
    return JSONResponse(status_code=error.http_status, content=body.model_dump(by_alias=True))


_bearer = HTTPBearer(auto_error=False, scheme_name="bearerAuth", description="`Bearer <evalsvc API key>`")


def caller(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Caller:
    """The evalsvc API key from `Authorization: Bearer` (the HTTPBearer dependency documents the scheme)."""
    return bearer_key(request)


# Vogent documents a default (100) and no maximum, so a larger limit is read as evalsvc's largest page rather
# than refused; the page's cursor leads to the rest.
Limit = Annotated[
    int,
    Query(ge=1, description=f"The maximum number of items to fetch (more than {MAX_LIMIT} fetches {MAX_LIMIT})"),
    AfterValidator(lambda limit: min(limit, MAX_LIMIT)),
]
Cursor = Annotated[str | None, Query(description="The pagination cursor returned by the previous request")]


# --- translation ---


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def config_out(dataset: dataset_service_pb2.Dataset) -> AIEvalConfig:
    return AIEvalConfig(id=dataset.id, name=dataset.display_name, prompt_snippet=dataset.annotations.get(SNIPPET))


def check_record(record: CreateAIEvalRecordInput) -> None:
    """Vogent's conditional rules: DIAL needs dialId; PROMPT needs systemPrompt, and its agentInputs (the
    agent's variables) must be a JSON object. A DIAL record's prompt fields are only stored."""
    if record.record_type is AIEvalRecordType.DIAL and not record.dial_id:
        raise GatewayError.invalid("dialId is required for a DIAL record", ("dialId", "required for DIAL"))
    if record.record_type is AIEvalRecordType.PROMPT and not record.system_prompt:
        raise GatewayError.invalid(
            "systemPrompt is required for a PROMPT record", ("systemPrompt", "required for PROMPT")
        )
    if record.record_type is AIEvalRecordType.PROMPT and record.agent_inputs is not None:
        try:
            parsed = json.loads(record.agent_inputs)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise GatewayError.invalid(
                "agentInputs must be a JSON object", ("agentInputs", "not a JSON object of key-value pairs")
            )


def item_in(record: CreateAIEvalRecordInput) -> item_pb2.Item:
    """The dataset item of a record: every given field in metadata; the prompt (or the dial id) is the input
    the call agent answers; agentInputs is the item's context."""
    fields = record.model_dump(by_alias=True, exclude_none=True, mode="json")
    if record.record_type is AIEvalRecordType.PROMPT:
        fields.setdefault("maxTurns", DEFAULT_MAX_TURNS)
    metadata = {key: str(value) for key, value in fields.items()} | {CREATED_AT: now_iso()}
    text = record.system_prompt if record.record_type is AIEvalRecordType.PROMPT else record.dial_id
    return item_pb2.Item(input=text or "", context=record.agent_inputs or "", metadata=metadata)


def record_out(item: item_pb2.Item) -> AIEvalRecord | None:
    """A record from its item; None for an item whose Vogent fields cannot be read (a recordType that is
    neither DIAL nor PROMPT, a maxTurns that is not a number: written natively), which is not a record
    of the config, as every dialect reads a record it did not write (docs/dialects.md). An item added
    natively without them reads as a PROMPT of its input (an absent field has its default)."""
    try:
        return read_record(item)
    except Unreadable:
        return None


def read_record(item: item_pb2.Item) -> AIEvalRecord:
    """`record_out`, Unreadable when the item's Vogent fields cannot be read."""
    meta = item.metadata
    record_type = AIEvalRecordType.PROMPT
    if "recordType" in meta:
        record_type = read_stored(AIEvalRecordType, meta["recordType"], as_json=False)
    max_turns = read_stored(Int32, meta["maxTurns"], as_json=False) if "maxTurns" in meta else None
    prompt_keys = ("systemPrompt", "name", "description", "maxTurns", "agentInputs")
    prompt = None
    if record_type is AIEvalRecordType.PROMPT or any(key in meta for key in prompt_keys):
        default_prompt = item.input if record_type is AIEvalRecordType.PROMPT else None
        prompt = AIEvalPrompt(
            id=item.id,
            system_prompt=meta.get("systemPrompt", default_prompt),
            max_turns=max_turns,
            created_at=meta.get(CREATED_AT),
            name=meta.get("name"),
            description=meta.get("description"),
            agent_inputs=meta.get("agentInputs"),
        )
    return AIEvalRecord(id=item.id, record_type=record_type, dial_id=meta.get("dialId"), prompt=prompt)


def matches(item: item_pb2.Item, search: str) -> bool:
    """Vogent's `search` on records ("record names or IDs"): a case-insensitive substring of the record's
    id, name, description, prompt or dial id."""
    needle = search.casefold()
    meta = item.metadata
    texts = (item.id, *(meta.get(key, "") for key in ("name", "description", "systemPrompt", "dialId")))
    return any(needle in text.casefold() for text in texts)


def result_not_served(result_id: str) -> GatewayError:
    """getEvalResult (`GET /eval_results/{id}`), answered as every route no dialect serves (404,
    ROUTE_NOT_FOUND) in Vogent's envelope, saying where results are read: evalsvc finds a
    result only by paging through its run's results (ListRunResults, by id, with opaque signed page tokens;
    there is no get-one-result call), so a result id, even one that named its run, could be found only by
    reading up to the whole run (100,000 items by default, each page reading its outputs)."""
    return GatewayError(
        grpc.StatusCode.NOT_FOUND,
        f"no route for GET /api/eval_results/{result_id}: getEvalResult is not served by this gateway (evalsvc "
        "reads a result only with its run's results); list them with GET /api/eval_runs/{evalRunId}/results",
        Reason.ROUTE_NOT_FOUND,
    )


def run_out(run: run_pb2.Run) -> AIEvalRun:
    return AIEvalRun(
        id=run.id,
        status=STATUS.get(run.status, AIEvalRunStatus.PENDING),
        call_agent_id=run.annotations.get(CALL_AGENT, ""),
        versioned_prompt_id=run.annotations.get(VERSIONED_PROMPT, ""),
        created_at=iso(run.create_time) or "",
        aggregate_result=AIEvalAggregateResult(num_failing=run.counts.failed, num_passing=run.counts.passed),
    )


def transcript_of(item: item_pb2.Item, output: item_pb2.Response) -> list[AIEvalTranscriptEntry]:
    """The one exchange evalsvc performs: the record's prompt as the caller's turn, the agent's reply."""
    calls = [
        AIEvalFunctionCall(name=call.name, args=json.dumps(dict(call.arguments)), function_call_id=None)
        for call in output.tool_calls
    ]
    turns = [("user", item.input, []), ("agent", output.content, calls)]
    return [
        AIEvalTranscriptEntry(
            text=text,
            speaker=speaker,
            detail_type=None,
            function_call_id=None,
            start_time_ms=None,
            end_time_ms=None,
            function_calls=function_calls,
            node_transition=None,
        )
        for speaker, text, function_calls in turns
    ]


def result_out(result: run_pb2.Result, item: item_pb2.Item, grader_index: int) -> AIEvalRunResult:
    """One record's result: its verdict, the agent's reply as the transcript, and the call's usage. Its
    record is shown by its id alone, as one deleted from the config, when its fields cannot be read."""
    output = result.output
    accurate = result.state == run_pb2.RESULT_STATE_PASSED
    return AIEvalRunResult(
        id=result.id,
        eval_run_id=result.run_id,
        record=record_out(item) or read_record(item_pb2.Item(id=item.id)),
        num_alerts=0 if accurate else 1,
        results=[
            AIEvalResultItem(
                index=grader_index,
                accurate=accurate,
                model_output=output.content,
                reason=judge_reason(result.explanation) or result.error_reason or None,
            )
        ],
        transcript=transcript_of(item, output),
        created_at=iso(result.complete_time),
        simulation_metadata=AIEvalSimulationMetadata(
            total_turns=1,
            end_reason=result.error_reason or None,
            simulation_duration_ms=round(output.latency_ms),
            num_input_tokens=output.prompt_tokens,
            num_cached_input_tokens=0,
            num_output_tokens=output.completion_tokens,
        ),
    )


class Vogent(DialectClient):
    """The evalsvc calls behind Vogent's routes, made as one caller."""

    async def _owned(self, method: Any, request: Any, resource: str, noun: str) -> Any:
        """`resource` of a Get call's response: one this dialect created. A missing one, one without the
        dialect's label, or a run deleted natively (Vogent has no deletion) is NOT_FOUND in Vogent's words."""
        missing = GatewayError.not_found(f"{noun} {getattr(request, f'{resource}_id')!r} not found")
        live = (lambda run: not run.HasField("delete_time")) if resource == "run" else (lambda _: True)
        return await self.owned(method, request, resource, missing, accept=live)

    async def config(self, config_id: str) -> dataset_service_pb2.Dataset:
        """The eval config: a dataset this dialect created."""
        request = dataset_service_pb2.GetDatasetRequest(dataset_id=config_id)
        found: dataset_service_pb2.Dataset = await self._owned(
            self.upstream.datasets.GetDataset, request, "dataset", "eval config"
        )
        return found

    async def run(self, run_id: str) -> run_pb2.Run:
        """The eval run: a run this dialect created."""
        request = eval_run_service_pb2.GetRunRequest(run_id=run_id)
        found: run_pb2.Run = await self._owned(self.upstream.runs.GetRun, request, "run", "eval run")
        return found

    async def create_config(self, body: CreateAIEvalConfigInput) -> AIEvalConfig:
        annotations = {SNIPPET: body.prompt_snippet} if body.prompt_snippet is not None else {}
        dataset = dataset_service_pb2.Dataset(display_name=body.name, labels=self.labels, annotations=annotations)
        request = dataset_service_pb2.CreateDatasetRequest(dataset=dataset)
        created = await self.call(self.upstream.datasets.CreateDataset, request)
        return config_out(created.dataset)

    async def list_configs(self, limit: int, cursor: str | None) -> AIEvalPage[AIEvalConfig]:
        request = dataset_service_pb2.ListDatasetsRequest()
        found, next_cursor = await self.page(
            self.upstream.datasets.ListDatasets, request, "datasets", limit, cursor, lambda d: self.owns(d.labels)
        )
        return AIEvalPage[AIEvalConfig](data=[config_out(d) for d in found], cursor=next_cursor)

    async def create_record(self, config_id: str, body: CreateAIEvalRecordInput) -> AIEvalRecord:
        check_record(body)
        await self.config(config_id)
        item = item_in(body)
        request = dataset_service_pb2.AddDatasetItemsRequest(dataset_id=config_id, items=[item])
        added = await self.call(self.upstream.datasets.AddDatasetItems, request)
        item.id = added.item_ids[0]
        return read_record(item)  # as `item_in` wrote it: readable

    async def list_records(
        self, config_id: str, limit: int, cursor: str | None, search: str
    ) -> AIEvalPage[AIEvalRecord]:
        await self.config(config_id)
        request = dataset_service_pb2.ListDatasetItemsRequest(dataset_id=config_id)
        found, next_cursor = await self.page(
            self.upstream.datasets.ListDatasetItems,
            request,
            "items",
            limit,
            cursor,
            lambda item: record_out(item) is not None and (not search or matches(item, search)),
        )
        records = [read_record(item) for item in found]  # each kept one was read
        return AIEvalPage[AIEvalRecord](data=records, cursor=next_cursor)

    async def create_run(self, config_id: str, body: RunEvalInput) -> AIEvalRun:
        config = await self.config(config_id)
        judge = grader_pb2.LlmJudge(
            mode=grader_pb2.LlmJudge.MODE_CRITERIA,
            scoring=grader_pb2.LlmJudge.SCORING_BINARY,
            criteria=config.annotations.get(SNIPPET) or DEFAULT_CRITERIA,
        )
        request = eval_run_service_pb2.CreateRunRequest(
            dataset_id=config.id,
            item_ids=body.eval_record_ids,
            target=target_pb2.Target(saved_target_id=body.call_agent_id),
            graders=[grader_pb2.Grader(name=GRADER, llm_judge=judge)],
            display_name=config.display_name,
            labels=self.labels,
            annotations={VERSIONED_PROMPT: body.versioned_prompt_id, CALL_AGENT: body.call_agent_id},
        )
        try:
            created = await self.call(self.upstream.runs.CreateRun, request)
        except GatewayError as error:  # the service names a saved target; Vogent calls it a call agent
            if error.reason == Reason.TARGET_NOT_FOUND:
                raise GatewayError.not_found(f"call agent {body.call_agent_id!r} not found") from None
            raise
        return run_out(created.run)

    async def list_runs(self, config_id: str, limit: int, cursor: str | None) -> AIEvalPage[AIEvalRun]:
        await self.config(config_id)
        request = eval_run_service_pb2.ListRunsRequest(dataset_id=config_id, labels=self.labels)
        found, next_cursor = await self.page(self.upstream.runs.ListRuns, request, "runs", limit, cursor)
        return AIEvalPage[AIEvalRun](data=[run_out(run) for run in found], cursor=next_cursor)

    async def cancel_run(self, run_id: str) -> AIEvalRun:
        """CancelRun; a run that has ended is a FAILED_PRECONDITION naming its status as Vogent does (the
        service's message named evalsvc's, RUN_STATUS_SUCCEEDED)."""
        await self.run(run_id)
        request = eval_run_service_pb2.CancelRunRequest(run_id=run_id)
        try:
            return run_out((await self.call(self.upstream.runs.CancelRun, request)).run)
        except GatewayError as error:
            if error.reason != Reason.RUN_ALREADY_FINISHED:
                raise
            ended = run_out(await self.run(run_id)).status
            raise dataclasses.replace(error, message=f"eval run {run_id!r} already finished as {ended}") from None

    async def list_results(self, run_id: str, limit: int, cursor: str | None) -> AIEvalPage[AIEvalRunResult]:
        run = await self.run(run_id)
        request = eval_run_service_pb2.ListRunResultsRequest(run_id=run_id)
        found, next_cursor = await self.page(self.upstream.runs.ListRunResults, request, "results", limit, cursor)
        items = await self._items(run.dataset_id) if found else {}
        position = {grader.name: i for i, grader in enumerate(run.graders)}
        data = [
            result_out(r, items.get(r.item_id) or item_pb2.Item(id=r.item_id), position.get(r.grader, 0)) for r in found
        ]
        return AIEvalPage[AIEvalRunResult](data=data, cursor=next_cursor)

    async def _items(self, dataset_id: str) -> dict[str, item_pb2.Item]:
        """The config's records by id, to show each result's record."""
        request = dataset_service_pb2.ListDatasetItemsRequest(dataset_id=dataset_id)
        items = await self.collect(self.upstream.datasets.ListDatasetItems, request, "items")
        return {item.id: item for item in items}


def routes(api: APIRouter, client: Any, options: DialectOptions) -> None:
    """Vogent's eval routes, relative to its base path `/api`."""

    @api.post("/eval_configs", response_model=AIEvalConfig, operation_id="createEvalConfig")
    async def create_eval_config(body: CreateAIEvalConfigInput, vogent: Vogent = client) -> AIEvalConfig:
        """Creates an AI evaluation configuration (an evalsvc dataset)."""
        return await vogent.create_config(body)

    @api.get("/eval_configs", response_model=AIEvalPage[AIEvalConfig], operation_id="listEvalConfigs")
    async def list_eval_configs(
        vogent: Vogent = client, limit: Limit = DEFAULT_LIMIT, cursor: Cursor = None
    ) -> AIEvalPage[AIEvalConfig]:
        """Lists the eval configs created through this API, newest first."""
        return await vogent.list_configs(limit, cursor)

    @api.get("/eval_configs/{id}", response_model=AIEvalConfig, operation_id="getEvalConfig")
    async def get_eval_config(id: str, vogent: Vogent = client) -> AIEvalConfig:
        """Gets an eval config."""
        return config_out(await vogent.config(id))

    @api.post("/eval_configs/{id}/records", response_model=AIEvalRecord, operation_id="createEvalConfigRecord")
    async def create_eval_config_record(
        id: str, body: CreateAIEvalRecordInput, vogent: Vogent = client
    ) -> AIEvalRecord:
        """Adds a DIAL or PROMPT record (a dataset item) to an eval config."""
        return await vogent.create_record(id, body)

    @api.get(
        "/eval_configs/{id}/records", response_model=AIEvalPage[AIEvalRecord], operation_id="listEvalConfigRecords"
    )
    async def list_eval_config_records(
        id: str, vogent: Vogent = client, limit: Limit = DEFAULT_LIMIT, cursor: Cursor = None, search: str = ""
    ) -> AIEvalPage[AIEvalRecord]:
        """Lists an eval config's records in the order they were added, optionally filtered by `search`."""
        return await vogent.list_records(id, limit, cursor, search)

    @api.post("/eval_configs/{id}/runs", response_model=AIEvalRun, operation_id="runEval")
    async def run_eval(id: str, body: RunEvalInput, vogent: Vogent = client) -> AIEvalRun:
        """Starts a run of the call agent (a saved target) over the config's records, or `evalRecordIds`."""
        return await vogent.create_run(id, body)

    @api.get("/eval_configs/{id}/runs", response_model=AIEvalPage[AIEvalRun], operation_id="listEvalConfigRuns")
    async def list_eval_config_runs(
        id: str, vogent: Vogent = client, limit: Limit = DEFAULT_LIMIT, cursor: Cursor = None
    ) -> AIEvalPage[AIEvalRun]:
        """Lists an eval config's runs, newest first."""
        return await vogent.list_runs(id, limit, cursor)

    @api.get("/eval_runs/{id}", response_model=AIEvalRun, operation_id="getEvalRun")
    async def get_eval_run(id: str, vogent: Vogent = client) -> AIEvalRun:
        """Gets an eval run."""
        return run_out(await vogent.run(id))

    @api.post("/eval_runs/{id}/cancel", response_model=AIEvalRun, operation_id="cancelEvalRun")
    async def cancel_eval_run(id: str, vogent: Vogent = client) -> AIEvalRun:
        """Cancels a pending or running eval run (400 FAILED_PRECONDITION once it has finished)."""
        return await vogent.cancel_run(id)

    @api.get("/eval_runs/{id}/results", response_model=AIEvalPage[AIEvalRunResult], operation_id="listEvalRunResults")
    async def list_eval_run_results(
        id: str, vogent: Vogent = client, limit: Limit = DEFAULT_LIMIT, cursor: Cursor = None
    ) -> AIEvalPage[AIEvalRunResult]:
        """Lists an eval run's results, one per evaluated record, in the run's order (by result id)."""
        return await vogent.list_results(id, limit, cursor)

    # Documented by Vogent (getEvalResult) and not served: in Vogent's envelope, not the native 404 of a path
    # `/api` that Omni and Vogent share. Left out of the OpenAPI document, which lists served routes.
    @api.get("/eval_results/{id}", include_in_schema=False)
    async def get_eval_result(id: str) -> None:
        raise result_not_served(id)


DIALECT = Dialect(
    name=NAME,
    title="Vogent AI Evals",
    prefix="/api",
    client=Vogent,
    routes=routes,
    vendor=VendorOptions(error_handler=render, caller=caller, error_responses=ERROR_RESPONSES),
)
