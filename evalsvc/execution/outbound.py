"""Outbound calls to model endpoints: secrets, SSRF checks, retries with backoff, adaptive concurrency.

Every target and judge call goes through `Outbound.post_json`, so the rules hold in one place:
- secrets are referenced by name and filled in here (`endpoint_headers`) from the values the run's
  tenant may use (evalsvc.secrets), never stored in run rows, returned by an RPC or logged;
- a URL whose host is (or resolves to) a private, loopback, link-local or reserved address is
  refused unless the operator allow-listed it (`--outbound-allow`), so a run cannot make the server
  reach its own network (SSRF);
- 408/429/5xx and connection errors are retried with exponential backoff and full jitter, honouring
  Retry-After; each endpoint has an adaptive concurrency limit that halves on 429 and grows by one
  on each success (AIMD), so a rate-limited endpoint is not hammered. A call's slot under that limit
  is a context manager: a cancelled call gives it back like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from evalsvc.config import Settings
from evalsvc.execution.slots import Slots
from evalsvc.v1 import target_pb2

RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}

# Set by the executor for each job: called when a call is about to start (after waiting for an
# endpoint slot), it raises to stop the call - how a spent budget stops new model calls at once.
call_guard: ContextVar[Callable[[], None] | None] = ContextVar("evalsvc_call_guard", default=None)
# Set by the executor for each job: how a call waits when its endpoint makes it wait - all the
# endpoint's slots are taken, or a retry backs off (Retry-After). The job gives its worker slot back
# meanwhile, so jobs held up by a slow, hung or throttling endpoint never hold the workers other runs
# need (a worker slot bounds calls in progress, not calls waiting for their turn).
endpoint_wait: ContextVar[Callable[[], AbstractAsyncContextManager[None]] | None] = ContextVar(
    "evalsvc_endpoint_wait", default=None
)
SECRET_HEADER = "secret:"


class OutboundError(Exception):
    """A call that failed for good; `reason` is safe to record (no secrets, no bodies)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def secret_refs(endpoint: target_pb2.Endpoint, at: str) -> list[tuple[str, str]]:
    """(field, name) of every secret an endpoint names: its `api_key_secret` and `secret:NAME` headers."""
    names = [endpoint.api_key_secret] if endpoint.api_key_secret else []
    names += [value[len(SECRET_HEADER) :] for value in endpoint.headers.values() if value.startswith(SECRET_HEADER)]
    return [(at, name) for name in names]


def endpoint_headers(endpoint: target_pb2.Endpoint, secrets: Mapping[str, str]) -> dict[str, str]:
    """Request headers with the named secrets filled in from `secrets` (the values the run's tenant may
    use, by upper-case name); OutboundError when one is not among them (deleted since the run began)."""

    def value(name: str) -> str:
        try:
            return secrets[name.upper()]
        except KeyError:
            raise OutboundError(f"no secret named {name!r} is available to the run's tenant") from None

    headers = {"content-type": "application/json"}
    for name, header in endpoint.headers.items():
        headers[name] = value(header[len(SECRET_HEADER) :]) if header.startswith(SECRET_HEADER) else header
    if endpoint.api_key_secret:
        headers["authorization"] = f"Bearer {value(endpoint.api_key_secret)}"
    return headers


