"""Omni AI Eval (https://docs.omni.co/api/ai-eval) in front of evalsvc.

Omni's prompt sets are evalsvc datasets (one item per prompt) and its eval runs are evalsvc runs of a
prompt set's items. Each run goes through the saved target named by the set's `model_id` and is judged
by the server's default LLM judge in accuracy mode. Omni's judge is binary, so a prompt scores 1 when
its result passed and 0 when it failed. Everything this dialect creates carries the label
`dialect=omni`. A prompt set or run without that label is "not found" here, so an Omni client sees
only its own. Every id Omni documents as a UUID is one here: evalsvc's ids are shown in their UUID
form (`uuids.to_uuid`) and read back at the edge, so the service keeps one id scheme. The mapping, and
what is approximated, is in docs/dialects/omni.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import grpc
from fastapi import Query
from fastapi.responses import JSONResponse
from fastapi.routing import APIRouter
from google.protobuf import timestamp_pb2
from pydantic import BaseModel, Field

from evalsvc.errors import Reason
from evalsvc.gateway.dialects.base import Dialect, DialectClient, DialectOptions, VendorOptions, iso
from evalsvc.gateway.dialects.uuids import derived_uuid, from_uuid, to_uuid
from evalsvc.gateway.upstream import GatewayError
from evalsvc.limits import ACTIVE_RUNS_RETRY_AFTER_S
from evalsvc.v1 import dataset_service_pb2 as ds_pb
from evalsvc.v1 import eval_run_service_pb2 as run_svc
from evalsvc.v1 import grader_pb2, item_pb2, run_pb2, target_pb2
from evalsvc.v1 import target_service_pb2 as target_svc

NAME = "omni"
MODEL_LABEL = "model_id"  # a prompt set's model (an evalsvc saved target id), as a dataset label
SLUG_KEY = "slug"  # a prompt set's slug, as a dataset annotation (slugs may be longer than a label value)
BRANCH_KEY = "branch_id"  # run_config.branch_id, as a run annotation
CREATED_KEY = "created_at"  # when a prompt was added, as item metadata (items have no timestamps)
MAX_PROMPTS = 25
MAX_RUNS_IN_FLIGHT = 2  # SKILL.md: "at most 2 eval runs in flight at once", else 429

RunState = Literal["RUNNING", "COMPLETE", "CANCELLED"]
JobState = Literal["QUEUED", "EXECUTING", "COMPLETE", "FAILED"]
ACTIVE = (run_pb2.RUN_STATUS_PENDING, run_pb2.RUN_STATUS_RUNNING)
STATUS: dict[int, RunState] = {
    run_pb2.RUN_STATUS_PENDING: "RUNNING",
    run_pb2.RUN_STATUS_RUNNING: "RUNNING",
    run_pb2.RUN_STATUS_SUCCEEDED: "COMPLETE",
    # SKILL.md's terminal statuses are COMPLETE and CANCELLED, and an Omni run is COMPLETE once every
    # prompt's job has ended, COMPLETE or FAILED: a run whose prompts all errored (or that stopped on an
    # error) is COMPLETE, each row's agentic_job.state FAILED with its error_reason. A FAILED status, which
    # Omni does not document, kept a poller waiting for COMPLETE or CANCELLED polling for ever.
    run_pb2.RUN_STATUS_FAILED: "COMPLETE",
    run_pb2.RUN_STATUS_CANCELLED: "CANCELLED",
}
# Omni's judge reads the whole answer and fails only material errors; with no expectation it judges
# the answer on its own terms. An accuracy judge with these guidelines asks the same of evalsvc's judge.
JUDGE = grader_pb2.Grader(
    name="accuracy",
    llm_judge=grader_pb2.LlmJudge(
        mode=grader_pb2.LlmJudge.MODE_ACCURACY,
        additional_guidelines=(
            "Ignore wording and formatting. Score low only for a material divergence from the expected "
            "output (wrong numbers, wrong direction, a missing required result). When the expected output "
            "is empty, score whether the response correctly answers the input on its own terms."
        ),
    ),
)


# --- Omni's request and response bodies ---------------------------------------------------------


class OmniErrorBody(BaseModel):
    """Omni's error envelope (ApiError400/401/403/404 of Omni's OpenAPI)."""

    detail: str
    status: int


class OmniPromptIn(BaseModel):
    prompt_text: str = Field(min_length=1, max_length=8000)
    expectation: str | None = Field(default=None, max_length=16000)


class OmniPromptPatch(OmniPromptIn):
    id: str | None = Field(default=None, description="An existing prompt's id; omit it for a new prompt.")


class OmniPromptSetCreate(BaseModel):
    model_id: str = Field(
        min_length=1, description="The model that answers: an evalsvc saved target, by its UUID or its evalsvc id."
    )
    name: str = Field(min_length=1, max_length=255)
    slug: str = Field(max_length=255, pattern=r"^[a-z][a-z0-9-]*$")
    description: str | None = Field(default=None, max_length=1024)
    prompts: list[OmniPromptIn] = Field(default_factory=list, max_length=MAX_PROMPTS)


class OmniPromptSetPatch(BaseModel):
    name: str | None = Field(default=None, min_length=1, max_length=255)
    description: str | None = Field(default=None, max_length=1024)
    prompts: list[OmniPromptPatch] | None = Field(default=None, max_length=MAX_PROMPTS)


class OmniPrompt(BaseModel):
    id: str
    prompt_text: str
    expectation: str | None
    created_at: str
    updated_at: str


class OmniPromptSetFields(BaseModel):
    id: str
    model_id: str
    name: str
    slug: str
    description: str | None
    is_archived: bool
    created_at: str
    updated_at: str


class OmniPromptSet(OmniPromptSetFields):
    prompts: list[OmniPrompt]


class OmniPromptSetSummary(OmniPromptSetFields):
    latest_run_at: str | None
    prompt_count: int


class OmniPromptSetEnvelope(BaseModel):
    prompt_set: OmniPromptSet


class OmniPromptSetList(BaseModel):
    prompt_sets: list[OmniPromptSetSummary]


class OmniRunConfig(BaseModel):
    branch_id: str | None = None


class OmniRunCreate(BaseModel):
    prompt_set_id: str = Field(min_length=1)
    description: str | None = Field(default=None, max_length=1024)
    run_config: OmniRunConfig | None = None


class OmniAgenticJob(BaseModel):
    id: str = Field(description="A stable UUID of this prompt's job in this run, from the run's creation on.")
    conversation_id: str = Field(description="A stable UUID of this prompt's conversation in this run.")
    state: JobState


class OmniRunResult(BaseModel):
    id: str
    prompt: str
    score: int | None = Field(description="1 when the judge passed the answer, 0 when it failed it; null otherwise.")
    cost: float | None
    scoring_cost: float | None
    timing_ms: int | None
    error_reason: str | None
    agentic_job: OmniAgenticJob


class OmniRunFields(BaseModel):
    id: str
    prompt_set_id: str
    model_id: str
    branch_id: str | None
    branch_name: str | None
    description: str | None
    run_number: int
    status: RunState
    is_archived: bool
    created_at: str
    completed_at: str | None


class OmniRun(OmniRunFields):
    results: list[OmniRunResult]


class OmniRunStats(BaseModel):
    terminal: int
    total: int


class OmniRunListItem(OmniRunFields):
    stats: OmniRunStats


class OmniRunCreated(BaseModel):
    job_count: int
    run: OmniRun


class OmniRunEnvelope(BaseModel):
    run: OmniRun


class OmniRunList(BaseModel):
    runs: list[OmniRunListItem]


class OmniRunCancelled(BaseModel):
    cancelled: int
    run: OmniRun
    total: int


class OmniRunArchived(BaseModel):
    is_archived: Literal[True]


class OmniRunUnarchived(BaseModel):
    """Omni's restore-an-archived-eval-run answer: always false on success."""

    is_archived: Literal[False]


