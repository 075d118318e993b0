"""Bland's routes over the dialect runtime: the `Bland` client (its evalsvc calls, as one caller), Bland's
object-id cursors over evalsvc's token-paged lists, and the route declarations."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from fastapi import APIRouter, Depends, Query, Request
from google.protobuf import field_mask_pb2

from evalsvc.gateway.dialects.base import DialectClient, DialectOptions, is_owned
from evalsvc.gateway.dialects.bland.models import (
    AgentCreate,
    AgentListItem,
    AgentResult,
    AgentVersion,
    AgentWithVersion,
    AttachedAgent,
    CallOut,
    CallResultsEnvelope,
    CallsAdded,
    CallsIn,
    Envelope,
    EvalsStatus,
    ListOf,
    RunCreate,
    RunListItem,
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
from evalsvc.gateway.dialects.bland.translate import (
    A_SETUP,
    A_SUMMARY,
    CALLS_DATASET,
    CALLS_REQUEST_ID,
    NAME,
    STATUS_FILTER,
    TRIGGER_NAMES,
    TRIGGERS,
    ZERO_WEIGHT,
    Agent,
    CallGroup,
    RunView,
    Verdict,
    bland_status,
    call_item,
    call_out,
    call_result_id,
    checked,
    encode_version,
    forked,
    not_found,
    own_agent,
    parse_version_id,
    run_annotations,
    version_id,
)
from evalsvc.gateway.upstream import TERMINAL, Caller, GatewayError
from evalsvc.v1 import dataset_service_pb2 as ds_pb
from evalsvc.v1 import eval_run_service_pb2 as runs_pb
from evalsvc.v1 import grader_pb2, grader_service_pb2, item_pb2, run_pb2, target_pb2

T = TypeVar("T")
VERSION_READS = 4  # GetGrader calls a page of an agent's versions makes at once


def bland_key(request: Request) -> Caller:
    """Bland's `authorization: <API key>` (the raw key); a `Bearer ` prefix is accepted too."""
    value = request.headers.get("authorization", "").strip()
    scheme, _, rest = value.partition(" ")
    return Caller(rest.strip() if scheme.lower() == "bearer" else value)


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


cursor_dep = Depends(cursor_query)


@dataclass
class Page(Generic[T]):
    """One page of a list: `has_more` in the paging direction; `next_cursor` continues forward."""

    items: list[T]
    has_more: bool
    next_cursor: str | None


async def paginate(
    source: AsyncIterator[T], key: Callable[[T], str], cursor: Cursor, keep: Callable[[T], bool] = lambda _: True
) -> Page[T]:
    """A page of the elements of `source` (in list order) that `keep` accepts, after or before a cursor;
    an unknown cursor is INVALID_REQUEST.

    evalsvc pages by opaque tokens, so the cursor is found by reading the list from its start. It is
    looked for among every element, kept or not: the object a filtered page ended on still marks its
    place when it no longer matches the filter (a run listed as RUNNING that has been cancelled since),
    as a cursor does in Bland's own lists."""
    if cursor.ending_before:
        before: deque[T] = deque(maxlen=cursor.limit + 1)
        async for item in source:
            if key(item) == cursor.ending_before:
                page = list(before)[-cursor.limit :]
                return Page(page, len(before) > cursor.limit, key(page[-1]) if page else None)
            if keep(item):
                before.append(item)
        raise _unknown_cursor("ending_before", cursor.ending_before)
    found = cursor.starting_after is None
    items: list[T] = []
    async for item in source:
        if found:
            if keep(item):
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


async def _iterate(values: Iterable[T]) -> AsyncIterator[T]:
    """`values` as the async source `paginate` reads."""
    for value in values:
        yield value


def _unknown_cursor(name: str, value: str) -> GatewayError:
    return GatewayError.invalid(f"{name} {value!r} is not in this list", (name, f"no object {value!r} in this list"))


def listing(page: Page[Any], data: list[T]) -> ListOf[T]:
    """The list envelope of a page whose items became `data`."""
    return ListOf(data=data, has_more=page.has_more, next_cursor=page.next_cursor)


# ---------------------------------------------------------------------------------------------- routes


