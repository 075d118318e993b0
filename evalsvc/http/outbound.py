"""Outbound calls to model endpoints: secrets, SSRF checks, retries with backoff, adaptive concurrency.

Every target and judge call goes through `Outbound.post_json`, so the rules hold in one place:
- secrets are referenced by name and filled in here (`endpoint_headers`) from the values the run's
  tenant may use (evalsvc.secrets), never stored in run rows, returned by an RPC or logged;
- a URL is called only when every address its host is (or resolves to) is globally routable
  (`is_global_destination`), unless the operator allow-listed it (`--outbound-allow`: its host or
  network, on the port connected to when the entry names one), so a run cannot make the server reach
  its own network, its own other services or a cloud metadata service (SSRF);
- 408/429/5xx and connection errors are retried with exponential backoff and full jitter, honouring
  Retry-After; each endpoint has an adaptive concurrency limit that halves on 429 and grows by one
  on each success (AIMD), so a rate-limited endpoint is not hammered. A call's slot under that limit
  is a context manager: a cancelled call gives it back like any other. The limit is the endpoint's,
  shared by every tenant, but waiting for it is fair: a freed slot goes to the next tenant in
  round-robin order among those with calls waiting (`call_tenant`; first come, first served within
  a tenant), so one tenant's backlog on a popular endpoint (a provider, the default judge) does not
  queue ahead of another tenant's call, and while other tenants use it one tenant holds at most half of
  its slots (`SharedSlots`), so one tenant's slow calls cannot hold all of them;
- what one call may cost is bounded whatever its endpoint does: its name is looked up on resolver
  threads of its own, a few per tenant, within a timeout, holding no worker slot (`_resolve`,
  evalsvc.http.resolver); its reply is bounded in decoded bytes, pieces and bytes on the connection
  (evalsvc.http.replies). Past a bound the call is that evaluation's error.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import ipaddress
import random
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit

import httpcore
import httpx

from evalsvc.config import Settings, allow_entries
from evalsvc.errors import FieldViolation
from evalsvc.http.errors import OutboundError as OutboundError  # re-exported: callers import it from here
from evalsvc.http.errors import UnusableReply as UnusableReply
from evalsvc.http.json_bodies import JsonParser
from evalsvc.http.replies import (
    CountedStream,
    attempt_reads,
    error_excerpt,
    one_line,
    read_body,
    without_secrets,
)
from evalsvc.http.resolver import IPAddress, Resolver
from evalsvc.slots import SharedSlots, Slots
from evalsvc.v1 import grader_pb2, target_pb2

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
# Set by the executor for each job (and by dataset generation for each generation): the tenant the
# calls are made for - a target's, and a judge's grading that tenant's run. It is whose turn a call
# waits for when its endpoint's slots are all taken (see `AdaptiveLimit`).
call_tenant: ContextVar[str] = ContextVar("evalsvc_call_tenant", default="")
SECRET_HEADER = "secret:"
# How long a create call waits for DNS to check an endpoint's name: a slow resolver must not stall it.
CREATE_RESOLVE_TIMEOUT_S = 2.0
# How long a call waits for DNS (its turn for a resolver thread included): a name that does not resolve
# within it is that evaluation's error. (A call's own `timeout_s` is the bound when shorter.)
RESOLVE_TIMEOUT_S = 5.0
# Every lookup of a destination's name: on threads of its own, bounded per tenant (evalsvc.http.resolver).
RESOLVER = Resolver()


def secret_refs(endpoint: target_pb2.Endpoint, at: str) -> list[tuple[str, str]]:
    """(field, name) of every secret an endpoint at `at` names: its `api_key_secret` and `secret:NAME`
    headers, each field its own path (`at.api_key_secret`, `at.headers[X-Org]`): two refusals both named
    `at` left the caller to guess which reference was wrong."""
    refs = [(f"{at}.api_key_secret", endpoint.api_key_secret)] if endpoint.api_key_secret else []
    refs += [
        (f"{at}.headers[{header}]", value[len(SECRET_HEADER) :])
        for header, value in sorted(endpoint.headers.items())
        if value.startswith(SECRET_HEADER)
    ]
    return refs


def endpoint_secret_values(endpoint: target_pb2.Endpoint, secrets: Mapping[str, str]) -> tuple[str, ...]:
    """The values of the secrets an endpoint names (what `endpoint_headers` fills in): kept out of what its
    calls report (`post_json`'s `secrets`)."""
    return tuple(secrets[name.upper()] for _, name in secret_refs(endpoint, "") if name.upper() in secrets)


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


# Blocks that Python 3.11's `is_global` still calls global although nothing on the public internet
# answers there: the IETF protocol assignments (192.0.0.0/24; 3.11 knows only parts of it),
# IPv4-compatible IPv6 (::/96, deprecated; stacks may route it as the IPv4 address in its low bits)
# and local-use NAT64 (64:ff9b:1::/48, RFC 8215). Newer Pythons agree; listing them keeps the rule
# the same on every version.
_NOT_GLOBAL = tuple(ipaddress.ip_network(n) for n in ("192.0.0.0/24", "::/96", "64:ff9b:1::/48"))
# Prefixes whose low 32 bits are the IPv4 address a translator delivers to: NAT64's well-known prefix
# (RFC 6052) and SIIT's IPv4-translated addresses (RFC 2765, ::ffff:0:a.b.c.d; Python calls them
# global, so [::ffff:0:169.254.169.254] passed as a public address).
_TRANSLATED = tuple(ipaddress.ip_network(n) for n in ("64:ff9b::/96", "::ffff:0:0:0/96"))


def embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries and would deliver to: IPv4-mapped, 6to4, Teredo
    (its server and client), NAT64 and IPv4-translated (SIIT) forms. Empty for IPv4 and for native IPv6."""
    if isinstance(address, ipaddress.IPv4Address):
        return []
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped]
    if address.sixtofour is not None:
        return [address.sixtofour]
    if address.teredo is not None:
        return list(address.teredo)
    if any(address in prefix for prefix in _TRANSLATED):
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    return []


def is_global_destination(address: IPAddress) -> bool:
    """Whether the server may call this address without an allow-list entry: it (or every IPv4
    address it embeds) is globally routable and unicast.

    A rule rather than a list of forbidden ranges: whatever is not public on the internet (private,
    loopback, link-local, shared address space such as 100.100.100.200, benchmarking, documentation,
    reserved, multicast, and each of these wrapped in an IPv6 transition form) is refused."""
    candidates: list[IPAddress] = list(embedded_ipv4(address)) or [address]
    for candidate in candidates:
        if not candidate.is_global or candidate.is_multicast:
            return False
        if any(candidate in network for network in _NOT_GLOBAL if network.version == candidate.version):
            return False
    return True


class AllowList:
    """Hosts and networks the operator allows to be called although they are not globally routable,
    each on one port or on every port."""

    def __init__(self, spec: str) -> None:
        """`spec` as `--outbound-allow` takes it (`evalsvc.config.allow_entries`); ValueError for an
        entry that is neither a network nor a host name, with an optional port from 1 to 65535."""
        self._entries = allow_entries(spec)

    def allows(self, host: str, address: IPAddress, port: int) -> bool:
        """Whether an entry for host or address allows the port connected to: an entry with a port allows
        only it (an entry for a local model server must not open the gateway, metrics or a database on
        its host), one without allows every port."""
        candidates = [address, *embedded_ipv4(address)]
        return any(
            entry.port in (None, port)
            and (
                entry.destination == host.lower()
                or (not isinstance(entry.destination, str) and any(c in entry.destination for c in candidates))
            )
            for entry in self._entries
        )


# The ports schemes imply.
DEFAULT_PORTS = {"http": 80, "https": 443}


def url_port(parts: SplitResult) -> int:
    """The port a connection to a URL is made on: its own, or its scheme's (0 for a scheme with none,
    which only an entry without a port allows). ValueError for one that is no port (`:99999`). What the
    SSRF checks match allow-list entries against, and what an endpoint's limit is keyed by."""
    port = parts.port
    return DEFAULT_PORTS.get(parts.scheme.lower(), 0) if port is None else port