# --- errors ---------------------------------------------------------------------------------------


# evalsvc field paths in the service's violations -> the Omni fields they came from (the first that matches).
# A prompt set is a dataset (its slug an annotation, its model a label) and its prompts are items, added in
# the order sent (`items[i]` is `prompts[i]` of a create; a PATCH renumbers them, `Omni.update_set`); a
# run's description is the run's and its branch an annotation.
FIELD_NAMES = (
    (re.compile(r"^items\[(\d+)\]\.input\b"), r"prompts[\1].prompt_text"),
    (re.compile(r"^items\[(\d+)\]\.expected_output\b"), r"prompts[\1].expectation"),
    (re.compile(r"^items\[(\d+)\]\.metadata\b.*", re.S), r"prompts[\1]"),
    (re.compile(r"^items\[(\d+)\]"), r"prompts[\1]"),
    (re.compile(r"^items\b"), "prompts"),
    (re.compile(r"^(?:dataset\.)?display_name\b"), "name"),
    (re.compile(r"^dataset\.description\b"), "description"),
    (re.compile(r"^dataset\.annotations\b.*", re.S), "slug"),
    (re.compile(r"^dataset\.labels\b.*", re.S), "model_id"),
    (re.compile(r"^dataset_id\b"), "prompt_set_id"),
    (re.compile(r"^annotations\b.*", re.S), "run_config.branch_id"),
)
# The service's message of an INVALID_ARGUMENT: "invalid request: " and the first 5 fields, "and N more".
SERVICE_INVALID = re.compile(r"^invalid request: .*?(?: and (\d+) more)?$", re.S)