class Bland(DialectClient):
    """The routes' calls to evalsvc, as one caller."""

    async def calls_dataset(self) -> ds_pb.Dataset:
        """The tenant's calls dataset, created on first use (CreateDataset is idempotent by request id).
        Its id also stands for the organization (`org_id`): evalsvc does not expose tenant names."""
        request = ds_pb.CreateDatasetRequest(dataset=CALLS_DATASET, request_id=CALLS_REQUEST_ID)
        return (await self.call(self.upstream.datasets.CreateDataset, request)).dataset

    async def agent(self, agent_id: str, version: int = 0) -> Agent:
        """One of this dialect's agents at a version (0 = latest); EVAL_AGENT_NOT_FOUND otherwise, and
        EVAL_AGENT_VERSION_NOT_FOUND for a version the service does not have or this dialect did not write."""
        request = grader_service_pb2.GetGraderRequest(grader_id=agent_id, version=version)
        if version:
            missing = not_found("EVAL_AGENT_VERSION_NOT_FOUND", f"eval agent {agent_id!r} has no such version")
            saved = (await self.get(self.upstream.graders.GetGrader, request, missing)).grader
        else:
            saved = (await self.call(self.upstream.graders.GetGrader, request)).grader
        found = own_agent(saved)
        if found is None and version and is_owned(saved.labels, NAME):
            # The agent's grader, at a version a native UpdateGrader wrote: the agent exists, that version not.
            raise not_found("EVAL_AGENT_VERSION_NOT_FOUND", f"eval agent {agent_id!r} has no such version")
        if found is None:
            raise not_found("EVAL_AGENT_NOT_FOUND", f"eval agent {agent_id!r} not found")
        return found

    async def version(self, latest: Agent, number: int) -> Agent | None:
        """The agent at one of its versions (`latest` is the agent at its latest); None for a version this
        dialect did not write (a native UpdateGrader of the agent's grader)."""
        if number == latest.saved.version:
            return latest
        request = grader_service_pb2.GetGraderRequest(grader_id=latest.saved.id, version=number)
        missing = not_found("EVAL_AGENT_VERSION_NOT_FOUND", f"eval agent {latest.saved.id!r} has no such version")
        return own_agent((await self.get(self.upstream.graders.GetGrader, request, missing)).grader)

    async def agents(self) -> AsyncIterator[Agent]:
        """This dialect's agents, newest first."""
        request = grader_service_pb2.ListGradersRequest()
        async for saved in self.pages(self.upstream.graders.ListGraders, request, "graders"):
            if (agent := own_agent(saved)) is not None:
                yield agent

    async def run(self, run_id: str) -> RunView:
        """One of this dialect's runs; EVAL_RUN_NOT_FOUND for any other, for a soft-deleted one and for one
        whose Bland fields cannot be read (`RunView.of`): lists leave those out too."""
        request = runs_pb.GetRunRequest(run_id=run_id)
        run: run_pb2.Run = await self.owned(
            self.upstream.runs.GetRun,
            request,
            "run",
            run_missing(run_id),
            accept=lambda run: not run.HasField("delete_time"),
        )
        return viewed(run)

    async def runs(self, statuses: Sequence[run_pb2.RunStatus]) -> AsyncIterator[tuple[run_pb2.Run, RunView | None]]:
        """This dialect's runs, newest first (the label filter is applied by evalsvc), each with its view
        (None for a run that is not a Bland run: `RunView.of`)."""
        request = runs_pb.ListRunsRequest(labels=self.labels, statuses=statuses)
        async for run in self.pages(self.upstream.runs.ListRuns, request, "runs"):
            yield run, RunView.of(run)

    async def calls(self) -> AsyncIterator[tuple[item_pb2.Item, CallOut | None]]:
        """The items of the calls dataset in the order they were added, each with its call (None for an
        item that is not one: `call_out`)."""
        request = ds_pb.ListDatasetItemsRequest(dataset_id=(await self.calls_dataset()).id)
        async for item in self.pages(self.upstream.datasets.ListDatasetItems, request, "items"):
            yield item, call_out(item)

    async def groups(self, view: RunView) -> AsyncIterator[CallGroup]:
        """The run's results grouped by call, in the run's order (by result id)."""
        request = runs_pb.ListRunResultsRequest(run_id=view.run.id)
        group: CallGroup | None = None
        async for result in self.pages(self.upstream.runs.ListRunResults, request, "results"):
            if group is None or result.item_id != group.call_id:
                if group is not None:
                    yield group
                group = CallGroup(result.item_id, call_result_id(result))
            group.verdicts.append(view.verdict(result))
        if group is not None:
            yield group

    async def summary(self, view: RunView, groups: list[CallGroup] | None = None) -> Summary | None:
        """The summary of an ended run with results, computed from its results once and then kept in the
        run's annotations (an ended run's results never change); None before."""
        run = view.run
        if run.status not in TERMINAL or not run.counts.completed_evaluations:
            return None
        if view.kept_summary is not None:
            return view.kept_summary
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
            await self.call(self.upstream.runs.UpdateRun, request)
        return summary

    async def run_out(self, view: RunView) -> RunOut:
        """The full run object; the call ids come from the results when the run could not keep them."""
        groups = None if view.call_ids is not None else [g async for g in self.groups(view)]
        call_ids = view.call_ids if view.call_ids is not None else [g.call_id for g in groups or []]
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


