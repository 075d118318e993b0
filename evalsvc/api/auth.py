"""The authentication interceptor: one place that checks the API key of every RPC.

It wraps each method handler so the check runs inside the call, where it can abort with a rich
status, and sets `current_tenant` for the servicer. Health and reflection stay open so load
balancers and tools work without keys.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import grpc

from evalsvc.api.status import abort
from evalsvc.api.tenancy import current_tenant
from evalsvc.auth.service import KeyService
from evalsvc.errors import ServiceError

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def presented_key(metadata: tuple[Any, ...] | None) -> str | None:
    """The key from `authorization: Bearer <key>` or `x-api-key: <key>`."""
    for name, value in metadata or ():
        if name == "authorization":
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return str(value)  # malformed: rejected by the key check, never logged
        if name == "x-api-key":
            return str(value)
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every RPC except health and reflection."""

    def __init__(self, keys: KeyService) -> None:
        self._keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        key = presented_key(details.invocation_metadata)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, key),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(cast("Callable[..., AsyncIterator[Any]]", handler.unary_stream), key),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # no client-streaming methods exist in the contract

    async def _authenticate(self, key: str | None, context: grpc.aio.ServicerContext[Any, Any]) -> bool:
        try:
            current_tenant.set(await self._keys.authenticate(key))
            return True
        except ServiceError as error:
            await abort(context, error)
            return False

    def _unary(self, behaviour: Callable[..., Awaitable[Any]], key: str | None) -> Callable[..., Awaitable[Any]]:
        async def authenticated(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await self._authenticate(key, context)
            return await behaviour(request, context)

        return authenticated

    def _stream(
        self, behaviour: Callable[..., AsyncIterator[Any]], key: str | None
    ) -> Callable[..., AsyncIterator[Any]]:
        async def authenticated(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            await self._authenticate(key, context)
            async for message in behaviour(request, context):
                yield message

        return authenticated
