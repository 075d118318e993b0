"""Domain errors that carry everything a gRPC status needs (AIP-193).

Domain modules raise these; `to_status` turns one into a `google.rpc.Status` with `ErrorInfo` (a
stable `reason`, domain `evalsvc`) and, for invalid input, `BadRequest` field violations. The gRPC
servicers (evalsvc.api.status) and the REST gateway both render errors with it, so every door reports
them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

ERROR_DOMAIN = "evalsvc"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid field: `field` is a path such as `graders[2].regex.pattern`."""

    field: str
    description: str


@dataclass
class ServiceError(Exception):
    """An error a caller can act on: a gRPC code, a stable reason and a message for people."""

    code: grpc.StatusCode
    reason: str
    message: str
    violations: list[FieldViolation] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    retry_after_s: float | None = None

    def __str__(self) -> str:
        return self.message


def invalid_argument(violations: list[FieldViolation]) -> ServiceError:
    """INVALID_ARGUMENT naming every bad field."""
    names = ", ".join(v.field for v in violations[:5])
    more = f" and {len(violations) - 5} more" if len(violations) > 5 else ""
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        f"invalid request: {names}{more}",
        violations=violations,
    )


def invalid_page_token() -> ServiceError:
    """INVALID_ARGUMENT (reason INVALID_PAGE_TOKEN) for a page token this service did not issue to
    this tenant for this list and these filters: forged, altered, truncated or another request's."""
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
        "page_token is not one this service issued for this request; start again without it",
        violations=[
            FieldViolation("page_token", "not a page token issued for this list, with these filters, to this caller")
        ],
    )


def malformed_request() -> ServiceError:
    """INVALID_ARGUMENT (reason MALFORMED_REQUEST) for request bytes that are not the method's message."""
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "MALFORMED_REQUEST",
        "the request is not a valid protobuf message of this method",
        violations=[FieldViolation("request", "cannot be decoded as this method's request message")],
    )


# How long a caller should wait before retrying a call the database could not serve.
DATABASE_RETRY_S = 2.0


def database_unavailable() -> ServiceError:
    """UNAVAILABLE with RetryInfo: the database cannot serve now (a full disk, an unreachable or
    restarting server). The cause is logged for the operator, never sent to callers (it may name
    internal hosts)."""
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        "DATABASE_UNAVAILABLE",
        "the service cannot use its database at the moment; retry later",
        retry_after_s=DATABASE_RETRY_S,
    )


MAX_ECHOED_ID = 128


def not_found(kind: str, resource_id: str) -> ServiceError:
    """NOT_FOUND for a resource that is missing or belongs to another tenant (the two look the same).

    The id is echoed at most 128 characters long: an arbitrarily long id would overflow the trailing
    metadata limit of the caller's channel and turn a clear NOT_FOUND into a transport error."""
    shown = resource_id if len(resource_id) <= MAX_ECHOED_ID else resource_id[:MAX_ECHOED_ID] + "..."
    return ServiceError(
        grpc.StatusCode.NOT_FOUND,
        f"{kind.upper()}_NOT_FOUND",
        f"{kind} {shown!r} not found",
        metadata={f"{kind}_id": shown},
    )


def to_status(error: ServiceError) -> status_pb2.Status:
    """The google.rpc.Status for a domain error."""
    details = []
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)
    details.append(info)
    if error.violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in error.violations
                ]
            )
        )
    if error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(error.retry_after_s * 1000))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return status_pb2.Status(code=error.code.value[0], message=error.message, details=packed)