def omni_field(path: str) -> str:
    """The Omni name of an evalsvc field path (unchanged when it already is one)."""
    for pattern, replacement in FIELD_NAMES:
        renamed = pattern.sub(replacement, path)
        if renamed != path:
            return renamed
    return path


def detail_of(error: GatewayError) -> str:
    """The message, then each field problem as `field: why`, fields in Omni's names. The service's own
    message of an INVALID_ARGUMENT only lists the fields the violations name (in evalsvc's names), so it is
    left out rather than naming each field twice."""
    if not error.violations:
        return error.message
    problems = [f"{omni_field(field)}: {why}" if field else why for field, why in error.violations]
    head = error.message
    service = SERVICE_INVALID.match(head) if error.reason == Reason.INVALID_ARGUMENT else None
    if service:
        head = "invalid request"
        more = 5 + int(service[1]) - len(problems) if service[1] else 0
        if more > 0:  # the service lists only the first violations
            problems.append(f"and {more} more")
    return f"{head}: " + "; ".join(problems)


def render(error: GatewayError) -> JSONResponse:
    """`{"detail", "status"}`. A body that does not match the documented shape is a 400, like Omni's own
    validation errors (FastAPI would say 422)."""
    status = 400 if error.request_errors is not None else error.http_status
    return JSONResponse({"detail": detail_of(error), "status": status}, status_code=status)


def renumbered(error: GatewayError, positions: Sequence[int]) -> GatewayError:
    """`error` of adding some of a PATCH's prompts as items: `items[i]` is the prompt at `positions[i]`."""

    def field(path: str) -> str:
        found = re.match(r"^items\[(\d+)\]", path)
        if not found or int(found[1]) >= len(positions):
            return path
        return omni_field(f"items[{positions[int(found[1])]}]{path[found.end() :]}")

    return dataclasses.replace(error, violations=[(field(f), why) for f, why in error.violations])


def conflict(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.FAILED_PRECONDITION, message, "CONFLICT", http_status=409)


def _timestamp(ts: timestamp_pb2.Timestamp) -> str:
    """A timestamp that is always set, as Omni writes it (`2025-01-15T10:00:00.000Z`)."""
    return iso(ts, millis=True) or ""


def _now() -> str:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(datetime.now(UTC))
    return _timestamp(ts)


