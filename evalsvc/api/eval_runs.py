"""EvalRunService servicer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial
from typing import Any, TypeAlias

import grpc

from evalsvc.api.status import server_stream, unary, unary_read
from evalsvc.api.tenancy import current_key_id, tenant_of
from evalsvc.config import Settings
from evalsvc.errors import FieldViolation, invalid_argument
from evalsvc.events.bus import EventBus
from evalsvc.events.watch import BATCH_BYTES, CATCH_UP_PAGE, MAX_BATCH_EVENTS, Chunk, Logged, batched_message, watch
from evalsvc.ids import PageTokens
from evalsvc.limits import TenantLimits
from evalsvc.messages.encoded import Encoded
from evalsvc.runs.compare import CompareService
from evalsvc.runs.service import RunService
from evalsvc.store.db import Database
from evalsvc.v1 import comparison_pb2 as cpb
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc as pb_grpc

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class EvalRunServicer(pb_grpc.EvalRunServiceServicer):
    """Translates EvalRunService calls to the run service and the watch."""

    def __init__(
        self,
        runs: RunService,
        db: Database,
        bus: EventBus,
        settings: Settings,
        limits: TenantLimits,
        page_tokens: PageTokens,
    ) -> None:
        self._runs = runs
        self._limits = limits
        self._db = db
        self._bus = bus
        self._settings = settings
        self._comparisons = CompareService(db, page_tokens, settings.judge_model)

    @unary
    async def CreateRun(self, request: pb.CreateRunRequest, context: Context) -> pb.CreateRunResponse:
        created = await self._runs.create(tenant_of(context), request)
        return pb.CreateRunResponse(run=created.run, job_count=created.job_count)

    @unary
    async def RerunRun(self, request: pb.RerunRunRequest, context: Context) -> pb.RerunRunResponse:
        created = await self._runs.rerun(tenant_of(context), request)
        return pb.RerunRunResponse(run=created.run, job_count=created.job_count)

    @unary_read
    async def GetRun(self, request: pb.GetRunRequest, context: Context) -> pb.GetRunResponse:
        return pb.GetRunResponse(run=await self._runs.get(tenant_of(context), request.run_id))

    @unary_read
    async def ListRuns(self, request: pb.ListRunsRequest, context: Context) -> pb.ListRunsResponse:
        runs, token = await self._runs.list(tenant_of(context), request)
        return pb.ListRunsResponse(runs=runs, next_page_token=token)

    @unary
    async def CancelRun(self, request: pb.CancelRunRequest, context: Context) -> pb.CancelRunResponse:
        return pb.CancelRunResponse(run=await self._runs.cancel(tenant_of(context), request.run_id))

    @unary
    async def UpdateRun(self, request: pb.UpdateRunRequest, context: Context) -> pb.UpdateRunResponse:
        return pb.UpdateRunResponse(run=await self._runs.update(tenant_of(context), request))

    @unary
    async def DeleteRun(self, request: pb.DeleteRunRequest, context: Context) -> pb.DeleteRunResponse:
        return pb.DeleteRunResponse(run=await self._runs.delete(tenant_of(context), request.run_id, request.etag))

    @unary
    async def UndeleteRun(self, request: pb.UndeleteRunRequest, context: Context) -> pb.UndeleteRunResponse:
        return pb.UndeleteRunResponse(run=await self._runs.undelete(tenant_of(context), request.run_id))

    @unary_read
    async def ListRunResults(self, request: pb.ListRunResultsRequest, context: Context) -> pb.ListRunResultsResponse:
        results, token = await self._runs.list_results(tenant_of(context), request)
        return pb.ListRunResultsResponse(results=results, next_page_token=token)

    @unary_read
    async def CompareRuns(self, request: cpb.CompareRunsRequest, context: Context) -> cpb.CompareRunsResponse:
        return cpb.CompareRunsResponse(comparison=await self._comparisons.compare(tenant_of(context), request))

    @unary_read
    async def ListComparisonItems(
        self, request: cpb.ListComparisonItemsRequest, context: Context
    ) -> cpb.ListComparisonItemsResponse:
        items, token = await self._comparisons.list_items(tenant_of(context), request)
        return cpb.ListComparisonItemsResponse(items=items, next_page_token=token)

    @server_stream
    async def WatchRun(
        self, request: pb.WatchRunRequest, context: Context
    ) -> AsyncIterator[pb.WatchRunResponse | Encoded[pb.WatchRunResponse]]:
        tenant = tenant_of(context)
        with self._limits.watch_slot(tenant):
            async for batch in self._watch(tenant, request.run_id, request.after_seq, CATCH_UP_PAGE):
                # Events read from the log go out as the bytes read, never parsed here (`Encoded`).
                for event in batch.encoded() if isinstance(batch, Logged) else batch:
                    yield event

    @server_stream
    async def WatchRunBatched(
        self, request: pb.WatchRunBatchedRequest, context: Context
    ) -> AsyncIterator[Encoded[pb.WatchRunBatchedResponse]]:
        if not 0 <= request.max_events <= MAX_BATCH_EVENTS:
            raise invalid_argument([FieldViolation("max_events", f"must be between 0 and {MAX_BATCH_EVENTS}")])
        tenant = tenant_of(context)
        with self._limits.watch_slot(tenant):
            async for batch in self._watch(
                tenant, request.run_id, request.after_seq, request.max_events or CATCH_UP_PAGE, BATCH_BYTES
            ):
                yield batched_message(batch)

    def _watch(
        self, tenant: str, run_id: str, after_seq: int, max_events: int, batch_bytes: int | None = None
    ) -> AsyncIterator[Chunk]:
        """The run's events in chunks (a function, not a generator: no extra layer per open stream);
        `batch_bytes` bounds each chunk's serialized size, for WatchRunBatched messages. The watch is
        counted against the tenant's watch memory once it has found the run (`TenantLimits.watch_memory`)."""
        return watch(
            self._db,
            self._bus,
            tenant=tenant,
            run_id=run_id,
            after_seq=after_seq,
            heartbeat_s=self._settings.heartbeat_s,
            buffer=self._settings.watch_buffer,
            max_events=max_events,
            owner=current_key_id.get(),
            hold=partial(self._limits.watch_memory, tenant),
            **({} if batch_bytes is None else {"page_bytes": batch_bytes, "live_bytes": batch_bytes}),
        )
