"""SecretService servicer: a tenant's own secrets, never their values."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

from evalsvc.api.status import unary, unary_read
from evalsvc.api.tenancy import tenant_of
from evalsvc.messages.convert import timestamp
from evalsvc.secrets.service import SecretService
from evalsvc.v1 import secret_service_pb2 as pb
from evalsvc.v1 import secret_service_pb2_grpc

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class SecretServicer(secret_service_pb2_grpc.SecretServiceServicer):
    """Translates SecretService calls to the secret service."""

    def __init__(self, secrets: SecretService) -> None:
        self._secrets = secrets

    @unary
    async def CreateSecret(self, request: pb.CreateSecretRequest, context: Context) -> pb.CreateSecretResponse:
        name, created = await self._secrets.create(tenant_of(context), request.name, request.value)
        return pb.CreateSecretResponse(secret=pb.Secret(name=name, create_time=timestamp(created)))

    @unary_read
    async def ListSecrets(self, request: pb.ListSecretsRequest, context: Context) -> pb.ListSecretsResponse:
        found, token = await self._secrets.list(tenant_of(context), request.page_size, request.page_token)
        return pb.ListSecretsResponse(
            secrets=[pb.Secret(name=name, create_time=timestamp(created)) for name, created in found],
            next_page_token=token,
        )

    @unary
    async def DeleteSecret(self, request: pb.DeleteSecretRequest, context: Context) -> pb.DeleteSecretResponse:
        await self._secrets.delete(tenant_of(context), request.name)
        return pb.DeleteSecretResponse()
