"""HTTP's own optimistic concurrency on the native routes: `ETag` and `If-Match` for the resources
that carry an AIP-154 `etag` (a run).

A response whose resource has an etag names it in an `ETag` header (a strong validator, quoted); a
request's `If-Match` fills the request's etag (DeleteRun's `etag`, UpdateRun's `run.etag`), so the
write happens only if nobody changed the resource, exactly as with the etag in the body or query
(`ABORTED`, reason ETAG_MISMATCH otherwise: HTTP 409 for the etag in the body or query, and for an
`If-Match` that does not hold HTTP's own 412 Precondition Failed, RFC 9110 13.1.1, which is what an
HTTP client's conditional request waits for; the body is the same google.rpc.Status either way).
`If-Match: *` asks for no check; a weak tag
(`W/"..."`, which RFC 9110's strong comparison never matches) or an empty one is refused (400), and
so is a tag on a write whose resource has no etag (a grader, a webhook...: 400 INVALID_ARGUMENT, as
the other If-Match refusals), whose condition cannot hold: the method must not run (RFC 9110 13.1.1),
and ignoring the header ran it. A read (GET, HEAD) with a tag is answered only when the resource it
returns is at that etag (else the same ABORTED ETAG_MISMATCH, 412). An HTTP client that follows RFC 9110
gets what it expects without knowing the field.

`If-None-Match: *` on a write asks that it run only if the resource does not exist (RFC 9110 13.1.2),
and every write here names a resource that must exist: on a resource with an etag the write is sent with
one no resource is ever at (`NO_ETAG`), so nothing is written and the answer is 412 when it exists, and
the 404 it would have had when it does not. The header was ignored, and a PATCH with it changed the run.
Entity tags in it (a write only if the resource is at none of them) are refused (400), and so is the header
on a write whose resource has no etag, as for If-Match: the service compares one etag for equality, and
ignoring the condition would run the write unconditionally. A read ignores it (no 304: the whole response).
"""

from __future__ import annotations

import json

import grpc
from fastapi.responses import JSONResponse
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from evalsvc.errors import Reason
from evalsvc.gateway.routes import Route
from evalsvc.gateway.upstream import GatewayError

ETAG_FIELD = "etag"
NO_ETAG = "0"  # the version before a run's first (etags count from 1): no run is ever at it


def _holds_etag(message: Message) -> bool:
    return ETAG_FIELD in message.DESCRIPTOR.fields_by_name


def _etag_holder(route: Route, message: Message) -> Message | None:
    """Where a request names the etag it expects: its own `etag`, or that of the resource in its body."""
    if _holds_etag(message):
        return message
    if route.body and route.body != "*":
        resource = getattr(message, route.body)
        if isinstance(resource, Message) and _holds_etag(resource):
            return resource
    return None


def _one_strong_tag(value: str) -> str:
    """The one strong entity tag an `If-Match` names (quotes removed); GatewayError when it names none."""
    if "," in value:
        raise GatewayError.invalid("If-Match names one etag here", ("If-Match", "must be one entity tag"))
    if value.startswith("W/"):  # RFC 9110: If-Match compares strongly, so a weak tag never matches
        raise GatewayError.invalid("If-Match takes a strong entity tag", ("If-Match", "must not be a weak tag"))
    tag = value.strip('"')
    if not tag:  # an empty etag in the request means "no check": the opposite of what was asked
        raise GatewayError.invalid("If-Match names no etag", ("If-Match", "must be an entity tag or *"))
    return tag


def check_read_if_match(if_match: str, response: Message) -> None:
    """A read (GET, HEAD) with `If-Match`: answered only when the resource it returns is at that etag
    (RFC 9110 13.1.1), else the writes' own refusal, ABORTED ETAG_MISMATCH (412). A response without
    an etag cannot match a tag."""
    value = if_match.strip()
    if not value or value == "*":
        return
    tag = _one_strong_tag(value)
    current = etag_header(response)
    if current is None:
        raise GatewayError.invalid(
            "If-Match is not supported here: this resource has no etag",
            ("If-Match", "only runs carry an etag; send no If-Match here, or *"),
        )
    if current.strip('"') != tag:
        raise GatewayError(
            grpc.StatusCode.ABORTED,
            f"the resource is at etag {current}, not the one If-Match names",
            Reason.ETAG_MISMATCH,
            metadata={"etag": current.strip('"')},
        )


