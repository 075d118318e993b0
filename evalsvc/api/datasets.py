"""DatasetService servicer."""

from __future__ import annotations

import grpc

from evalsvc.api.status import unary
from evalsvc.api.tenancy import tenant_of
from evalsvc.datasets.service import DatasetService
from evalsvc.v1 import dataset_service_pb2 as pb
from evalsvc.v1 import dataset_service_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext


class DatasetServicer(pb_grpc.DatasetServiceServicer):
    """Translates DatasetService calls to the dataset service."""

    def __init__(self, datasets: DatasetService) -> None:
        self._datasets = datasets

    @unary
    async def CreateDataset(  # type: ignore[override]
        self, request: pb.CreateDatasetRequest, context: Context
    ) -> pb.CreateDatasetResponse:
        return pb.CreateDatasetResponse(dataset=await self._datasets.create(tenant_of(context), request))

    @unary
    async def GetDataset(self, request: pb.GetDatasetRequest, context: Context) -> pb.GetDatasetResponse:  # type: ignore[override]
        return pb.GetDatasetResponse(dataset=await self._datasets.get(tenant_of(context), request.dataset_id))

    @unary
    async def ListDatasets(  # type: ignore[override]
        self, request: pb.ListDatasetsRequest, context: Context
    ) -> pb.ListDatasetsResponse:
        datasets, token = await self._datasets.list(tenant_of(context), request)
        return pb.ListDatasetsResponse(datasets=datasets, next_page_token=token)

    @unary
    async def AddDatasetItems(  # type: ignore[override]
        self, request: pb.AddDatasetItemsRequest, context: Context
    ) -> pb.AddDatasetItemsResponse:
        ids, dataset = await self._datasets.add_items(tenant_of(context), request)
        return pb.AddDatasetItemsResponse(item_ids=ids, dataset=dataset)

    @unary
    async def ListDatasetItems(  # type: ignore[override]
        self, request: pb.ListDatasetItemsRequest, context: Context
    ) -> pb.ListDatasetItemsResponse:
        items, token = await self._datasets.list_items(tenant_of(context), request)
        return pb.ListDatasetItemsResponse(items=items, next_page_token=token)
