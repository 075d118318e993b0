"""GraderService and TargetService servicers."""

from __future__ import annotations

import grpc

from evalsvc.api.status import unary
from evalsvc.api.tenancy import tenant_of
from evalsvc.definitions.service import DefinitionService
from evalsvc.v1 import grader_service_pb2 as gpb
from evalsvc.v1 import grader_service_pb2_grpc, target_service_pb2_grpc
from evalsvc.v1 import target_service_pb2 as tpb

Context = grpc.aio.ServicerContext


class GraderServicer(grader_service_pb2_grpc.GraderServiceServicer):
    """Translates GraderService calls to the definition service."""

    def __init__(self, definitions: DefinitionService) -> None:
        self._definitions = definitions

    @unary
    async def CreateGrader(self, request: gpb.CreateGraderRequest, context: Context) -> gpb.CreateGraderResponse:  # type: ignore[override]
        return gpb.CreateGraderResponse(grader=await self._definitions.create_grader(tenant_of(context), request))

    @unary
    async def GetGrader(self, request: gpb.GetGraderRequest, context: Context) -> gpb.GetGraderResponse:  # type: ignore[override]
        grader = await self._definitions.get_grader(tenant_of(context), request.grader_id, request.version)
        return gpb.GetGraderResponse(grader=grader)

    @unary
    async def ListGraders(self, request: gpb.ListGradersRequest, context: Context) -> gpb.ListGradersResponse:  # type: ignore[override]
        graders, token = await self._definitions.list_graders(tenant_of(context), request)
        return gpb.ListGradersResponse(graders=graders, next_page_token=token)

    @unary
    async def UpdateGrader(self, request: gpb.UpdateGraderRequest, context: Context) -> gpb.UpdateGraderResponse:  # type: ignore[override]
        return gpb.UpdateGraderResponse(grader=await self._definitions.update_grader(tenant_of(context), request))


class TargetServicer(target_service_pb2_grpc.TargetServiceServicer):
    """Translates TargetService calls to the definition service."""

    def __init__(self, definitions: DefinitionService) -> None:
        self._definitions = definitions

    @unary
    async def CreateTarget(self, request: tpb.CreateTargetRequest, context: Context) -> tpb.CreateTargetResponse:  # type: ignore[override]
        return tpb.CreateTargetResponse(target=await self._definitions.create_target(tenant_of(context), request))

    @unary
    async def GetTarget(self, request: tpb.GetTargetRequest, context: Context) -> tpb.GetTargetResponse:  # type: ignore[override]
        return tpb.GetTargetResponse(target=await self._definitions.get_target(tenant_of(context), request.target_id))

    @unary
    async def ListTargets(self, request: tpb.ListTargetsRequest, context: Context) -> tpb.ListTargetsResponse:  # type: ignore[override]
        targets, token = await self._definitions.list_targets(tenant_of(context), request)
        return tpb.ListTargetsResponse(targets=targets, next_page_token=token)
