"""Domain errors that carry everything a gRPC status needs (AIP-193).

Domain modules raise these; `to_status` turns one into a `google.rpc.Status` with `ErrorInfo` (a
stable `reason`, domain `evalsvc`) and, for invalid input, `BadRequest` field violations. The gRPC
servicers (evalsvc.api.status) and the REST gateway both render errors with it, so every door reports
them the same way.

Every ErrorInfo reason the service sends is a member of `Reason`, documented in docs/errors.md
(tests/test_errors_doc.py keeps the two in step). A StrEnum, so a member is its own string on the
wire and compares equal to the literal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum, unique

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

ERROR_DOMAIN = "evalsvc"


@unique
class Reason(StrEnum):
    """The stable `reason` of every ErrorInfo (docs/errors.md says what a caller should do on each)."""

    # The request
    INVALID_ARGUMENT = "INVALID_ARGUMENT"  # fields invalid; BadRequest names every one
    INVALID_PAGE_TOKEN = "INVALID_PAGE_TOKEN"  # a page token not issued for this list, filters and tenant
    MALFORMED_REQUEST = "MALFORMED_REQUEST"  # the bytes are not the method's protobuf message
    HEADERS_TOO_LARGE = "HEADERS_TOO_LARGE"  # REST gateway: key headers over 4 KiB or all headers over 64 KiB
    BODY_TOO_LARGE = "BODY_TOO_LARGE"  # REST gateway: a body over --max-message-bytes
    BODY_TIMEOUT = "BODY_TIMEOUT"  # REST gateway: a body not all arrived within --http-body-timeout-s
    ROUTE_NOT_FOUND = "ROUTE_NOT_FOUND"  # REST gateway: no route has the path (HTTP 404)
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"  # REST gateway: the path's routes take other methods (HTTP 405)
    GATEWAY_STREAMS_FULL = (
        "GATEWAY_STREAMS_FULL"  # REST gateway: all tenants' streams fill their part of the connections
    )
    GATEWAY_CONNECTIONS_FULL = "GATEWAY_CONNECTIONS_FULL"  # REST gateway: --max-http-connections are open
    SERVER_STREAMS_FULL = "SERVER_STREAMS_FULL"  # WatchRun (all tenants) or health Watch streams fill their part
    SERVER_CALLS_FULL = "SERVER_CALLS_FULL"  # --max-concurrent-rpcs calls are being served
    WAITING_CALLS_FULL = "WAITING_CALLS_FULL"  # the connection's calls waiting for their requests are at the limit
    REQUEST_TIMEOUT = "REQUEST_TIMEOUT"  # a call's request message did not arrive within --request-timeout-s
    REQUEST_TOO_COSTLY = "REQUEST_TOO_COSTLY"  # a request over 1 MiB took over 5 s to decode (evalsvc.api.decoding)
    CHECKER_UNAVAILABLE = "CHECKER_UNAVAILABLE"  # the process that checks requests over 1 MiB cannot be used now
    UPSTREAM_UNAVAILABLE = "UPSTREAM_UNAVAILABLE"  # REST gateway: the gRPC service cannot be reached from it
    # The API key
    API_KEY_MISSING = "API_KEY_MISSING"  # no key presented
    API_KEY_INVALID = "API_KEY_INVALID"  # malformed, mistyped, unknown or wrong secret
    API_KEY_REVOKED = "API_KEY_REVOKED"  # the key was revoked
    API_KEY_EXPIRED = "API_KEY_EXPIRED"  # the key has expired
    # Missing resources (or another tenant's: the two look the same)
    RUN_NOT_FOUND = "RUN_NOT_FOUND"  # no such run
    DATASET_NOT_FOUND = "DATASET_NOT_FOUND"  # no such dataset
    GRADER_NOT_FOUND = "GRADER_NOT_FOUND"  # no such saved grader (or version)
    TARGET_NOT_FOUND = "TARGET_NOT_FOUND"  # no such saved target
    WEBHOOK_NOT_FOUND = "WEBHOOK_NOT_FOUND"  # no such webhook
    SECRET_NOT_FOUND = "SECRET_NOT_FOUND"  # no secret of that name
    # What the server is not set up for
    JUDGE_NOT_CONFIGURED = "JUDGE_NOT_CONFIGURED"  # an llm_judge names no model and there is no default judge
    GENERATOR_NOT_CONFIGURED = "GENERATOR_NOT_CONFIGURED"  # no generator model (nor default judge) to generate with
    SECRETS_KEY_NOT_CONFIGURED = "SECRETS_KEY_NOT_CONFIGURED"  # CreateSecret without EVALSVC_SECRETS_KEY
    # Conflicts with the state of a resource
    GENERATION_EXISTS = "GENERATION_EXISTS"  # the dataset already has a different generation
    REQUEST_ID_CONFLICT = "REQUEST_ID_CONFLICT"  # request_id reused for a different request
    RUN_ALREADY_FINISHED = "RUN_ALREADY_FINISHED"  # CancelRun of a run that already succeeded or failed
    RUN_NOT_FINISHED = "RUN_NOT_FINISHED"  # RerunRun of a run still PENDING or RUNNING
    NOTHING_TO_RERUN = "NOTHING_TO_RERUN"  # RerunRun whose scope selects none of the run's items
    RUN_NOT_RERUNNABLE = "RUN_NOT_RERUNNABLE"  # RerunRun of a run whose stored definition no longer passes
    ETAG_MISMATCH = "ETAG_MISMATCH"  # the run changed since the etag was read
    SEQ_OUT_OF_RANGE = "SEQ_OUT_OF_RANGE"  # WatchRun's after_seq outside 0..last_seq
    # Limits
    TENANT_QUOTA_EXCEEDED = "TENANT_QUOTA_EXCEEDED"  # one of the tenant's limits; metadata `quota` says which
    # The server
    GENERATOR_UNAVAILABLE = "GENERATOR_UNAVAILABLE"  # the generator model gave no usable turn
    SERVER_SHUTTING_DOWN = "SERVER_SHUTTING_DOWN"  # open streams end when the server stops
    DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"  # the database cannot serve now; RetryInfo says when to retry
    INTERNAL = "INTERNAL"  # a bug; logged, never described to the caller


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid field: `field` is a path such as `graders[2].regex.pattern`."""

    field: str
    description: str


