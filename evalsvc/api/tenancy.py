"""Which tenant a call acts for.

Authentication (`evalsvc.api.auth`, run by `evalsvc.api.interceptor`) sets `current_tenant` inside
each RPC's own task before the servicer runs; servicers read it through `tenant_of`. It is not reset
afterwards, so the interceptor can still read it for its access log once the call is done.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import grpc

current_tenant: ContextVar[str] = ContextVar("evalsvc_tenant", default="")
# The id of the API key the call presented: watch streams are filed under it, so they end when it is revoked.
current_key_id: ContextVar[str] = ContextVar("evalsvc_key_id", default="")


def tenant_of(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The authenticated caller's tenant. Servicers only run after authentication succeeded."""
    tenant = current_tenant.get()
    if not tenant:
        raise RuntimeError("no authenticated tenant: the auth interceptor is not installed")
    return tenant
