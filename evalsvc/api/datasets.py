"""DatasetService and DatasetGenerationService servicers."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

from evalsvc.api.status import unary, unary_calls_model, unary_read
from evalsvc.api.tenancy import tenant_of
from evalsvc.datasets.generation import DatasetGenerations
from evalsvc.datasets.service import DatasetService
from evalsvc.v1 import dataset_generation_pb2 as generation_pb
from evalsvc.v1 import dataset_generation_pb2_grpc as generation_pb_grpc
from evalsvc.v1 import dataset_service_pb2 as pb
from evalsvc.v1 import dataset_service_pb2_grpc as pb_grpc

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class DatasetServicer(pb_grpc.DatasetServiceServicer):
    """Translates DatasetService calls to the dataset service."""

    def __init__(self, datasets: DatasetService) -> None:
        self._datasets = datasets

    @unary
    async def CreateDataset(self, request: pb.CreateDatasetRequest, context: Context) -> pb.CreateDatasetResponse:
        return pb.CreateDatasetResponse(dataset=await self._datasets.create(tenant_of(context), request))

    @unary_read
    async def GetDataset(self, request: pb.GetDatasetRequest, context: Context) -> pb.GetDatasetResponse:
        return pb.GetDatasetResponse(dataset=await self._datasets.get(tenant_of(context), request.dataset_id))

    @unary_read
    async def ListDatasets(self, request: pb.ListDatasetsRequest, context: Context) -> pb.ListDatasetsResponse:
        datasets, token = await self._datasets.list(tenant_of(context), request)
        return pb.ListDatasetsResponse(datasets=datasets, next_page_token=token)

    @unary
    async def AddDatasetItems(self, request: pb.AddDatasetItemsRequest, context: Context) -> pb.AddDatasetItemsResponse:
        ids, dataset = await self._datasets.add_items(tenant_of(context), request)
        return pb.AddDatasetItemsResponse(item_ids=ids, dataset=dataset)

    @unary_read
    async def ListDatasetItems(
        self, request: pb.ListDatasetItemsRequest, context: Context
    ) -> pb.ListDatasetItemsResponse:
        items, token = await self._datasets.list_items(tenant_of(context), request)
        return pb.ListDatasetItemsResponse(items=items, next_page_token=token)

    @unary
    async def DeleteDataset(self, request: pb.DeleteDatasetRequest, context: Context) -> pb.DeleteDatasetResponse:
        await self._datasets.delete(tenant_of(context), request.dataset_id)
        return pb.DeleteDatasetResponse()


class DatasetGenerationServicer(generation_pb_grpc.DatasetGenerationServiceServicer):
    """Translates DatasetGenerationService calls to the generations."""

    def __init__(self, generations: DatasetGenerations) -> None:
        self._generations = generations

    @unary
    async def GenerateDatasetItems(
        self, request: generation_pb.GenerateDatasetItemsRequest, context: Context
    ) -> generation_pb.GenerateDatasetItemsResponse:
        generation = await self._generations.generate(tenant_of(context), request)
        return generation_pb.GenerateDatasetItemsResponse(generation=generation)

    @unary_calls_model
    async def ContinueConversations(
        self, request: generation_pb.ContinueConversationsRequest, context: Context
    ) -> generation_pb.ContinueConversationsResponse:
        items = await self._generations.continue_conversations(tenant_of(context), request)
        return generation_pb.ContinueConversationsResponse(items=items)
