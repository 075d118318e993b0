"""GraderService and TargetService servicers."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

from evalsvc.api.status import unary, unary_read
from evalsvc.api.tenancy import tenant_of
from evalsvc.definitions.service import DefinitionService
from evalsvc.v1 import grader_service_pb2 as gpb
from evalsvc.v1 import grader_service_pb2_grpc, target_service_pb2_grpc
from evalsvc.v1 import target_service_pb2 as tpb

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class GraderServicer(grader_service_pb2_grpc.GraderServiceServicer):
    """Translates GraderService calls to the definition service."""

    def __init__(self, definitions: DefinitionService) -> None:
        self._definitions = definitions

    @unary
    async def CreateGrader(self, request: gpb.CreateGraderRequest, context: Context) -> gpb.CreateGraderResponse:
        return gpb.CreateGraderResponse(grader=await self._definitions.create_grader(tenant_of(context), request))

    @unary_read
    async def GetGrader(self, request: gpb.GetGraderRequest, context: Context) -> gpb.GetGraderResponse:
        grader = await self._definitions.get_grader(tenant_of(context), request.grader_id, request.version)
        return gpb.GetGraderResponse(grader=grader)

    @unary_read
    async def ListGraders(self, request: gpb.ListGradersRequest, context: Context) -> gpb.ListGradersResponse:
        graders, token = await self._definitions.list_graders(tenant_of(context), request)
        return gpb.ListGradersResponse(graders=graders, next_page_token=token)

    @unary
    async def UpdateGrader(self, request: gpb.UpdateGraderRequest, context: Context) -> gpb.UpdateGraderResponse:
        return gpb.UpdateGraderResponse(grader=await self._definitions.update_grader(tenant_of(context), request))

    @unary
    async def DeleteGrader(self, request: gpb.DeleteGraderRequest, context: Context) -> gpb.DeleteGraderResponse:
        await self._definitions.delete_grader(tenant_of(context), request.grader_id)
        return gpb.DeleteGraderResponse()


class TargetServicer(target_service_pb2_grpc.TargetServiceServicer):
    """Translates TargetService calls to the definition service."""

    def __init__(self, definitions: DefinitionService) -> None:
        self._definitions = definitions

    @unary
    async def CreateTarget(self, request: tpb.CreateTargetRequest, context: Context) -> tpb.CreateTargetResponse:
        return tpb.CreateTargetResponse(target=await self._definitions.create_target(tenant_of(context), request))

    @unary_read
    async def GetTarget(self, request: tpb.GetTargetRequest, context: Context) -> tpb.GetTargetResponse:
        return tpb.GetTargetResponse(target=await self._definitions.get_target(tenant_of(context), request.target_id))

    @unary_read
    async def ListTargets(self, request: tpb.ListTargetsRequest, context: Context) -> tpb.ListTargetsResponse:
        targets, token = await self._definitions.list_targets(tenant_of(context), request)
        return tpb.ListTargetsResponse(targets=targets, next_page_token=token)

    @unary
    async def DeleteTarget(self, request: tpb.DeleteTargetRequest, context: Context) -> tpb.DeleteTargetResponse:
        await self._definitions.delete_target(tenant_of(context), request.target_id)
        return tpb.DeleteTargetResponse()
