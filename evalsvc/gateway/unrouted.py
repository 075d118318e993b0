"""Requests no route takes: a path the gateway does not serve (HTTP 404) or a method its path does not allow
(HTTP 405, with `Allow`), answered in the error shape of the API the path belongs to instead of
Starlette's `{"detail": "Not Found"}`.

As grpc-gateway's routing error handler does, a 404 is NOT_FOUND and a 405 is UNIMPLEMENTED (its HTTP
status stays 405); the native routes render them as every other error, a google.rpc.Status, with the
reasons ROUTE_NOT_FOUND and METHOD_NOT_ALLOWED, and a dialect's paths with that dialect's own error
handler (`VendorOptions.error_handler`), so each vendor's client reads them as it reads its other errors.

The API a path belongs to is the one whose routes match the most of its leading segments (a parameter
matches any segment): `/v1/evals/nope` is Bland's (`/v1/evals/...`), `/v1/runz` native, `/api/v1/ai/x`
Omni's, and with `--dialects aymara=/aymara` everything under `/aymara/` is Aymara's. A path that no
API matches further than the others (`/nope`; `/api/nope`, where Omni and Vogent share the prefix
`/api`; `/v1/nope`, native and Bland) is answered in the native shape.

The request size limits (evalsvc.gateway.request_limits: 413, 431), which answer before any route runs,
answer the same way (`RoutingErrors.answer`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import grpc
from fastapi.exception_handlers import http_exception_handler
from starlette.convertors import CONVERTOR_TYPES
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from evalsvc.errors import Reason
from evalsvc.gateway.routes import custom_methods
from evalsvc.gateway.upstream import GatewayError

# Renders a GatewayError in an API's error shape: the native routes' `refused`, or a dialect's error handler.
Render = Callable[[GatewayError], Response]
# Reads the caller's key from a request's headers as the API's routes do, as the gRPC metadata that carries
# it (GatewayError for a key metadata cannot carry).
KeyReader = Callable[[Request], tuple[tuple[str, str], ...]]


@dataclass(frozen=True)
class Keyed:
    """How an API's routes take a caller's key and answer its refusal: `read` the key from the headers,
    `refuse` renders the service's refusal as the route itself would (its status, body and headers)."""

    read: KeyReader
    refuse: Render


MAX_ECHOED_PATH = 200  # characters of the request's path an error message repeats
MAX_ECHOED_METHOD = 32
_PARAM = re.compile(r"{[^}]*}")


def _segment_pattern(segment: str) -> re.Pattern[str]:
    """A route's path segment as a regex: its parameters (`{run_id}`, as in `{run_id}:cancel`) match what
    their Starlette convertor does: by default any non-empty text without a `/`, a native route's ids
    (`{run_id:resource_id}`) none with a `:` either."""
    literals = _PARAM.split(segment)
    params = [CONVERTOR_TYPES[param.strip("{}").partition(":")[2] or "str"].regex for param in _PARAM.findall(segment)]
    pattern = re.escape(literals[0])
    for param, literal in zip(params, literals[1:], strict=True):
        pattern += f"(?:{param}){re.escape(literal)}"
    return re.compile(pattern)


@dataclass(frozen=True)
class _Template:
    """One route: its path, segment by segment, the methods it takes, and how its API renders errors."""

    segments: tuple[re.Pattern[str], ...]
    methods: frozenset[str]
    render: Render
    path: str  # as routed (`/v1/runs/{run_id:resource_id}`)
    keyed: Keyed | None = None

    def matched(self, segments: Sequence[str]) -> int:
        """How many leading segments of a path (split at `/`) this route matches; the path is the route's
        when that is all of both."""
        count = 0
        for pattern, segment in zip(self.segments, segments, strict=False):
            if not pattern.fullmatch(segment):
                break
            count += 1
        return count