@dataclass
class ServiceError(Exception):
    """An error a caller can act on: a gRPC code, a stable reason and a message for people."""

    code: grpc.StatusCode
    reason: str  # a Reason (still a literal in a few modules, which compares equal)
    message: str
    violations: list[FieldViolation] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    retry_after_s: float | None = None

    def __str__(self) -> str:
        return self.message


# The field violations an INVALID_ARGUMENT carries: its details travel in a trailer, and clients take
# 16 KiB of metadata (more, and a client sees RESOURCE_EXHAUSTED instead of the error: ~275 violations).
MAX_VIOLATIONS = 100
MAX_VIOLATIONS_BYTES = 8 * 1024
MAX_VIOLATION_TEXT = 256  # characters of a violation's field path or description (a path may quote a key)


def invalid_argument(violations: list[FieldViolation]) -> ServiceError:
    """INVALID_ARGUMENT naming every bad field: the message counts them all, the details list the
    first ones, at most MAX_VIOLATIONS and MAX_VIOLATIONS_BYTES of them, each cut to
    MAX_VIOLATION_TEXT characters (a map key in a path can be megabytes long)."""
    names = ", ".join(_cut(v.field) for v in violations[:5])
    more = f" and {len(violations) - 5} more" if len(violations) > 5 else ""
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.INVALID_ARGUMENT,
        f"invalid request: {names}{more}",
        violations=_first_violations(violations),
    )


def _cut(text: str) -> str:
    return text if len(text) <= MAX_VIOLATION_TEXT else text[:MAX_VIOLATION_TEXT] + "..."


def _first_violations(violations: list[FieldViolation]) -> list[FieldViolation]:
    kept: list[FieldViolation] = []
    size = 0
    for listed in violations[:MAX_VIOLATIONS]:
        violation = FieldViolation(_cut(listed.field), _cut(listed.description))
        size += len(violation.field.encode()) + len(violation.description.encode()) + 8
        if kept and size > MAX_VIOLATIONS_BYTES:
            break
        kept.append(violation)
    return kept


def invalid_page_token() -> ServiceError:
    """INVALID_ARGUMENT (reason INVALID_PAGE_TOKEN) for a page token this service did not issue to
    this tenant for this list and these filters: forged, altered, truncated or another request's."""
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.INVALID_PAGE_TOKEN,
        "page_token is not one this service issued for this request; start again without it",
        violations=[
            FieldViolation("page_token", "not a page token issued for this list, with these filters, to this caller")
        ],
    )


def malformed_request() -> ServiceError:
    """INVALID_ARGUMENT (reason MALFORMED_REQUEST) for request bytes that are not the method's message."""
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.MALFORMED_REQUEST,
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
        Reason.DATABASE_UNAVAILABLE,
        "the service cannot use its database at the moment; retry later",
        retry_after_s=DATABASE_RETRY_S,
    )


MAX_ECHOED_ID = 128


def not_found(kind: str, resource_id: str) -> ServiceError:
    """NOT_FOUND (reason `<KIND>_NOT_FOUND`, a Reason) for a resource that is missing or belongs to
    another tenant (the two look the same).

    The id is echoed at most 128 characters long: an arbitrarily long id would overflow the trailing
    metadata limit of the caller's channel and turn a clear NOT_FOUND into a transport error."""
    shown = resource_id if len(resource_id) <= MAX_ECHOED_ID else resource_id[:MAX_ECHOED_ID] + "..."
    return ServiceError(
        grpc.StatusCode.NOT_FOUND,
        Reason(f"{kind.upper()}_NOT_FOUND"),
        f"{kind} {shown!r} not found",
        metadata={f"{kind}_id": shown},
    )


def retry_delay_ms(seconds: float) -> int:
    """A wait as RetryInfo's whole milliseconds: rounded up, and at least 1. Truncated, a token bucket's
    sub-millisecond wait was sent as "0s" (retry at once, and no `Retry-After` over REST); the float's
    noise (0.023 s is 23.000000000000004 ms) is not worth a millisecond."""
    return max(1, math.ceil(round(seconds * 1000, 6)))


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
        delay.FromMilliseconds(retry_delay_ms(error.retry_after_s))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return status_pb2.Status(code=error.code.value[0], message=error.message, details=packed)
