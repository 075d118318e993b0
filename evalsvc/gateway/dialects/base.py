"""What a vendor dialect is, and the parts every dialect shares.

A dialect is one module of this package defining `DIALECT = Dialect(...)`: its name, the path prefix its
vendor documents (a client switches by changing only its base URL), and a factory that builds its
FastAPI router from the gateway's `Upstream` and the operator's `DialectOptions`. The router's routes
use `error_route_class(render)`, so every failure, whether from the gRPC service, from the dialect's
own checks of documented limits, or from FastAPI's request validation, reaches the client in the vendor's error shape.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from fastapi import Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute, APIRouter
from google.protobuf import timestamp_pb2

from evalsvc.gateway.upstream import Caller, GatewayError, Upstream, with_retry_after

RUN_LABEL = "dialect"  # label on every run a dialect creates: its lists show only their own runs


@dataclass(frozen=True)
class DialectOptions:
    """What the operator configures for every dialect's routes (as grpc-gateway's ServeMux options)."""

    # How long a synchronous route (Agno POST /eval-runs, Aymara score-responses) waits for its run:
    # a little under the vendors' clients' 60 s default timeout (--dialect-sync-wait-s).
    sync_wait_s: float = 58.0


@dataclass(frozen=True)
class Dialect:
    """One vendor's eval-run API, translated to evalsvc."""

    name: str  # e.g. "omni"; also the value of the `dialect` label on the runs it creates
    title: str  # e.g. "Omni AI Eval"
    prefix: str  # the documented base path, e.g. "/api" for Omni ("" for the root)
    router: Callable[[Upstream, DialectOptions], APIRouter]


def error_route_class(render: Callable[[GatewayError], Response]) -> type[APIRoute]:
    """An APIRoute class whose handlers answer every GatewayError and request-validation error with
    `render(error)`. Request validation errors become INVALID_ARGUMENT with HTTP status 422 (FastAPI's
    own) and keep FastAPI's error list in `request_errors`; `render` may choose another status."""

    class DialectRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def handle(request: Request) -> Response:
                try:
                    return await handler(request)
                except GatewayError as error:
                    return with_retry_after(render(error), error)
                except RequestValidationError as error:
                    errors = _writable(jsonable_encoder(error.errors()))
                    violations = [(".".join(str(p) for p in e.get("loc", ())[1:]), e.get("msg", "")) for e in errors]
                    return render(
                        GatewayError(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            "the request does not match the documented shape",
                            "INVALID_ARGUMENT",
                            violations,
                            errors,
                            422,
                        )
                    )

            return handle

    return DialectRoute


def _writable(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """FastAPI's validation errors, without the echoed `input` and `ctx` when those cannot be written back
    as JSON: NaN and lone surrogates are valid in a JSON request but not in a response (a 500 otherwise)."""
    try:
        json.dumps(errors, ensure_ascii=False, allow_nan=False).encode()
        return errors
    except ValueError:  # UnicodeEncodeError is a ValueError
        return [{key: value for key, value in e.items() if key not in ("input", "ctx")} for e in errors]


def bearer_key(request: Request) -> Caller:
    """`Authorization: Bearer <key>` (Omni, Agno, Vogent)."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return Caller(key.strip() if scheme.lower() == "bearer" else "")


def iso(ts: timestamp_pb2.Timestamp, *, millis: bool = False) -> str | None:
    """An RFC 3339 UTC timestamp (`2025-01-15T10:00:00Z`, or with `.000` milliseconds), None if unset."""
    if not ts.seconds and not ts.nanos:
        return None
    moment = datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, UTC)
    if millis:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