class RoutingErrors:
    """The app's route table, by API, and the exception handler that answers the requests none of it takes."""

    def __init__(self, native: Render) -> None:
        self._native = native
        self._templates: list[_Template] = []

    def add(
        self, routes: Iterable[BaseRoute], render: Render | None = None, prefix: str = "", keyed: Keyed | None = None
    ) -> None:
        """Routes of one API (mounted under `prefix`), whose errors `render` writes (None: native), and which
        take a key as `keyed` says (None: routes that need none, such as /openapi.json and the UI's)."""
        for route in routes:
            if isinstance(route, Route) and route.methods:
                self._templates.append(
                    _Template(
                        tuple(_segment_pattern(part) for part in (prefix + route.path).split("/")),
                        frozenset(route.methods),
                        render or self._native,
                        prefix + route.path,
                        keyed,
                    )
                )

    def keyed(self, method: str, path: str) -> Keyed | None:
        """How the route that takes `method` on `path` reads and refuses keys; None when no route takes
        the request (its 404 or 405 needs no key) or the route needs none. The first route added that
        matches, as Starlette tries them in the order they were added."""
        segments = path.split("/")
        for template in self._templates:
            if (
                method in template.methods
                and len(template.segments) == len(segments)
                and template.matched(segments) == len(segments)
            ):
                return template.keyed
        return None

    def allowed(self, segments: Sequence[str]) -> set[str]:
        """Every method some route takes on this path."""
        return {
            method
            for template in self._templates
            if len(template.segments) == len(segments) and template.matched(segments) == len(segments)
            for method in template.methods
        }

    def owner(self, segments: Sequence[str]) -> Render:
        """The error renderer of the API whose routes match the most leading segments of the path; the
        native one when none does, or when the native API or several dialects match as far."""
        best, owners = 1, {self._native}  # 1: the empty segment before the first `/`, which every path has
        for template in self._templates:
            count = template.matched(segments)
            if count > best:
                best, owners = count, {template.render}
            elif count == best:
                owners.add(template.render)
        return owners.pop() if len(owners) == 1 else self._native

    def answer(self, path: str, error: GatewayError) -> Response:
        """`error` in the error shape of the API `path` belongs to (`owner`), with the HTTP status
        `error.http_status` whatever status the vendor's code map would choose for its gRPC code: the one
        way the gateway answers a request before, or instead of, any route (a path no route takes, and
        evalsvc.gateway.request_limits's 413 and 431)."""
        response = self.owner(path.split("/"))(error)
        response.status_code = error.http_status
        return response

    async def handle(self, request: Request, exc: Exception) -> Response:
        """The app's handler of Starlette's HTTPException: routing's own 404 and 405 in the API's shape;
        anything else (an HTTPException a route raised itself) as FastAPI answers it."""
        if not isinstance(exc, HTTPException):  # registered for HTTPException only
            raise exc
        if exc.status_code not in (404, 405):
            return await http_exception_handler(request, exc)
        segments = request.scope["path"].split("/")
        allowed = self.allowed(segments)
        if exc.status_code == 405 and exc.headers:  # a route outside the table: Starlette's own list
            allowed |= {m.strip() for m in exc.headers.get("Allow", "").split(",") if m.strip()}
        if request.method in allowed:  # a route took the request: its 404 or 405 is its own
            return await http_exception_handler(request, exc)
        return self._unrouted(request, allowed)

    def unread(self, request: Request) -> Response | None:
        """The answer to a request with a body that no route taking a key will serve, given before its
        body is read (evalsvc.gateway.request_limits): the 404 or 405 of a path no route takes, or a 400
        for a route that reads no body (the UI's pages, /openapi.json). None when a keyed route takes it.
        Read whole first, such bodies needed no key: a keyless client could have the gateway buffer
        16 MB on each of its connections for --http-body-timeout-s."""
        method, path = request.method, request.scope["path"]
        segments = path.split("/")
        allowed = self.allowed(segments)
        if method not in allowed:
            return self._unrouted(request, allowed)
        if self.keyed(method, path) is not None:
            return None
        shown = _echoed(_sent_path(request), MAX_ECHOED_PATH)
        error = GatewayError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{_echoed(method, MAX_ECHOED_METHOD)} {shown} takes no request body",
            Reason.INVALID_ARGUMENT,
        )
        return self.answer(path, error)

    def _unrouted(self, request: Request, allowed: set[str]) -> Response:
        """The 405 (with `Allow`) of a path some route takes with other methods, else the 404, in the
        path's API's shape."""
        segments = request.scope["path"].split("/")
        method, path = _echoed(request.method, MAX_ECHOED_METHOD), _echoed(_sent_path(request), MAX_ECHOED_PATH)
        if allowed:
            listed = ", ".join(sorted(allowed))
            error = GatewayError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"method {method} is not allowed on {path} (allowed: {listed})",
                Reason.METHOD_NOT_ALLOWED,
                http_status=405,
            )
        else:
            error = GatewayError(
                grpc.StatusCode.NOT_FOUND,
                f"no route for {method} {path}{self._no_such_custom_method(segments, _sent_path(request))}",
                Reason.ROUTE_NOT_FOUND,
            )
        # The status HTTP requires (405 with `Allow`), whatever a vendor's code map would choose.
        response = self.answer(request.scope["path"], error)
        if allowed:
            response.headers["allow"] = listed
        return response

    def _no_such_custom_method(self, segments: Sequence[str], sent_path: str) -> str:
        """For a native resource's path with a custom method it does not have (`/v1/runs/<id>:wacth`): which
        resource that is and the custom methods it has, else "". Such a path was GetRun of the run
        `<id>:wacth`, 404 RUN_NOT_FOUND for a run that exists; now it is no route's (`routes._IdConvertor`)."""
        resource, colon, _ = segments[-1].partition(":")
        name = sent_path.rpartition("/")[2].partition(":")[2]  # as sent: percent-encoded, no control character
        if not colon or not resource:
            return ""
        at = [*segments[:-1], resource]
        for template in self._templates:
            if (
                template.render is self._native
                and len(template.segments) == len(at)
                and template.matched(at) == len(at)
            ):
                path = _PARAM.sub(lambda param: param[0].partition(":")[0].rstrip("}") + "}", template.path)
                known = ", ".join(custom_methods(path)) or "none"
                return f": {path} has no custom method ':{_echoed(name, MAX_ECHOED_METHOD)}' (it has {known})"
        return ""


def _sent_path(request: Request) -> str:
    """The path as the client sent it (percent-encoded, so no control character is echoed)."""
    raw = request.scope.get("raw_path")
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) and raw else str(request.scope["path"])


def _echoed(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