# --- prompt sets ----------------------------------------------------------------------------------


def _prompt(item: item_pb2.Item) -> OmniPrompt:
    created = item.metadata.get(CREATED_KEY, "")
    return OmniPrompt(
        id=item.id,
        prompt_text=item.input,
        expectation=item.expected_output or None,
        created_at=created,
        updated_at=created,
    )


def _item(prompt: OmniPromptIn, created_at: str) -> item_pb2.Item:
    return item_pb2.Item(
        id=str(uuid.uuid4()),
        input=prompt.prompt_text,
        expected_output=prompt.expectation or "",
        metadata={CREATED_KEY: created_at},
    )


def _set_fields(dataset: ds_pb.Dataset) -> dict[str, Any]:
    """The fields every prompt-set shape has. Prompt sets are never archived here (DeleteDataset cannot be undone)."""
    return OmniPromptSetFields(
        id=to_uuid(dataset.id),
        model_id=to_uuid(dataset.labels.get(MODEL_LABEL, "")),
        name=dataset.display_name,
        slug=dataset.annotations.get(SLUG_KEY, ""),
        description=dataset.description or None,
        is_archived=False,
        created_at=_timestamp(dataset.create_time),
        updated_at=_timestamp(dataset.update_time),
    ).model_dump()


class Omni(DialectClient):
    """The routes' work, as one caller. A prompt set or run this dialect did not create is not found."""

    # prompt sets

    async def prompt_set(self, set_id: str) -> ds_pb.Dataset:
        """The dataset of an Omni prompt set; 404 when missing or not created by this dialect."""
        request = ds_pb.GetDatasetRequest(dataset_id=from_uuid(set_id))
        missing = GatewayError.not_found(f"eval prompt set {set_id!r} not found")
        dataset: ds_pb.Dataset = await self.owned(self.upstream.datasets.GetDataset, request, "dataset", missing)
        return dataset

    async def items(self, set_id: str) -> list[item_pb2.Item]:
        request = ds_pb.ListDatasetItemsRequest(dataset_id=set_id)
        return await self.collect(self.upstream.datasets.ListDatasetItems, request, "items")

    async def prompt_sets(self) -> list[ds_pb.Dataset]:
        """The Omni prompt sets among the tenant's newest 10,000 datasets of any kind (`collect`'s bound:
        ListDatasets has no label filter): all of them unless --max-datasets-per-tenant is raised past it
        (docs/dialects/omni.md, "Lists are collected whole")."""
        found = await self.collect(self.upstream.datasets.ListDatasets, ds_pb.ListDatasetsRequest(), "datasets")
        return [d for d in found if self.owns(d.labels)]

    async def view_set(self, dataset: ds_pb.Dataset) -> OmniPromptSetEnvelope:
        prompts = [_prompt(item) for item in await self.items(dataset.id)]
        return OmniPromptSetEnvelope(prompt_set=OmniPromptSet(**_set_fields(dataset), prompts=prompts))

    async def summary(self, dataset: ds_pb.Dataset) -> OmniPromptSetSummary:
        request = run_svc.ListRunsRequest(page_size=1, dataset_id=dataset.id, labels=self.labels, show_deleted=True)
        latest = (await self.call(self.upstream.runs.ListRuns, request)).runs
        return OmniPromptSetSummary(
            **_set_fields(dataset),
            latest_run_at=_timestamp(latest[0].create_time) if latest else None,
            prompt_count=dataset.item_count,
        )

    async def check_model(self, model_id: str) -> None:
        """A prompt set's model must be a saved target (404 otherwise, before anything is created)."""
        missing = GatewayError.not_found(f"model {to_uuid(model_id)!r} not found")
        await self.get(self.upstream.targets.GetTarget, target_svc.GetTargetRequest(target_id=model_id), missing)

    async def create_set(self, body: OmniPromptSetCreate) -> OmniPromptSetEnvelope:
        model_id = from_uuid(body.model_id)
        await self.check_model(model_id)
        for other in await self.prompt_sets():
            if other.labels.get(MODEL_LABEL) == model_id and other.annotations.get(SLUG_KEY) == body.slug:
                raise conflict(f"a prompt set with slug {body.slug!r} already exists for model {body.model_id!r}")
        spec = ds_pb.Dataset(
            display_name=body.name,
            description=body.description or "",
            labels={**self.labels, MODEL_LABEL: model_id},
            annotations={SLUG_KEY: body.slug},
        )
        dataset = (
            await self.call(self.upstream.datasets.CreateDataset, ds_pb.CreateDatasetRequest(dataset=spec))
        ).dataset
        if body.prompts:
            now = _now()
            dataset = await self.fill_new(dataset, [_item(p, now) for p in body.prompts])
        return await self.view_set(dataset)

    async def append(self, dataset: ds_pb.Dataset, prompts: Sequence[OmniPromptIn]) -> ds_pb.Dataset:
        """The dataset after adding `prompts` as items (unchanged when there are none)."""
        if not prompts:
            return dataset
        now = _now()
        request = ds_pb.AddDatasetItemsRequest(dataset_id=dataset.id, items=[_item(p, now) for p in prompts])
        return (await self.call(self.upstream.datasets.AddDatasetItems, request)).dataset

    async def update_set(self, set_id: str, body: OmniPromptSetPatch) -> OmniPromptSetEnvelope:
        """PATCH, as far as append-only datasets allow: new prompts are appended; renaming, editing or
        deleting a prompt is refused with 409 (evalsvc has no dataset update RPC)."""
        dataset = await self.prompt_set(set_id)
        _check_unchanged(dataset, body)
        existing = await self.items(dataset.id)
        new = _appended(existing, body.prompts)
        if len(existing) + len(new) > MAX_PROMPTS:
            raise GatewayError.invalid(
                f"a prompt set has at most {MAX_PROMPTS} prompts",
                ("prompts", f"{len(existing)} existing and {len(new)} new prompts"),
            )
        try:
            appended = await self.append(dataset, new)
        except GatewayError as error:  # the new prompts' fields, by their place in the PATCH's list
            raise renumbered(error, [i for i, p in enumerate(body.prompts or ()) if p.id is None]) from None
        return await self.view_set(appended)

    # runs

    async def run(self, run_id: str) -> run_pb2.Run:
        """An Omni run; 404 when missing or not created by this dialect."""
        request = run_svc.GetRunRequest(run_id=from_uuid(run_id))
        missing = GatewayError.not_found(f"eval run {run_id!r} not found")
        run: run_pb2.Run = await self.owned(
            self.upstream.runs.GetRun, request, "run", missing, accept=lambda run: bool(run.dataset_id)
        )
        return run

    async def view_run(self, run: run_pb2.Run) -> OmniRun:
        """The run with one result row per prompt, joined with the prompts' text."""
        items, results = await asyncio.gather(
            self.items(run.dataset_id),
            self.collect(self.upstream.runs.ListRunResults, run_svc.ListRunResultsRequest(run_id=run.id), "results"),
        )
        by_item = {result.item_id: result for result in results}
        rows = [_result_row(run, item, by_item.get(item.id)) for item in items[: run.counts.total_items]]
        return OmniRun(**_run_fields(run), results=rows)

    async def check_in_flight(self) -> None:
        """Omni's cap on runs in flight (429), counted over the tenant's Omni runs."""
        request = run_svc.ListRunsRequest(page_size=MAX_RUNS_IN_FLIGHT, statuses=ACTIVE, labels=self.labels)
        if len((await self.call(self.upstream.runs.ListRuns, request)).runs) >= MAX_RUNS_IN_FLIGHT:
            raise GatewayError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"at most {MAX_RUNS_IN_FLIGHT} eval runs may be in flight at once; "
                "wait for one to finish or cancel one",
                "ACTIVE_RUN_CAP",
                retry_after_s=ACTIVE_RUNS_RETRY_AFTER_S,  # every 429 says when to try again (Retry-After)
            )

    async def create_run(self, body: OmniRunCreate) -> OmniRunCreated:
        dataset = await self.prompt_set(body.prompt_set_id)
        if not dataset.item_count:
            raise GatewayError.invalid("the prompt set has no prompts", ("prompt_set_id", "add prompts first"))
        await self.check_in_flight()
        model_id = dataset.labels.get(MODEL_LABEL, "")
        branch = body.run_config.branch_id if body.run_config else None
        request = run_svc.CreateRunRequest(
            dataset_id=dataset.id,
            target=target_pb2.Target(saved_target_id=model_id, model_id=model_id),
            graders=[JUDGE],
            display_name=dataset.display_name,
            description=body.description or "",
            labels=self.labels,
            annotations={BRANCH_KEY: branch} if branch else {},
        )
        created = await self.call(self.upstream.runs.CreateRun, request)
        return OmniRunCreated(job_count=created.job_count, run=await self.view_run(created.run))

    async def list_runs(self, set_id: str, archived: bool) -> OmniRunList:
        dataset = await self.prompt_set(set_id)
        request = run_svc.ListRunsRequest(dataset_id=dataset.id, labels=self.labels, show_deleted=archived)
        runs = await self.collect(self.upstream.runs.ListRuns, request, "runs")
        return OmniRunList(runs=[_list_item(run) for run in runs if run.HasField("delete_time") == archived])

    async def cancel(self, run_id: str) -> OmniRunCancelled:
        """Cancel and archive (DeleteRun does both); `cancelled` counts the prompts that had no result."""
        before = await self.run(run_id)
        after = await self.soft_delete(before.id)
        cancelled = 0
        if before.status in ACTIVE and after.status == run_pb2.RUN_STATUS_CANCELLED:
            cancelled = max(0, after.counts.total_items - after.counts.completed_evaluations)
        return OmniRunCancelled(cancelled=cancelled, run=await self.view_run(after), total=after.counts.total_items)

    async def archive(self, run_id: str) -> None:
        await self.soft_delete((await self.run(run_id)).id)

    async def soft_delete(self, run_id: str) -> run_pb2.Run:
        """DeleteRun: archives the run, cancelling it first if it has not finished; idempotent."""
        return (await self.call(self.upstream.runs.DeleteRun, run_svc.DeleteRunRequest(run_id=run_id))).run

    async def undelete(self, run_id: str) -> None:
        """UndeleteRun: restores an archived run; idempotent."""
        request = run_svc.UndeleteRunRequest(run_id=(await self.run(run_id)).id)
        await self.call(self.upstream.runs.UndeleteRun, request)