def shown_host(url: str) -> str:
    """The host[:port] of a URL, as messages and logs name it: without the `user:password@` a URL may
    carry (a webhook's or an endpoint's credentials were written to the log, `last_error` and the
    delivery's `disabled_reason` in clear text)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address, as URLs write it
    try:
        port = parts.port
    except ValueError:  # not a port: the host alone
        port = None
    return host if port is None else f"{host}:{port}"


# Characters a URL may not hold anywhere: ASCII controls (urlsplit drops TAB, CR and LF without a word,
# so a URL holding them passed the checks and every attempt then failed) and the space.
_NOT_IN_URLS = re.compile(r"[\x00-\x20\x7f]")
# What a host name holds once IDNA-encoded: letters, digits, '-', '_' (seen in the wild) and dots.
_HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")
MAX_HOST_NAME = 253


def host_name_problem(host: str) -> str | None:
    """Why `host` (a URL's host, IPv6 brackets removed) is no host name a lookup could find, or None: an
    empty or over-long (63) label, characters no name holds. The system resolver raised UnicodeError for
    those (`a..b.com`, `.example.com`, a 64-character label), which is no OSError, and a create was
    INTERNAL."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    try:
        encoded = host.encode("idna").decode("ascii")
    except UnicodeError:
        return "must have a valid host name (labels of 1 to 63 characters)"
    if len(encoded) > MAX_HOST_NAME or not _HOST_NAME.fullmatch(encoded):
        return "must have a valid host name (labels of 1 to 63 characters)"
    return None


def check_url_shape(url: str) -> str | None:
    """A static problem with an endpoint URL (scheme, host, port), or None. Used at CreateRun and for
    webhooks: a port no connection can have (`:99999`, `:-1`, `:1:2`) made every attempt fail in the
    HTTP client with an error it does not name (a webhook's deliveries failed so, for good). A URL that
    does not parse (`http://[::1/`) or whose host no lookup could find is refused here too: both were
    INTERNAL."""
    if _NOT_IN_URLS.search(url):
        return "must not contain spaces or control characters (tab, CR, LF)"
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:  # "Invalid IPv6 URL"
        return "must be an http(s) URL with a host"
    if parts.scheme not in {"http", "https"} or not host:
        return "must be an http(s) URL with a host"
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 and parts.netloc.rpartition("@")[2].rpartition("]")[2].count(":"):
        return "must have a port from 1 to 65535, or none"
    return host_name_problem(host)


async def _resolve(host: str, timeout_s: float) -> list[IPAddress]:
    """The addresses host names: itself when it is an IP literal, else what `RESOLVER` says within
    `timeout_s` (TimeoutError), in the turn of the tenant the call is made for (`call_tenant`).

    A lookup is a wait on something outside the server, like a slow endpoint: the job gives its worker
    slot back meanwhile (`_held_up`), so lookups that a tenant's resolver answers late never hold the
    workers other runs need (64 of them did, with no timeout, for minutes)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    async with _held_up():
        return await RESOLVER.resolve(host, call_tenant.get(), timeout_s)


def _unresolved(host: str, exc: OSError, timeout_s: float) -> str:
    """Why a host could not be called: its name did not resolve, or not in time."""
    if isinstance(exc, TimeoutError):
        return f"cannot resolve host {host!r} within {timeout_s:g} s"
    return f"cannot resolve host {host!r}"


def _refusal(host: str, addresses: list[IPAddress], port: int, allow: AllowList) -> str | None:
    """Why host, resolved to addresses, may not be called on port, or None. One message whatever the
    allow-list holds: saying which entries name the address (for other ports) told any tenant, without a
    connection made, which private networks and ports the operator opened."""
    for address in addresses:
        if is_global_destination(address) or allow.allows(host, address, port):
            continue
        shown = f"[{address}]" if address.version == 6 else str(address)
        return (
            f"refused to call {host!r}: {shown}:{port} is not allowed "
            "(not globally routable; allow it with --outbound-allow)"
        )
    return None


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with the SSRF rule at connect time: the host is resolved once,
    every address checked (for the port connected to), and the connection made to a checked address.
    What was checked is what is connected to, so a name re-pointed between `check_destination` and the
    connection (DNS rebinding) is refused too. Its connections count what each attempt reads (`CountedStream`)."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend, allow: AllowList) -> None:
        self._inner = inner
        self._allow = allow

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        within = min(timeout or RESOLVE_TIMEOUT_S, RESOLVE_TIMEOUT_S)
        try:
            addresses = await _resolve(host, within)
        except OSError as exc:  # TimeoutError included
            raise httpcore.ConnectError(_unresolved(host, exc, within)) from exc
        if refusal := _refusal(host, addresses, port, self._allow):
            raise httpcore.ConnectError(refusal)
        failure: httpcore.ConnectError | None = None
        for address in addresses:
            try:
                stream = await self._inner.connect_tcp(
                    str(address), port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
                return CountedStream(stream)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = httpcore.ConnectError(str(exc))
        raise failure or httpcore.ConnectError(f"no address for {host!r}")

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("a unix socket is not a destination")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def checked_transport(allow: AllowList, limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """httpx's transport with `_CheckedBackend` under its connection pool. The one place that reaches
    into httpx's and httpcore's internals (the pool and its backend); tests/test_outbound_rule.py
    fails if they move."""
    transport = httpx.AsyncHTTPTransport(limits=limits)
    pool = transport._pool
    pool._network_backend = _CheckedBackend(pool._network_backend, allow)
    return transport


async def check_destination(url: str, allow: AllowList, timeout_s: float = RESOLVE_TIMEOUT_S) -> None:
    """Refuse (OutboundError) a URL unless every address its host resolves to, within `timeout_s`, is
    globally routable or allow-listed for the port it names (or its scheme implies). Runs before every
    call, so a name that later resolves elsewhere is caught."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = url_port(parts)
    except ValueError:  # the default judge's URL (--judge-base-url) is not shape-checked as a tenant's are
        raise OutboundError(f"refused to call {shown_host(url)}: its port is not from 1 to 65535") from None
    try:
        addresses = await _resolve(host, timeout_s)
    except OSError as exc:  # TimeoutError included
        raise OutboundError(_unresolved(host, exc, timeout_s)) from exc
    if refusal := _refusal(host, addresses, port, allow):
        raise OutboundError(refusal)


def named_endpoints(
    target: target_pb2.Target | None = None,
    target_at: str = "target",
    graders: Iterable[tuple[str, grader_pb2.Grader]] = (),
) -> list[tuple[str, str]]:
    """(field, base_url) of every endpoint a target and graders (with their field paths) would call."""
    out: list[tuple[str, str]] = []
    kind = target.WhichOneof("kind") if target is not None else None
    if target is not None and kind in ("chat", "http"):
        endpoint = getattr(target, kind).endpoint
        if endpoint.base_url:
            out.append((f"{target_at}.{kind}.endpoint.base_url", endpoint.base_url))
    for at, grader in graders:
        if grader.WhichOneof("kind") == "llm_judge" and grader.llm_judge.endpoint.base_url:
            out.append((f"{at}.llm_judge.endpoint.base_url", grader.llm_judge.endpoint.base_url))
    return out


async def destination_violations(
    endpoints: Iterable[tuple[str, str]], allow: AllowList, tenant: str
) -> list[FieldViolation]:
    """The (field, base_url) endpoints a definition names that would be refused, as violations: what
    CreateRun, CreateTarget, CreateGrader and UpdateGrader check before storing anything. The names are
    looked up in `tenant`'s turn (the caller's).

    A name that does not resolve now, or not within CREATE_RESOLVE_TIMEOUT_S, is accepted (DNS may be
    down, or the name not yet published); `check_destination` refuses it at call time if it then
    resolves somewhere not allowed."""
    out: list[FieldViolation] = []
    token = call_tenant.set(tenant)
    try:
        for field, url in endpoints:
            try:
                parts = urlsplit(url)
                host, port = parts.hostname or "", url_port(parts)
            except ValueError:  # does not parse, or no port: check_url_shape says why
                continue
            if problem := host_name_problem(host):  # the resolver would raise UnicodeError, no OSError
                out.append(FieldViolation(field, problem))
                continue
            try:
                addresses = await _resolve(host, CREATE_RESOLVE_TIMEOUT_S)
            except OSError:  # TimeoutError included
                continue
            if refusal := _refusal(host, addresses, port, allow):
                out.append(FieldViolation(field, refusal))
    finally:
        call_tenant.reset(token)
    return out


# Endpoints whose adaptive limits are kept (see Outbound.limit_of).
ENDPOINT_LIMITS = 1024


def _endpoint_host(host: str) -> str:
    """One spelling of a URL's host: lower case, no trailing dot, an IP address in its short form
    (`API.example.com.` and `api.example.com`, `2001:db8:0::1` and `2001:db8::1` are one endpoint)."""
    host = host.lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


class AdaptiveLimit:
    """AIMD concurrency limit of one endpoint and credentials: halve on 429, grow by one on success.
    Shared by every tenant calling with those credentials (the server's judge key, an operator secret,
    or none); its waiters are served round-robin across tenants, and while others use it one tenant holds
    at most half of its slots (`SharedSlots`)."""

    def __init__(self, limit: float = 8.0, minimum: float = 1.0, maximum: float = 256.0) -> None:
        self.limit = limit
        self.minimum = minimum
        self.maximum = maximum
        self.slots = SharedSlots(int(limit))

    @property
    def in_flight(self) -> int:
        """Calls holding a slot now."""
        return self.slots.held

    @property
    def idle(self) -> bool:
        """No call holds a slot or waits for one."""
        return not self.slots.held and not self.slots.waiting

    async def acquire(self, tenant: str = "") -> None:
        """Wait for a slot under the current limit, in `tenant`'s turn."""
        await self.slots.acquire(tenant)

    def give_back(self, tenant: str = "") -> None:
        """Give a slot (taken for `tenant`) back that made no call: the limit learns nothing from it."""
        self.slots.release(tenant)

    def release(self, tenant: str = "", *, throttled: bool) -> None:
        """Give the slot (taken for `tenant`) back and adapt the limit."""
        if throttled:
            self.limit = max(self.minimum, self.limit / 2)
        else:
            self.limit = min(self.maximum, self.limit + 1 / max(self.limit, 1.0))
        self.slots.release(tenant)
        self.slots.set_capacity(int(self.limit))


@dataclass
class _Call:
    """What the end of a call tells its endpoint's limit."""

    throttled: bool = False


def _held_up() -> AbstractAsyncContextManager[None]:
    """How this call waits while its endpoint holds it up (see `endpoint_wait`)."""
    wait = endpoint_wait.get()
    return wait() if wait is not None else contextlib.nullcontext()


class TenantCalls:
    """The calls each tenant has in progress in this process, at most `per_tenant` (--max-workers-per-tenant).

    Each call in progress holds a worker of the executor, and a call to an endpoint that never answers
    holds it until its timeout (up to 600 s). Per endpoint, the adaptive limit bounds that; but a tenant
    names as many endpoints as it likes, and runs on 8 hung endpoints held all 64 workers, so that no
    other tenant's job was claimed until the calls timed out. With this bound, whatever one tenant's
    endpoints do, the rest of the workers are left to the other tenants."""

    def __init__(self, per_tenant: int) -> None:
        self.per_tenant = per_tenant
        self._of: dict[str, Slots] = {}  # kept while a tenant has calls in progress or waiting

    def of(self, tenant: str) -> Slots:
        """The tenant's room for calls."""
        room = self._of.get(tenant)
        if room is None:
            room = self._of[tenant] = Slots(self.per_tenant)
        return room

    def forget_if_idle(self, tenant: str) -> None:
        """Forget a tenant with no call in progress or waiting (tenants that come and go cost nothing)."""
        room = self._of.get(tenant)
        if room is not None and not room.held and not room.waiting:
            del self._of[tenant]


async def _wait_for_slot(limit: AdaptiveLimit, tenant: str) -> None:
    """Take a slot of the endpoint, in the tenant's turn."""
    if limit.slots.available(tenant):
        await limit.acquire(tenant)
    else:
        await _held_up_until(functools.partial(limit.acquire, tenant), functools.partial(limit.give_back, tenant))


async def _held_up_until(take: Callable[[], Awaitable[None]], give_back: Callable[[], None]) -> None:
    """Wait for what `take` takes the way the caller asked (`endpoint_wait`: a job gives its worker back
    meanwhile); cancelled as the caller takes its own resources back, it gives the taken thing back."""
    taken = False
    try:
        async with _held_up():
            await take()
            taken = True
    except BaseException:
        if taken:
            give_back()
        raise


def _credentials(secrets: Sequence[str]) -> bytes:
    """What identifies a call's credentials at its endpoint: a digest of the secrets it sends (its API
    key, secret-filled headers); b"" for none. The same on every call of a target or judge."""
    return hashlib.blake2b(repr(sorted(secrets)).encode(), digest_size=16).digest() if secrets else b""


@contextlib.asynccontextmanager
async def _endpoint_slot(limit_of: Callable[[], AdaptiveLimit], calls: TenantCalls) -> AsyncIterator[_Call]:
    """One call's slot under its endpoint's limit and within its tenant's room (`TenantCalls`), given
    back (and the limit adapted) however the call ends: cancelled, failed or answered. A call that must
    queue waits the way its caller asked (`endpoint_wait`), in its tenant's turn (`call_tenant`).

    The endpoint's slot comes first, the tenant's room only if there is some now: a slot taken and then
    held while waiting for the tenant's room would sit idle, and one tenant whose own endpoints hang
    could so collect a shared endpoint's slots, turn after turn. Without room, the slot is given back
    (to the next tenant in turn), the call waits for room holding nothing, then, holding the room (the
    tenant's own), queues for the endpoint again."""
    tenant = call_tenant.get()
    try:
        limit = limit_of()
        await _wait_for_slot(limit, tenant)
        # Looked up only now, and again below after a wait: one looked up before a wait may have been
        # forgotten meanwhile (idle), and its holders then counted apart from the tenant's (or the
        # endpoint's) current one: 8 calls in progress against a share of 2.
        room = calls.of(tenant)
        if room.available():
            await room.acquire()  # at once: there is room
        else:
            limit.give_back(tenant)
            await _held_up_until(room.acquire, room.release)  # a waiter: its room is not forgotten meanwhile
            try:
                limit = limit_of()
                await _wait_for_slot(limit, tenant)
            except BaseException:
                room.release()
                raise
        call = _Call()
        try:
            yield call
        finally:
            room.release()
            limit.release(tenant, throttled=call.throttled)
    finally:
        calls.forget_if_idle(tenant)


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
        self._max_reply_bytes = settings.reply_bytes
        self._client = httpx.AsyncClient(
            follow_redirects=False, transport=checked_transport(self.allow, httpx.Limits(max_connections=512))
        )
        # (scheme, host, port, credentials) -> its limit; least recently used first
        self._limits: OrderedDict[tuple[str, str, int, bytes], AdaptiveLimit] = OrderedDict()
        self.calls = TenantCalls(settings.workers_per_tenant)
        self._json = JsonParser()
        self.base_backoff_s = 0.2

    def limit_of(self, url: str, secrets: Sequence[str] = ()) -> AdaptiveLimit:
        """The adaptive limit of calls to the endpoint (scheme, host, port) serving url with the
        credentials `secrets` (the secret values among the call's headers: `_credentials`).

        Keyed by the URL's netloc, user-info and spelling included, every variant of one endpoint's
        URL (`http://a@host/`, `http://HOST:80/`) had a fresh limit of its own, which a tenant could use
        to go around an endpoint's shared limit and the fair queueing on it, and each stayed for good
        (3,000 variants, 3,000 limits; with 64 KiB of user-info each, 64 MB). Keyed by the endpoint
        alone, one tenant whose own key was over its provider's quota (429s) halved the limit of every
        tenant calling that provider with keys of their own (16 one-second calls: 2.3 s alone, 10.8 s
        beside the throttled tenant, a probe measured): a provider's rate limit is its key's. By the
        secrets alone, not every header: a harmless header of a tenant's own (`x-pad: 1`) gave it a fresh
        limit around a shared key's (a review). At most
        ENDPOINT_LIMITS are kept; past it the least recently used idle one is forgotten (it starts
        afresh if used again)."""
        parts = urlsplit(url)
        key = (parts.scheme.lower(), _endpoint_host(parts.hostname or ""), url_port(parts), _credentials(secrets))
        limit = self._limits.get(key)
        if limit is None:
            self._forget_idle_limits()
            limit = self._limits[key] = AdaptiveLimit()  # after the forgetting: the newest is never forgotten
        else:
            self._limits.move_to_end(key)
        return limit

    def _forget_idle_limits(self) -> None:
        """Make room for one more limit: forget the least recently used that no call holds or waits for,
        down to ENDPOINT_LIMITS - 1 (when all are busy, none: their calls bound how many there are)."""
        excess = len(self._limits) + 1 - ENDPOINT_LIMITS
        for key in [k for k, limit in self._limits.items() if limit.idle][:excess] if excess > 0 else ():
            del self._limits[key]

    async def post_json(
        self,
        url: str,
        body: Any,
        headers: Mapping[str, str],
        timeout_s: float = 60.0,
        *,
        secrets: Sequence[str] = (),
    ) -> Reply:
        """POST JSON and return the JSON reply, retrying what may succeed on a later attempt. `secrets`: the
        values among the headers that are secrets (API keys): an error reply that quotes one does not show it."""
        await check_destination(url, self.allow, min(timeout_s, RESOLVE_TIMEOUT_S))
        attempt = 0
        while True:
            attempt += 1
            # Looked up at each attempt (and after each wait): one idle meanwhile may have been forgotten.
            async with _endpoint_slot(functools.partial(self.limit_of, url, secrets), self.calls) as call:
                guard = call_guard.get()
                if guard is not None:
                    guard()
                started = time.perf_counter()
                try:
                    code, content, retry_after = await self._post(url, body, headers, timeout_s)
                except httpx.LocalProtocolError as exc:  # the request itself cannot be sent: never will be
                    raise OutboundError(f"LocalProtocolError calling {shown_host(url)} (not retried)") from exc
                except (httpx.TransportError, httpx.TimeoutException, TimeoutError) as exc:
                    failure = f"{type(exc).__name__} calling {shown_host(url)}"
                    retry_after = None
                else:
                    call.throttled = code == 429
                    latency_ms = (time.perf_counter() - started) * 1000
                    if code < 300:
                        try:
                            return Reply(await self.parse_json(content), latency_ms, attempt)
                        except ValueError as exc:
                            raise UnusableReply(_not_json(shown_host(url), code, content, exc)) from exc
                    shown = one_line(without_secrets(content, secrets)) if content else ""
                    failure = f"HTTP {code} from {shown_host(url)}" + (f": {shown}" if shown else "")
                    if code not in RETRYABLE_STATUS:
                        raise OutboundError(failure)
            if attempt > self._retries:
                raise OutboundError(f"{failure} (gave up after {attempt} attempts)")
            backoff = random.uniform(0, self.base_backoff_s * 2 ** (attempt - 1))
            async with _held_up():
                await asyncio.sleep(max(backoff, retry_after or 0.0))

    async def parse_json(self, text: str | bytes) -> Any:
        """An endpoint's JSON: a reply, or the JSON inside one (a judge's verdict, generated items), parsed
        off the loop when large (`JsonParser`), waiting in the calling tenant's turn (`call_tenant`)."""
        return await self._json.parse(text, call_tenant.get())

    async def _post(
        self, url: str, body: Any, headers: Mapping[str, str], timeout_s: float
    ) -> tuple[int, bytes, float | None]:
        """One attempt: (status, the body of a success or the start of an error's, Retry-After). The
        attempt, reading the body included, ends within `timeout_s` (httpx's own timeout is per read: a
        body dripped a byte at a time held a worker and its endpoint slot for good); the body is read as
        it arrives, and one past --max-reply-bytes fails the call (a tenant's endpoint answering 1 GB was
        read whole, then parsed on the event loop, every tenant's calls stopped meanwhile). What the
        reply may cost on the way - bytes on the connection, pieces, decoding - is bounded too
        (evalsvc.http.replies)."""
        host = shown_host(url)
        request_headers = httpx.Headers(headers)
        request_headers["accept-encoding"] = "identity"  # decoded here, bounded (`read_body`), if sent anyway
        with attempt_reads(host) as reads:
            async with (
                asyncio.timeout(timeout_s),
                self._client.stream("POST", url, json=body, headers=request_headers, timeout=timeout_s) as response,
            ):
                retry_after = retry_after_s(response.headers.get("retry-after"))
                if response.status_code >= 300:
                    return response.status_code, await error_excerpt(response, reads), retry_after
                content = await read_body(response, host, self._max_reply_bytes, reads)
                return response.status_code, content, retry_after

    async def close(self) -> None:
        """Close pooled connections and stop the JSON parser's worker."""
        await self._client.aclose()
        await self._json.close()


def _not_json(host: str, code: int, content: bytes, exc: ValueError) -> str:
    """Why a success's body is no reply: an empty one said "Expecting value: line 1 column 1 (char 0)"."""
    if not content.strip():
        return f"{host} answered HTTP {code} with an empty body, not JSON"
    return f"{host} answered with a body that is not usable JSON ({exc})"


def retry_after_s(value: str | None) -> float | None:
    """A Retry-After header's delay in seconds, at most 60 (HTTP dates are not honoured); None when absent."""
    if not value:
        return None
    try:
        return min(float(value), 60.0)
    except ValueError:
        return None
