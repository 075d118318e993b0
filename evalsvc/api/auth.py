"""Authentication: the API key check every RPC except health and reflection goes through.

The check runs inside the call (see evalsvc.api.interceptor), where it can abort with a rich status,
and sets `current_tenant` for the servicer. Health and reflection stay open so load balancers and
tools work without keys.
"""

from __future__ import annotations

from typing import Any

import grpc

from evalsvc.api.status import abort, unexpected_error
from evalsvc.api.tenancy import current_key_id, current_tenant
from evalsvc.auth.service import KeyService
from evalsvc.errors import ServiceError

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def presented_key(metadata: tuple[Any, ...] | None) -> str | None:
    """The key from `authorization: Bearer <key>` or `x-api-key: <key>`."""
    for name, value in metadata or ():
        if name == "authorization":
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() == "bearer":
                # `Bearer ` and nothing (an unset $EVALSVC_API_KEY in a client's header): missing, not invalid.
                return token.strip() or None
            return str(value)  # malformed: rejected by the key check, never logged
        if name == "x-api-key":
            return str(value)
    return None


class Authenticator:
    """Decides which methods need a key and checks the key a call presented."""

    def __init__(self, keys: KeyService) -> None:
        self._keys = keys

    @staticmethod
    def guards(method: str) -> bool:
        """Whether calls of this method must present a valid key."""
        return not method.startswith(OPEN_PREFIXES)

    async def refusal(self, key: str | None) -> ServiceError | None:
        """None with the caller's tenant set; or why a call that presented `key` is refused
        (UNAUTHENTICATED; UNAVAILABLE when the keys cannot be read, as for the call itself)."""
        try:
            caller = await self._keys.authenticate(key)
        except ServiceError as error:
            return error
        except Exception as exc:
            return unexpected_error(exc, "authentication")
        current_tenant.set(caller.tenant)
        current_key_id.set(caller.key_id)
        return None

    async def authenticate(self, key: str | None, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Set the caller's tenant, or abort the call (`refusal`)."""
        if (error := await self.refusal(key)) is not None:
            await abort(context, error)
