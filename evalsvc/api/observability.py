"""Access log and RPC metrics of every call, once its outcome is known.

The call interceptor (evalsvc.api.interceptor) reports each call here from its end hook, because
only then are its status code and its latency known; with them, the tenant authentication found
("" when the call's key was refused). Rejected calls are counted and logged too.

What is logged is chosen field by field: method, tenant, code, latency, run id and peer address.
Metadata (where API keys travel) and request bodies are never read for the log.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, NamedTuple

import grpc

from evalsvc.metrics import Metrics

access_log = logging.getLogger("evalsvc.access")

# Load balancers poll health; at INFO those lines would drown the rest. They are logged at DEBUG.
QUIET_PREFIXES = ("/grpc.health.v1.Health/",)


class FinishedCall(NamedTuple):
    """One finished call, as its end hook saw it. A NamedTuple rather than a frozen dataclass: one is
    built for every call, GetRun's included, and a tuple is the cheapest immutable record to build."""

    method: str
    code: grpc.StatusCode
    started: float  # `time.perf_counter()` when the call started
    request: Any  # the decoded request (or the interceptor's MalformedRequest)
    response: Any  # the unary response; None for streams and failed calls
    peer: str
    stream: bool
    tenant: str  # the tenant whose key the call carried; "" when its key was refused (or it needs none)


class Observer:
    """Records a finished call: RPC metrics (count by code, latency) and one access log line."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def stream_opened(self, method: str) -> None:
        """Count an open stream; `finished` counts it closed."""
        self._metrics.open_streams.labels(method).inc()

    def finished(self, call: FinishedCall) -> None:
        """Count the call (closing its stream) and log its access line."""
        method, status, started, request, response, peer, stream, tenant = call  # one unpacking, not 8 lookups
        seconds = time.perf_counter() - started
        if stream:
            self._metrics.open_streams.labels(method).dec()
        code = status.name
        self._metrics.rpc_finished(method, code, seconds, stream=stream)
        level = logging.DEBUG if method.startswith(QUIET_PREFIXES) else logging.INFO
        if not access_log.isEnabledFor(level):
            return
        run_id = _run_id(request, response)
        latency_ms = round(seconds * 1000, 3)
        access_log.log(
            level,
            "%s %s %.1f ms tenant=%s%s",
            method,
            code,
            latency_ms,
            tenant or "-",
            f" run_id={run_id}" if run_id else "",
            extra={
                "method": method,
                "code": code,
                "latency_ms": latency_ms,
                "tenant": tenant,
                "run_id": run_id,
                "peer": peer,
            },
        )


def _run_id(request: Any, response: Any) -> str:
    """The run a call concerns: the request's `run_id` (as `shown_id` shows it), else the created run of a
    response (CreateRun)."""
    descriptor = getattr(request, "DESCRIPTOR", None)
    if descriptor is not None and "run_id" in descriptor.fields_by_name:
        return shown_id(str(request.run_id))
    descriptor = getattr(response, "DESCRIPTOR", None)
    if descriptor is not None and "run" in descriptor.fields_by_name and response.HasField("run"):
        return str(response.run.id)
    return ""


_PLAIN_ID = re.compile(r"[A-Za-z0-9_.:-]+")
_SHOWN_CHARS = 64


def shown_id(value: str) -> str:
    """A caller's id as a log line shows it: as it is when it could be an id, else quoted with every
    control and non-ASCII character escaped, and cut. A `run_id` holding newlines forged whole log
    lines (an ERROR line with another key's name), and one of 16 MB made a line of 16 MB."""
    if len(value) <= _SHOWN_CHARS and _PLAIN_ID.fullmatch(value):
        return value
    return ascii(value[:_SHOWN_CHARS]) + ("..." if len(value) > _SHOWN_CHARS else "")
