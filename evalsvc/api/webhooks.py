"""WebhookService servicer."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

from evalsvc.api.status import unary, unary_read
from evalsvc.api.tenancy import tenant_of
from evalsvc.v1 import webhook_service_pb2 as wpb
from evalsvc.v1 import webhook_service_pb2_grpc
from evalsvc.webhooks.service import WebhookService

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class WebhookServicer(webhook_service_pb2_grpc.WebhookServiceServicer):
    """Translates WebhookService calls to the webhook service."""

    def __init__(self, webhooks: WebhookService) -> None:
        self._webhooks = webhooks

    @unary
    async def CreateWebhook(self, request: wpb.CreateWebhookRequest, context: Context) -> wpb.CreateWebhookResponse:
        return wpb.CreateWebhookResponse(webhook=await self._webhooks.create(tenant_of(context), request))

    @unary_read
    async def GetWebhook(self, request: wpb.GetWebhookRequest, context: Context) -> wpb.GetWebhookResponse:
        return wpb.GetWebhookResponse(webhook=await self._webhooks.get(tenant_of(context), request.webhook_id))

    @unary_read
    async def ListWebhooks(self, request: wpb.ListWebhooksRequest, context: Context) -> wpb.ListWebhooksResponse:
        webhooks, token = await self._webhooks.list(tenant_of(context), request)
        return wpb.ListWebhooksResponse(webhooks=webhooks, next_page_token=token)

    @unary
    async def UpdateWebhook(self, request: wpb.UpdateWebhookRequest, context: Context) -> wpb.UpdateWebhookResponse:
        return wpb.UpdateWebhookResponse(webhook=await self._webhooks.update(tenant_of(context), request))

    @unary
    async def DeleteWebhook(self, request: wpb.DeleteWebhookRequest, context: Context) -> wpb.DeleteWebhookResponse:
        await self._webhooks.delete(tenant_of(context), request.webhook_id)
        return wpb.DeleteWebhookResponse()

    @unary
    async def RotateWebhookSecret(
        self, request: wpb.RotateWebhookSecretRequest, context: Context
    ) -> wpb.RotateWebhookSecretResponse:
        return wpb.RotateWebhookSecretResponse(webhook=await self._webhooks.rotate_secret(tenant_of(context), request))

    @unary_read
    async def ListWebhookDeliveries(
        self, request: wpb.ListWebhookDeliveriesRequest, context: Context
    ) -> wpb.ListWebhookDeliveriesResponse:
        deliveries, token = await self._webhooks.list_deliveries(tenant_of(context), request)
        return wpb.ListWebhookDeliveriesResponse(deliveries=deliveries, next_page_token=token)