class AllowList:
    """Hosts and networks that may be called although they are not public."""

    def __init__(self, spec: str) -> None:
        self._hosts: set[str] = set()
        self._networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in filter(None, (e.strip() for e in spec.split(","))):
            try:
                self._networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self._hosts.add(entry.lower())

    def allows(self, host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Whether host (as named) or the address it resolved to is allow-listed."""
        return host.lower() in self._hosts or any(address in network for network in self._networks)


def _is_internal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_reserved
        or address.is_multicast
        or address.is_unspecified
    )


def check_url_shape(url: str) -> str | None:
    """A static problem with an endpoint URL (scheme, host), or None. Used at CreateRun."""
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        return "must be an http(s) URL with a host"
    return None


async def check_destination(url: str, allow: AllowList) -> None:
    """Refuse a URL whose host is or resolves to an internal address that is not allow-listed."""
    host = urlsplit(url).hostname or ""
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise OutboundError(f"cannot resolve host {host!r}") from exc
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    for address in addresses:
        if _is_internal(address) and not allow.allows(host, address):
            raise OutboundError(
                f"refused to call {host!r}: {address} is a private, loopback or link-local address "
                "(allow it with --outbound-allow)"
            )


class AdaptiveLimit:
    """AIMD concurrency limit of one endpoint: halve on 429, grow by one on success."""

    def __init__(self, limit: float = 8.0, minimum: float = 1.0, maximum: float = 256.0) -> None:
        self.limit = limit
        self.minimum = minimum
        self.maximum = maximum
        self.slots = Slots(int(limit))

    @property
    def in_flight(self) -> int:
        """Calls holding a slot now."""
        return self.slots.held

    async def acquire(self) -> None:
        """Wait for a slot under the current limit."""
        await self.slots.acquire()

    def release(self, *, throttled: bool) -> None:
        """Give the slot back and adapt the limit."""
        if throttled:
            self.limit = max(self.minimum, self.limit / 2)
        else:
            self.limit = min(self.maximum, self.limit + 1 / max(self.limit, 1.0))
        self.slots.release()
        self.slots.set_capacity(int(self.limit))


@dataclass
class _Call:
    """What the end of a call tells its endpoint's limit."""

    throttled: bool = False


def _held_up() -> AbstractAsyncContextManager[None]:
    """How this call waits while its endpoint holds it up (see `endpoint_wait`)."""
    wait = endpoint_wait.get()
    return wait() if wait is not None else contextlib.nullcontext()


@contextlib.asynccontextmanager
async def _endpoint_slot(limit: AdaptiveLimit) -> AsyncIterator[_Call]:
    """One call's slot under its endpoint's limit, given back (and the limit adapted) however the call
    ends: cancelled, failed or answered. A call that must queue for the slot waits the way its
    caller asked (`endpoint_wait`)."""
    if limit.slots.available():
        await limit.acquire()
    else:
        acquired = False
        try:
            async with _held_up():
                await limit.acquire()
                acquired = True
        except BaseException:
            if acquired:  # cancelled while the caller took its own resources back
                limit.release(throttled=False)
            raise
    call = _Call()
    try:
        yield call
    finally:
        limit.release(throttled=call.throttled)


@dataclass(frozen=True)
class Reply:
    """A successful call: the JSON body, how long the successful attempt took, and attempts made."""

    body: Any
    latency_ms: float
    attempts: int


class Outbound:
    """The shared HTTP client of targets and judges."""

    def __init__(self, settings: Settings) -> None:
        self.allow = AllowList(settings.outbound_allow)
        self._retries = settings.http_retries
        self._client = httpx.AsyncClient(follow_redirects=False, limits=httpx.Limits(max_connections=512))
        self._limits: dict[str, AdaptiveLimit] = {}
        self.base_backoff_s = 0.2

    def limit_of(self, url: str) -> AdaptiveLimit:
        """The adaptive limit of the endpoint (scheme://host:port) serving url."""
        parts = urlsplit(url)
        key = f"{parts.scheme}://{parts.netloc}"
        if key not in self._limits:
            self._limits[key] = AdaptiveLimit()
        return self._limits[key]

    async def post_json(self, url: str, body: Any, headers: Mapping[str, str], timeout_s: float = 60.0) -> Reply:
        """POST JSON and return the JSON reply, retrying what may succeed on a later attempt."""
        await check_destination(url, self.allow)
        limit = self.limit_of(url)
        attempt = 0
        while True:
            attempt += 1
            async with _endpoint_slot(limit) as call:
                guard = call_guard.get()
                if guard is not None:
                    guard()
                started = time.perf_counter()
                try:
                    response = await self._client.post(url, json=body, headers=dict(headers), timeout=timeout_s)
                except (httpx.TransportError, httpx.TimeoutException) as exc:
                    failure = f"{type(exc).__name__} calling {urlsplit(url).netloc}"
                    retry_after = None
                else:
                    call.throttled = response.status_code == 429
                    latency_ms = (time.perf_counter() - started) * 1000
                    if response.status_code < 300:
                        try:
                            return Reply(response.json(), latency_ms, attempt)
                        except ValueError as exc:
                            not_json = f"{urlsplit(url).netloc} answered with a body that is not JSON"
                            raise OutboundError(not_json) from exc
                    failure = f"HTTP {response.status_code} from {urlsplit(url).netloc}"
                    if response.status_code not in RETRYABLE_STATUS:
                        raise OutboundError(failure)
                    retry_after = retry_after_s(response.headers.get("retry-after"))
            if attempt > self._retries:
                raise OutboundError(f"{failure} (gave up after {attempt} attempts)")
            backoff = random.uniform(0, self.base_backoff_s * 2 ** (attempt - 1))
            async with _held_up():
                await asyncio.sleep(max(backoff, retry_after or 0.0))

    async def close(self) -> None:
        """Close pooled connections."""
        await self._client.aclose()


def retry_after_s(value: str | None) -> float | None:
    """A Retry-After header's delay in seconds, at most 60 (HTTP dates are not honoured); None when absent."""
    if not value:
        return None
    try:
        return min(float(value), 60.0)
    except ValueError:
        return None