def run_missing(run_id: str) -> GatewayError:
    return not_found("EVAL_RUN_NOT_FOUND", f"eval run {run_id!r} not found")


def viewed(run: run_pb2.Run) -> RunView:
    """The run's view; EVAL_RUN_NOT_FOUND when it is not a Bland run (`RunView.of`)."""
    if (view := RunView.of(run)) is None:
        raise run_missing(run.id)
    return view


def routes(api: APIRouter, client: Any, options: DialectOptions) -> None:
    """The Bland routes, at Bland's paths (`/v1/evals/...`)."""

    @api.get("/v1/evals/status", response_model=Envelope[EvalsStatus])
    async def evals_status(bland: Bland = client) -> Envelope[EvalsStatus]:
        """Evals are always enabled; a one-row ListRuns still checks the API key."""
        await bland.call(bland.upstream.runs.ListRuns, runs_pb.ListRunsRequest(page_size=1, labels=bland.labels))
        return Envelope(data=EvalsStatus(enabled=True))

    @api.post("/v1/evals/agents", response_model=Envelope[AgentWithVersion])
    async def create_agent(body: AgentCreate, bland: Bland = client) -> Envelope[AgentWithVersion]:
        """A saved grader (version 1) judging by the agent's levels."""
        version = checked(
            AgentVersion(
                name=f"{body.name} v1",
                modality=body.modality or "text",
                **body.model_dump(include=set(VersionFields.model_fields), exclude_none=True),
            )
        )
        spec = grader_service_pb2.SavedGrader(
            display_name=body.name,
            description=body.description or "",
            labels=bland.labels,
            grader=encode_version(version),
        )
        request = grader_service_pb2.CreateGraderRequest(grader=spec)
        saved = (await bland.call(bland.upstream.graders.CreateGrader, request)).grader
        org = (await bland.calls_dataset()).id
        return Envelope(data=Agent(saved, version).with_version(org))

    @api.get("/v1/evals/agents", response_model=Envelope[ListOf[AgentListItem]])
    async def list_agents(bland: Bland = client, cursor: Cursor = cursor_dep) -> Envelope[ListOf[AgentListItem]]:
        """This dialect's agents, newest first."""
        page = await paginate(bland.agents(), lambda a: a.saved.id, cursor)
        return Envelope(data=listing(page, [agent.list_item() for agent in page.items]))

    @api.get("/v1/evals/agents/{eval_agent_id}", response_model=Envelope[AgentWithVersion])
    async def get_agent(eval_agent_id: str, bland: Bland = client) -> Envelope[AgentWithVersion]:
        """The agent and its latest version."""
        agent = await bland.agent(eval_agent_id)
        return Envelope(data=agent.with_version((await bland.calls_dataset()).id))

    @api.post("/v1/evals/agents/{eval_agent_id}/versions", response_model=Envelope[VersionOut])
    async def create_version(eval_agent_id: str, body: VersionCreate, bland: Bland = client) -> Envelope[VersionOut]:
        """A new grader version forked from `from_version_id` (default: the latest), with the given changes."""
        number = parse_version_id(body.from_version_id, eval_agent_id) if body.from_version_id else 0
        source = await bland.agent(eval_agent_id, number)
        version = forked(source, body, source.saved.latest_version + 1)
        request = grader_service_pb2.UpdateGraderRequest(grader_id=eval_agent_id, grader=encode_version(version))
        saved = (await bland.call(bland.upstream.graders.UpdateGrader, request)).grader
        return Envelope(data=Agent(saved, version).version_out((await bland.calls_dataset()).id))

    @api.get("/v1/evals/agents/{eval_agent_id}/versions", response_model=Envelope[ListOf[VersionListItem]])
    async def list_versions(
        eval_agent_id: str, bland: Bland = client, cursor: Cursor = cursor_dep
    ) -> Envelope[ListOf[VersionListItem]]:
        """The agent's versions, newest first: each is a version of its saved grader (GetGrader at that
        version), and a version id names its number, so a page reads only its own versions, VERSION_READS
        at a time (a page of 100 was 100 GetGrader calls at once)."""
        latest = await bland.agent(eval_agent_id)
        ids = (version_id(latest.saved.id, n) for n in range(latest.saved.latest_version, 0, -1))
        page = await paginate(_iterate(ids), lambda v: v, cursor)
        reads = asyncio.Semaphore(VERSION_READS)

        async def read(v: str) -> Agent | None:
            async with reads:
                return await bland.version(latest, parse_version_id(v, latest.saved.id))

        agents = await asyncio.gather(*(read(v) for v in page.items))
        return Envelope(data=listing(page, [agent.version_list_item() for agent in agents if agent is not None]))

    @api.get("/v1/evals/agents/{eval_agent_id}/versions/{version_id}", response_model=Envelope[VersionOut])
    async def get_version(eval_agent_id: str, version_id: str, bland: Bland = client) -> Envelope[VersionOut]:
        """One version of the agent, as its create returned it; EVAL_AGENT_VERSION_NOT_FOUND for any other."""
        number = parse_version_id(version_id, eval_agent_id)
        agent = await bland.agent(eval_agent_id, number)
        return Envelope(data=agent.version_out((await bland.calls_dataset()).id))

    @api.post("/v1/evals/calls", response_model=Envelope[CallsAdded])
    async def add_calls(body: CallsIn, bland: Bland = client) -> Envelope[CallsAdded]:
        """evalsvc extension: store calls (transcripts) for runs to evaluate, one dataset item each."""
        dataset = await bland.calls_dataset()
        request = ds_pb.AddDatasetItemsRequest(dataset_id=dataset.id, items=[call_item(c) for c in body.calls])
        added = await bland.call(bland.upstream.datasets.AddDatasetItems, request)
        return Envelope(data=CallsAdded(call_ids=list(added.item_ids), total_call_count=added.dataset.item_count))

    @api.get("/v1/evals/calls", response_model=Envelope[ListOf[CallOut]])
    async def list_calls(bland: Bland = client, cursor: Cursor = cursor_dep) -> Envelope[ListOf[CallOut]]:
        """evalsvc extension: the stored calls, in the order they were added (an item added natively
        whose metadata is not a call's is left out)."""
        page = await paginate(bland.calls(), lambda pair: pair[0].id, cursor, lambda pair: pair[1] is not None)
        return Envelope(data=listing(page, [call for _, call in page.items if call is not None]))

    @api.post("/v1/evals/runs", response_model=Envelope[RunOut])
    async def create_run(body: RunCreate, bland: Bland = client) -> Envelope[RunOut]:
        """A run over the calls (items of the calls dataset) with one saved-grader reference per agent."""
        dataset = await bland.calls_dataset()
        resolved = await asyncio.gather(*(bland.resolve(i, a) for i, a in enumerate(body.attached_agents or ())))
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
            labels=bland.labels,
            annotations=run_annotations(body, [submitted for _, submitted in resolved]),
            trigger=TRIGGERS[body.triggered_by or "manual"],
        )
        if body.pass_threshold_pct is not None:
            request.pass_threshold = body.pass_threshold_pct
        created = await bland.call(bland.upstream.runs.CreateRun, request)
        return Envelope(data=viewed(created.run).out(None, body.call_ids))

    @api.get("/v1/evals/runs", response_model=Envelope[ListOf[RunListItem]])
    async def list_runs(
        bland: Bland = client,
        cursor: Cursor = cursor_dep,
        eval_agent_id: str | None = None,
        workbench_setup_id: str | None = None,
        status: RunStatus | None = None,
        triggered_by: TriggeredBy | None = None,
    ) -> Envelope[ListOf[RunListItem]]:
        """This dialect's runs, newest first, filtered."""

        def keep(pair: tuple[run_pb2.Run, RunView | None]) -> bool:
            run, view = pair
            return (
                view is not None
                and (status is None or bland_status(run) == status)
                and (eval_agent_id is None or any(g.name == eval_agent_id for g in run.graders))
                and (triggered_by is None or TRIGGER_NAMES.get(run.trigger) == triggered_by)
                and (workbench_setup_id is None or run.annotations.get(A_SETUP) == workbench_setup_id)
            )

        if status is not None and not STATUS_FILTER[status]:
            page: Page[tuple[run_pb2.Run, RunView | None]] = Page([], False, None)
        else:
            # evalsvc filters on the status too, unless a cursor is looked for: it may have left that status
            paging = cursor.starting_after or cursor.ending_before
            runs = bland.runs(STATUS_FILTER[status] if status and not paging else ())
            page = await paginate(runs, lambda pair: pair[0].id, cursor, keep)
        views = [view for _, view in page.items if view is not None]
        summaries = await asyncio.gather(*(bland.summary(view) for view in views))
        return Envelope(data=listing(page, [v.list_item(s) for v, s in zip(views, summaries, strict=True)]))

    @api.get("/v1/evals/runs/{run_id}", response_model=Envelope[RunOut])
    async def get_run(run_id: str, bland: Bland = client) -> Envelope[RunOut]:
        """The run with its status and, once it has ended, its summary."""
        return Envelope(data=await bland.run_out(await bland.run(run_id)))

    @api.post("/v1/evals/runs/{run_id}/cancellations", response_model=Envelope[RunOut])
    async def cancel_run(run_id: str, bland: Bland = client) -> Envelope[RunOut]:
        """Cancel a pending or running run (EVAL_RUN_NOT_CANCELLABLE once it has ended)."""
        await bland.run(run_id)
        request = runs_pb.CancelRunRequest(run_id=run_id)
        cancelled = (await bland.call(bland.upstream.runs.CancelRun, request)).run
        return Envelope(data=await bland.run_out(viewed(cancelled)))

    @api.get("/v1/evals/runs/{run_id}/call-results", response_model=CallResultsEnvelope)
    async def call_results(
        run_id: str, bland: Bland = client, cursor: Cursor = cursor_dep, include_agent_results: bool = False
    ) -> CallResultsEnvelope:
        """One row per evaluated call, in the order they were evaluated."""
        view = await bland.run(run_id)
        page = await paginate(bland.groups(view), lambda g: g.id, cursor)
        rows = [view.call_result(g, include_agent_results) for g in page.items]
        return CallResultsEnvelope(
            data=listing(page, rows), run_status=view.status, run_resolved_call_count=view.run.counts.total_items
        )

    @api.get("/v1/evals/runs/{run_id}/agent-results", response_model=Envelope[ListOf[AgentResult]])
    async def agent_results(
        run_id: str, bland: Bland = client, cursor: Cursor = cursor_dep
    ) -> Envelope[ListOf[AgentResult]]:
        """Every judge verdict of the run, in the run's order (by result id)."""
        view = await bland.run(run_id)

        async def verdicts() -> AsyncIterator[tuple[CallGroup, Verdict]]:
            async for group in bland.groups(view):
                for verdict in group.verdicts:
                    yield group, verdict

        page = await paginate(verdicts(), lambda pair: pair[1].id, cursor)
        return Envelope(data=listing(page, [view.agent_result(g, v) for g, v in page.items]))