def _check_unchanged(dataset: ds_pb.Dataset, body: OmniPromptSetPatch) -> None:
    """A PATCH may not rename a prompt set or change its description (datasets cannot be updated)."""
    if "name" in body.model_fields_set and body.name != dataset.display_name:
        raise conflict("renaming a prompt set is not supported by this gateway (evalsvc datasets are append-only)")
    if "description" in body.model_fields_set and (body.description or "") != dataset.description:
        raise conflict("changing a prompt set's description is not supported (evalsvc datasets are append-only)")


def _appended(existing: Sequence[item_pb2.Item], given: Sequence[OmniPromptPatch] | None) -> list[OmniPromptPatch]:
    """The new prompts of a PATCH's full prompt list, which must keep every existing prompt as it is."""
    if given is None:
        return []
    by_id = {item.id: item for item in existing}
    kept = [p for p in given if p.id is not None]
    unknown = [p.id for p in kept if p.id not in by_id]
    if unknown:
        raise GatewayError.not_found(f"no prompt {unknown[0]!r} in this prompt set")
    changed = [
        p.id
        for p in kept
        if p.prompt_text != by_id[p.id or ""].input
        or (p.expectation is not None and p.expectation != by_id[p.id or ""].expected_output)
    ]
    if sorted(str(p.id) for p in kept) != sorted(by_id) or changed:  # each existing prompt, once
        raise conflict(
            "only appending prompts is supported: send every existing prompt unchanged (with its id) "
            "plus the new ones; editing or deleting prompts needs a dataset update evalsvc lacks"
        )
    return [p for p in given if p.id is None]