def apply_if_match(if_match: str, route: Route, message: Message) -> None:
    """Fill a write's etag from an `If-Match` header (one entity tag, or `*`); GatewayError when the
    header cannot be one, or disagrees with an etag the request already names."""
    value = if_match.strip()
    if not value or value == "*":
        return
    holder = _etag_holder(route, message)
    if holder is None:  # no etag to compare: ignoring the header ran a conditional DELETE or PATCH unconditionally
        raise GatewayError.invalid(
            "If-Match is not supported here: this request's resource has no etag",
            ("If-Match", "only a run's PATCH and DELETE take an etag; send no If-Match here, or *"),
        )
    tag = _one_strong_tag(value)
    named = getattr(holder, ETAG_FIELD)
    if named and named != tag:
        raise GatewayError.invalid(
            "If-Match and the request's etag differ", ("If-Match", "differs from the etag in the request")
        )
    setattr(holder, ETAG_FIELD, tag)


def apply_if_none_match(if_none_match: str, route: Route, message: Message) -> None:
    """Make a write with `If-None-Match: *` fail on an existing resource (see the module docstring);
    GatewayError when the header is anything else, or the request's resource has no etag."""
    value = if_none_match.strip()
    if not value:
        return
    holder = _etag_holder(route, message)
    if holder is None:
        raise GatewayError.invalid(
            "If-None-Match is not supported here: this request's resource has no etag",
            ("If-None-Match", "only a run's writes take If-None-Match: *; send none here"),
        )
    if value != "*":
        raise GatewayError.invalid(
            "If-None-Match takes only * on a write here",
            ("If-None-Match", "must be * (the write runs only if the resource does not exist)"),
        )
    setattr(holder, ETAG_FIELD, NO_ETAG)


def etag_header(response: Message) -> str | None:
    """The `ETag` header of a response whose one resource carries an etag (GetRun's run, ...), else None."""
    for field in response.DESCRIPTOR.fields:
        if field.type != FieldDescriptor.TYPE_MESSAGE or field.is_repeated or not response.HasField(field.name):
            continue
        resource = getattr(response, field.name)
        if _holds_etag(resource) and (tag := getattr(resource, ETAG_FIELD)):
            return f'"{tag}"'
    return None


def unmet_status(response: JSONResponse, reason: str, if_match: str, if_none_match: str = "") -> JSONResponse:
    """`response` (an error), answered 412 Precondition Failed when it is an ETAG_MISMATCH of a request
    whose `If-Match` named an etag or that had an `If-None-Match` (a write's: `apply_if_none_match`): RFC 9110
    13.1.1 and 13.1.2 say a condition that does not hold is 412, and a client's conditional request (an
    HTTP library's, a proxy's) waits for exactly that."""
    if reason == Reason.ETAG_MISMATCH and (if_match.strip() not in ("", "*") or if_none_match.strip()):
        response.status_code = 412
        if if_none_match.strip():
            _say_it_exists(response)
    return response


def _say_it_exists(response: JSONResponse) -> None:
    """The message of a write refused by `If-None-Match: *` (sent with `NO_ETAG`): the service's "changed
    since etag '0' was read" named an etag the client never sent; what failed is that the run exists."""
    body = json.loads(bytes(response.body))
    run_id = next((d.get("metadata", {}).get("run_id") for d in body.get("details", ()) if "metadata" in d), None)
    run = f"run {run_id!r}" if run_id else "the run"
    body["message"] = f"{run} exists, and If-None-Match: * lets the write run only if it does not; nothing was written"
    response.body = response.render(body)
    response.headers["content-length"] = str(len(response.body))
