"""Errors: every failed call raises an `EvalError` (a subclass per gRPC code) with the server's rich details.

The server puts a `google.rpc.Status` in the `grpc-status-details-bin` trailer whose details hold an `ErrorInfo`
(domain `evalsvc`, a stable `reason`), and where they apply a `BadRequest` and a `RetryInfo` (docs/errors.md).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import ItemsView, Iterable, KeysView, Mapping
from typing import Any, NamedTuple
from urllib.parse import unquote

import grpc
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"
#: The most field violations `str(EvalError)` spells out; the rest are counted ("and 3 more").
MAX_VIOLATIONS_SHOWN = 10


class FieldViolation(NamedTuple):
    """One BadRequest field violation: the field's path and why it is wrong. A field may have several."""

    field: str
    description: str


class FieldViolations(list[FieldViolation]):
    """Every BadRequest violation, in the server's order (a list of FieldViolation); it also answers by field,
    as the dict it was until 0.2 did (`"labels[x]" in v`, `v["labels[x]"]`, `v.get(...)`, `v.items()`), the
    last description of a field winning, so code written against the dict still works."""

    def _by_field(self) -> dict[str, str]:
        return {violation.field: violation.description for violation in self}

    def __contains__(self, item: object) -> bool:
        return item in self._by_field() if isinstance(item, str) else super().__contains__(item)

    def __getitem__(self, key: Any) -> Any:  # an index or slice of the list, or a field's description
        return self._by_field()[key] if isinstance(key, str) else super().__getitem__(key)

    def get(self, field: str, default: str | None = None) -> str | None:
        return self._by_field().get(field, default)

    def items(self) -> ItemsView[str, str]:
        return self._by_field().items()

    def keys(self) -> KeysView[str]:
        return self._by_field().keys()


def describe(
    code: grpc.StatusCode, message: str, reason: str, field_violations: list[FieldViolation], hint: str
) -> str:
    """An error's one-line text: what an uncaught traceback shows. It says why each field is wrong, not
    only which ("invalid request: graders[0].regex.pattern" left the reason in `.field_violations`)."""
    text = f"{code.name}: {message}" + (f" ({reason})" if reason else "")
    if field_violations:
        shown = [f"{path}: {why}" for path, why in field_violations[:MAX_VIOLATIONS_SHOWN]]
        if (hidden := len(field_violations) - len(shown)) > 0:
            shown.append(f"and {hidden} more")
        text += " - " + "; ".join(shown)
    return text + (f". {hint}" if hint else "")


class EvalError(Exception):
    """A failed evalsvc call: its gRPC code, message, ErrorInfo reason and metadata, and any rich details."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Iterable[tuple[str, str]] | Mapping[str, str] | None = None,
        retry_delay: float | None = None,
        hint: str = "",
        set_up_wrong: bool = False,
    ) -> None:
        pairs = field_violations.items() if isinstance(field_violations, Mapping) else field_violations or ()
        #: Every BadRequest violation in the server's order, (field, description); a field may appear more than
        #: once (a label key and its value both wrong: two for `labels[KEY]`).
        self.field_violations = FieldViolations(FieldViolation(*pair) for pair in pairs)
        super().__init__(describe(code, message, reason, self.field_violations, hint))
        self.code = code
        #: What to do about it, when the error is one a person fixes (a missing key, a server not running).
        self.hint = hint
        self.message = message
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.retry_delay = retry_delay
        #: The transport's words say the client is set up wrong for what answers (`set_up_wrong`): a retry
        #: alone will not help, so it is retried only briefly.
        self.set_up_wrong = set_up_wrong

    def with_hint(self, more: str) -> EvalError:
        """This error again (its class, code and details) with `more` after its hint: a client's note of how
        long it retried, which `str(error)` and evalctl's message then show."""
        return type(self)(
            self.code,
            self.message,
            reason=self.reason,
            metadata=self.metadata,
            field_violations=self.field_violations,
            retry_delay=self.retry_delay,
            hint=f"{self.hint}. {more}" if self.hint else more,
            set_up_wrong=self.set_up_wrong,
        )


class InvalidArgumentError(EvalError):
    """INVALID_ARGUMENT: `field_violations` lists each bad field and why; nothing was written."""


class UnauthenticatedError(EvalError):
    """UNAUTHENTICATED: no key, or a malformed, unknown, revoked or expired one."""


class NotFoundError(EvalError):
    """NOT_FOUND: no such run or dataset for this key's tenant."""


class AlreadyExistsError(EvalError):
    """ALREADY_EXISTS: a request_id reused for a different request; `metadata['run_id']` is the first run."""


class FailedPreconditionError(EvalError):
    """FAILED_PRECONDITION: e.g. cancelling a run that already finished."""


class OutOfRangeError(EvalError):
    """OUT_OF_RANGE: WatchRun's after_seq is beyond the run's last_seq (`metadata['last_seq']`)."""


class ResourceExhaustedError(EvalError):
    """RESOURCE_EXHAUSTED: a quota; `retry_delay` says how long to wait when waiting helps."""


class UnavailableError(EvalError):
    """UNAVAILABLE: the server is unreachable or shutting down."""