# --- runs -----------------------------------------------------------------------------------------


def _run_fields(run: run_pb2.Run) -> dict[str, Any]:
    """The fields every run shape has."""
    return OmniRunFields(
        id=to_uuid(run.id),
        prompt_set_id=to_uuid(run.dataset_id),
        model_id=to_uuid(run.target.model_id),
        branch_id=run.annotations.get(BRANCH_KEY),
        branch_name=None,
        description=run.description or None,
        run_number=run.run_number,
        status=STATUS.get(run.status, "RUNNING"),
        is_archived=run.HasField("delete_time"),
        created_at=_timestamp(run.create_time),
        completed_at=iso(run.end_time, millis=True),
    ).model_dump()


def _list_item(run: run_pb2.Run) -> OmniRunListItem:
    total = run.counts.total_items
    terminal = total if run.status not in ACTIVE else min(total, run.counts.completed_evaluations)
    return OmniRunListItem(**_run_fields(run), stats=OmniRunStats(terminal=terminal, total=total))


def _unfinished_job(run: run_pb2.Run) -> tuple[JobState, str | None]:
    """The job state of a prompt without a result, from the run's status."""
    if run.status == run_pb2.RUN_STATUS_PENDING:
        return "QUEUED", None
    if run.status == run_pb2.RUN_STATUS_RUNNING:
        return "EXECUTING", None
    if run.status == run_pb2.RUN_STATUS_CANCELLED:
        return "FAILED", "cancelled before it finished"
    return "FAILED", run.error.message or "the run ended without a result for this prompt"


def _result_row(run: run_pb2.Run, item: item_pb2.Item, result: run_pb2.Result | None) -> OmniRunResult:
    row_id = derived_uuid("omni.result", run.id, item.id)
    job_id = derived_uuid("omni.agentic_job", run.id, item.id)
    conversation_id = derived_uuid("omni.conversation", run.id, item.id)
    if result is None:
        state, reason = _unfinished_job(run)
        job = OmniAgenticJob(id=job_id, conversation_id=conversation_id, state=state)
        return OmniRunResult(
            id=row_id,
            prompt=item.input,
            score=None,
            cost=None,
            scoring_cost=None,
            timing_ms=None,
            error_reason=reason,
            agentic_job=job,
        )
    graded = result.state in (run_pb2.RESULT_STATE_PASSED, run_pb2.RESULT_STATE_FAILED)
    return OmniRunResult(
        id=row_id,
        prompt=item.input,
        score=int(result.passed) if graded else None,
        cost=result.cost_usd,
        scoring_cost=result.scoring_cost_usd,
        timing_ms=round(result.latency_ms),
        error_reason=None if graded else (result.error_reason or "the prompt was not evaluated"),
        agentic_job=OmniAgenticJob(
            id=job_id, conversation_id=conversation_id, state="COMPLETE" if graded else "FAILED"
        ),
    )


# --- routes ---------------------------------------------------------------------------------------

Archived = Annotated[
    str,
    Query(pattern="^(?i:true|false)$", description="true: archived items instead of active ones (any letter case)"),
]