class DeadlineExceededError(EvalError):
    """DEADLINE_EXCEEDED: the call's deadline passed."""


_BY_CODE: dict[grpc.StatusCode, type[EvalError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def status_details(error: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status in an error's trailers (sync or aio), if the server sent one."""
    trailing = getattr(error, "trailing_metadata", None)
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


KEY_HINT = (
    "Give an API key (evalctl: --api-key or EVALSVC_API_KEY; SDK: api_key=... or EVALSVC_API_KEY): the server"
    " prints one at its first start, and `evalsvc keys create --tenant NAME --db URL` makes another in the"
    " server's database (URL: the server's --db or EVALSVC_DB; without --db a key goes into ./evalsvc.db of the"
    " directory it was made in, which that server never reads)"
)


def request_id_conflict_hint(metadata: dict[str, str]) -> str:
    """What to do about REQUEST_ID_CONFLICT: the request_id belongs to another request. The server names what
    that request made (`run_id`, `dataset_id`, ...: docs/errors.md), when it does."""
    made = next(
        ((key.removesuffix("_id"), value) for key, value in sorted(metadata.items()) if key.endswith("_id")), None
    )
    again = (
        f"or repeat exactly the request that made {made[0]} {made[1]} (evalctl: the same command, spec, labels"
        " and flags) to get it back"
        if made
        else "or repeat exactly the request that first used it to get what it made"
    )
    return f"A request_id names one request: give a new one for this request (evalctl: --request-id), {again}"


# How grpc says a connection was closed before any call (a TLS handshake that failed: a plaintext client at a
# TLS port, a client without the certificate mTLS asks for, or TLS to a plaintext port), as against
# "Connection refused" where nothing listens.
_HANDSHAKE_FAILED = re.compile(r"socket closed|handshake|ssl|certificate|tls", re.IGNORECASE)

# How grpc says a connection was reset as it was made (what answers accepted and dropped it: TLS not matching,
# as "Socket closed" is; a server restarting refuses instead). It comes between "Socket closed" failures.
_RESET_CONNECTING = re.compile(r"failed to connect.*connection reset", re.IGNORECASE | re.DOTALL)

# How grpc says the name of a target does not resolve (its words differ by version and resolver: "DNS
# resolution failed", "errors resolving HOST: ... Domain name not found").
_UNRESOLVED = re.compile(r"dns resolution failed|errors resolving|domain name not found", re.IGNORECASE)

# How grpc says the server's certificate is not for the name called ("Custom verification check failed with
# error: UNAUTHENTICATED: Hostname Verification Check failed."), which read as nothing answering.
_HOSTNAME_MISMATCH = re.compile(r"hostname verification|peer name", re.IGNORECASE)

# The address grpc tried last, in its words (`ipv6:%5B::1%5D:50051: ... Connection refused`): for a name with an
# address of each family (localhost), the other family's failure (TLS not matching at 127.0.0.1) goes unsaid.
_REFUSED_AT = re.compile(r"ipv[46]:(\S+?): [^;]*Connection refused", re.IGNORECASE)


# How grpc says an HTTP/1 server answered (the REST gateway's port, a web server): h11's 404 to the HTTP/2
# preface, or the bytes of an HTTP/1 reply where a SETTINGS frame should be.
_HTTP1_ANSWERED = re.compile(r"http1\.x server|Failed parsing HTTP/2|Expected SETTINGS frame", re.IGNORECASE)


# Schemes of web URLs, which grpc does not take as targets (grpc's own - dns, unix, xds, ipv4 - it does).
WEB_SCHEMES = frozenset({"http", "https", "grpc", "grpcs"})


def target_as_url_hint(target: str) -> str:
    """What to say of a target written as a web URL (`http://127.0.0.1:50051`); empty for HOST:PORT and for
    grpc's own target schemes (`dns:///host:port`, which spreads calls over replicas, `unix:///path`,
    `xds:///...`). grpc took a web URL for a host name ("Misformatted domain name"), and the hint said
    nothing answered there."""
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in WEB_SCHEMES:
        return ""
    address = rest.split("/", 1)[0] or "HOST:PORT"
    tls = " (and --tls for a TLS server)" if scheme.lower() == "https" else ""
    return (
        f"The target {target!r} is a URL; it is HOST:PORT of the gRPC port, without a scheme: {address}{tls}."
        " The REST gateway's http:// URL (port 8080 by default) is for curl, not for evalctl or the SDK"
    )


def _set_up_wrong_cause(code: grpc.StatusCode, reason: str, target: str, message: str) -> str | None:
    """What a transport's UNAVAILABLE (no ErrorInfo) says is wrong with how the client is set up for what
    answers: "url" (a URL for a target), "http1" (an HTTP/1 port), "hostname" (a certificate for another
    name), "unresolved" (a name that does not resolve), "handshake" (closed or reset before any call: TLS
    not matching); None otherwise (nothing answers yet: refused, a server restarting). The transport's words
    name the address too (`evalsvc-tls.internal:443` matched "tls"): it is left out of them."""
    if code != grpc.StatusCode.UNAVAILABLE or reason or not target:
        return None
    words = message.replace(target, " ")
    if target_as_url_hint(target):
        return "url"
    if _HTTP1_ANSWERED.search(message):
        return "http1"
    if _HOSTNAME_MISMATCH.search(words):
        return "hostname"
    if _UNRESOLVED.search(message):  # before the handshake: a name that does not resolve is none
        return "unresolved"
    if _HANDSHAKE_FAILED.search(words) or _RESET_CONNECTING.search(words):
        return "handshake"
    return None


def set_up_wrong(code: grpc.StatusCode, reason: str, target: str, message: str) -> bool:
    """Whether a transport's UNAVAILABLE says the client is set up wrong for what answers
    (`_set_up_wrong_cause`), rather than that nothing answers yet: such a call was retried for the whole
    retry bound (30 s of 'retrying' lines before the TLS hint)."""
    return _set_up_wrong_cause(code, reason, target, message) is not None


def hint_for(
    code: grpc.StatusCode,
    reason: str,
    target: str,
    message: str = "",
    *,
    tls: bool = False,
    metadata: dict[str, str] | None = None,
) -> str:
    """What a person can do about an error: a key to give, a server to start, TLS to use (`message`, the
    transport's words, tells a failed handshake from nothing listening, and an HTTP/1 server from both), a
    target to write without its URL scheme, a request_id to change. `tls`: the call went out with TLS;
    `metadata`: the ErrorInfo's. Empty for the rest."""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return KEY_HINT
    if reason == "REQUEST_ID_CONFLICT":
        return request_id_conflict_hint(metadata or {})
    cause = _set_up_wrong_cause(code, reason, target, message)
    if cause == "url":
        return target_as_url_hint(target)
    if cause == "http1":
        # evalctl said "Nothing answers" of the REST gateway, which had answered, in HTTP/1.
        return (
            f"Something answers at {target}, but in HTTP/1, not gRPC: most likely the REST gateway's port"
            " (8080 by default). --target HOST:PORT (EVALCTL_TARGET; SDK: the target) takes the gRPC port,"
            " 50051 by default: the server logs it as `evalsvc listening on HOST:PORT`"
        )
    if cause == "hostname":
        return (
            f"Something answers at {target} with TLS, but its certificate is not for the name called: call it by a"
            " name its certificate holds (--target), or give that name with --tls-server-name NAME (SDK:"
            " TLSOptions(server_name_override=...))"
        )
    if cause == "unresolved":
        return (
            f"The name in {target} does not resolve: check --target HOST:PORT (EVALCTL_TARGET; SDK: the target),"
            " or use the server's IP address"
        )
    if cause == "handshake":
        # evalctl said "is the server running?" of a running TLS server.
        return (
            f"Something answers at {target} but closed the connection before any call: most likely TLS does "
            "not match. A TLS server needs --tls or --ca-cert (SDK: tls=TLSOptions(...)), one that asks for "
            "client certificates (mTLS) also --client-cert and --client-key, a plaintext server none of them"
        )
    if code == grpc.StatusCode.UNAVAILABLE and not reason and target:
        # No ErrorInfo: the transport's UNAVAILABLE (nothing listening, refused, unresolvable), not a server's.
        hint = (
            f"Nothing answers at {target}: is the server running? `make run` starts one; "
            "--target HOST:PORT or EVALCTL_TARGET point evalctl elsewhere"
        )
        refused = _REFUSED_AT.search(message)
        if tls and refused and _is_name(target):
            # localhost: ::1 refused (the last address tried) where 127.0.0.1 may have failed TLS, unsaid.
            hint += (
                f". grpc names only the last address it tried ({unquote(refused.group(1))}); another address of"
                f" {target.rpartition(':')[0]} may answer but not match TLS: a --target by IP address shows its"
                " error, and --ca-cert, --client-cert/--client-key and --tls-server-name set TLS"
            )
        return hint
    return ""


def _is_name(target: str) -> bool:
    """Whether a HOST:PORT target's host is a name (which may have several addresses), not an IP address."""
    host = target.rpartition(":")[0].strip("[]") or target
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


def from_rpc_error(error: grpc.RpcError, target: str = "", *, tls: bool = False) -> EvalError:
    """The EvalError for a grpc error (sync `grpc.RpcError` or `grpc.aio.AioRpcError`); `target`, the address
    called, goes into the hint of a connection failure, as does `tls`, whether the call used TLS."""
    code_of = getattr(error, "code", None)
    details_of = getattr(error, "details", None)
    code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    message = (details_of() if callable(details_of) else None) or str(error)
    reason, metadata, delay = "", {}, None
    violations: list[FieldViolation] = []
    status = status_details(error)
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                delay = retry.retry_delay.ToTimedelta().total_seconds()
    cls = _BY_CODE.get(code, EvalError)
    return cls(
        code,
        message,
        reason=reason,
        metadata=metadata,
        field_violations=violations,
        retry_delay=delay,
        hint=hint_for(code, reason, target, message, tls=tls, metadata=metadata),
        set_up_wrong=set_up_wrong(code, reason, target, message),
    )