def routes(api: APIRouter, client: Any, options: DialectOptions) -> None:
    """Omni's AI Eval routes (documented base path `/api`)."""

    @api.post("/v1/ai/eval/prompt-sets", response_model=OmniPromptSetEnvelope, summary="Create an eval prompt set")
    async def create_prompt_set(body: OmniPromptSetCreate, omni: Omni = client) -> OmniPromptSetEnvelope:
        return await omni.create_set(body)

    @api.get("/v1/ai/eval/prompt-sets", response_model=OmniPromptSetList, summary="List eval prompt sets")
    async def list_prompt_sets(
        omni: Omni = client,
        model_ids: Annotated[
            list[str] | None,
            Query(description="Models to list the sets of: the parameter repeated, or comma-separated"),
        ] = None,
        archived: Archived = "false",
    ) -> OmniPromptSetList:
        if archived.lower() == "true":  # prompt sets cannot be archived here (DeleteDataset cannot be undone)
            return OmniPromptSetList(prompt_sets=[])
        wanted = {from_uuid(model_id.strip()) for given in model_ids or () for model_id in given.split(",")}
        sets = [d for d in await omni.prompt_sets() if not wanted or d.labels.get(MODEL_LABEL) in wanted]
        sets.sort(key=lambda d: d.display_name)
        return OmniPromptSetList(prompt_sets=list(await asyncio.gather(*(omni.summary(d) for d in sets))))

    @api.get("/v1/ai/eval/prompt-sets/{promptSetId}", response_model=OmniPromptSetEnvelope, summary="Get a prompt set")
    async def get_prompt_set(promptSetId: str, omni: Omni = client) -> OmniPromptSetEnvelope:
        return await omni.view_set(await omni.prompt_set(promptSetId))

    @api.patch(
        "/v1/ai/eval/prompt-sets/{promptSetId}", response_model=OmniPromptSetEnvelope, summary="Update a prompt set"
    )
    async def update_prompt_set(
        promptSetId: str, body: OmniPromptSetPatch, omni: Omni = client
    ) -> OmniPromptSetEnvelope:
        return await omni.update_set(promptSetId, body)

    @api.post(
        "/v1/ai/eval/prompt-sets/{promptSetId}/unarchive",
        response_model=OmniPromptSetEnvelope,
        summary="Restore an archived prompt set (prompt sets are never archived here: returns it as is)",
    )
    async def unarchive_prompt_set(promptSetId: str, omni: Omni = client) -> OmniPromptSetEnvelope:
        return await omni.view_set(await omni.prompt_set(promptSetId))

    @api.post("/v1/ai/eval/runs", response_model=OmniRunCreated, summary="Start an eval run")
    async def create_run(body: OmniRunCreate, omni: Omni = client) -> OmniRunCreated:
        return await omni.create_run(body)

    @api.get("/v1/ai/eval/runs", response_model=OmniRunList, summary="List eval runs")
    async def list_runs(prompt_set_id: str, omni: Omni = client, archived: Archived = "false") -> OmniRunList:
        return await omni.list_runs(prompt_set_id, archived.lower() == "true")

    @api.get("/v1/ai/eval/runs/{runId}", response_model=OmniRunEnvelope, summary="Get an eval run")
    async def get_run(runId: str, omni: Omni = client) -> OmniRunEnvelope:
        return OmniRunEnvelope(run=await omni.view_run(await omni.run(runId)))

    @api.post("/v1/ai/eval/runs/{runId}/cancel", response_model=OmniRunCancelled, summary="Cancel an eval run")
    async def cancel_run(runId: str, omni: Omni = client) -> OmniRunCancelled:
        return await omni.cancel(runId)

    @api.delete("/v1/ai/eval/runs/{runId}", response_model=OmniRunArchived, summary="Archive an eval run")
    async def archive_run(runId: str, omni: Omni = client) -> OmniRunArchived:
        await omni.archive(runId)
        return OmniRunArchived(is_archived=True)

    @api.post("/v1/ai/eval/runs/{runId}/unarchive", response_model=OmniRunUnarchived, summary="Restore an archived run")
    async def unarchive_run(runId: str, omni: Omni = client) -> OmniRunUnarchived:
        await omni.undelete(runId)
        return OmniRunUnarchived(is_archived=False)


DIALECT = Dialect(
    name=NAME,
    title="Omni AI Eval",
    prefix="/api",
    client=Omni,
    routes=routes,
    vendor=VendorOptions(
        error_handler=render,
        error_responses={"4XX": {"model": OmniErrorBody, "description": "Omni's error envelope"}},
    ),
)
